"""The matmul entry points of a quantized weight: ``F.linear`` (``__torch_function__``) and the
``mm`` / ``addmm`` of a decomposed linear (``__torch_dispatch__``) go to ``quantized_linear``,
which checks the input, follows ``torch.autocast``, flattens leading dimensions and calls the
format's ``linear``; its input gradient dequantizes one layer's weight (``_QuantLinearFn``). Also
the fused entry points ``swiglu_linear`` and ``linear_add_rmsnorm`` (``lowbit.fuse``)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from lowbit.qtensor.base import _SUPPORTED_ACTIVATIONS, QTensor, flat_only, keep_mark

aten = torch.ops.aten


def check_activation(x: torch.Tensor, w: QTensor) -> None:
    if x.dtype not in _SUPPORTED_ACTIVATIONS:
        names = ", ".join(str(d) for d in _SUPPORTED_ACTIVATIONS)
        raise TypeError(f"{type(w).__name__} linear: activation dtype {x.dtype} is not supported; use one of {names}")
    # w._size / w._device: cached at construction; w.shape / w.device would each go
    # through __torch_function__ (~2 us, on every linear call)
    if len(w._size) != 2:  # (the flattened view FSDP keeps as bookkeeping)
        flat_only(w, "a linear with")
        raise NotImplementedError(f"{type(w).__name__} linear: the weight is {tuple(w._size)}, want [N, K]")
    if x.shape[-1] != w._size[1]:
        raise ValueError(
            f"{type(w).__name__} linear: input has {x.shape[-1]} features, weight expects {w._size[1]} "
            f"(weight shape {tuple(w._size)})"
        )
    if x.device != w._device:
        raise ValueError(f"{type(w).__name__} linear: input on {x.device}, weight on {w._device}")


def _forward(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    lead = x.shape[:-1]
    n = w._size[0]
    if x.dim() == 2:
        x2 = x
    else:
        x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x.new_zeros(*lead, n)
    if not x2.is_contiguous() or x2.stride(-1) != 1:  # K = 1 sliced with a step is "contiguous" to torch
        x2 = x2.clone(memory_format=torch.contiguous_format)
    y = w.linear(x2)
    return y if x.dim() == 2 else y.reshape(*lead, n)


def swiglu_linear(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """``silu(x @ gate.T) * (x @ up.T)`` for a quantized weight stacked as [gate; up] (2 I rows):
    x [..., K] -> [..., I], inference only (``reference.swiglu`` of the linear's output)."""
    check_activation(x, w)
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("swiglu_linear is for inference; call the gate and up linears for gradients")
    if w._size[0] % 2:
        raise ValueError(f"swiglu_linear: the weight has {w._size[0]} rows; want [gate; up] halves")
    lead, half = x.shape[:-1], w._size[0] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x.new_zeros(*lead, half)
    if not x2.is_contiguous() or x2.stride(-1) != 1:
        x2 = x2.clone(memory_format=torch.contiguous_format)
    return w.linear_swiglu(x2).reshape(*lead, half)


def linear_add_rmsnorm(x: torch.Tensor, w: QTensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float):
    """(h, normed) = ``reference.add_rmsnorm(x @ w.T, residual, norm_weight, eps)``: a pre-norm
    decoder layer's residual add after a quantized linear and the RMSNorm of the sum; x [..., K],
    residual [..., N], norm_weight [N] of x's dtype; inference only."""
    check_activation(x, w)
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("linear_add_rmsnorm is for inference; call the linear and the norm for gradients")
    from lowbit.ops.reference import check_add_rmsnorm_operands

    lead, n = x.shape[:-1], w._size[0]
    check_add_rmsnorm_operands("linear_add_rmsnorm", (*lead, n), residual, norm_weight, x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x.new_zeros(*lead, n), x.new_zeros(*lead, n)
    if not x2.is_contiguous() or x2.stride(-1) != 1:
        x2 = x2.clone(memory_format=torch.contiguous_format)
    h, normed = w.linear_add_rmsnorm(x2, residual.reshape(-1, n), norm_weight, eps)
    return h.reshape(*lead, n), normed.reshape(*lead, n)


class _QuantLinearFn(torch.autograd.Function):
    """Gradients for the input of a linear on a frozen quantized weight.

    The backward dequantizes this one layer's weight, so training (LoRA on a
    quantized base) never holds more than one full-precision weight at a time.
    """

    @staticmethod
    def forward(x, w):
        return _forward(x, w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.w = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.w.dequantize(grad.dtype), None


def quantized_linear(x: torch.Tensor, w: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    dt = autocast_dtype(x)
    if dt is not None:
        return _autocast_linear(x, w, bias, dt)
    check_activation(x, w)
    if bias is not None and bias.dtype != x.dtype:  # as F.linear
        raise TypeError(f"{type(w).__name__} linear: bias is {bias.dtype} but the input is {x.dtype}")
    if torch.is_grad_enabled() and w.requires_grad and not torch.compiler.is_compiling():
        warnings.warn(
            f"a quantized {type(w).__name__} {tuple(w._size)} has requires_grad=True, but quantized weights are "
            "frozen: it gets no gradient (train adapters or use lowbit.qat instead; call .requires_grad_(False) "
            "on it to silence this)",
            stacklevel=3,
        )
    if torch.is_grad_enabled() and x.requires_grad:
        y = _QuantLinearFn.apply(x, w)
    else:
        y = _forward(x, w)
    return y if bias is None else y + bias


_AUTOCAST_DEVICES = ("cuda", "cpu")  # (is_autocast_enabled raises for "meta")


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts a linear's input ``x`` to here, or None (autocast off)."""
    if not torch.compiler.is_compiling() and not torch._C._is_any_autocast_enabled():
        return None  # (eagerly the common case in one call, ~0.2 us against ~1.3)
    dev = x.device.type
    if dev in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def _autocast_linear(x: torch.Tensor, w: QTensor, bias: torch.Tensor | None, dt: torch.dtype) -> torch.Tensor:
    """Under ``torch.autocast``, as ``F.linear`` there: the input and bias are cast to the
    autocast dtype, which is the output's. The matmul then runs with autocast off, so the
    kernels' own fp32 accumulation (and the reference's fp32 math) is not cast down again."""
    dev = x.device.type
    if x.dtype in _SUPPORTED_ACTIVATIONS:  # (float64 stays, as F.linear under autocast leaves it)
        x = x.to(dt)
    if bias is not None and bias.dtype in _SUPPORTED_ACTIVATIONS:
        bias = bias.to(dt)
    with torch.autocast(dev, enabled=False):
        return quantized_linear(x, w, bias)


@QTensor.implements_function(F.linear)
def _(func, types, args, kwargs):
    x = args[0] if args else kwargs.get("input")
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(w, QTensor) or isinstance(x, QTensor):
        raise NotImplementedError(
            f"F.linear with a quantized tensor as the input is not supported ({type(x).__name__})"
        )
    return quantized_linear(x, w, bias)


@QTensor.implements(aten.mm.default)
def _(func, types, args, kwargs):
    return _mm_like(args[0], args[1], None)


@QTensor.implements(aten.addmm.default)
def _(func, types, args, kwargs):
    return _addmm(args, kwargs)


def _addmm(args, kwargs):
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if beta != 1 or alpha != 1:
        raise NotImplementedError(
            f"addmm with a quantized weight supports beta=1, alpha=1 only (a linear), got beta={beta}, alpha={alpha}"
        )
    return _mm_like(args[1], args[2], args[0])


def _mm_like(x, wt, bias):
    if isinstance(wt, QTensor) and bias is None and not isinstance(x, (QTensor, TransposedQTensor)):
        # grad @ w: the input gradient autograd's MmBackward asks for after a decomposed
        # linear (x @ w.t()); as _QuantLinearFn.backward, through this layer's dequantized weight
        flat_only(wt, "mm with")
        return x @ wt.dequantize(x.dtype)
    if not isinstance(wt, TransposedQTensor) or isinstance(x, QTensor):
        raise NotImplementedError("mm with a quantized weight is only supported as x @ w.t() (linear), without out=")
    return quantized_linear(x, wt.weight, bias)


class TransposedQTensor(torch.Tensor):
    """``w.t()`` of a quantized weight: only good for the ``mm``/``addmm`` of a decomposed linear."""

    @staticmethod
    def __new__(cls, weight: QTensor):
        shape = (weight.shape[1], weight.shape[0])
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=weight.dtype, device=weight.device)

    def __init__(self, weight: QTensor):
        self.weight = weight

    def __tensor_flatten__(self):
        return ["weight"], None

    @classmethod
    def __tensor_unflatten__(cls, inner_tensors, ctx, outer_size, outer_stride):
        return cls(inner_tensors["weight"])

    def __repr__(self):
        return f"TransposedQTensor({self.weight!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.mm.default:
            return _mm_like(args[0], args[1], None)
        if func is aten.addmm.default:
            return _addmm(args, kwargs)
        if func is aten.t.default:
            return keep_mark(args[0].weight, args[0].weight._rebuild(lambda t: t))
        if func in (aten.detach.default, aten.alias.default):
            return cls(args[0].weight)
        inner = next((type(a.weight).__name__ for a in args if isinstance(a, TransposedQTensor)), "QTensor")
        raise NotImplementedError(f"{func} on a transposed {inner} is not supported (only x @ w.t() without out=)")
