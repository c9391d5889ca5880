"""Host (CPU) cost of one eager quantized linear on a GPU, per scheme, one GPU command.

    python bench/op_overhead.py [--out DIR] [--calls 2000] [--m 2048] [--k 256] [--n 256]

Eager prefill (Transformers runs it uncompiled) launches every linear from Python, so
a scheme whose per-call host work exceeds its GPU time turns a GPU-bound forward
CPU-bound. Each row times ``calls`` back-to-back ``F.linear(x, layer.weight)`` on a
layer small enough (K x N) that the GPU finishes each call before the host issues the
next: wall time per call = host cost. Also times pieces of the fp8 / W8A8 paths alone
(the activation quantizer's launch, ``torch._scaled_mm``) and prints a cProfile of
the fp8 path. Host timings move by up to +-50% between machines and with the order of the
rows; compare rows of one run only. Writes ``<device>-op-overhead.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import device_tag, env, log  # noqa: E402

import lowbit  # noqa: E402
from lowbit.ops.reference import FP8_DTYPE  # noqa: E402
from lowbit.ops.triton import _w8 as w8_mod  # noqa: E402
from lowbit.ops.triton import fp8 as fp8_mod  # noqa: E402
from lowbit.ops.triton.quant import quantize_rows  # noqa: E402


def per_call_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--n", type=int, default=256)
    args = p.parse_args()
    info = env()
    log(json.dumps(info))
    torch.manual_seed(0)
    x = torch.randn(args.m, args.k, device="cuda", dtype=torch.bfloat16)
    rows = []

    def add(name, fn):
        with torch.no_grad():
            us = min(per_call_us(fn, args.calls) for _ in range(3))  # best of 3 rounds
        rows.append({"op": name, "us_per_call": round(us, 1)})
        log(f"{name}: {us:.1f} us/call")

    configs = {
        "int4 g128": lowbit.int4_weight_only(128),
        "int8 weight-only": lowbit.int8_weight_only(),
        "W8A8 int8": lowbit.int8_dynamic_activation_int8_weight(),
        "fp8": lowbit.float8_dynamic_activation_float8_weight(),
    }
    w_bf16 = torch.randn(args.n, args.k, device="cuda", dtype=torch.bfloat16)
    add("bf16 F.linear", lambda: F.linear(x, w_bf16))
    layers = {}
    for name, config in configs.items():
        lin = torch.nn.Sequential(torch.nn.Linear(args.k, args.n, bias=False, device="cuda", dtype=torch.bfloat16))
        lowbit.quantize_(lin, config)
        layers[name] = lin[0].weight
        add(f"{name} F.linear (QTensor)", lambda w=lin[0].weight: F.linear(x, w))
    add("quantize_rows fp8 (one Triton launch)", lambda: quantize_rows(x, FP8_DTYPE))
    add("quantize_rows int8 (one Triton launch)", lambda: quantize_rows(x, torch.int8))
    xq, xs = quantize_rows(x, FP8_DTYPE)
    wq = torch.randn(args.n, args.k, device="cuda").to(FP8_DTYPE)
    ws = torch.rand(args.n, device="cuda") + 0.5
    add(
        "torch._scaled_mm row-wise alone",
        lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs[:, None], scale_b=ws[None, :], out_dtype=torch.bfloat16),
    )
    add("fp8 TMA GEMM alone (w8_mm)", lambda: w8_mod.w8_mm(xq, wq, ws, xs, torch.bfloat16))
    saved = fp8_mod.SCALED_MM_MIN_M
    fp8_mod.SCALED_MM_MIN_M = 1 << 30
    add("fp8 F.linear (QTensor), TMA GEMM instead of _scaled_mm", lambda: F.linear(x, layers["fp8"]))
    fp8_mod.SCALED_MM_MIN_M = saved
    add("torch.cuda.get_device_capability", lambda: torch.cuda.get_device_capability(x.device))
    from lowbit.ops.triton import quant as quant_mod
    from lowbit.ops.triton.fp8 import fp8_dyn_mm
    from lowbit.ops.triton.int8 import int8_dyn_mm, int8_mm

    w8 = layers["W8A8 int8"]
    add("int8_dyn_mm op direct (no QTensor)", lambda: int8_dyn_mm(x, w8.qdata, w8.scale))
    xq8, xs8 = quantize_rows(x, torch.int8)
    add("W8A8 GEMM alone (w8_mm, autotuned launch)", lambda: w8_mod.w8_mm(xq8, w8.qdata, w8.scale, xs8, torch.bfloat16))
    wo = layers["int8 weight-only"]
    add("int8_mm op direct (W8A16, chunked dequant + mm)", lambda: int8_mm(x, wo.qdata, wo.scale))
    f8 = layers["fp8"]
    add("fp8_dyn_mm op direct (no QTensor)", lambda: fp8_dyn_mm(x, f8.qdata, f8.scale))
    # the quantizer's kernel alone through Triton's JIT launch (no torch.empty, no checks)
    q = torch.empty(args.m, args.k, device="cuda", dtype=torch.int8)
    s_ = torch.empty(args.m, device="cuda")
    const = dict(QMAX=127.0, IS_INT=True, EPS=2.0**-20, BLOCK_K=256, ONE_PASS=True, num_warps=4, PDL=0)
    add(
        "quantizer kernel via JIT launch",
        lambda: quant_mod._kernel[(args.m,)](x, q, s_, args.k, args.k, args.k, **const),
    )

    prof = cProfile.Profile()
    with torch.no_grad():
        prof.enable()
        for _ in range(500):
            F.linear(x, layers["fp8"])
        prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(30)
    log(s.getvalue())

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{device_tag()}-op-overhead")
    with open(stem + ".json", "w") as f:
        json.dump({"env": info, "args": vars(args), "rows": rows, "cprofile_fp8": s.getvalue()}, f, indent=1)
    lines = [f"- command: `{info['command']}`", f"- device: {info['gpu']}; torch {info['torch']}, triton {info['triton']}",
             f"- x [{args.m}, {args.k}] bf16, weight [{args.n}, {args.k}]: host-bound, wall per call = host cost", "",
             "| op | us per call |", "|---|---|"] + [f"| {r['op']} | {r['us_per_call']} |" for r in rows]  # fmt: skip
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    log(f"wrote {stem}.json/.md")


if __name__ == "__main__":
    main()
