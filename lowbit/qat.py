"""Quantization-aware training: fake quantization with a straight-through estimator.

Two steps, both applied with ``quantize_``::

    quantize_(model, QATConfig(int4_weight_only(32), step="prepare"))  # nn.Linear -> FakeQuantLinear
    ... train ...
    quantize_(model, QATConfig(int4_weight_only(32), step="convert"))  # FakeQuantLinear -> lowbit weights

``prepare`` turns each selected ``nn.Linear`` into a ``FakeQuantLinear`` (an
``nn.Linear`` subclass) in place, by swapping its class: the module object, its
Parameters (an optimizer built before ``prepare`` keeps working), hooks and
``state_dict`` keys stay the same. Its forward computes what
the real lowbit layer computes, through the functions of
``lowbit.ops.reference`` (the spec): the fake-quantized weight equals
``<Tensor>.from_float(w).dequantize()`` of the real class, and for W8A8 / fp8
the activations are quantized per token with the real rule and the product is
taken in fp32 (the real scheme accumulates exactly, then rescales). After
``convert`` the outputs equal the prepared model's outputs (bit-exact against
the reference backend for int4 / int8 weight-only, fp32 rounding for W8A8 / fp8).

Gradients (straight-through estimator)
--------------------------------------
The quantization parameters (scale, zero) are recomputed from the tensor on
every forward and treated as constants: no gradient flows through them.

* Weights: ``d w_hat / d w = 1`` everywhere. The range is the weight's own
  min/max (int4, per group) or absmax (int8, fp8, per row), so every weight is
  inside it by construction; the clamp of the real quantizer only absorbs the
  rounding of the stored bf16/fp16 scale and zero, which can push the extreme
  weights of a group past the last code (for a bf16 group at an offset of 10
  and a spread of 0.03, most of them). Zeroing the gradient there would freeze
  exactly the weights that define the range, so weights always pass through.
* Activations (W8A8, fp8; per token): the gradient is 1 where the clamp is
  inactive, i.e. where rounding alone picks the code, the bounds included:
  ``|round(x / scale)| <= 127`` for int8, ``|x / scale| <= 464`` for e4m3
  (448 plus half its step of 32, where a value still rounds to 448); 0 beyond.
  With the per-token absmax scale no activation is beyond, so the estimator is
  the identity in practice; ``fake_quantize_int8`` / ``fake_quantize_fp8``
  take an explicit scale, where values beyond the bounds do occur.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import config as C
from lowbit.compile import kernel_op
from lowbit.ops import reference as ref
from lowbit.quantize import check_finite, quantize_weight, register_handler, skip_reason

STEPS = ("prepare", "convert")
# |v / scale| beyond which an fp8 value saturates: halfway from 448 to the next e4m3 step (480)
FP8_CLAMP_LIMIT = ref.FP8_MAX + 16.0


@dataclass(frozen=True)
class QATConfig:
    """``quantize_`` config for quantization-aware training.

    ``step="prepare"`` swaps each selected ``nn.Linear`` for a ``FakeQuantLinear``
    that trains with the numerics of ``base_config``; ``step="convert"`` swaps
    each ``FakeQuantLinear`` back for an ``nn.Linear`` with the real lowbit weight.
    """

    base_config: Any
    step: str = "prepare"

    def __post_init__(self):
        if self.step not in STEPS:
            raise ValueError(f"QATConfig step must be one of {STEPS}, got {self.step!r}")
        if type(self.base_config) not in _FAKE_WEIGHT:
            known = ", ".join(t.__name__ for t in _FAKE_WEIGHT)
            raise TypeError(f"QATConfig: unsupported base_config {self.base_config!r}; expected one of {known}")

    @property
    def name(self) -> str:
        return f"qat_{self.step}({self.base_config.name})"


# ---------------------------------------------------------------------------- straight-through estimator
def _straight_through(v: torch.Tensor, v_hat: torch.Tensor, inside: torch.Tensor | None = None) -> torch.Tensor:
    """``v_hat`` in the forward (exactly: ``v - v.detach()`` is 0); gradient ``inside`` (or 1) w.r.t. ``v``."""
    delta = v - v.detach()
    # in v_hat's dtype (x's, for a fake weight): an fp32 weight's delta must not promote it
    return v_hat + (delta if inside is None else delta * inside).to(v_hat.dtype)


def fake_quantize_int4(w: torch.Tensor, group_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``Int4Tensor.from_float(w, group_size).dequantize(dtype)``; gradient 1 w.r.t. ``w``."""
    return _straight_through(w, _fake_weight(w.detach(), "int4", group_size, dtype or w.dtype))


@kernel_op("qat_fake_weight", fake=lambda w, kind, group_size, dtype: w.new_empty(w.shape, dtype=dtype))
def _fake_weight(w: torch.Tensor, kind: str, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight as the real class of ``kind`` stores it, dequantized to ``dtype`` (no gradient).

    An operator, so that torch.compile runs it as it runs eagerly: Inductor, fusing these steps,
    kept the qparams in fp32 where the reference rounds them to the weight's 16-bit dtype (it does
    not emulate such casts by default), and 75% of a bf16 weight's fake-quantized values then
    differed from the converted weight's (by up to a step)."""
    if kind == "int4":
        scale, zero = ref.int4_choose_qparams(w, group_size, w.dtype)
        codes = ref.int4_quantize(w, scale, zero, group_size)
        w_hat = ref.int4_dequantize(ref.int4_pack(codes), scale, zero, group_size, dtype)
    elif kind == "fp8":
        scale = ref.fp8_choose_qparams(w, fit=w.dtype)
        w_hat = ref.fp8_dequantize(ref.fp8_quantize(w, scale), scale, dtype)
    else:  # "int8": Int8Tensor keeps its scale in the weight's dtype, "int8_dyn": Int8DynActTensor in fp32
        scale = ref.int8_choose_qparams(w, w.dtype if kind == "int8" else torch.float32, fit=w.dtype)
        w_hat = ref.int8_dequantize(ref.int8_quantize(w, scale), scale, dtype)
    return w_hat.contiguous()  # (as the fake: a transposed weight's int4 result was contiguous, int8's not)


def fake_quantize_int8(v: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, *, mask: bool = True) -> torch.Tensor:
    """Symmetric int8 per row of ``v`` with ``scale`` [rows], dequantized to ``dtype``.

    Gradient 1 where ``|round(v / scale)| <= 127``, 0 beyond (everywhere 1 if ``mask`` is False).
    """
    with torch.no_grad():
        v_hat, inside = _int8_parts(v.detach(), scale, dtype)
    return _straight_through(v, v_hat, inside if mask else None)


def _int8_parts(v: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``v`` quantized with ``scale`` and dequantized to ``dtype``, and where rounding alone picks the code."""
    v_hat = ref.int8_dequantize(ref.int8_quantize(v, scale), scale, dtype)
    return v_hat, torch.round(v.float() / scale.float().unsqueeze(-1)).abs() <= 127


def fake_quantize_fp8(v: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, *, mask: bool = True) -> torch.Tensor:
    """e4m3 per row of ``v`` with fp32 ``scale`` [rows], dequantized to ``dtype``.

    Gradient 1 where ``|v / scale| <= 464``, 0 beyond (everywhere 1 if ``mask`` is False).
    """
    with torch.no_grad():
        v_hat, inside = _fp8_parts(v.detach(), scale, dtype)
    return _straight_through(v, v_hat, inside if mask else None)


def _fp8_parts(v: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``_int8_parts``, in e4m3: where ``|v / scale| <= 464``."""
    v_hat = ref.fp8_dequantize(ref.fp8_quantize(v, scale), scale, dtype)
    return v_hat, (v.float() / scale.unsqueeze(-1)).abs() <= FP8_CLAMP_LIMIT


def _int4_weight(w, config, dtype):
    return fake_quantize_int4(w, config.group_size, dtype)


def _int8_weight(w, config, dtype):
    return _straight_through(w, _fake_weight(w.detach(), "int8", 0, dtype))


def _int8_dyn_weight(w, config, dtype):
    return _straight_through(w, _fake_weight(w.detach(), "int8_dyn", 0, dtype))


def _fp8_weight(w, config, dtype):
    return _straight_through(w, _fake_weight(w.detach(), "fp8", 0, dtype))


@kernel_op(
    "qat_fake_rows",
    fake=lambda x, kind: (x.new_empty(x.shape, dtype=torch.float32), x.new_empty(x.shape, dtype=torch.bool)),
)
def _fake_rows(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x's tokens quantized per row as the W8A8 (``kind`` "int8") / fp8 kernels do, in fp32, and
    where the clamp is inactive (the STE's mask; ``fake_quantize_int8`` / ``fake_quantize_fp8``).
    An operator for the reason ``_fake_weight`` is one: Inductor merged the previous layer's
    rounding of its output to x's 16-bit dtype with this quantizer's ``x.float()`` and skipped it."""
    if kind == "int8":
        x_hat, inside = _int8_parts(x, ref.int8_choose_qparams(x, torch.float32), torch.float32)
    else:
        x_hat, inside = _fp8_parts(x, ref.fp8_choose_qparams(x), torch.float32)
    return x_hat.contiguous(), inside.contiguous()


@torch.library.custom_op("lowbit::qat_round", mutates_args=())
def _round(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``y.to(dtype)`` (a narrower dtype), kept by Inductor: it merged this rounding of a W8A8 / fp8
    layer's fp32 product into the bias add after it (one rounding instead of two). Gradient: the
    incoming one, cast back."""
    return y.to(dtype)


_round.register_fake(lambda y, dtype: y.new_empty(y.shape, dtype=dtype))
_round.register_autograd(
    lambda ctx, grad: (grad.to(ctx.dtype), None),
    setup_context=lambda ctx, inputs, output: setattr(ctx, "dtype", inputs[0].dtype),
)


def _int8_rows(x):
    return _straight_through(x, *_fake_rows(x.detach(), "int8"))


def _fp8_rows(x):
    return _straight_through(x, *_fake_rows(x.detach(), "fp8"))


# config type -> fake weight quantizer; for dynamic-activation schemes, the per-token activation quantizer
_FAKE_WEIGHT = {
    C.Int4WeightOnlyConfig: _int4_weight,
    C.Int8WeightOnlyConfig: _int8_weight,
    C.Int8DynamicActivationInt8WeightConfig: _int8_dyn_weight,
    C.Float8DynamicActivationFloat8WeightConfig: _fp8_weight,
}
_FAKE_ACTIVATION = {
    C.Int8DynamicActivationInt8WeightConfig: _int8_rows,
    C.Float8DynamicActivationFloat8WeightConfig: _fp8_rows,
}


def fake_quantize_weight(w: torch.Tensor, config, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``w`` as the real scheme ``config`` stores it, dequantized to ``dtype`` (default ``w.dtype``).

    Equals ``<Tensor>.from_float(w).dequantize(dtype)`` of the real class; STE gradients w.r.t. ``w``.
    """
    return _FAKE_WEIGHT[type(config)](w, config, dtype or w.dtype)


def fake_quant_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, config) -> torch.Tensor:
    """``F.linear`` with the numerics of the lowbit scheme ``config`` and STE gradients."""
    act = _FAKE_ACTIVATION.get(type(config))
    if act is None:  # weight-only: the real layer dequantizes to the activation dtype
        y = F.linear(x, fake_quantize_weight(w, config, x.dtype))
    else:  # W8A8 / fp8: the real product of the codes is exact, then rescaled; fp32 keeps nearly all of it
        y = F.linear(act(x), fake_quantize_weight(w, config, torch.float32))
        y = y if x.dtype == torch.float32 else _round(y, x.dtype)
    # the bias is added after rounding the product, as the real layer does (not fused as in addmm;
    # written in fp32 and rounded, the same numbers as ``y + bias``, so that Inductor's pattern
    # matcher does not make an addmm of it, which rounds once)
    return y if bias is None else (y.float() + bias.float()).to(torch.promote_types(y.dtype, bias.dtype))


# ---------------------------------------------------------------------------- module
class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose forward fake-quantizes as ``qat_config`` (a lowbit base config) does.

    ``prepare`` turns an ``nn.Linear`` into one in place (``__class__`` swap): the
    module object, its Parameters, hooks and ``state_dict`` keys stay the same.
    """

    qat_config: Any

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, qat_config, **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        self.qat_config = qat_config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_linear(x, self.weight, self.bias, self.qat_config)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qat={self.qat_config}"


def _prepare(fqn: str, mod: nn.Module, base, report) -> None:
    if isinstance(mod, FakeQuantLinear):
        report.skipped[fqn] = f"already prepared for QAT with {mod.qat_config}"
        return
    if type(mod) is not nn.Linear:  # a subclass may have its own forward; we would drop it
        report.skipped[fqn] = f"{type(mod).__name__} is not an nn.Linear"
        return
    reason = skip_reason(mod, base)
    if reason is not None:
        report.skipped[fqn] = reason
        return
    check_finite(mod.weight.detach(), f"layer {fqn!r}")
    mod.__class__ = FakeQuantLinear
    mod.qat_config = base
    report.quantized.append(fqn)


def _convert(fqn: str, mod: nn.Module, base, report) -> None:
    if not isinstance(mod, FakeQuantLinear):
        report.skipped[fqn] = "not prepared for QAT (not a FakeQuantLinear)"
        return
    if mod.qat_config != base:
        raise ValueError(
            f"layer {fqn!r} was prepared with {mod.qat_config} but is being converted with {base}; "
            "convert with the config used for prepare"
        )
    check_finite(mod.weight.detach(), f"layer {fqn!r}")
    with torch.no_grad():
        qweight = quantize_weight(mod.weight, base)
    mod.__class__ = nn.Linear
    del mod.qat_config
    mod.weight = nn.Parameter(qweight, requires_grad=False)
    report.quantized.append(fqn)


def _handle(model: nn.Module, fqn: str, mod: nn.Module, config: QATConfig, report) -> None:
    (_prepare if config.step == "prepare" else _convert)(fqn, mod, config.base_config, report)


register_handler(QATConfig, _handle, module=True)
