"""Transformers integration: ``quant_method="lowbit"``.

    from lowbit.hf import LowbitConfig
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=LowbitConfig("int4_weight_only"))
    model.save_pretrained(out)                       # flattened fields + quantization_config in config.json
    model = AutoModelForCausalLM.from_pretrained(out)  # any process that imported lowbit

Loading a full-precision checkpoint quantizes each ``nn.Linear`` weight as it
arrives (Transformers loads synchronously then, so at most one full-precision
layer is alive), through the same ``quantize_`` code as ``lowbit.quantize_``.
Loading a lowbit checkpoint validates every header first (``lowbit.safetensors``)
and rebuilds each weight from its fields with the same checks as ``load_file``.

Written against the Transformers 5.x quantizer API (5.17 to 5.23): ``HfQuantizer``
hooks, ``get_quantize_ops`` for quantize-on-load and ``get_weight_conversions``
with a ``WeightConverter`` for pre-quantized checkpoints. No private helper of
Transformers is called; the model attribute ``_keep_in_fp32_modules`` is read.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowbit import config as C
from lowbit import safetensors as lst
from lowbit.ops import reference as ref
from lowbit.qtensor import QTENSOR_CLASSES, QTensor
from lowbit.quantize import QuantizeReport, quantize_

log = logging.getLogger("lowbit")

QUANT_METHOD = "lowbit"

# scheme name (config.json) -> lowbit config
SCHEMES = {
    "int4_weight_only": lambda c: C.int4_weight_only(group_size=c.group_size),
    "int8_weight_only": lambda c: C.int8_weight_only(),
    "int8_dynamic_activation_int8_weight": lambda c: C.int8_dynamic_activation_int8_weight(),
    "float8_dynamic_activation_float8_weight": lambda c: C.float8_dynamic_activation_float8_weight(),
}
_BYTES_PER_WEIGHT = {"int4_weight_only": 0.5}  # the rest: one byte
# the tensor class a pre-quantized checkpoint of each scheme stores
_SCHEME_CLASS = {
    "int4_weight_only": "Int4Tensor",
    "int8_weight_only": "Int8Tensor",
    "int8_dynamic_activation_int8_weight": "Int8DynActTensor",
    "float8_dynamic_activation_float8_weight": "Float8Tensor",
}


@register_quantization_config(QUANT_METHOD)
class LowbitConfig(QuantizationConfigMixin):
    """``quantization_config`` for lowbit.

    Args:
        scheme: one of ``SCHEMES`` (the names of the ``lowbit`` config factories).
        group_size: int4 group size along K (32, 64, 128, 256); ignored by other schemes.
        modules_to_not_convert: module names (or name suffixes) kept in full precision.
            ``None`` keeps what Transformers picks for the model: the output head,
            tied weights and the last module.
        format_version: the ``lowbit.safetensors`` format the checkpoint uses; a
            checkpoint from a newer lowbit is refused with a clear error.
    """

    def __init__(
        self,
        scheme: str = "int4_weight_only",
        group_size: int = 128,
        modules_to_not_convert: list[str] | None = None,
        format_version: int = lst.FORMAT_VERSION,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        self.scheme = scheme
        self.group_size = group_size
        if isinstance(modules_to_not_convert, str):  # one name, not its characters
            modules_to_not_convert = [modules_to_not_convert]
        if modules_to_not_convert is not None and not isinstance(modules_to_not_convert, (list, tuple)):
            raise ValueError(
                f"LowbitConfig.modules_to_not_convert must be a list of module names, got {modules_to_not_convert!r}"
            )
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        self.format_version = format_version
        kwargs.pop("quant_method", None)
        if kwargs:
            log.warning("lowbit: LowbitConfig ignores unknown fields %s", sorted(kwargs))
        self.post_init()

    def post_init(self):
        import lowbit

        if self.scheme not in SCHEMES:
            raise ValueError(
                f"lowbit {lowbit.__version__} cannot serve quantization scheme {self.scheme!r}; it knows "
                f"{sorted(SCHEMES)}. A checkpoint with this scheme needs a lowbit version that supports it."
            )
        if not isinstance(self.format_version, int) or isinstance(self.format_version, bool) or self.format_version < 1:
            raise ValueError(f"LowbitConfig.format_version must be a positive int, got {self.format_version!r}")
        if self.format_version > lst.FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint uses lowbit format version {self.format_version}; lowbit {lowbit.__version__} "
                f"reads up to version {lst.FORMAT_VERSION}. Upgrade lowbit to load it."
            )
        if self.scheme == "int4_weight_only" and (
            type(self.group_size) is not int or self.group_size not in ref.INT4_GROUP_SIZES
        ):
            raise ValueError(f"LowbitConfig.group_size must be one of {ref.INT4_GROUP_SIZES}, got {self.group_size!r}")
        if self.modules_to_not_convert is not None and not all(isinstance(m, str) for m in self.modules_to_not_convert):
            raise ValueError("LowbitConfig.modules_to_not_convert must be a list of module names")

    def lowbit_config(self):
        """The ``lowbit`` config object this scheme stands for (what ``quantize_`` takes)."""
        return SCHEMES[self.scheme](self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "scheme": self.scheme,
            "group_size": self.group_size,
            "modules_to_not_convert": self.modules_to_not_convert,
            "format_version": self.format_version,
        }


def _matches(fqn: str, patterns) -> bool:
    """A pattern matches whole dotted components of ``fqn``: "lm_head", "mlp", "layers.0"."""
    return any(f".{p}." in f".{fqn}." for p in patterns)


def _check_shape(model, full_layer_name: str, shape) -> None:
    """Transformers skips its size check for parameters a quantizer claims: make it here, so a
    checkpoint weight of another shape (a resized head, an edited config) is an error, not a
    layer whose weight disagrees with its module."""
    if model is None:
        return
    fqn = full_layer_name.rpartition(".")[0]
    want = tuple(model.get_submodule(fqn).weight.shape)
    if tuple(shape) != want:
        raise ValueError(
            f"checkpoint: weight {full_layer_name!r} has shape {list(shape)} but the model's layer expects "
            f"{list(want)}; lowbit cannot reinitialise a quantized layer (ignore_mismatched_sizes): add "
            f"{fqn!r} to modules_to_not_convert, or fix the config"
        )


class _Deserialize(ConversionOps):
    """Rebuilds one lowbit weight from the fields Transformers collected for it."""

    def __init__(self, hf_quantizer: LowbitHfQuantizer):
        self.hf_quantizer = hf_quantizer  # Transformers also reads this: fields load in their stored dtype

    def __deepcopy__(self, memo):  # converters are copied per weight; this op holds no per-weight state
        return self

    def convert(
        self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None, **kwargs
    ):
        name, entry = self.hf_quantizer.entry_for(full_layer_name)
        _check_shape(model, full_layer_name, entry.shape)
        parts = {}
        for key, value in input_dict.items():
            values = value if isinstance(value, list) else [value]
            field = key.rpartition(".")[2]
            if len(values) != 1:
                raise ValueError(f"checkpoint: tensor {name!r} field {field!r}: stored {len(values)} times")
            parts[field] = values[0]
        q = lst.build_qtensor(name, entry, parts, source="checkpoint")
        q = q.to_device(q.device)  # int4: the CPU layout when loaded on CPU
        return {full_layer_name: nn.Parameter(q, requires_grad=False)}

    @property
    def reverse_op(self):
        raise NotImplementedError("lowbit saves through get_state_dict_and_metadata, not by reversing the load")


class _Converter(WeightConverter):
    """Collects ``<weight>.qdata``, ``<weight>.scale``, ... of a checkpoint into ``<weight>``."""

    __slots__ = ()

    def was_used(self) -> bool:
        # Transformers replays used converters backwards in save_pretrained; lowbit instead
        # flattens in get_state_dict_and_metadata, so keep this one out of that list.
        return False


class _Quantize(ConversionOps):
    """Quantizes one full-precision weight as it is loaded, through ``quantize_``."""

    def __init__(self, hf_quantizer: LowbitHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def __deepcopy__(self, memo):
        return self

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        (value,) = input_dict.values()
        value = value[0] if isinstance(value, list) else value
        module = model.get_submodule(full_layer_name.rpartition(".")[0])
        _check_shape(model, full_layer_name, tuple(value.shape))
        module.weight = nn.Parameter(value, requires_grad=False)
        quantize_(module, self.hf_quantizer.quantization_config.lowbit_config(), lambda m, _: m is module)
        del module.lowbit_report
        return {full_layer_name: module.weight}


@register_quantizer(QUANT_METHOD)
class LowbitHfQuantizer(HfQuantizer):
    """Quantize on load (full-precision checkpoint) or rebuild lowbit weights (lowbit checkpoint)."""

    requires_calibration = False
    quantization_config: LowbitConfig

    def __init__(self, quantization_config: LowbitConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []
        self.entries: dict[str, lst.Entry] = {}  # lowbit checkpoint metadata, by tensor name

    # ------------------------------------------------------------------ checks before loading
    def validate_environment(self, *args, device_map=None, **kwargs):
        self.quantization_config.post_init()
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "lowbit: offloading quantized weights to disk is not supported; use a device_map "
                "without 'disk' (CPU and GPU placement both work)"
            )
        if self.quantization_config.scheme.startswith("float8") and not torch.cuda.is_available():
            log.warning("lowbit: float8 has no fast CPU kernel; the reference implementation will run (slow)")

    def update_dtype(self, dtype):
        # every scheme computes in the activation dtype (fp32, bf16 or fp16): keep what the user asked for
        return dtype

    def param_element_size(self, model, param_name: str, param: torch.Tensor) -> float:
        if self.param_needs_quantization(model, param_name):
            return _BYTES_PER_WEIGHT.get(self.quantization_config.scheme, 1.0)
        return param.element_size()

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, cfg.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None)
        )
        if self.pre_quantized:
            self.entries = _read_checkpoint_metadata(checkpoint_files or [])
            _check_entries_match(self.entries, cfg)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        fqn, _, name = param_name.rpartition(".")
        if name != "weight":
            return False
        if self.pre_quantized:
            return self._entry_name(param_name) is not None
        try:
            module = model.get_submodule(fqn)
        except AttributeError:
            return False
        return isinstance(module, nn.Linear) and self._skip_reason(fqn, module) is None

    def _skip_reason(self, fqn: str, module: nn.Linear) -> str | None:
        if _matches(fqn, self.modules_to_not_convert):
            return "in modules_to_not_convert"
        cfg = self.quantization_config
        if cfg.scheme == "int4_weight_only" and module.in_features % cfg.group_size:
            return f"in_features={module.in_features} is not a multiple of group_size={cfg.group_size}"
        return None

    # ------------------------------------------------------------------ loading
    def get_quantize_ops(self):
        return _Quantize(self)

    def get_weight_conversions(self):
        if not self.pre_quantized:
            return []
        fields = sorted({f for cls in QTENSOR_CLASSES.values() for f in cls.tensor_fields})
        return [_Converter([f"weight.{f}" for f in fields], "weight", operations=[_Deserialize(self)])]

    def _entry_name(self, param_name: str) -> str | None:
        if param_name in self.entries:
            return param_name
        # the model may add or drop a base-model prefix relative to the checkpoint
        hits = [n for n in self.entries if n.endswith("." + param_name) or param_name.endswith("." + n)]
        return hits[0] if len(hits) == 1 else None

    def entry_for(self, param_name: str) -> tuple[str, lst.Entry]:
        name = self._entry_name(param_name)
        if name is None:
            raise ValueError(
                f"checkpoint: tensor {param_name!r}: fields are stored but no lowbit metadata describes it"
            )
        return name, self.entries[name]

    def _process_model_after_weight_loading(self, model, **kwargs):
        report = QuantizeReport(self.quantization_config.lowbit_config())
        for fqn, module in model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if isinstance(module.weight, QTensor):
                report.quantized.append(fqn)
            elif self.pre_quantized:
                report.skipped[fqn] = "stored in full precision in the checkpoint"
            else:
                report.skipped[fqn] = self._skip_reason(fqn, module) or "not quantized"
        model.lowbit_report = report
        return model

    # ------------------------------------------------------------------ saving, training
    def get_state_dict_and_metadata(self, model):
        return lst.flatten_state_dict(model.state_dict())

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # quantized weights are frozen; adapters (LoRA) on top train through F.linear's input gradient
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        for module in model.modules():
            w = getattr(module, "weight", None)
            if isinstance(w, QTensor):
                module.weight = nn.Parameter(w.dequantize(dtype or w.dtype), requires_grad=False)
        return model


def _check_entries_match(entries: dict, cfg: LowbitConfig) -> None:
    """The tensors a pre-quantized checkpoint stores must be of its config's scheme (and
    group size): config.json alone is not trusted to describe them."""
    want = _SCHEME_CLASS[cfg.scheme]
    for name, entry in entries.items():
        got = entry.cls.__name__
        if got != want:
            raise ValueError(
                f"checkpoint: tensor {name!r} is a {got}, but quantization_config.scheme is {cfg.scheme!r} "
                f"(which stores {want}); config.json and the weight files disagree"
            )
        g = entry.attrs.get("group_size")
        if g is not None and g != cfg.group_size:
            raise ValueError(
                f"checkpoint: tensor {name!r} has group_size {g}, but quantization_config.group_size is "
                f"{cfg.group_size}; config.json and the weight files disagree"
            )


def _read_checkpoint_metadata(files) -> dict[str, lst.Entry]:
    """Validate every header of a lowbit checkpoint up front and return its metadata entries.

    Transformers gives every shard of a ``save_pretrained`` checkpoint the same
    metadata, so entries are merged and checked against the tensors of all shards.
    Scales and zero points are small; their values are checked here too, so a bad
    one fails before any weight is loaded.
    """
    tensors: dict[str, lst.TensorInfo] = {}
    entries: dict[str, lst.Entry] = {}
    where_stored: dict[str, str] = {}
    for path in files:
        path = os.fspath(path)
        if not path.endswith(".safetensors"):
            raise ValueError(f"{path}: lowbit checkpoints are safetensors files")
        infos, metadata = lst.read_header(path)
        for name, entry in lst.parse_metadata(metadata, path).items():
            if entries.setdefault(name, entry) != entry:
                raise ValueError(f"{path}: tensor {name!r}: shards disagree about its lowbit metadata")
        for key in infos:
            if key in where_stored:
                raise ValueError(f"{path}: tensor {key!r}: also stored in {where_stored[key]}")
            where_stored[key] = path
        tensors.update(infos)
    source = os.path.dirname(os.fspath(files[0])) if files else "<checkpoint>"
    if not entries:
        raise ValueError(f"{source}: config.json says quant_method 'lowbit' but no shard holds lowbit metadata")
    lst.check_entries(entries, tensors, source)
    _check_small_fields(entries, where_stored, source)
    return entries


def _check_small_fields(entries, where_stored, source) -> None:
    from safetensors import safe_open

    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, entry in entries.items():
        for field in ("scale", "zero"):
            if field in entry.fields():
                by_file.setdefault(where_stored[f"{name}.{field}"], []).append((name, field))
    for path, items in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for name, field in items:
                lst.check_field_values(name, field, f.get_tensor(f"{name}.{field}"), source)


def _weight_kinds(model) -> set[tuple[str, int | None]]:
    """(class name, group size) of each kind of lowbit weight ``model`` holds."""
    return {(type(p).__name__, getattr(p, "group_size", None)) for p in model.parameters() if isinstance(p, QTensor)}


def _attach(model, scheme: str, group_size: int | None) -> None:
    cfg = LowbitConfig(scheme, **({"group_size": group_size} if scheme == "int4_weight_only" else {}))
    model.config.quantization_config = cfg
    model.hf_quantizer = LowbitHfQuantizer(cfg)


def attach_after_quantize(model, config) -> None:
    """After ``lowbit.quantize_`` on a Transformers model: give it a ``quantization_config`` and
    this quantizer, as ``from_pretrained`` would, so ``save_pretrained`` writes a lowbit
    checkpoint that ``from_pretrained`` loads (without them Transformers serialised the
    wrapper tensors and failed on their storage). A model holding lowbit weights of more than
    one scheme or group size has no single config: it gets none, and a warning says how to
    save it."""
    if getattr(config, "step", None) == "convert":  # QAT convert: weights of its base scheme
        config = config.base_config
    if config.name not in SCHEMES:  # e.g. QAT prepare (float weights)
        return
    gs = config.group_size if config.name == "int4_weight_only" else None
    kinds = _weight_kinds(model)
    if kinds != {(_SCHEME_CLASS[config.name], gs)}:
        model.config.quantization_config = None
        model.hf_quantizer = None
        log.warning(
            "lowbit: this model holds lowbit weights of several schemes or group sizes %s, which no one "
            "quantization_config describes; save it with lowbit.safetensors.save_file(model.state_dict(), path)",
            sorted(kinds, key=str),
        )
        return
    _attach(model, config.name, gs)


def before_save(model) -> None:
    """Run by ``save_pretrained`` (``guard_save_pretrained``). A model holding lowbit weights that
    its lowbit quantizer does not describe (none: ``quantize_`` ran on a submodule such as
    ``model.model`` or its layers; or a quantizer from before another ``quantize_``) gets the one
    its weights call for, as ``attach_after_quantize`` gives; weights of several schemes or group
    sizes raise ``ValueError`` (Transformers failed on their storage, or wrote them under the old
    config). Another library's quantizer is left alone, unless lowbit weights sit beside its
    own: no one checkpoint format holds both (``ValueError``; Transformers failed on an attribute
    of the lowbit tensor)."""
    q = getattr(model, "hf_quantizer", None)
    kinds = _weight_kinds(model)
    if not kinds:
        return
    if q is not None and not isinstance(q, LowbitHfQuantizer):
        method = getattr(q.quantization_config, "quant_method", type(q).__name__)
        raise ValueError(
            f"lowbit: {type(model).__name__} is quantized with {getattr(method, 'value', method)} and also holds "
            f"lowbit weights {sorted(kinds, key=str)}; save_pretrained writes one quantization_config: quantize "
            "the whole model with one library, or save with lowbit.safetensors.save_file(model.state_dict(), path)"
        )
    if len(kinds) > 1:
        raise ValueError(
            f"lowbit: {type(model).__name__} holds lowbit weights of several schemes or group sizes "
            f"{sorted(kinds, key=str)}, which no one quantization_config describes; save_pretrained cannot write "
            "them: save with lowbit.safetensors.save_file(model.state_dict(), path)"
        )
    ((cls_name, gs),) = kinds
    scheme = next(name for name, c in _SCHEME_CLASS.items() if c == cls_name)
    if q is not None and q.quantization_config.scheme == scheme:
        if scheme != "int4_weight_only" or q.quantization_config.group_size == gs:
            return  # (its config as loaded: modules_to_not_convert and all)
    log.info("lowbit: saving %s's %s weights as quantization_config %s", type(model).__name__, cls_name, scheme)
    _attach(model, scheme, gs)


def guard_save_pretrained() -> None:
    """Wrap ``PreTrainedModel.save_pretrained`` (once) to call ``before_save`` first. Called by
    ``quantize_`` once Transformers' modeling_utils is imported (not at this module's import:
    Transformers imports it while its own registry is half made)."""
    from transformers.modeling_utils import PreTrainedModel

    save = PreTrainedModel.save_pretrained
    if getattr(save, "_lowbit_before_save", False):
        return

    @functools.wraps(save)
    def save_pretrained(self, *args, **kwargs):
        before_save(self)
        return save(self, *args, **kwargs)

    save_pretrained._lowbit_before_save = True
    PreTrainedModel.save_pretrained = save_pretrained
