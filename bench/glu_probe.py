"""Probe: the fused gate / up + SwiGLU tile against the stacked GEMV and a separate product.

    python bench/glu_probe.py [--shapes KxN2,...] [--ms 1,8] [--out D]   # GPU

For a [gate; up] int4 weight of N2 rows (Llama-3-8B's MLP: 4096 x 28672), us per layer over a
>= 1 GiB stack in one CUDA graph (median): ``int4_mm`` of the stack (what the unfused step runs
first), that plus the product as torch.compile fuses it (one pointwise kernel, the second
launch of the unfused step), and ``int4_mm_swiglu`` (one launch). Each output is checked
against the reference once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gemv_mma_probe import int4_stack, stack_us  # noqa: E402

from lowbit.ops import reference as ref  # noqa: E402
from lowbit.ops.triton._int4_gemv import int4_mm_swiglu  # noqa: E402
from lowbit.ops.triton.int4 import int4_mm  # noqa: E402


def glu_at(x, qdata, scale, zero, w, split, unroll, x_stride=None):
    """One launch of ``_glu_kernel`` at a chosen config ("tiled" codes, group size 128); ``x_stride``
    0 makes every token read x's first row (x's load traffic of M = 1, the rest of M's work)."""
    import triton

    from lowbit.ops.triton import _int4_gemv as gemv_mod
    from lowbit.ops.triton._utils import m_bucket, pdl_args, split_k_buffers

    m, k = x.shape
    n = qdata.shape[0]
    y = torch.empty(m, n // 2, device=x.device, dtype=x.dtype)
    ws, cnt = split_k_buffers(x.device, m, n, split)
    gemv_mod._glu_kernel.fn[(triton.cdiv(n // 2, 16), split)](
        x, qdata, scale, zero, y, ws, cnt, m, n, k, n // 2, m_bucket(m), x.stride(0) if x_stride is None else x_stride,
        y.stride(0), qdata.stride(0),
        scale.stride(0), GS=128, ASM=True, TILED=1, SPLIT_K=split, W=w, UNROLL=unroll, ADJ=int(unroll == 2),
        num_warps=2 * w, num_stages=1, **pdl_args(x.device, 2),
    )  # fmt: skip
    return y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x28672")
    ap.add_argument("--ms", default="1,8")
    ap.add_argument("--cfgs", default="", help="also time _glu_kernel at these W:split:unroll (W warps per half)")
    ap.add_argument("--out", default="")
    ap.add_argument("--same-x", action="store_true", help="also time each --cfgs config with every token on x's row 0")
    a = ap.parse_args()
    product = torch.compile(ref.swiglu, fullgraph=True, dynamic=False)
    rows = []
    for shape in a.shapes.split(","):
        k, n = map(int, shape.split("x"))
        packed, g = int4_stack(k, n, 128, "tiled")
        for m in map(int, a.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            q0 = ref.int4_pack(ref.int4_tiled_unpack(packed[0][0]))
            want = ref.swiglu(ref.int4_linear(x, q0, *packed[0][1:], 128)).double()
            got = int4_mm_swiglu(x, *packed[0], 128, "tiled").double()
            two = product(int4_mm(x, *packed[0], 128, "tiled")).double()
            row = dict(K=k, N=n, M=m, layers=len(packed))
            row["rel_err_fused"] = float((got - want).norm() / want.norm())
            row["rel_err_two"] = float((two - want).norm() / want.norm())
            row["stack_gemv_us"] = round(stack_us([lambda p=p, x=x: int4_mm(x, *p, 128, "tiled") for p in packed]), 2)
            row["gemv_then_product_us"] = round(
                stack_us([lambda p=p, x=x: product(int4_mm(x, *p, 128, "tiled")) for p in packed]), 2
            )
            row["fused_us"] = round(stack_us([lambda p=p, x=x: int4_mm_swiglu(x, *p, 128, "tiled") for p in packed]), 2)
            for cf in [tuple(map(int, c.split(":"))) for c in a.cfgs.split(",") if c]:
                fns = [lambda p=p, x=x, cf=cf: glu_at(x, *p, *cf) for p in packed]
                err = float((glu_at(x, *packed[0], *cf).double() - want).norm() / want.norm())
                row[f"glu_{cf[0]}:{cf[1]}:{cf[2]}_us"] = (round(stack_us(fns), 2), round(err, 5))
                if a.same_x:  # (numbers not checked: every token is token 0)
                    fns = [lambda p=p, x=x, cf=cf: glu_at(x, *p, *cf, x_stride=0) for p in packed]
                    row[f"glu_{cf[0]}:{cf[1]}:{cf[2]}_same_x_us"] = round(stack_us(fns), 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
        del packed
        torch.cuda.empty_cache()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        env = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name())
        with open(os.path.join(a.out, "glu_probe.json"), "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
