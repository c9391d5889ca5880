"""Probe: Triton's Hopper warp specialization for the W8A8 (int8, fp8) GEMM at large M.

    python bench/w8_ws_probe.py --variant NAME [--scheme int8_dyn|fp8] [--out DIR]

The shipped persistent TMA GEMM (``_w8._gemm_tma_kernel``) hung on the H100 with
``warp_specialize=True`` on its tile loop (Triton 3.6, session 7). This probe kernel
is shaped like the loops Triton's Hopper pass is tested on: a separate tile counter for
the epilogue (a TMA-descriptor store of y does not compile there: the pass splits the
accumulator between two consumer groups). One variant per process
(the driver wraps each in ``timeout``, so a hang costs one variant), rows printed as
JSON lines as they finish. Same harness as ``kernels.py``: a >= 1 GiB stack of layers
in one CUDA graph, median, bf16 ``F.linear`` timed in the same process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import env, log, time_stack  # noqa: E402

from lowbit.ops import reference as ref  # noqa: E402
from lowbit.ops.triton._utils import grouped_tile, num_sms  # noqa: E402
from lowbit.ops.triton.fp8 import fp8_dyn_mm  # noqa: E402
from lowbit.ops.triton.int8 import int8_dyn_mm  # noqa: E402
from lowbit.ops.triton.quant import quantize_rows  # noqa: E402


@triton.jit
def _probe_kernel(
    x_desc, w_desc, y_ptr, ws_ptr, xs_ptr, M, N, K,
    INT_ACC: tl.constexpr, NUM_PROGS: tl.constexpr, WS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    acc_t: tl.constexpr = tl.int32 if INT_ACC else tl.float32
    tile_c = tl.program_id(0) - NUM_PROGS  # the epilogue's own counter
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGS, flatten=not WS, warp_specialize=WS):
        pid_m, pid_n = grouped_tile(tile, num_m, num_n, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_t)
        for ki in range(k_tiles):
            x = x_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=acc_t)
        tile_c += NUM_PROGS
        cm, cn = grouped_tile(tile_c, num_m, num_n, GROUP_M)
        rm = cm * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = cn * BLOCK_N + tl.arange(0, BLOCK_N)
        y = acc.to(tl.float32) * tl.load(ws_ptr + rn, mask=rn < N, other=0)[None, :]
        y = y * tl.load(xs_ptr + rm, mask=rm < M, other=0)[:, None]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# name -> (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, warp-specialized)
VARIANTS = {
    "plain_128x256x128_w8_s4": (128, 256, 128, 8, 4, False),
    "ws_128x256x64_w4_s4": (128, 256, 64, 4, 4, True),
    "ws_128x256x128_w4_s3": (128, 256, 128, 4, 3, True),
    "ws_128x128x128_w4_s4": (128, 128, 128, 4, 4, True),
}


def probe_mm(x, w, ws, qdtype, cfg):
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk, warps, stages, spec = cfg
    xq, xs = quantize_rows(x, qdtype)
    m, k = xq.shape
    n = w.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    progs = min(num_sms(x.device), triton.cdiv(m, bm) * triton.cdiv(n, bn))
    _probe_kernel[(progs,)](
        TensorDescriptor(xq, [m, k], [k, 1], [bm, bk]), TensorDescriptor(w, [n, k], [k, 1], [bn, bk]),
        y, ws, xs, m, n, k,
        INT_ACC=qdtype == torch.int8, NUM_PROGS=progs, WS=spec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", required=True, help="shipped or one of " + ",".join(VARIANTS))
    p.add_argument("--scheme", default="int8_dyn")
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096")
    p.add_argument("--ms", default="2048,512")
    args = p.parse_args()
    log(json.dumps(env()))
    qdtype = torch.int8 if args.scheme == "int8_dyn" else ref.FP8_DTYPE
    spec = ref.int8_dynamic_linear if args.scheme == "int8_dyn" else ref.fp8_dynamic_linear
    shipped = int8_dyn_mm if args.scheme == "int8_dyn" else fp8_dyn_mm
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        n_layers = max(1, math.ceil(1024**3 / (k * n * 2)))
        g = torch.Generator(device="cuda").manual_seed(k * 7 + n)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(n_layers)]
        q = []
        for w in ws:
            if qdtype == torch.int8:
                s = ref.int8_choose_qparams(w, torch.float32)
                q.append((ref.int8_quantize(w, s), s))
            else:
                s = ref.fp8_choose_qparams(w)
                q.append((ref.fp8_quantize(w, s), s))
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            t_bf, _ = time_stack([lambda x, w=w: F.linear(x, w) for w in ws], x)
            if args.variant == "shipped":
                op = lambda x, p: shipped(x, *p)  # noqa: E731
            else:
                op = lambda x, p, c=VARIANTS[args.variant]: probe_mm(x, p[0], p[1], qdtype, c)  # noqa: E731
            row = dict(scheme=args.scheme, variant=args.variant, K=k, N=n, M=m)
            try:
                with torch.no_grad():
                    y = op(x, q[0])
                    want = spec(x, *q[0])
                row["rel_err_vs_ref"] = float(f"{(y.double() - want.double()).norm() / want.double().norm():.2e}")
                t, _ = time_stack([lambda x, p=p, op=op: op(x, p) for p in q], x)
                row.update(speedup=round(t_bf / t, 3), TFLOPs=round(2 * m * k * n / t / 1e9, 1))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            print("ROW " + json.dumps(row), flush=True)
        del ws, q
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
