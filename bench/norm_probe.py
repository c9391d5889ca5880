"""The int4 GEMV with the residual add and RMSNorm in its epilogue against the GEMV followed by
Inductor's add + RMSNorm kernel, and the GEMV alone (M = 1..8, Llama-3-8B's o_proj and down_proj
shapes), each timed as a chain over a stack of distinct layers (> L2) captured in one CUDA graph.

    python bench/norm_probe.py [--layers 32] [--ms 1,8] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lowbit  # noqa: E402
from lowbit.ops import reference as ref  # noqa: E402
from lowbit.ops.triton._int4_gemv import int4_mm_add_rmsnorm  # noqa: E402
from lowbit.ops.triton.int4 import int4_mm  # noqa: E402


def graph_time(fn, reps: int = 20) -> float:
    """Median us per replay of a CUDA graph of ``fn``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--ms", default="1,2,4,8")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev, dt, eps = torch.device("cuda"), torch.bfloat16, 1e-5
    norm = torch.compile(lambda y, r, w: ref.add_rmsnorm(y, r, w, eps))
    rows = []
    for k, n in ((4096, 4096), (14336, 4096)):
        ws = [
            lowbit.Int4Tensor.from_float((torch.randn(n, k, device=dev) * 0.02).to(dt), group_size=128)
            for _ in range(args.layers)
        ]
        nws = [(torch.rand(n, device=dev) + 0.5).to(dt) for _ in range(args.layers)]
        for m in (int(v) for v in args.ms.split(",")):
            xs = [torch.randn(m, k, device=dev, dtype=dt) for _ in range(args.layers)]
            res = torch.randn(m, n, device=dev, dtype=dt)

            def alone(ws=ws, xs=xs):
                for w, x in zip(ws, xs):
                    int4_mm(x, w.qdata, w.scale, w.zero, 128, w.packing)

            def unfused(ws=ws, xs=xs, nws=nws, res=res):
                r = res
                for w, x, nw in zip(ws, xs, nws):
                    r, _ = norm(int4_mm(x, w.qdata, w.scale, w.zero, 128, w.packing), r, nw)

            def fused(ws=ws, xs=xs, nws=nws, res=res):
                r = res
                for w, x, nw in zip(ws, xs, nws):
                    r, _ = int4_mm_add_rmsnorm(x, w.qdata, w.scale, w.zero, 128, r, nw, eps, w.packing)

            w, x, nw = ws[0], xs[0], nws[0]
            want = ref.add_rmsnorm(int4_mm(x, w.qdata, w.scale, w.zero, 128, w.packing), res, nw, eps)
            got = int4_mm_add_rmsnorm(x, w.qdata, w.scale, w.zero, 128, res, nw, eps, w.packing)
            err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, want))
            row = dict(k=k, n=n, m=m, max_abs_diff=err)
            for name, fn in (("gemv_us", alone), ("gemv_then_norm_us", unfused), ("fused_us", fused)):
                row[name] = round(graph_time(fn) / args.layers, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
