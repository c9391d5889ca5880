"""Host and GPU time of one eager forward (a prompt, as ``generate`` and ``e2e.py``'s step loop
run it), bf16 against lowbit int4, on a Llama-3-8B-shaped model cut to ``--layers`` layers.

    python bench/eager_probe.py [--layers 4] [--shapes 1x16,8x16,1x2048] [--variants ...] [--out DIR]

Per variant and input shape (batch x tokens; ``use_cache=False``, logits of the last position):

* ``wall_ms``: one forward with a sync, median of 10;
* ``issue_ms``: the host's time to issue one forward while the GPU sleeps (no sync), median of 10;
* ``gpu_ms``: the forward's GPU time with the host issuing ahead (events after a GPU sleep), median.

When ``issue_ms`` is above ``gpu_ms`` the eager forward is host-bound. A forward that waits for
the GPU part-way reads the sleep in both (on the H100 runs of session 24 Transformers' mask
code did, with ``use_cache=False``: ~280 ms); then only ``wall_ms`` means anything. ``--profile`` adds a
cProfile of one issued forward per (variant, shape), top 30 by own time; ``--kernels`` the top
ops of one forward by GPU time (``e2e_profile.profile_forward``). ``--pieces``: instead,
the host cost of one eager int4 linear (4096 x 4096, M = 1 and 16) layer by layer: bf16
``F.linear``; ``F.linear`` on the QTensor; the ``lowbit::int4_mm_triton`` op; the Triton autotuner's
launch with the launcher's recorded arguments; the tuned config's ``JITFunction`` launch; with
the launch plans (``_utils.LaunchPlan``) and the direct op calls (``lowbit.compile``) on and off. Variants:
``bf16``, ``lowbit_int4`` (every linear and the head), ``lowbit_int4_fused`` (the same after
``lowbit.fuse_projections_``). Writes ``<device>-eager-probe.json``.

``--prompt``: the step loop's prompt call instead (``e2e.step_loop_decode``: a static cache, reset
before each call, and ``cache_position``); its rows add ``returned_ms`` (until the forward returned,
no sync), ``layer_host_ms`` (host time per decoder layer, from pre-hooks), ``linears_host_ms`` (host
time inside the ``nn.Linear`` / ``FusedLinear`` forwards, per forward), ``gpu_busy_ms`` (the sum of
the forward's kernel times, profiled) and ``gc_per_10`` (Python's GC passes in the 10 timed
forwards; ``--gc`` freezes or disables it); with ``--profile`` also the host time by op.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import e2e  # noqa: E402
import op_overhead  # noqa: E402
from e2e_profile import profile_forward, sleep_cycles_per_s  # noqa: E402
from kernels import device_tag, env, log  # noqa: E402


def measure(model, ids, cycles: float, profile: bool, prompt: bool = False) -> dict:
    if prompt:  # the step loop's prompt: a static cache, as e2e.step_loop_decode runs it
        cache = e2e.static_cache(model, ids.shape[0], ids.shape[1] + 256)
        pos = torch.arange(ids.shape[1], device=ids.device)

        def fwd():
            return model(ids, past_key_values=cache, cache_position=pos, use_cache=True, logits_to_keep=1)

        def prep():  # (the cache counts the tokens it was given: without a reset the 17th call overflows)
            cache.reset()
            torch.cuda.synchronize()

    else:

        def fwd():
            return model(ids, use_cache=False, logits_to_keep=1)

        def prep():
            pass

    for _ in range(3):
        prep()
        fwd()
    torch.cuda.synchronize()
    wall, issue, gpu = [], [], []
    gc_before = [g["collections"] for g in gc.get_stats()]
    returned, layer_host = [], []
    layers = model.model.layers
    stamps: list[float] = []
    hooks = (
        [m.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter())) for m in layers] if prompt else []
    )
    for _ in range(10):
        stamps.clear()
        prep()
        t0 = time.perf_counter()
        fwd()
        returned.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
        if len(stamps) > 1:  # host time per decoder layer (from one layer's start to the next's)
            layer_host.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    for h in hooks:
        h.remove()
    gc_runs = [g["collections"] - b for g, b in zip(gc.get_stats(), gc_before)]  # per generation, 10 forwards
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    for _ in range(10):
        prep()
        torch.cuda.synchronize()
        torch.cuda._sleep(int(0.3 * cycles))  # 300 ms: the host issues the forward well ahead
        ev[0].record()
        t0 = time.perf_counter()
        fwd()
        issue.append(time.perf_counter() - t0)
        ev[1].record()
        ev[1].synchronize()
        gpu.append(ev[0].elapsed_time(ev[1]) / 1e3)
    row = {
        k: round(statistics.median(v) * 1e3, 3)
        for k, v in (("wall_ms", wall), ("issue_ms", issue), ("gpu_ms", gpu))
        if v
    }
    if prompt:
        # until the forward returned (no sync; the GPU was idle at its start) and per decoder layer:
        # when these are close to wall_ms the forward is bound by host work
        row["returned_ms"] = round(statistics.median(returned) * 1e3, 3)
        row["layer_host_ms"] = round(statistics.median(layer_host) * 1e3, 3)
        row["gc_per_10"] = gc_runs  # Python's cyclic collections during the 10 timed forwards (gen 0, 1, 2)
    if prompt:  # host time inside the linears' forwards (nn.Linear and lowbit's FusedLinear), per forward
        classes = [torch.nn.Linear] + [c for c in (getattr(sys.modules.get("lowbit.fuse"), "FusedLinear", None),) if c]
        spent = [0.0]

        def timed(orig):
            def forward(self, x):
                t = time.perf_counter()
                out = orig(self, x)
                spent[0] += time.perf_counter() - t
                return out

            return forward

        saved = [c.__dict__["forward"] for c in classes]
        for c, f in zip(classes, saved):
            c.forward = timed(f)
        try:
            for _ in range(10):
                prep()
                fwd()
                torch.cuda.synchronize()
        finally:
            for c, f in zip(classes, saved):
                c.forward = f
        row["linears_host_ms"] = round(spent[0] / 10 * 1e3, 3)
    if prompt:  # GPU busy time of one forward: the sum of its kernels' times (profiled)
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        prep()
        with tprofile(activities=[ProfilerActivity.CUDA]) as tp:
            fwd()
            torch.cuda.synchronize()
        row["gpu_busy_ms"] = round(sum(e.self_device_time_total for e in tp.key_averages()) / 1e3, 3)
    if profile:
        prep()
        torch.cuda.synchronize()
        torch.cuda._sleep(int(0.5 * cycles))
        prof = cProfile.Profile()
        prof.enable()
        fwd()
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(40)
        row["profile"] = buf.getvalue()
        if prompt:  # host time by op (the profiler's own cost per op included), one forward
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as tprofile

            prep()
            with tprofile(activities=[ProfilerActivity.CPU]) as tp:
                fwd()
            torch.cuda.synchronize()
            row["ops"] = tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50)
            row["op_calls"] = sum(e.count for e in tp.key_averages())
    return row


def per_call_us(fn) -> float:
    return round(min(op_overhead.per_call_us(fn, 2000) for _ in range(3)), 1)  # best of 3 rounds


def _pieces_at(m: int, w_bf16, w) -> dict:
    import torch.nn.functional as F

    from lowbit.ops.triton import int4 as int4_mod

    kern = int4_mod._gemm_kernel
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    seen = {}

    class Rec:  # records the launcher's grid and arguments, then launches as usual
        def __getitem__(self, grid):
            def call(*a, **kw):
                seen.update(grid=grid, a=a, kw=kw)
                out = kern[grid](*a, **kw)
                seen["best"] = getattr(kern, "best_config", None)
                return out

            return call

    F.linear(x, w)
    from lowbit.ops.triton import _utils

    int4_mod._gemm_kernel, _utils.PLANS = Rec(), False  # (the recorded call goes through Triton)
    try:
        F.linear(x, w)
    finally:
        int4_mod._gemm_kernel, _utils.PLANS = kern, True
    grid, a, kw, best = seen["grid"], seen["a"], seen["kw"], seen["best"]
    res = dict(M=m, K=4096, N=4096)
    import lowbit.compile

    def linear_with(direct: bool, plans: bool):
        lowbit.compile.DIRECT, _utils.PLANS = direct, plans
        try:
            F.linear(x, w)  # (makes the plan)
            return per_call_us(lambda: F.linear(x, w))
        finally:
            lowbit.compile.DIRECT, _utils.PLANS = True, True

    with torch.no_grad():
        res["bf16 F.linear"] = per_call_us(lambda: F.linear(x, w_bf16))
        res["QTensor F.linear"] = per_call_us(lambda: F.linear(x, w))
        res["QTensor F.linear, no launch plans"] = linear_with(True, False)
        res["QTensor F.linear, dispatcher, no launch plans"] = linear_with(False, False)
        res["lowbit op (dispatcher)"] = per_call_us(
            lambda: int4_mod.int4_mm.op(x, w.qdata, w.scale, w.zero, 128, w.packing)
        )
        res["lowbit op (direct)"] = per_call_us(lambda: int4_mod.int4_mm(x, w.qdata, w.scale, w.zero, 128, w.packing))
        res.update(_plan_path_pieces(x, w))
        res["autotuner launch"] = per_call_us(lambda: kern[grid](*a, **kw))
        if best is not None:
            tuned = {**kw, **best.all_kwargs()}
            g = grid(tuned) if callable(grid) else grid
            res["JITFunction launch"] = per_call_us(lambda: kern.fn[g](*a, **tuned))
            res["config"] = str(best)
    return res


def _plan_path_pieces(x, w) -> dict:
    """The launch-plan path of one int4 GEMM call, step by step (host us per call)."""
    from lowbit.ops.triton import _int4_gemv, _utils
    from lowbit.ops.triton import int4 as int4_mod

    op = int4_mod.int4_mm
    args = (x, w.qdata, w.scale, w.zero, 128, w.packing)
    m, n = x.shape[0], w.qdata.shape[0]
    plan = int4_mod._PLANS.get(int4_mod._plan_key(*args))
    if plan is None:
        return {"plan path": "no plan for this key"}
    most = plan.extra["most"]
    y = x.new_empty((m, n))
    ws, cnt = _utils.split_k_buffers(x.device, m, n, most)
    launch, stream = plan.launch, torch._C._cuda_getCurrentRawStream(x.get_device())
    return {
        "launcher run() (its lane)": per_call_us(lambda: op.__wrapped__(*args)),
        "int4_mm body (checks, plan)": per_call_us(lambda: op.__wrapped__.__wrapped__(*args)),
        "check_int4_args": per_call_us(lambda: _int4_gemv.check_int4_args("int4_mm", *args)),
        "plan key": per_call_us(lambda: int4_mod._plan_key(*args)),
        "x.new_empty(M, N)": per_call_us(lambda: x.new_empty((m, n))),
        f"split_k_buffers (most {most})": per_call_us(lambda: _utils.split_k_buffers(x.device, m, n, most)),
        "plan(x, y, ws, cnt)": per_call_us(lambda: plan(x, y, ws, cnt)),
        "plan.launch(..., stream)": per_call_us(
            lambda: launch(x, *plan.weights, y, ws, cnt, *plan.tail, stream=stream)
        ),
    }


def pieces() -> list[dict]:
    import lowbit

    lin = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
    w_bf16 = lin.weight.detach().clone()
    lowbit.quantize_(lin, lowbit.int4_weight_only(128))
    rows = []
    for m in (1, 16):
        rows.append(_pieces_at(m, w_bf16, lin.weight))
        log(json.dumps(rows[-1]))
    import torch.nn.functional as F

    schemes = {  # the other schemes' eager linears, for comparison
        "int8 weight-only": lowbit.int8_weight_only,
        "W8A8 int8": lowbit.int8_dynamic_activation_int8_weight,
        "fp8 W8A8": lowbit.float8_dynamic_activation_float8_weight,
    }
    for label, config in schemes.items():
        other = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
        lowbit.quantize_(other, config())
        row = dict(scheme=label)
        with torch.no_grad():
            for m in (1, 16):
                x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
                row[f"QTensor F.linear M={m}"] = per_call_us(lambda: F.linear(x, other.weight))  # noqa: B023
        rows.append(row)
        log(json.dumps(row))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--shapes", default="1x16,8x16,1x2048", help="batch x tokens list")
    p.add_argument("--variants", default="bf16,lowbit_int4,lowbit_int4_fused")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--pieces", action="store_true")
    p.add_argument("--kernels", action="store_true", help="also the top ops by GPU time of one forward per shape")
    p.add_argument(
        "--prompt",
        action="store_true",
        help="time the step loop's prompt call (a static cache and cache_position, as e2e.py runs it) "
        "instead of a use_cache=False forward; with --profile also the host time by op",
    )
    p.add_argument(
        "--gc",
        choices=("on", "freeze", "off"),
        default="on",
        help="Python's cyclic garbage collector while timing: as is, with every object made before the "
        "forwards frozen out of its passes (gc.freeze), or off",
    )
    a = p.parse_args()
    info = env()
    log(json.dumps(info))
    if a.pieces:
        with open(os.path.join(a.out, f"{device_tag()}-eager-pieces.json"), "w") as f:
            json.dump({"env": info, "command": " ".join(sys.argv), "rows": pieces()}, f, indent=1)
        return
    cycles = sleep_cycles_per_s()
    args = argparse.Namespace(tiny=False, layers=a.layers)
    rows = []
    for variant in a.variants.split(","):
        model = e2e.build_model(args, torch.device("cuda"))
        base = variant.removesuffix("_fused")
        e2e.quantize(model, base, 128, with_head=True)
        if variant.endswith("_fused"):
            import lowbit

            lowbit.fuse_projections_(model)
        gen = torch.Generator().manual_seed(0)
        gc.collect()
        if a.gc == "freeze":
            gc.freeze()
        elif a.gc == "off":
            gc.disable()
        with torch.inference_mode():
            for shp in a.shapes.split(","):
                b, t = (int(v) for v in shp.split("x"))
                ids = torch.randint(1, 128000, (b, t), generator=gen).cuda()
                row = dict(
                    variant=variant,
                    layers=a.layers,
                    batch=b,
                    tokens=t,
                    gc=a.gc,
                    **measure(model, ids, cycles, a.profile, a.prompt),
                )
                if a.kernels:
                    row["kernels"] = profile_forward(model, ids, torch.device("cuda"), rows=20)
                    log(f"{variant} {shp} top ops by GPU time:\n{row['kernels']}")
                rows.append(row)
                log(json.dumps({k: v for k, v in row.items() if k not in ("profile", "kernels", "ops")}))
                if "profile" in row:
                    log(f"{variant} {shp} cProfile of one issued forward:\n{row['profile']}")
                if "ops" in row:
                    log(f"{variant} {shp} host time by op ({row['op_calls']} op calls):\n{row['ops']}")
        gc.unfreeze()
        gc.enable()
        del model
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{device_tag()}-eager-probe.json"), "w") as f:
        json.dump({"env": info, "command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
