"""Probe: the int4 GEMV tile's loads alone, to tell its access pattern's rate from its math.

    python bench/gemv_load_probe.py [--shapes KxN,...] [--ms 1,8] [--cfgs W:split:unroll,...] [--out D]  # GPU

``_loads_only`` issues exactly the loads of ``_int4_gemv.gemv_tile`` (its ``_load_block``, same
grid, warps, splits and unroll) and folds every loaded word into one int32 per lane with xor, so
nothing is dead code; no unpacking, no mma, no split-K reduction. Each row has the load-only time
next to the full tile's (same config, same layer stack, CUDA graph, median) and the weight bytes
per second of each, plus ``loads_tiled``: the same loads with the "tiled" packing's addressing
(``_load_block``'s TILED: each 16-row x 128-k tile one 1 KB run; the plain codes read in that
order, the same set of words); ``loads_adj`` / ``tile_adj``: the blocks of the tile's ADJ mode
(a warp's two blocks adjacent, so each of its rows is read 128 contiguous bytes at a time). If
the loads alone run near the copy rate (~3 TB/s), the tile's time is its math and how it
overlaps the loads; if they run near the tile's own rate, the access pattern is
the bound. (Session 15 question: the tile takes 16 us on 4096 x 14336 at M=1 against a 10.4 us
DRAM floor.)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gemv_mma_probe import _parse_cfgs, gemv, int4_stack, stack_us  # noqa: E402

from lowbit.ops.reference import int4_tiled_fits  # noqa: E402
from lowbit.ops.triton._int4_gemv import _load_block, lanes  # noqa: E402


@triton.jit
def _fold(t):
    """xor of a [R, 4] int32 tile's columns -> [R]."""
    return tl.reduce(t, 1, _xor)


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _loads_only(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_q, stride_s,
                GS: tl.constexpr, SPLIT_K: tl.constexpr, W: tl.constexpr, UNROLL: tl.constexpr,
                TILED: tl.constexpr, ADJ: tl.constexpr = 0):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    warp, _, c, rg, okg, ok8, xg = lanes(pid_n, M, N, W)
    qw_ptr = q_ptr.to(tl.pointer_type(tl.int32))
    xw_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    acc = tl.zeros([W * 32], dtype=tl.int32)
    step = W * SPLIT_K
    if ADJ:  # the blocks of gemv_tile's ADJ mode: a warp's UNROLL blocks adjacent
        start = pid_k * W * UNROLL
    else:
        start = pid_k * W
    for it in range(start, tl.cdiv(K, 128), step * UNROLL):
        for u in tl.static_range(UNROLL):
            if ADJ:
                blk = it + warp * (UNROLL - 1) + u
            else:
                blk = it + u * step
            q_g, q_8, x0, x1, x2, x3, sg, zg, s8, z8 = _load_block(
                qw_ptr, xw_ptr, s_ptr, z_ptr, blk, warp, xg, c, rg, okg, ok8, K, stride_xm // 2,
                stride_q // 4, stride_s, GS, TILED,
            )  # fmt: skip
            acc ^= _fold(q_g) ^ _fold(q_8) ^ _fold(x0) ^ _fold(x1) ^ _fold(x2) ^ _fold(x3)
            for h in tl.static_range(4):
                if h == 0:
                    v = sg
                elif h == 1:
                    v = zg
                elif h == 2:
                    v = s8
                else:
                    v = z8
                acc ^= v.to(tl.int16, bitcast=True).to(tl.int32)
    tl.store(out_ptr + (pid_k * tl.num_programs(0) + pid_n) * W * 32 + tl.arange(0, W * 32), acc)


def loads_only(x, qdata, scale, zero, gs, w=4, split=1, unroll=1, tiled=False, adj=False):
    m, k = x.shape
    n = qdata.shape[0]
    if tiled and not int4_tiled_fits(n, k):  # the tiled addressing has no masks for partial tiles
        raise ValueError(f"tiled addressing needs N % 16 == 0 and K % 128 == 0, got N={n}, K={k}")
    grid = (triton.cdiv(n, 16), split)
    out = torch.empty(grid[0] * split * w * 32, device=x.device, dtype=torch.int32)
    _loads_only[grid](
        x, qdata, scale, zero, out, m, n, k, x.stride(0), qdata.stride(0), scale.stride(0),
        GS=gs, SPLIT_K=split, W=w, UNROLL=unroll, TILED=tiled, ADJ=int(adj), num_warps=w, num_stages=1,
    )  # fmt: skip
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x14336,14336x4096,4096x4096,4096x1024")
    p.add_argument("--ms", default="1,8")
    p.add_argument("--cfgs", default="4:1:2,4:2:2,2:4:2,1:8:2,4:4:1")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    gs, rows = 128, []
    variants = dict(
        loads=loads_only,
        loads_adj=functools.partial(loads_only, adj=True),
        loads_tiled=functools.partial(loads_only, tiled=True),
        tile=functools.partial(gemv, adj=False),
        tile_adj=functools.partial(gemv, adj=True),
    )
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        packed, gen = int4_stack(k, n, gs)
        weight_bytes = packed[0][0].numel() + 2 * packed[0][1].numel() * 2
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            for cf in _parse_cfgs(args.cfgs):
                row = dict(K=k, N=n, M=m, W=cf[0], split=cf[1], unroll=cf[2])
                for name, fn in variants.items():
                    us = stack_us([lambda p=p, fn=fn, x=x, cf=cf: fn(x, *p, gs, *cf) for p in packed])
                    row[f"{name}_us"], row[f"{name}_GBps"] = round(us, 2), round(weight_bytes / us / 1e3, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
        del packed
        torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        env = dict(torch=torch.__version__, triton=triton.__version__, gpu=torch.cuda.get_device_name())
        with open(os.path.join(args.out, "gemv-load-probe.json"), "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
