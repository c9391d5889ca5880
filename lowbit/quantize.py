"""quantize_: swap the weights of selected nn.Linear modules for quantized tensors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit import config as C
from lowbit.qtensor import Float8Tensor, Int4Tensor, Int8DynActTensor, Int8Tensor, QTensor

log = logging.getLogger("lowbit")

# config type -> function(weight, config) -> quantized tensor. Other modules
# (qat.py) add their own config types with ``register_handler``.
_HANDLERS: dict[type, Callable] = {
    C.Int4WeightOnlyConfig: lambda w, c: Int4Tensor.from_float(w, group_size=c.group_size),
    C.Int8WeightOnlyConfig: lambda w, c: Int8Tensor.from_float(w),
    C.Int8DynamicActivationInt8WeightConfig: lambda w, c: Int8DynActTensor.from_float(w),
    C.Float8DynamicActivationFloat8WeightConfig: lambda w, c: Float8Tensor.from_float(w),
}

# handlers that replace the whole module instead of its weight (QAT prepare)
_MODULE_HANDLERS: dict[type, Callable] = {}


def register_handler(config_type: type, fn: Callable, *, module: bool = False) -> None:
    (_MODULE_HANDLERS if module else _HANDLERS)[config_type] = fn


@dataclass
class QuantizeReport:
    """What quantize_ did: fully qualified names of quantized and skipped layers."""

    config: object
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # fqn -> reason

    def __str__(self):
        lines = [
            f"lowbit {getattr(self.config, 'name', self.config)}: {len(self.quantized)} quantized, {len(self.skipped)} skipped"
        ]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def skip_reason(mod: nn.Linear, config) -> str | None:
    """Why ``config`` cannot quantize ``mod``'s weight, or None if it can."""
    if nn.utils.parametrize.is_parametrized(mod, "weight"):
        return "its weight is parametrized (e.g. weight_norm); remove the parametrization first"
    w = mod.weight
    if isinstance(w, nn.parameter.UninitializedParameter):
        return "its weight is not initialized yet (a lazy module: run one forward first)"
    if isinstance(w, QTensor):
        return f"already quantized ({type(w).__name__})"
    if w.numel() == 0:
        return f"its weight is empty ({tuple(w.shape)})"
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"weight dtype {w.dtype} is not supported (float32, bfloat16 or float16)"
    if isinstance(config, C.Int4WeightOnlyConfig) and mod.in_features % config.group_size:
        return f"in_features={mod.in_features} is not a multiple of group_size={config.group_size}"
    return None


def quantize_weight(w: torch.Tensor, config) -> QTensor:
    """The quantized tensor ``config`` makes of a full-precision weight ``w``."""
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise TypeError(f"quantize_weight: {config!r} does not quantize weights")
    with torch.no_grad():
        return handler(w.detach(), config)


def tied_weights(model: nn.Module) -> dict[int, str]:
    """id(linear) -> the name of another module's parameter that is the same tensor as the linear's
    weight (tied weights, e.g. an output head sharing the input embedding's)."""
    holders: dict[int, list[tuple[str, str]]] = {}
    linears = []
    for fqn, mod in model.named_modules():
        for name, p in mod._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((fqn, name))
        if isinstance(mod, nn.Linear) and mod._parameters.get("weight") is not None:
            linears.append((fqn, mod))
    out = {}
    for fqn, mod in linears:
        others = [f"{f}.{name}" if f else name for f, name in holders[id(mod._parameters["weight"])] if f != fqn]
        if others:
            out[id(mod)] = others[0]
    return out


def _dtensor_weights(targets) -> list[tuple[str, object]]:
    """(fqn, placements) of the targets whose weight is a DTensor (sharded: FSDP2, tensor parallel)."""
    dt = sys.modules.get("torch.distributed.tensor")
    if dt is None:
        return []
    weights = [(fqn, getattr(mod, "weight", None)) for fqn, mod in targets]
    return [(fqn, w.placements) for fqn, w in weights if isinstance(w, dt.DTensor)]


def _refuse_qat_prepared(targets, config) -> None:
    """ValueError, before any layer changes, if a target is prepared for QAT: its forward
    fake-quantizes its weight, which a quantized weight cannot be."""
    from lowbit.qat import FakeQuantLinear

    prepared = [(fqn, mod) for fqn, mod in targets if isinstance(mod, FakeQuantLinear)]
    if prepared:
        fqn, mod = prepared[0]
        raise ValueError(
            f"quantize_: layer {fqn!r} (and {len(prepared) - 1} more) is prepared for QAT with {mod.qat_config}; "
            f"convert it with quantize_(model, QATConfig({mod.qat_config}, step='convert')) instead of {config}"
        )


def check_finite(w: torch.Tensor, where: str) -> None:
    """ValueError naming ``where`` (e.g. ``layer 'model.fc'``) if ``w`` holds NaN or Inf."""
    if w.device.type == "meta" or bool(torch.isfinite(w).all()):  # (counted only when some are not)
        return
    bad = (~torch.isfinite(w)).sum().item()
    raise ValueError(f"{where}: weight has {bad} NaN/Inf values of {w.numel()}; cannot quantize")


def quantize_(
    model: nn.Module,
    config,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    progress: bool | None = None,
) -> nn.Module:
    """Quantize, in place, the weights of ``model``'s ``nn.Linear`` layers selected by ``filter_fn``.

    ``filter_fn(module, fqn)`` defaults to every ``nn.Linear``. Layers that the
    scheme cannot represent are skipped, logged and listed with the reason in
    ``model.lowbit_report`` (a ``QuantizeReport``); so are linears whose weight is tied to another
    module's parameter (quantizing one would untie them, as Transformers' quantizers also leave
    tied weights alone). A weight holding NaN/Inf raises ``ValueError``, and so does a sharded
    (DTensor) weight, before any layer changes: quantize before ``fully_shard``, or an unsharded
    copy. Returns ``model``.
    """
    handler = _HANDLERS.get(type(config))
    module_handler = _MODULE_HANDLERS.get(type(config))
    if handler is None and module_handler is None:
        known = ", ".join(t.__name__ for t in (*_HANDLERS, *_MODULE_HANDLERS))
        raise TypeError(f"quantize_: unknown config {config!r}; expected one of {known}")
    filter_fn = filter_fn or (lambda mod, fqn: isinstance(mod, nn.Linear))
    targets = [(fqn, mod) for fqn, mod in model.named_modules() if filter_fn(mod, fqn)]
    report = QuantizeReport(config)
    if handler is not None or getattr(config, "step", None) == "convert":  # (QAT prepare keeps float weights)
        sharded = _dtensor_weights(targets)
        if sharded:
            raise ValueError(
                f"quantize_: the weight of layer {sharded[0][0]!r} (and {len(sharded) - 1} more) is a sharded DTensor "
                f"(placements {sharded[0][1]}); quantizing it would be undone by the sharding: quantize before "
                "fully_shard, or an unsharded copy (a full state dict)"
            )
    if handler is not None:
        _refuse_qat_prepared(targets, config)
    tied = tied_weights(model)
    show = progress if progress is not None else len(targets) >= 64
    for fqn, mod in tqdm(targets, desc="lowbit quantize", disable=not show, unit="layer"):
        if id(mod) in tied:
            report.skipped[fqn] = f"its weight is tied to {tied[id(mod)]}; quantizing it would untie them"
            continue
        if module_handler is not None:
            module_handler(model, fqn, mod, config, report)
            continue
        if not isinstance(mod, nn.Linear):
            report.skipped[fqn] = f"{type(mod).__name__} is not an nn.Linear"
            continue
        reason = skip_reason(mod, config)
        if reason is not None:
            report.skipped[fqn] = reason
            continue
        check_finite(mod.weight.detach(), f"layer {fqn!r}")
        mod.weight = nn.Parameter(quantize_weight(mod.weight, config), requires_grad=False)
        report.quantized.append(fqn)
    for fqn, why in report.skipped.items():
        log.warning("lowbit: skipped %s: %s", fqn or "<root>", why)
    model.lowbit_report = report
    # a Transformers model exists only once modeling_utils is imported; never import it here
    tf = sys.modules.get("transformers.modeling_utils")
    if tf is not None and report.quantized:  # save_pretrained then writes a lowbit checkpoint
        from lowbit import hf

        hf.guard_save_pretrained()  # (an enclosing model, quantize_ on a submodule: at its save)
        if isinstance(model, tf.PreTrainedModel):
            hf.attach_after_quantize(model, config)
    return model
