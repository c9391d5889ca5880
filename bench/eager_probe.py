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
"""

from __future__ import annotations

import argparse
import cProfile
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


def measure(model, ids, cycles: float, profile: bool) -> dict:
    def fwd():
        return model(ids, use_cache=False, logits_to_keep=1)

    for _ in range(3):
        fwd()
    torch.cuda.synchronize()
    wall, issue, gpu = [], [], []
    for _ in range(10):
        t0 = time.perf_counter()
        fwd()
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    for _ in range(10):
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
        k: round(statistics.median(v) * 1e3, 3) for k, v in (("wall_ms", wall), ("issue_ms", issue), ("gpu_ms", gpu))
    }
    if profile:
        torch.cuda.synchronize()
        torch.cuda._sleep(int(0.5 * cycles))
        prof = cProfile.Profile()
        prof.enable()
        fwd()
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
        row["profile"] = buf.getvalue()
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
        res["autotuner launch"] = per_call_us(lambda: kern[grid](*a, **kw))
        if best is not None:
            tuned = {**kw, **best.all_kwargs()}
            g = grid(tuned) if callable(grid) else grid
            res["JITFunction launch"] = per_call_us(lambda: kern.fn[g](*a, **tuned))
            res["config"] = str(best)
    return res


def pieces() -> list[dict]:
    import lowbit

    lin = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
    w_bf16 = lin.weight.detach().clone()
    lowbit.quantize_(lin, lowbit.int4_weight_only(128))
    rows = []
    for m in (1, 16):
        rows.append(_pieces_at(m, w_bf16, lin.weight))
        log(json.dumps(rows[-1]))
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
        with torch.inference_mode():
            for shp in a.shapes.split(","):
                b, t = (int(v) for v in shp.split("x"))
                ids = torch.randint(1, 128000, (b, t), generator=gen).cuda()
                row = dict(
                    variant=variant, layers=a.layers, batch=b, tokens=t, **measure(model, ids, cycles, a.profile)
                )
                if a.kernels:
                    row["kernels"] = profile_forward(model, ids, torch.device("cuda"), rows=20)
                    log(f"{variant} {shp} top ops by GPU time:\n{row['kernels']}")
                rows.append(row)
                log(json.dumps({k: v for k, v in row.items() if k not in ("profile", "kernels")}))
                if "profile" in row:
                    log(f"{variant} {shp} cProfile of one issued forward:\n{row['profile']}")
        del model
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{device_tag()}-eager-probe.json"), "w") as f:
        json.dump({"env": info, "command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
