"""int4 kernel exploration (GPU): candidate W4A16 kernels against the shipped one and bf16.

    python bench/int4_explore.py [--out DIR] [--shapes 4096x4096,...] [--ms 1,8,32,128]

Candidates (same qdata layout as lowbit: [N, K/2] uint8, even k in the low nibble):

* ``gemm_asm``: lowbit's ``_gemm_kernel`` (x @ W^T, weight tile as the B operand,
  inline-PTX dequant) at each explicit config and split;
* ``gemm_swap``: the same kernel's swapped tiles (``SWAP=True``, y^T = W @ x^T with the
  dequantized tile as wgmma's register A operand and x^T straight from shared memory;
  session 8, untimed);
* (removed after measuring; in git at commit 0a94bdc) ``swap`` / ``swap_asm``: an earlier
  transposed product that split x in registers, 0.85-0.95x of ``gemm_asm``
  (``bench/results/h100-int4-explore.json``).

Every config is checked against ``lowbit.ops.reference.int4_linear`` (relative
error) and timed as the time per layer over a stack of distinct layers
(>= 1 GiB of bf16 weights) inside one CUDA graph, median of the replays.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lowbit.ops import reference as ref  # noqa: E402
from lowbit.ops.triton._utils import chunked_dequant_mm, split_k_buffers  # noqa: E402
from lowbit.ops.triton.int4 import _dequant_kernel, _gemm_kernel, int4_mm, pair_stages, qparam_words  # noqa: E402

GS = 128


# variant -> (kernel, inline-PTX dequant, swapped tiles: y.T = w_hat @ x.T, int4.GEMM_SWAP)
KERNELS = {"gemm_asm": (_gemm_kernel.fn, True, False), "gemm_swap": (_gemm_kernel.fn, True, True)}


def chunked(rows: int):
    """Large M: dequantize ``rows`` weight rows at a time into one reused buffer (small
    enough to stay in L2) and run cuBLAS on each chunk into a column slice of y, instead
    of writing the whole w_hat to HBM and reading it back."""

    def run(x, q, s, z):
        k = x.shape[1]

        def fill(n0, r, buf):
            _dequant_kernel[(triton.cdiv(r, 32), k // GS)](
                q[n0:], s[n0:], z[n0:], buf, r, k, GS=GS, MMA=False, BLOCK_N=32
            )

        return chunked_dequant_mm(x, q.shape[0], rows, fill)

    return run


def launcher(variant, cfg, split):
    if variant == "chunked":
        return chunked(cfg[0])
    kern, asm, swap = KERNELS[variant]
    bm, bn, bk, w, st = cfg
    if bk == GS:  # two K tiles per loop iteration with qparam words, as _prune does
        st = pair_stages(st)

    def run(x, q, s, z):
        m, k = x.shape
        n = q.shape[0]
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
        ws, cnt = split_k_buffers(x.device, m, n, split)
        grid = (triton.cdiv(n, bn), split, triton.cdiv(m, bm))
        sw, zw = qparam_words(s), qparam_words(z)  # as the launcher passes them (even G)
        kern[grid](
            x, q, sw, zw, y, ws, cnt, m, n, k, m, x.stride(0), y.stride(0), q.stride(0), sw.stride(0), 0,
            GS=GS, ASM=asm, DOT_F32=False, MMA=False, SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SWAP=swap,
            SZ=True, QDT=tl.bfloat16, num_warps=w, num_stages=st,
        )  # fmt: skip
        return y  # split > 1: the last split of each tile reduces in the kernel

    return run


# ----------------------------------------------------------------------------- timing
def time_stack(fns, x) -> float:
    """us per layer: all layers in one CUDA graph, median of 20 replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f(x)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f(x)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000 / len(fns))
    del g
    return statistics.median(ts)


def configs_for(variant, m, bks=(128,)):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) to try; for ``chunked``, (rows,)."""
    if variant == "chunked":
        return [(r, 0, 0, 0, 0) for r in (512, 1024, 2048, 4096)]
    if m <= 64:
        bm = max(16, triton.next_power_of_2(m))
        return [
            (bm, bn, bk, w, st)
            for bk in bks
            for bn, w, st in [
                (16, 4, 6),
                (32, 4, 4),
                (32, 2, 6),
                (64, 2, 6),
                (32, 4, 6),
                (32, 4, 8),
                (64, 4, 6),
                (64, 4, 8),
                (64, 8, 6),
                (128, 8, 4),
                (128, 8, 6),
            ]
            if bm * bn <= 64 * 128
        ]
    if m <= 128:
        return [
            (64, 64, 128, 4, 4),
            (128, 64, 128, 4, 3),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (128, 128, 64, 8, 3),
        ]
    return [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096")
    p.add_argument("--ms", default="1,16,32,64,128")
    p.add_argument("--variants", default="gemm_asm")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--cfgs", default=None, help="BLOCK_N,warps,stages;... for M <= 64 (BLOCK_M follows M)")
    p.add_argument("--splits", default="1,2,4,8")
    p.add_argument("--bks", default="128", help="BLOCK_K values for M <= 64")
    args = p.parse_args()
    splits_all = [int(v) for v in args.splits.split(",")]
    only = [tuple(int(v) for v in c.split(",")) for c in args.cfgs.split(";")] if args.cfgs else None
    dtype = getattr(torch, args.dtype)
    ms = [int(v) for v in args.ms.split(",")]
    variants = args.variants.split(",")
    rows = []
    t_start = time.time()
    print(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)))
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        layers = max(2, math.ceil(2**30 / (n * k * 2)))
        torch.manual_seed(0)
        ws = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(layers)]
        qs = []
        for w in ws:
            s, z = ref.int4_choose_qparams(w, GS, dtype)
            qs.append((ref.int4_pack(ref.int4_quantize(w, s, z, GS)), s, z))
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            want = ref.int4_linear(x, *qs[0], GS).double()
            t_bf16 = time_stack([lambda x, w=w: F.linear(x, w) for w in ws], x)
            t_ship = time_stack([lambda x, p=p: int4_mm(x, *p, GS) for p in qs], x)
            base = dict(K=k, N=n, M=m, bf16_us=round(t_bf16, 2), ship_us=round(t_ship, 2))
            base["ship_x"] = round(t_bf16 / t_ship, 3)
            print(json.dumps(base), flush=True)
            for variant in variants:
                for cfg in configs_for(variant, m, [int(v) for v in args.bks.split(",")]):
                    if only and m <= 64 and variant != "chunked" and (cfg[1], cfg[3], cfg[4]) not in only:
                        continue
                    splits = [sp for sp in splits_all if k // (sp * cfg[2]) >= 2] if m <= 128 else [1]
                    for split in splits:
                        row = dict(base, variant=variant, cfg=list(cfg), split=split)
                        try:
                            run = launcher(variant, cfg, split)
                            got = run(x, *qs[0]).double()
                            row["rel_err"] = float((got - want).norm() / want.norm())
                            t = time_stack([lambda x, p=p, run=run: run(x, *p) for p in qs], x)
                            row["us"] = round(t, 2)
                            row["x_bf16"] = round(t_bf16 / t, 3)
                            row["x_ship"] = round(t_ship / t, 3)
                            row["GBps"] = round((n * k * (0.5 + 4 / GS) + 2 * m * (k + n)) / t / 1e3, 1)
                        except Exception as e:
                            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                            traceback.print_exc(limit=2)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
            with open(os.path.join(args.out, "int4_explore.json"), "w") as f:
                json.dump(rows, f)
        del ws, qs
        torch.cuda.empty_cache()
    # summary: best per (shape, M, variant)
    print("\nK N M | bf16us ship_x | best per variant: x_bf16 (us, cfg, split, err)")
    keyed = {}
    for r in rows:
        if "us" not in r or r["rel_err"] > 1e-2:
            continue
        key = (r["K"], r["N"], r["M"], r["variant"])
        if key not in keyed or r["us"] < keyed[key]["us"]:
            keyed[key] = r
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for m in ms:
            parts = []
            base = None
            for v in variants:
                r = keyed.get((k, n, m, v))
                if r:
                    base = r
                    parts.append(f"{v} {r['x_bf16']}x ({r['us']}us {r['cfg']} s{r['split']} e{r['rel_err']:.1e})")
            if base:
                print(f"{k} {n} {m} | {base['bf16_us']} {base['ship_x']}x | " + "; ".join(parts))
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
