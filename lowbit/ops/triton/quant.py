"""Per-row (per-token) dynamic activation quantization for the W8A8 paths (Triton).

Shapes and math (the spec is ``reference.int8_quantize_rows`` / ``fp8_quantize_rows``)::

    x   [M, K]  bf16 / fp16 / fp32
    int8: xs[m] = max(amax|x[m, :]| / 127, 2**-20),  xq = clamp(round_half_even(x / xs), -127, 127)
    fp8:  xs[m] = max(amax|x[m, :]| / 448, 2**-20),  xq = e4m3fn(clamp(x / xs, -448, 448))
    returns (xq [M, K] int8 or float8_e4m3fn, xs [M] fp32)

One program per row: a first pass over the row finds amax, a second (from L2)
divides with IEEE round-to-nearest (``tl.div_rn``, as torch does) and stores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.ops.reference import FP8_DTYPE, FP8_MAX, SCALE_EPS
from lowbit.ops.triton._utils import INTERPRET

_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + magic) - magic rounds |v| < 2**22 half-to-even in fp32


@triton.jit
def _kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, QMAX: tl.constexpr, IS_INT: tl.constexpr,
            EPS: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    m = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    x_row = x_ptr + m * stride_xm
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    # IEEE division: Triton's fp32 ``/`` is the approximate one on the GPU (bits differ from torch)
    scale = tl.maximum(tl.div_rn(tl.max(amax, axis=0), QMAX), EPS)
    tl.store(s_ptr + m, scale)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + rk < K
        v = tl.div_rn(tl.load(x_row + k0 + rk, mask=mask, other=0.0).to(tl.float32), scale)
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        if IS_INT:
            v = (v + _RNE_MAGIC) - _RNE_MAGIC
        else:
            # Round to e4m3 precision here (3 mantissa bits, subnormal below 2**-6) so the
            # final cast is exact: the interpreter's own fp32 -> fp8 cast mis-rounds on carry.
            e = ((v.to(tl.int32, bitcast=True) >> 23) & 255) - 127
            ulp = ((tl.maximum(e, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
            v = ((v / ulp + _RNE_MAGIC) - _RNE_MAGIC) * ulp
        tl.store(q_ptr + m * stride_qm + k0 + rk, v.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_rows(x: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(xq [M, K] qdtype, xs [M] fp32)``; qdtype is torch.int8 or float8_e4m3fn."""
    m, k = x.shape
    x = x.contiguous()
    xq = torch.empty(m, k, device=x.device, dtype=qdtype)
    xs = torch.empty(m, device=x.device, dtype=torch.float32)
    if m == 0:
        return xq, xs
    is_int = qdtype == torch.int8
    if not is_int and qdtype != FP8_DTYPE:
        raise ValueError(f"quantize_rows: unsupported qdtype {qdtype}")
    block = 256 if INTERPRET else min(4096, max(128, triton.next_power_of_2(k)))
    _kernel[(m,)](
        x, xq, xs, k, x.stride(0), xq.stride(0),
        QMAX=127.0 if is_int else FP8_MAX, IS_INT=is_int, EPS=SCALE_EPS, BLOCK_K=block,
        num_warps=4 if block <= 1024 else 8,
    )  # fmt: skip
    return xq, xs
