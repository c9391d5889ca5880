"""FP8 W8A8 matmul (Triton, cuBLAS for large bf16 batches): per-row scaled e4m3fn.

Shapes and math (the spec is ``reference.fp8_dynamic_linear``)::

    x      [M, K]  bf16 / fp16 / fp32
    qdata  [N, K]  float8_e4m3fn
    scale  [N]     fp32 (row amax / 448, floored at 2**-20)
    xq, xs = per-row e4m3fn quantization of x (``quant.quantize_rows``)
    y [M, N] = (xq @ qdata.T, fp32 accumulate) * xs[:, None] * scale[None, :]   in x.dtype

On sm_90 the tensor-core products (``tl.dot`` and cuBLAS alike) accumulate at the
tensor core's reduced precision within each wgmma before reaching the fp32
accumulator: relative error to the exact spec 2.4e-3 at K=4096 and 3.7e-3 at K=14336
(bf16 out, H100), a tenth of fp8's own quantization error.

Small M runs the kernels in ``_w8.py`` (FMA GEMV for M = 1, fp8 ``tl.dot``
GEMM with split-K otherwise). For large bf16 batches the product goes through
``torch._scaled_mm`` with row-wise scales (cuBLAS fp8 with the rescale fused
in its epilogue); other dtypes from M = 256 run the persistent TMA GEMM in ``_w8.py``.
"""

from __future__ import annotations

import torch

from lowbit.compile import kernel_op, linear_out_fake
from lowbit.ops.reference import FP8_DTYPE
from lowbit.ops.triton import _w8
from lowbit.ops.triton._utils import is_sm90_or_newer, launcher

SCALED_MM_MIN_M = 128  # measured crossover on H100 (bench/KERNEL_NOTES.md)
# Accumulate as the Triton fp8 kernels do (Triton's sm_90 default, and torchao's per-row
# default): the tensor core's own accumulation within each wgmma. Exact fp32 accumulation
# cost 2-11% in cuBLAS and 25-35% in the Triton GEMM (bench/KERNEL_NOTES.md).
SCALED_MM_FAST_ACCUM = True


def _use_scaled_mm(x: torch.Tensor, n: int) -> bool:
    m, k = x.shape
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16  # cuBLAS row-wise scaling writes bf16 only
        and m >= SCALED_MM_MIN_M
        and k > 0
        and n > 0
        and k % 16 == 0
        and n % 16 == 0
        and is_sm90_or_newer(x.device)
    )


def _scaled_mm(xq, qdata, scale, xs, dtype: torch.dtype) -> torch.Tensor:
    """cuBLAS's fp8 product with row-wise scales (bf16 out)."""
    return torch._scaled_mm(
        xq, qdata.t(), scale_a=xs[:, None], scale_b=scale.float()[None, :], out_dtype=dtype,
        use_fast_accum=SCALED_MM_FAST_ACCUM,
    )  # fmt: skip


def _key(x, qdata, scale):
    return _w8.dyn_key(x, qdata, scale, "fp8", SCALED_MM_MIN_M, SCALED_MM_FAST_ACCUM)


def _lane(x, qdata, scale):
    """FP8 W8A8 through a kept ``_w8.DynPlan`` for these arguments, or None (``_utils.launcher``)."""
    return _w8.dyn_lane(x, qdata, scale, _key(x, qdata, scale))


@kernel_op("fp8_dyn_mm_triton", fake=linear_out_fake)
@launcher("fp8_dyn_mm", (FP8_DTYPE,), lane=_lane)
def fp8_dyn_mm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 W8A8: per-row e4m3fn quantization of x, fp32 product, rescale -> [M, N] in x.dtype."""
    n = qdata.shape[0]
    if x.shape[0] == 0:
        return x.new_empty(0, n)
    product = _scaled_mm if _use_scaled_mm(x, n) else None
    return _w8.dyn_mm(x, qdata, scale, FP8_DTYPE, _key(x, qdata, scale), product)  # (eagerly: a plan, for the lane)
