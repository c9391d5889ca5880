"""Int8 weights: weight-only (W8A16) and with dynamic int8 activations (W8A8)."""

from __future__ import annotations

import torch

from lowbit.ops import cpu
from lowbit.ops import reference as ref
from lowbit.ops.backend import resolve
from lowbit.qtensor.base import SHARED_SCALES, QTensor, finite_qparams, float_weight, not_a_view


class Int8Tensor(QTensor):
    """Symmetric per-output-channel int8 weight (W8A16).

    Fields: ``qdata`` int8 [N, K]; ``scale`` [N] in the weight's dtype.
    """

    tensor_fields = ("qdata", "scale")
    attr_fields = ()
    scale_dtype: torch.dtype | None = None  # None: the weight's dtype

    @classmethod
    @torch.no_grad()
    def from_float(cls, w: torch.Tensor) -> Int8Tensor:
        w = float_weight(cls, w)
        scale = ref.int8_choose_qparams(w, cls.scale_dtype or w.dtype, fit=w.dtype)
        finite_qparams(cls, w, scale)
        return cls(ref.int8_quantize(w, scale), scale, shape=w.shape, dtype=w.dtype)

    def check_fields(self) -> None:
        if self.qdata.dtype != torch.int8 or tuple(self.qdata.shape) != self._matrix:
            self._field_error("qdata", f"{self.qdata.dtype} {tuple(self.qdata.shape)}", f"int8 {self._matrix}")
        if tuple(self.scale.shape) != (self._matrix[0],) or not self.scale.dtype.is_floating_point:
            self._field_error("scale", f"{self.scale.dtype} {tuple(self.scale.shape)}", f"floats ({self._matrix[0]},)")

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return ref.int8_dequantize(self.qdata, self.scale, dtype or self.dtype).reshape(self.shape)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        backend = resolve(x.device)
        if backend == "cpu":
            return cpu.int8_mm(x, self.qdata, self.scale)
        if backend == "triton":
            from lowbit.ops.triton import int8 as triton_int8

            return triton_int8.int8_mm(x, self.qdata, self.scale)
        return ref.int8_weight_only_linear(x, self.qdata, self.scale)

    def slice_cols(self, start: int, end: int) -> QTensor:
        out = type(self)(self.qdata[:, start:end], self.scale, shape=(self.shape[0], end - start), dtype=self.dtype)
        return not_a_view(out, SHARED_SCALES)


class Int8DynActTensor(Int8Tensor):
    """W8A8: the int8 weight of ``Int8Tensor`` (fp32 scale [N]); activations are
    quantized per token at run time and multiplied in int8 with int32 accumulation."""

    scale_dtype = torch.float32

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        backend = resolve(x.device)
        if backend == "cpu":
            return cpu.int8_dyn_mm(x, self.qdata, self.scale)
        if backend == "triton":
            from lowbit.ops.triton import int8 as triton_int8

            return triton_int8.int8_dyn_mm(x, self.qdata, self.scale)
        return ref.int8_dynamic_linear(x, self.qdata, self.scale)
