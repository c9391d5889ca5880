"""Per-row (per-token) dynamic activation quantization for the W8A8 paths (Triton).

Shapes and math (the spec is ``reference.int8_quantize_rows`` / ``fp8_quantize_rows``)::

    x   [M, K]  bf16 / fp16 / fp32
    int8: xs[m] = max(amax|x[m, :]| / 127, 2**-20),  xq = clamp(round_half_even(x / xs), -127, 127)
    fp8:  xs[m] = max(amax|x[m, :]| / 448, 2**-20),  xq = e4m3fn(clamp(x / xs, -448, 448))
    returns (xq [M, K] int8 or float8_e4m3fn, xs [M] fp32)

One program per row finds the row's amax, then divides with IEEE round-to-nearest
(``tl.div_rn``, as torch does) and stores. A row holding a NaN or an infinity gets a
NaN scale and zero codes (the reference's rule: its output row is NaN); ``tl.max``
alone would skip a NaN and quantize the row with a finite scale. Rows up to ONE_PASS_MAX_K elements stay
in registers between the two steps (x is read once); longer rows are read twice
(the second time from L2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.ops.reference import FP8_DTYPE, FP8_MAX, SCALE_EPS
from lowbit.ops.triton._utils import INTERPRET, pdl_args, pdl_start

# Rows up to this many elements are read once (64 fp32 registers a thread at 16 warps).
ONE_PASS_MAX_K = 32768
_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + magic) - magic rounds |v| < 2**22 half-to-even in fp32


@triton.jit
def _quantize(x, scale, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    """x / scale (IEEE) clamped and rounded to the code grid, in fp32."""
    v = tl.minimum(tl.maximum(tl.div_rn(x, scale), -QMAX), QMAX)
    if IS_INT:
        return (v + _RNE_MAGIC) - _RNE_MAGIC
    # Round to e4m3 precision here (3 mantissa bits, subnormal below 2**-6) so the
    # final cast is exact: the interpreter's own fp32 -> fp8 cast mis-rounds on carry.
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 255) - 127
    ulp = ((tl.maximum(e, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
    return ((v / ulp + _RNE_MAGIC) - _RNE_MAGIC) * ulp


@triton.jit
def _row_scale(amax, poison, QMAX: tl.constexpr, EPS: tl.constexpr):
    """max(amax / QMAX, EPS), or NaN when ``poison`` (the row's sum of x * 0) is not 0,
    i.e. the row holds a NaN or an infinity. IEEE division: Triton's fp32 ``/`` is the
    approximate one on the GPU (bits differ from torch)."""
    scale = tl.maximum(tl.div_rn(amax, QMAX), EPS)
    return tl.where(poison == 0.0, scale, float("nan"))


@triton.jit
def _codes(x, scale, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    """``_quantize``, with zeros for a row without a scale."""
    return tl.where(scale == scale, _quantize(x, scale, QMAX, IS_INT), 0.0)


@triton.jit
def _kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, QMAX: tl.constexpr, IS_INT: tl.constexpr,
            EPS: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr, PDL: tl.constexpr = 0):  # fmt: skip
    pdl_start(PDL)
    m = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    x_row = x_ptr + m * stride_xm
    q_row = q_ptr + m * stride_qm
    if ONE_PASS:  # BLOCK_K >= K: the row stays in registers
        x = tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
        scale = _row_scale(tl.max(tl.abs(x), axis=0), tl.sum(x * 0.0, axis=0), QMAX, EPS)
        tl.store(s_ptr + m, scale)
        tl.store(q_row + rk, _codes(x, scale, QMAX, IS_INT).to(q_ptr.dtype.element_ty), mask=rk < K)
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        poison = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
            poison += x * 0.0
        scale = _row_scale(tl.max(amax, axis=0), tl.sum(poison, axis=0), QMAX, EPS)
        tl.store(s_ptr + m, scale)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + rk < K
            x = tl.load(x_row + k0 + rk, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + k0 + rk, _codes(x, scale, QMAX, IS_INT).to(q_ptr.dtype.element_ty), mask=mask)


def quantize_rows(
    x: torch.Tensor, qdtype: torch.dtype, record: list | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(xq [M, K] qdtype, xs [M] fp32)``; qdtype is torch.int8 or float8_e4m3fn.
    ``record``: a list the launch is appended to (``_utils.Bound``'s ``launched``)."""
    m, k = x.shape
    x = x.contiguous()
    xq = torch.empty(m, k, device=x.device, dtype=qdtype)
    xs = torch.empty(m, device=x.device, dtype=torch.float32)
    if m == 0:
        return xq, xs
    is_int = qdtype == torch.int8
    if not is_int and qdtype != FP8_DTYPE:
        raise ValueError(f"quantize_rows: unsupported qdtype {qdtype}")
    block = max(128, triton.next_power_of_2(k))
    one_pass = block <= ONE_PASS_MAX_K
    if not one_pass:
        block = 256 if INTERPRET else 4096
    args = (x, xq, xs, k, x.stride(0), xq.stride(0))
    kw = dict(QMAX=127.0 if is_int else FP8_MAX, IS_INT=is_int, EPS=SCALE_EPS, BLOCK_K=block, ONE_PASS=one_pass,
              num_warps=4 if block <= 1024 else 8 if block <= 4096 else 16, **pdl_args(x.device))  # fmt: skip
    compiled = _kernel[(m,)](*args, **kw)
    if record is not None:
        record.append((_kernel, (m,), args, kw, compiled))
    return xq, xs
