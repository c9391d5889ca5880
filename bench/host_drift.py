"""Where the host time of an eager lowbit forward goes, and whether lowbit slows HF's own ops
(session 25's open question), measured in one process on a GPU.

    python bench/host_drift.py [--layers 32] [--tokens 16] [--batch 1] [--ladder ROUNDS] [--out DIR]

Without ``--ladder`` (stages): times, at each stage of one process, the host cost of a few small
CUDA ops in a tight loop (``micro``: us per call), a pure-Python loop (``py_us``), the number of
threads, and the wall time of the step loop's eager prompt (a static cache, reset before each
call) of a bf16 model built at the start. Stages: ``fresh`` (the bf16 model built), ``import``
(lowbit's Triton ops imported), ``quantized`` (a second model built and quantized to lowbit int4
g128, head included, not run), ``ran`` (that model's prompt run 20 times; its own time is reported
too), ``fused`` (``fuse_projections_`` on it), ``freed`` (it deleted, the allocator's cache
emptied). Then two experiments on the fused model rebuilt: ``stubbed`` (every ``nn.Linear`` and
``FusedLinear`` returns a preallocated output of its shape, in both models: what is left is HF's
code around the linears) and ``after`` (each model's prompt right after its own and right after
the other's). Session 26 (H100): the pure-Python loop's time moved 5.8-13.4 us between stages of
one process, so sequential blocks of samples do not compare; with the linears stubbed, both
models' prompts took the same time.

``--ladder ROUNDS``: bf16, lowbit int4 (every linear and the head) and the same fused
(``fuse_projections_``), one timed prompt per (model, level) per round in a new random order each
round, where a level cuts the quantized linear at one depth (``stubbed_below``; ``module`` cuts
the whole linear, in bf16 too); medians, and each one's median ratio to bf16's real forward of the
same round. ``real`` less a level is what the piece cut costs in a real forward (caches and branch
predictors as HF's code between the linears leaves them); ``op``, ``qlinear`` and ``module`` nest,
so their differences are the layers between them, while ``key``, ``buffers`` and ``launch`` each cut
one piece inside ``op``. Every model runs its real forward before the ladder (so the first plans'
bitwise checks never see a stubbed launch); the row records whether plans stayed on.

Writes ``<device>-host-drift.json`` (or ``-host-drift-ladder.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import e2e  # noqa: E402  (imports no lowbit)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # (the CPU: a dry run with --tiny)
sync = torch.cuda.synchronize if DEV.type == "cuda" else (lambda: None)


def log(*a):
    print(*a, flush=True)


def _median_us(fn, n: int, rounds: int) -> float:
    per = []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        per.append((time.perf_counter() - t0) / n)
    sync()
    return round(statistics.median(per) * 1e6, 2)


def micro(n: int = 300, rounds: int = 15) -> dict:
    """Host us per call of small CUDA ops in a tight loop (their GPU time is a few us: host-bound)."""
    a = torch.randn(1, 16, 4096, device=DEV, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    ops = {
        "mul": lambda: a * b,
        "add": lambda: a + b,
        "rsqrt": lambda: torch.rsqrt(a),
        "to_float": lambda: a.float(),
        "cat": lambda: torch.cat((a, b), -1),
        "transpose_contig": lambda: a.view(1, 16, 32, 128).transpose(1, 2).contiguous(),
        "empty": lambda: torch.empty(16, 4096, device=DEV, dtype=torch.bfloat16),
        "view": lambda: a.view(16, 4096),
    }
    out = {k: _median_us(f, n, rounds) for k, f in ops.items()}
    data = list(range(200))
    out["py_us"] = _median_us(lambda: sum(x * 3 for x in data if x & 1), 200, rounds)  # no torch at all
    return out


def threads() -> dict:
    with open("/proc/self/status") as f:
        native = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return {"native": native, "python": sorted(t.name for t in threading.enumerate())}


def prompt_ms(model, ids, n: int = 15, before=None, warm: int = 3) -> dict:
    """Median wall and returned (no sync) ms of the step loop's eager prompt; ``before``, if given,
    runs (synced) before each timed call."""
    cache = e2e.static_cache(model, ids.shape[0], ids.shape[1] + 256)
    pos = torch.arange(ids.shape[1], device=ids.device)
    wall, returned = [], []
    for i in range(n + warm):
        if before is not None:
            before()
        cache.reset()
        sync()
        t0 = time.perf_counter()
        model(ids, past_key_values=cache, cache_position=pos, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        sync()
        if i >= warm:
            returned.append(t1 - t0)
            wall.append(time.perf_counter() - t0)
    return {
        "wall_ms": round(statistics.median(wall) * 1e3, 3),
        "returned_ms": round(statistics.median(returned) * 1e3, 3),
    }


@contextlib.contextmanager
def stubbed_linears():
    """Every nn.Linear / FusedLinear forward, and the fused MLP's GLU kernel, returns a preallocated
    tensor of its output's shape (made on first use, so warm-up calls make them)."""
    import lowbit.fuse as fuse

    store: dict = {}

    def out_like(key, shape, like):
        t = store.get(key)
        if t is None or t.shape != shape:
            t = store[key] = torch.empty(shape, device=like.device, dtype=like.dtype)
        return t

    def linear(self, x):
        return out_like(id(self), (*x.shape[:-1], self.out_features), x)

    def glu(x, w):  # [..., K] -> [..., I] for a [gate; up] stack of 2 I rows
        return out_like(("glu", w.shape[0]), (*x.shape[:-1], w.shape[0] // 2), x)

    saved = [
        (torch.nn.Linear, "forward", torch.nn.Linear.forward),
        (fuse.FusedLinear, "forward", fuse.FusedLinear.forward),
        (fuse, "swiglu_linear", fuse.swiglu_linear),
    ]
    torch.nn.Linear.forward = linear
    fuse.FusedLinear.forward = linear
    fuse.swiglu_linear = glu
    try:
        yield
    finally:
        for owner, name, f in saved:
            setattr(owner, name, f)


@contextlib.contextmanager
def stubbed_below(level: str):
    """One piece of lowbit's int4 linear cut out (each learns its result from one real call per
    weight and input shape, then returns it):

    * ``qlinear``: ``Int4Tensor.linear`` returns an output: left are the module, F.linear's
      ``__torch_function__`` and the QTensor's wrapper;
    * ``op``: the int4 matmul op (``ops/triton/int4.int4_mm``): the same, and ``Int4Tensor.linear``;
    * ``launch``: the kept plan's Triton launch (``LaunchPlan.__call__``) does nothing;
    * ``buffers``: the split-K workspace and counters (``_utils.split_k_buffers``) come from a cache;
    * ``key``: the plan key (``int4._plan_key``) comes from a cache by weight and input shape;
    * ``fresh_ws``: (not a cut) each split-K launch gets a new workspace from ``torch.empty``, as
      before session 26's kept per-stream workspace.

    ``buffers`` and ``fresh_ws`` patch ``_utils.split_k_buffers``, which the plans' launches call
    (the launchers' bodies hold their own reference): they act on planned launches only."""
    from lowbit.ops.triton import _utils
    from lowbit.ops.triton import int4 as triton_int4
    from lowbit.qtensor.int4 import Int4Tensor

    store: dict = {}
    triton_cdiv = _utils.triton.cdiv

    def cached(real, key_of):
        def f(*args):
            key = key_of(*args)
            t = store.get(key)
            if t is None:
                t = store[key] = real(*args)
            return t

        return f

    owner, name = {
        "qlinear": (Int4Tensor, "linear"),
        "op": (triton_int4, "int4_mm"),
        "launch": (_utils.LaunchPlan, "__call__"),
        "buffers": (_utils, "split_k_buffers"),
        "key": (triton_int4, "_plan_key"),
        "fresh_ws": (_utils, "split_k_buffers"),
    }[level]
    real = getattr(owner, name)
    new = {
        "qlinear": lambda: cached(real, lambda w, x: (id(w), x.shape[0])),
        "op": lambda: cached(real, lambda x, qdata, *rest: (qdata.data_ptr(), x.shape[0])),
        "launch": lambda: lambda *a, **k: None,
        "buffers": lambda: cached(real, lambda device, m, n, most, stream=None: (device, m, n, most, stream)),
        "key": lambda: cached(real, lambda x, qdata, *rest: (qdata.data_ptr(), x.shape, x.data_ptr() % 16)),
        "fresh_ws": lambda: (
            lambda device, m, n, most, stream=None: (
                real(device, m, n, most, stream)
                if most == 1
                else (
                    torch.empty((most, m, n), device=device, dtype=torch.float32),
                    _utils.tile_counters(device, triton_cdiv(m, 16) * triton_cdiv(n, 16)),
                )
            )
        ),
    }[level]()
    setattr(owner, name, new)
    try:
        yield
    finally:
        setattr(owner, name, real)


def ladder(models: dict, ids, rounds: int) -> dict:
    """One timed prompt per (model, stub level) per round, in a new random order each round (the
    host's speed drifts up to 2x within a process: only interleaved samples compare); medians, and
    each configuration's median ratio to bf16's real forward of the same round."""
    import random

    stubs = {
        "real": contextlib.nullcontext,
        **{
            level: (lambda level=level: stubbed_below(level))
            for level in ("fresh_ws", "key", "buffers", "launch", "op", "qlinear")
        },
        "module": stubbed_linears,
    }
    for model in models.values():  # (plans made and checked with real launches)
        prompt_ms(model, ids, n=1)
    configs = [(m, s) for m in models for s in stubs if m == "bf16" and s in ("real", "module") or m != "bf16"]
    times = {f"{m}/{s}": [] for m, s in configs}
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(configs)
        for m, s in configs:
            with stubs[s]():
                prompt_ms(models[m], ids, n=1)  # (its warm-up calls make the stubs' outputs)
                times[f"{m}/{s}"].append(prompt_ms(models[m], ids, n=1, warm=0)["wall_ms"])
    base = times["bf16/real"]
    from lowbit.ops.triton import _utils

    out = {
        k: {
            "median_ms": round(statistics.median(v), 3),
            "ratio_to_bf16": round(statistics.median(t / b for t, b in zip(v, base)), 3),
        }
        for k, v in times.items()
    }
    return {"plans_on": _utils.PLANS, **out}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=1, help="prompts per call (batch 8 x 16 tokens: the b8 loop's prompt)")
    p.add_argument("--tiny", action="store_true", help="e2e's tiny model (a dry run)")
    p.add_argument(
        "--ladder",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead: bf16, lowbit int4 fused and unfused, with the linears cut at each level "
        "(real, fresh_ws, key, buffers, launch, op, qlinear, module; see stubbed_below), interleaved over "
        "ROUNDS rounds",
    )
    a = p.parse_args()
    info = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "cpus": os.cpu_count(),
    }
    log(json.dumps(info))
    args = argparse.Namespace(tiny=a.tiny, layers=a.layers)
    dev = DEV
    ids = torch.randint(
        1, 500 if a.tiny else 128000, (a.batch, a.tokens), generator=torch.Generator().manual_seed(0)
    ).to(dev)
    rows = []

    def stage(name, q=None):
        gc.collect()
        with torch.inference_mode():
            row = {"stage": name, "lowbit_loaded": "lowbit" in sys.modules, **micro(), "threads": threads()}
            row["bf16"] = prompt_ms(bf16, ids)
            if q is not None:
                row["lowbit"] = prompt_ms(q, ids)
        rows.append(row)
        log(json.dumps(row))

    def fuse(model):  # (int4's CPU packings cannot be fused: the dry run runs them unfused)
        if DEV.type == "cuda":
            lowbit.fuse_projections_(model)

    bf16 = e2e.build_model(args, dev)
    if a.ladder:
        import lowbit

        fused, plain = e2e.build_model(args, dev), e2e.build_model(args, dev)
        for m in (fused, plain):
            e2e.quantize(m, "lowbit_int4", 128, with_head=True)
        fuse(fused)
        with torch.inference_mode():
            row = {"stage": "ladder", "rounds": a.ladder}
            row.update(ladder({"bf16": bf16, "lowbit_fused": fused, "lowbit": plain}, ids, a.ladder))
        rows.append(row)
        log(json.dumps(row))
        return write(a.out, info, rows)
    stage("fresh")
    import lowbit
    import lowbit.ops.triton.int4  # noqa: F401

    stage("import")
    q = e2e.build_model(args, dev)
    e2e.quantize(q, "lowbit_int4", 128, with_head=True)
    stage("quantized")
    with torch.inference_mode():
        for _ in range(20):
            prompt_ms(q, ids, n=1)
    stage("ran", q)
    fuse(q)
    with torch.inference_mode():
        prompt_ms(q, ids, n=5)
    stage("fused", q)
    del q
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    stage("freed")

    q = e2e.build_model(args, dev)
    e2e.quantize(q, "lowbit_int4", 128, with_head=True)
    fuse(q)
    plain = e2e.build_model(args, dev)  # lowbit int4 unfused, for the stubbed comparison
    e2e.quantize(plain, "lowbit_int4", 128, with_head=True)
    with torch.inference_mode():
        exp = {"stage": "stubbed"}
        for rep in range(2):  # twice, in both orders
            for label, m in (("bf16", bf16), ("lowbit_fused", q), ("lowbit", plain))[:: 1 if rep == 0 else -1]:
                with stubbed_linears():
                    exp.setdefault(label, []).append(prompt_ms(m, ids))
                exp.setdefault(label + "_real", []).append(prompt_ms(m, ids))
        rows.append(exp)
        log(json.dumps(exp))
        cache_q = e2e.static_cache(q, 1, a.tokens + 256)
        pos = torch.arange(a.tokens, device=dev)

        def run_q():
            cache_q.reset()
            q(ids, past_key_values=cache_q, cache_position=pos, use_cache=True, logits_to_keep=1)
            sync()

        cache_b = e2e.static_cache(bf16, 1, a.tokens + 256)

        def run_b():
            cache_b.reset()
            bf16(ids, past_key_values=cache_b, cache_position=pos, use_cache=True, logits_to_keep=1)
            sync()

        exp = {"stage": "after"}
        for _ in range(3):
            exp.setdefault("bf16_after_bf16", []).append(prompt_ms(bf16, ids, before=run_b))
            exp.setdefault("bf16_after_lowbit", []).append(prompt_ms(bf16, ids, before=run_q))
            exp.setdefault("lowbit_after_bf16", []).append(prompt_ms(q, ids, before=run_b))
            exp.setdefault("lowbit_after_lowbit", []).append(prompt_ms(q, ids, before=run_q))
        rows.append(exp)
        log(json.dumps(exp))
    write(a.out, info, rows)


def write(out: str, info: dict, rows: list):
    os.makedirs(out, exist_ok=True)
    tag = "".join(c if c.isalnum() else "_" for c in info["gpu"]).lower()
    tag = next((t.lower() for t in ("H100", "H200") if t in info["gpu"]), tag)
    with open(os.path.join(out, f"{tag}-host-drift{'-ladder' if rows[0]['stage'] == 'ladder' else ''}.json"), "w") as f:
        json.dump({"env": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
