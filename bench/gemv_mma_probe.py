"""Probe: int4's GEMV tile (``lowbit/ops/triton/_int4_gemv.py``) at chosen (warps, split, unroll).

    python bench/gemv_mma_probe.py [--cfgs W:split:unroll,...|all] [--packing tiled] [--out D]   # GPU

Checks each launch against the reference and times it (>= 1 GiB of layers, CUDA graph, median)
next to the shipped ``int4_mm``, whose row also records what Triton's autotuner measured for that
key (its pick, the best GEMV and the best tensor-core config; fresh processes only, since picks are
cached on disk). Offline SASS of the tile: ``bench/offline_sass.py --buckets 1``.
(Session 14 measured the first version here as a standalone kernel, `results/h100-gemv-mma-probe-s14.json`.)

Each warp owns 16 weight rows (the mma's M) and the tokens are its N (8, so M <= 8 is the same
mma work as M = 1). Lane (g, c) of a warp (g = lane // 4, c = lane % 4) takes, for each 128-k block,
the k range [32 c, 32 c + 32) of rows g and g + 8: one 16-byte load of "plain" code bytes per row
and 64 bytes of x for token g. Within an mma the k order of the A and B fragments only has to
agree, so the lane's own k pairs fill its fragment slots in load order: no shared memory, no
ldmatrix, no x split. The W warps of a CTA work on the same 16 rows, each its own 128-k blocks,
and are summed at the end; SPLIT_K CTAs per row tile reduce in-kernel (``split_k_reduce``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lowbit.ops.triton import int4 as int4_mod  # noqa: E402
from lowbit.ops.triton._utils import pdl_args, pdl_start, split_k_buffers  # noqa: E402


@triton.jit
def _empty(y_ptr, PDL: tl.constexpr = 0):
    """A kernel that only waits for its predecessor (as the GEMM's PDL mode 2 does): the launch floor."""
    pdl_start(PDL)


def gemv(x, qdata, scale, zero, gs, w=4, split=1, unroll=1, adj=None, tiled=False):
    """One launch of int4._gemm_kernel's GEMV tile with warps ``w``, ``split`` and ``unroll``
    (``adj``: a warp's two blocks adjacent; None: as the shipped configs, i.e. with unroll 2;
    ``tiled``: qdata in the "tiled" packing)."""
    m, k = x.shape
    n = qdata.shape[0]
    assert m <= 8 and k % 32 == 0 and x.dtype in (torch.bfloat16, torch.float16) and scale.dtype == x.dtype
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    ws, cnt = split_k_buffers(x.device, m, n, split)
    meta = dict(
        BLOCK_M=16,
        BLOCK_N=16,
        BLOCK_K=min(128, gs),
        SPLIT_K=split,
        SWAP=False,
        GEMV=w,
        UNROLL=unroll,
        ADJ=int(unroll == 2 if adj is None else adj),
        TILED=int(tiled),
    )
    int4_mod._gemm_kernel.fn[(triton.cdiv(n, 16), split, 1)](
        x, qdata, scale, zero, y, ws, cnt, m, n, k, m, x.stride(0), y.stride(0), qdata.stride(0), scale.stride(0), 0,
        GS=gs, ASM=True, DOT_F32=False, MMA=False, SZ=False, QDT=None, **meta, num_warps=w, num_stages=1,
    )  # fmt: skip
    return y


# ----------------------------------------------------------------------------- GPU
def int4_stack(k: int, n: int, gs: int, packing: str = "plain"):
    """kernels.py's >= 1 GiB stack of [N, K] layers as int4 (codes in ``packing``, scale, zero)
    by the reference, and the generator for the activations."""
    from kernels import weight_stack

    from lowbit.ops import reference as ref

    ws, g = weight_stack(k, n)
    pack = ref.int4_tiled_pack if packing == "tiled" else ref.int4_pack
    packed = []
    while ws:
        w = ws.pop(0)
        s, z = ref.int4_choose_qparams(w, gs, torch.bfloat16)
        packed.append((pack(ref.int4_quantize(w, s, z, gs)), s, z))
    return packed, g


def stack_us(fns) -> float:
    """Median microseconds per call of ``fns`` (one per layer), all replayed in one CUDA graph."""
    from triton.testing import do_bench_cudagraph

    run = lambda: [f() for f in fns]  # noqa: E731
    run()
    return do_bench_cudagraph(run, rep=100, return_mode="median") / len(fns) * 1e3


def time_main(args):
    from lowbit.ops import reference as ref

    out = {
        "env": dict(torch=torch.__version__, triton=triton.__version__, gpu=torch.cuda.get_device_name()),
        "rows": [],
    }
    gs, tiled = 128, args.packing == "tiled"
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        packed, g = int4_stack(k, n, gs, args.packing)
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            q0 = ref.int4_pack(ref.int4_tiled_unpack(packed[0][0])) if tiled else packed[0][0]
            r = ref.int4_linear(x, q0, *packed[0][1:], gs)
            for cf in _parse_cfgs(args.cfgs):
                row = dict(K=k, N=n, M=m, W=cf[0], split=cf[1], unroll=cf[2])
                try:
                    y = gemv(x, *packed[0], gs, *cf, tiled=tiled)
                    row["rel_err"] = float((y.double() - r.double()).norm() / r.double().norm())
                    fns = [lambda p=p, x=x, cf=cf: gemv(x, *p, gs, *cf, tiled=tiled) for p in packed]
                    row["us"] = round(stack_us(fns), 2)
                    if args.hot:  # one layer over and over: its weight stays in L2
                        hot = [lambda x=x, cf=cf, p=packed[0]: gemv(x, *p, gs, *cf, tiled=tiled)] * len(fns)
                        row["hot_us"] = round(stack_us(hot), 2)
                        grid = (triton.cdiv(n, 16), cf[1], 1)  # the same grid doing nothing but PDL's wait
                        empty = [lambda y=y, grid=grid, w=cf[0]: _empty[grid](y, num_warps=w, **pdl_args(y.device, 2))]
                        row["empty_us"] = round(stack_us(empty * len(packed)), 2)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
            y = int4_mod.int4_mm(x, *packed[0], gs, args.packing)  # the first call tunes this key
            tuner = _tuner_view(int4_mod._gemm_kernel)
            us = stack_us([lambda p=p, x=x: int4_mod.int4_mm(x, *p, gs, args.packing) for p in packed])
            row = dict(K=k, N=n, M=m, impl="int4_mm (shipped)",
                       rel_err=float((y.double() - r.double()).norm() / r.double().norm()),
                       us=round(us, 2), tuner=tuner)  # fmt: skip
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
        del packed
        torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gemv-mma-probe.json"), "w") as f:
            json.dump(out, f, indent=1)


def _tuner_view(kernel) -> dict:
    """What Triton's autotuner measured for the key it tuned last (us, its do_bench median):
    the pick, the best GEMV and the best tensor-core config."""
    timings = getattr(kernel, "configs_timings", None) or {}
    ms = {c: (t[0] if isinstance(t, (list, tuple)) else t) for c, t in timings.items()}
    gemv = [c for c in ms if c.kwargs.get("GEMV")]
    mma = [c for c in ms if not c.kwargs.get("GEMV")]
    view = {"picked": str(getattr(kernel, "best_config", None))}
    for name, group in (("best_gemv", gemv), ("best_tensor_core", mma)):
        if group:
            c = min(group, key=ms.get)
            view[name] = [str(c), round(ms[c] * 1e3, 2)]
    return view


def _parse_cfgs(text):
    """ "W:split:unroll,..." (unroll 1 or 2) -> tuples of ints; "all": W 1-8 x split 1-16 x unroll 1-2."""
    if text == "all":
        return [(w, sp, u) for w in (1, 2, 4, 8) for sp in (1, 2, 4, 8, 16) for u in (1, 2)]
    out = [tuple(int(v) for v in c.split(":")) for c in text.split(",")]
    if any(len(c) != 3 or c[2] not in (1, 2) or min(c) < 1 for c in out):  # unroll 0 would never end
        raise SystemExit(f"--cfgs: want W:split:unroll with unroll 1 or 2, got {text!r}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096,4096x1024,4096x14336,14336x4096")
    p.add_argument("--ms", default="1,8")
    shipped = [c.kwargs for c in int4_mod._GEMM_CONFIGS if c.kwargs.get("GEMV")]
    p.add_argument(
        "--cfgs",
        default=",".join(f"{c['GEMV']}:{c['SPLIT_K']}:{c['UNROLL']}" for c in shipped),
        help="default: shipped",
    )
    p.add_argument("--packing", choices=["plain", "tiled"], default=None, help="qdata's byte order (default: shipped)")
    p.add_argument("--out", default=None)
    p.add_argument("--hot", action="store_true", help="also time each config on one L2-resident layer")
    args = p.parse_args()
    if args.packing is None:  # what CUDA weights of these (whole-tile) shapes get
        from lowbit.qtensor.int4 import cuda_packing

        args.packing = "tiled" if cuda_packing() == "tiled" else "plain"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    time_main(args)


if __name__ == "__main__":
    main()
