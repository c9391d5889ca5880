"""int8-weight matmuls (Triton): W8A16 weight-only and W8A8 dynamic.

Shapes and math (the spec is ``reference.int8_weight_only_linear`` and
``reference.int8_dynamic_linear``)::

    x      [M, K]  bf16 / fp16 / fp32
    qdata  [N, K]  int8 in [-127, 127]
    scale  [N]     per-output-channel scale (weight dtype for W8A16, fp32 for W8A8)

    int8_mm:      y = x @ (qdata * scale[:, None]).T                       fp32 accumulate
    int8_dyn_mm:  xq, xs = per-row int8 quantization of x (``quant.quantize_rows``)
                  y = (xq @ qdata.T, exact int32) * xs[:, None] * scale[None, :]
    y [M, N] in x.dtype

Both run the kernels in ``_w8.py``: an FMA GEMV for M = 1 and a tensor-core
GEMM (int8 x int8 -> int32 ``tl.dot`` for W8A8; the weight converted to x.dtype
in the main loop for W8A16) with split-K for small M. Scales go in the epilogue.
W8A16 with bf16 / fp16 x from M = 257 (``_w8.DEQUANT_MIN_M``) on CUDA dequantizes the weight in
4096-row chunks and runs cuBLAS instead.
"""

from __future__ import annotations

import torch

from lowbit.compile import kernel_op, linear_out_fake
from lowbit.ops.triton import _w8
from lowbit.ops.triton._utils import launcher
from lowbit.ops.triton._w8 import w8_mm, w8a16_lane


@kernel_op("int8_mm_triton", fake=linear_out_fake)
@launcher("int8_mm", (torch.int8,), lane=w8a16_lane)
def int8_mm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A16: ``x [M, K] @ (qdata * scale[:, None]).T -> [M, N]`` in x.dtype."""
    return w8_mm(x, qdata, scale, None, x.dtype)


def _dyn_key(x, qdata, scale):
    return _w8.dyn_key(x, qdata, scale, "int8")


def _dyn_lane(x, qdata, scale):
    """W8A8 through a kept ``_w8.DynPlan`` for these arguments, or None (``_utils.launcher``)."""
    return _w8.dyn_lane(x, qdata, scale, _dyn_key(x, qdata, scale))


@kernel_op("int8_dyn_mm_triton", fake=linear_out_fake)
@launcher("int8_dyn_mm", (torch.int8,), lane=_dyn_lane)
def int8_dyn_mm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8: per-row int8 quantization of x, int32 product, rescale -> [M, N] in x.dtype."""
    if x.shape[0] == 0:
        return x.new_empty(0, qdata.shape[0])
    return _w8.dyn_mm(x, qdata, scale, torch.int8, _dyn_key(x, qdata, scale))  # (eagerly: a plan, for the lane)
