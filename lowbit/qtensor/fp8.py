"""Float8Tensor: e4m3 weight with per-row scales and dynamic per-token e4m3 activations."""

from __future__ import annotations

import torch

from lowbit.ops import reference as ref
from lowbit.ops.backend import resolve
from lowbit.qtensor.base import SHARED_SCALES, QTensor, finite_qparams, float_weight, not_a_view


class Float8Tensor(QTensor):
    """Fields: ``qdata`` float8_e4m3fn [N, K]; ``scale`` fp32 [N].

    The fast path is the Triton kernel on CUDA sm_89+; elsewhere the reference
    (exact products, float64 accumulation) runs.
    """

    tensor_fields = ("qdata", "scale")
    attr_fields = ()

    @classmethod
    @torch.no_grad()
    def from_float(cls, w: torch.Tensor) -> Float8Tensor:
        w = float_weight(cls, w)
        scale = ref.fp8_choose_qparams(w, fit=w.dtype)
        finite_qparams(cls, w, scale)
        return cls(ref.fp8_quantize(w, scale), scale, shape=w.shape, dtype=w.dtype)

    def check_fields(self) -> None:
        if self.qdata.dtype != ref.FP8_DTYPE or tuple(self.qdata.shape) != self._matrix:
            self._field_error(
                "qdata", f"{self.qdata.dtype} {tuple(self.qdata.shape)}", f"{ref.FP8_DTYPE} {self._matrix}"
            )
        if tuple(self.scale.shape) != (self._matrix[0],) or self.scale.dtype != torch.float32:
            self._field_error("scale", f"{self.scale.dtype} {tuple(self.scale.shape)}", f"float32 ({self._matrix[0]},)")

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return ref.fp8_dequantize(self.qdata, self.scale, dtype or self.dtype).reshape(self.shape)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if resolve(x.device) == "triton":
            from lowbit.ops.triton import fp8 as triton_fp8

            return triton_fp8.fp8_dyn_mm(x, self.qdata, self.scale)
        return ref.fp8_dynamic_linear(x, self.qdata, self.scale)

    def slice_cols(self, start: int, end: int) -> QTensor:
        out = Float8Tensor(self.qdata[:, start:end], self.scale, shape=(self.shape[0], end - start), dtype=self.dtype)
        return not_a_view(out, SHARED_SCALES)
