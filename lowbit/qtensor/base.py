"""Base class for quantized weight tensors.

A subclass declares its plain-tensor fields (``tensor_fields``) and its
non-tensor attributes (``attr_fields``) once; this base derives everything a
``nn.Parameter`` meets from them: ``__tensor_flatten__``/``__tensor_unflatten__``
(torch.compile), ``detach``, ``clone``, device moves, ``copy_``, ``deepcopy``,
pickling, ``repr`` and slicing along the output dimension.

Ops are looked up in per-class tables filled by the ``implements`` decorators;
an op with no entry raises ``NotImplementedError`` naming the op and the class,
never a silent dequantize.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing

aten = torch.ops.aten

_SUPPORTED_ACTIVATIONS = (torch.float32, torch.bfloat16, torch.float16)


class QTensor(torch.Tensor):
    """A quantized 2-D linear weight of logical shape [N, K] = (out, in)."""

    tensor_fields: ClassVar[tuple[str, ...]] = ()
    attr_fields: ClassVar[tuple[str, ...]] = ()
    _aten_table: ClassVar[dict[Any, Callable]] = {}
    _function_table: ClassVar[dict[Any, Callable]] = {}
    # table name -> {func or op -> handler or None}: resolved over the MRO once,
    # cleared on every registration
    _resolved: ClassVar[dict[str, dict[Any, Callable | None]]] = {"_aten_table": {}, "_function_table": {}}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # each class owns its registrations; lookups walk the MRO, so a handler
        # registered on a base later still reaches existing subclasses
        cls._aten_table = {}
        cls._function_table = {}
        cls._resolved = {"_aten_table": {}, "_function_table": {}}

    @classmethod
    def _lookup(cls, table: str, key):
        # hot: torch.compile's runtime calls size()/stride() on every quantized
        # parameter on every call, and each goes through __torch_function__
        resolved = cls._resolved[table]
        if key not in resolved:
            resolved[key] = next(
                (h for klass in cls.__mro__ if (h := klass.__dict__.get(table, {}).get(key)) is not None), None
            )
        return resolved[key]

    @classmethod
    def _clear_resolved(cls):
        todo = [QTensor]
        while todo:
            klass = todo.pop()
            for resolved in klass._resolved.values():
                resolved.clear()
            todo.extend(klass.__subclasses__())

    @staticmethod
    def __new__(cls, *tensors: torch.Tensor, shape, dtype: torch.dtype, **attrs):
        first = tensors[0]
        return torch.Tensor._make_wrapper_subclass(
            cls, torch.Size(shape), dtype=dtype, device=first.device, requires_grad=False
        )

    def __init__(self, *tensors: torch.Tensor, shape, dtype: torch.dtype, **attrs):
        if len(tensors) != len(self.tensor_fields):
            raise TypeError(f"{type(self).__name__} takes fields {self.tensor_fields}")
        for name, t in zip(self.tensor_fields, tensors):
            setattr(self, name, t)
        missing = set(self.attr_fields) - set(attrs)
        if missing:
            raise TypeError(f"{type(self).__name__} missing attributes {sorted(missing)}")
        for name in self.attr_fields:
            setattr(self, name, attrs[name])
        # built once: torch.compile guards call __tensor_flatten__ on every call of a
        # compiled model, once per quantized parameter
        with torch._C.DisableTorchFunctionSubclass():
            self._size, self._stride = torch.Tensor.size(self), torch.Tensor.stride(self)
            self._device = torch.Tensor.device.__get__(self)
        self._matrix = weight_matrix(self._size, tensors[0].shape[0])
        self._flatten_ctx = (tuple(self._size), dtype, tuple((n, attrs[n]) for n in self.attr_fields))

    # torch.compile's runtime unwraps every quantized parameter on every call and asks
    # each for size() and stride(): answered here, they skip __torch_function__ (~2 us each)
    def size(self, dim=None):
        return self._size if dim is None else self._size[dim]

    def stride(self, dim=None):
        return self._stride if dim is None else self._stride[dim]

    # ------------------------------------------------------------------ fields
    def _tensors(self) -> list[torch.Tensor]:
        return [getattr(self, n) for n in self.tensor_fields]

    def _attrs(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self.attr_fields}

    def _rebuild(self, fn: Callable[[torch.Tensor], torch.Tensor], **overrides):
        """Same class and attributes, each tensor field mapped through ``fn``."""
        attrs = self._attrs()
        attrs.update({k: v for k, v in overrides.items() if k in self.attr_fields})
        shape = overrides.get("shape", self.shape)
        return type(self)(*[fn(t) for t in self._tensors()], shape=shape, dtype=self.dtype, **attrs)

    def __tensor_flatten__(self):
        return self.tensor_fields, self._flatten_ctx

    @classmethod
    def __tensor_unflatten__(cls, inner_tensors, ctx, outer_size, outer_stride):
        shape, dtype, attrs = ctx
        return cls(*[inner_tensors[n] for n in cls.tensor_fields], shape=outer_size, dtype=dtype, **dict(attrs))

    def _stable_hash_for_caching(self) -> str:
        """Cache key for torch.compile's AOT autograd cache: metadata only, stable across processes.

        The class, outer shape/dtype, attributes and each field's shape, stride,
        dtype and device type; never the values (weights are graph inputs).
        """
        fields = [
            (n, [str(d) for d in t.shape], [str(d) for d in t.stride()], str(t.dtype), t.device.type)
            for n, t in zip(self.tensor_fields, self._tensors())
        ]
        key = repr(
            (
                f"{type(self).__module__}.{type(self).__qualname__}",
                [str(d) for d in self.shape],
                str(self.dtype),
                self.requires_grad,
                sorted(self._attrs().items()),
                fields,
            )
        )
        return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()

    def __reduce_ex__(self, protocol):
        # Plain fields + attributes only: safe for torch.load(weights_only=True)
        # once the class is registered as a safe global (lowbit/qtensor/__init__.py).
        # nn.Parameter(w) keeps w's class (it only sets w._is_param): record it, as torch does for
        # a plain Parameter, with requires_grad and a shared-scales slice mark (torch.save keeps
        # storage shared with a parent shared on load; a repacked copy's fields are its own), and
        # only when not the defaults, so that lowbit versions before session 26 read the pickle.
        flat_only(self, "pickling")  # (its load would check an [N, K] shape)
        args = (type(self), self._tensors(), tuple(self.shape), self.dtype, self._attrs())
        why = getattr(self, "_not_a_view", None)
        state = (self.requires_grad, isinstance(self, torch.nn.Parameter), why if why == SHARED_SCALES else None)
        return (_rebuild_qtensor, args + state if state != (False, False, None) else args)

    def __repr__(self):
        fields = [f"shape={tuple(self.shape)}", f"dtype={self.dtype}", f"device={self.device}"]
        fields += [f"{k}={v}" for k, v in self._attrs().items()]
        return f"{type(self).__name__}({', '.join(fields)})"

    @property
    def nbytes_packed(self) -> int:
        """Bytes actually held by the fields (what the weight costs in memory)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    # ------------------------------------------------------------------ per-format API
    @classmethod
    def from_float(cls, w: torch.Tensor, **kwargs) -> QTensor:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K] @ self.T`` (2-D, contiguous, supported dtype), no bias."""
        raise NotImplementedError

    def linear_swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """``reference.swiglu(self.linear(x))`` for a weight whose rows are [gate; up] (Llama's
        MLP); formats with a fused kernel override this and ``swiglu_max_tokens``."""
        from lowbit.ops.reference import swiglu

        return swiglu(self.linear(x))

    def swiglu_max_tokens(self) -> int:
        """Up to how many tokens (rows of x, of this tensor's dtype, on its device under the current
        backend) ``linear_swiglu`` runs one fused kernel; 0: never. A fused MLP asks once, when it
        is fused, and runs its own forward beyond that (no fp32 temporaries, and Inductor fuses the
        product)."""
        return 0

    def linear_add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float):
        """``reference.add_rmsnorm(self.linear(x), residual, norm_weight, eps)``: (h, normed) for a
        pre-norm decoder layer's linear before a residual add; formats with a fused kernel override
        this and ``add_rmsnorm_max_tokens``."""
        from lowbit.ops.reference import add_rmsnorm

        return add_rmsnorm(self.linear(x), residual, norm_weight, eps)

    def add_rmsnorm_max_tokens(self) -> int:
        """Up to how many tokens ``linear_add_rmsnorm`` runs one fused kernel (as
        ``swiglu_max_tokens``); 0: never."""
        return 0

    def to_device(self, device) -> QTensor:
        """Move every field; formats with device-specific packing override this."""
        return self._rebuild(lambda t: t.to(device))

    def check_fields(self) -> None:
        """Raise ValueError if a field's shape or dtype does not fit the logical shape and
        attributes (for tensors rebuilt from a file); formats override this."""

    def _field_error(self, field: str, got, want) -> None:
        raise ValueError(f"{type(self).__name__} {tuple(self._size)}: field {field!r} is {got}, expected {want}")

    def loaded(self) -> QTensor:
        """This tensor as unpickled on its device; formats whose layout depends on the machine
        (int4's CPU packings) return it in this machine's layout."""
        return self

    def quantize_like(self, w: torch.Tensor) -> QTensor:
        """Quantize a full-precision ``w`` into this tensor's format and attributes."""
        return type(self).from_float(w.to(self.device, self.dtype))

    def convert_like(self, other: QTensor) -> QTensor:
        """``other`` on this tensor's device and in its packing (for ``copy_``)."""
        return other.to_device(self.device)

    def slice_rows(self, start: int, end: int) -> QTensor:
        """Rows [start, end) of the output dimension; every field is row-major in N."""
        return self._rebuild(lambda t: t[start:end], shape=(end - start, self.shape[1]))

    def slice_cols(self, start: int, end: int) -> QTensor:
        raise NotImplementedError(f"{type(self).__name__}: slicing along the input dimension is not supported")

    # ------------------------------------------------------------------ registration
    @classmethod
    def implements(cls, *ops):
        """Register a handler for aten ops (``__torch_dispatch__``) on this class."""

        def register(fn):
            for op in ops:
                cls._aten_table[op] = fn
            QTensor._clear_resolved()
            return fn

        return register

    @classmethod
    def implements_function(cls, *funcs):
        """Register a handler for torch functions (``__torch_function__``)."""

        def register(fn):
            for f in funcs:
                cls._function_table[f] = fn
            QTensor._clear_resolved()
            return fn

        return register

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        handler = cls._lookup("_function_table", func)
        if handler is not None:
            return handler(func, types, args, kwargs or {})
        # the C fallthrough: func with subclass torch functions disabled, no Python context manager
        return torch._C._disabled_torch_function_impl(func, types, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = cls._lookup("_aten_table", func)
        if handler is None:
            hint = "dequantize() first if a full-precision tensor is what you need"
            if func._schema.name.endswith("_") and func is not aten.copy_.default:
                hint = (
                    "in-place arithmetic on a quantized weight (e.g. merging LoRA adapters) is not supported; "
                    "merge into the full-precision model and quantize again"
                )
            raise NotImplementedError(f"{cls.__name__} does not support the op {func}; {hint}")
        return handler(func, types, args, kwargs)


def weight_matrix(shape, rows: int) -> tuple[int, int]:
    """[N, K] of a weight of ``shape``, also of its flattened view ([N * K], ``view(-1)``, which FSDP
    keeps as bookkeeping: ``lowbit/distributed.py``); ``rows``: N, the fields' first dimension."""
    if len(shape) == 2:
        return (shape[0], shape[1])
    return (rows, shape[0] // rows if rows else 0)


def float_weight(cls: type, w: torch.Tensor) -> torch.Tensor:
    """``w`` checked for ``cls.from_float`` (2-D, float32 / bfloat16 / float16) and detached:
    quantized from a weight that requires grad, the fields must hold no graph (no grad_fn, no
    gradient into ``w``, no float copies kept alive). Call under ``torch.no_grad``; then
    ``finite_qparams`` on the scales."""
    name = f"{cls.__name__}.from_float"
    if isinstance(w, QTensor):
        raise TypeError(f"{name}: the weight is already quantized ({type(w).__name__}); dequantize() it first")
    if w.ndim != 2:
        raise ValueError(f"{name} needs a 2-D weight, got shape {tuple(w.shape)}")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: weight dtype {w.dtype} is not supported; expected float32, bfloat16 or float16")
    return w.detach()


def finite_qparams(cls: type, w: torch.Tensor, *qparams: torch.Tensor) -> None:
    """ValueError naming ``cls.from_float`` unless ``w``'s quantization parameters are finite. NaN
    and Inf in ``w`` carry into them (they come from group / row max and min), so the small
    qparams are checked and ``w`` itself only when one is not: the count of its NaN/Inf values, or
    finite values too large for scales of its dtype."""
    if w.device.type == "meta" or all(bool(torch.isfinite(p).all()) for p in qparams):
        return
    from lowbit.quantize import check_finite  # (lowbit.quantize imports lowbit.qtensor)

    where = f"{cls.__name__}.from_float {tuple(w.shape)}"
    check_finite(w, where)
    raise ValueError(
        f"{where}: values up to {w.abs().max().item():.4g} overflow {w.dtype} quantization scales; "
        "rescale the weight or quantize it in float32"
    )


def _rebuild_qtensor(cls, tensors, shape, dtype, attrs, requires_grad=False, param=False, not_a_view_why=None):
    """Unpickling (``torch.load``, ``weights_only=True`` included): the outer dtype, shape and
    attributes and the fields' dtypes and shapes are checked as a safetensors file's metadata is
    (``lowbit.safetensors._SPECS``; the packing, a machine's layout here, by ``check_fields``),
    and the values as its data (scales finite and positive, zero points and float data finite),
    so a tampered or mismatched pickle is an error. An ``nn.Parameter`` comes back as one."""
    from lowbit.qtensor import QTENSOR_CLASSES
    from lowbit.safetensors import _SPECS, check_field_values, check_parts

    if not (isinstance(cls, type) and issubclass(cls, QTensor)) or not isinstance(tensors, (list, tuple)):
        raise ValueError(f"a pickled lowbit tensor names {cls!r}, which is not a lowbit tensor class")
    name = cls.__name__
    if len(tensors) != len(cls.tensor_fields) or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError(f"a pickled {name} needs the tensors {list(cls.tensor_fields)}")
    if dtype not in _SUPPORTED_ACTIVATIONS:
        want = [str(d) for d in _SUPPORTED_ACTIVATIONS]
        raise ValueError(f"a pickled {name} has dtype {dtype!r}, expected one of {want}")
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2 and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"a pickled {name} has shape {shape!r}, expected (N, K) of non-negative ints")
    if not isinstance(attrs, dict) or set(attrs) != set(cls.attr_fields):
        raise ValueError(f"a pickled {name} has attributes {attrs!r}, expected exactly {sorted(cls.attr_fields)}")
    if not (type(requires_grad) is bool and type(param) is bool and isinstance(not_a_view_why, (str, type(None)))):
        got = (requires_grad, param, not_a_view_why)
        raise ValueError(f"a pickled {name} has flags {got!r}, expected (bool, bool, str or None)")
    where = f"pickled {name} {tuple(shape)}"
    spec = next((_SPECS.get(k.__name__) for k in cls.__mro__ if QTENSOR_CLASSES.get(k.__name__) is k), None)
    if spec is not None:
        # (a file holds the "plain" packing only; a pickle holds any, and check_fields checks it)
        spec.attr_check({**attrs, "packing": "plain"} if "packing" in attrs else attrs, shape, where)
        parts = dict(zip(cls.tensor_fields, tensors))
        check_parts(f"{where}:", cls, spec.fields(shape, attrs), parts)
        if "zero" in parts and parts["zero"].dtype != parts["scale"].dtype:  # (as in a file)
            raise ValueError(f"{where}: field 'zero': dtype {parts['zero'].dtype} differs from the scale's")
    for field, t in zip(cls.tensor_fields, tensors):
        check_field_values(where, field, t, source="torch.load")
    t = cls(*tensors, shape=shape, dtype=dtype, **attrs)
    t.check_fields()
    t = t.loaded()
    t = torch.nn.Parameter(t, requires_grad=requires_grad) if param else t.requires_grad_(requires_grad)
    return not_a_view(t, not_a_view_why) if not_a_view_why else t


# ---------------------------------------------------------------------------- aten ops
@QTensor.implements(aten.detach.default, aten.alias.default)
def _(func, types, args, kwargs):  # (nn.Parameter(w) detaches: it keeps a slice's mark)
    return return_and_correct_aliasing(func, args, kwargs, keep_mark(args[0], args[0]._rebuild(func)))


@QTensor.implements(aten.clone.default)
def _(func, types, args, kwargs):
    self = args[0]
    return self._rebuild(lambda t: t.clone())


@QTensor.implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    self = args[0]
    dtype = kwargs.get("dtype")
    if dtype is not None and dtype != self.dtype:
        raise TypeError(
            f"{type(self).__name__}: casting a quantized weight to {dtype} is not supported "
            f"(it holds packed {self.dtype} data); call .dequantize({dtype}) for a plain tensor"
        )
    device = kwargs.get("device")
    if device is None or torch.device(device) == self.device:  # a copy: fields never shared
        return self._rebuild(lambda t: t.clone())
    return self.to_device(device)


SHARED_SCALES = "its per-row scales are shared with the columns outside it"  # (a column slice's mark)


def not_a_view(t: QTensor, why: str) -> QTensor:
    """Mark a slice whose fields are not views of its parent's (``copy_`` into it would be
    lost) or share a field with parts outside it (``copy_`` would change those)."""
    t._not_a_view = why
    return t


def keep_mark(parent: QTensor, out: QTensor) -> QTensor:
    """``out``, on ``parent``'s fields (a detach, view, slice), marked as ``parent`` is; never
    for a copy (clone, ``_to_copy``), which owns its fields."""
    why = getattr(parent, "_not_a_view", None)
    return not_a_view(out, why) if why else out


@QTensor.implements(aten.copy_.default)
def _(func, types, args, kwargs):
    dst, src = args[0], args[1]
    if not isinstance(dst, QTensor):
        raise ValueError(
            f"copy_ of a quantized {type(src).__name__} {tuple(src.shape)} into a full-precision tensor: quantize "
            "the model with the same config first (lowbit.quantize_), load with load_state_dict(..., assign=True), "
            "or copy src.dequantize()"
        )
    why = getattr(dst, "_not_a_view", None)
    if why:
        raise NotImplementedError(
            f"copy_ into a slice of a {type(dst).__name__}: {why}; write the whole weight instead"
        )
    if not isinstance(src, QTensor) and src.shape == dst.shape and src.dtype.is_floating_point:
        # loading a full-precision checkpoint into a quantized model quantizes it the same way
        from lowbit.quantize import check_finite

        # what is quantized is src in dst's dtype: a finite fp32 value past fp16's max is inf there
        cast = src.to(dst.device, dst.dtype)
        check_finite(cast, f"copy_ into {type(dst).__name__} {tuple(dst.shape)} from {src.dtype} as {dst.dtype}")
        src = dst.quantize_like(cast)
    if type(src) is type(dst) and src.shape == dst.shape:
        src = dst.convert_like(src)
    if type(src) is not type(dst) or src._attrs() != dst._attrs() or src.shape != dst.shape:
        raise ValueError(
            f"copy_ into {dst!r} needs a {type(dst).__name__} of the same shape and attributes, got {src!r}"
        )
    for d, s in zip(dst._tensors(), src._tensors()):
        if d.shape != s.shape:
            raise ValueError(
                f"copy_ into {type(dst).__name__}: field shapes differ ({tuple(d.shape)} vs {tuple(s.shape)})"
            )
        d.copy_(s)
    return dst


@QTensor.implements(aten._has_compatible_shallow_copy_type.default)
def _(func, types, args, kwargs):
    return type(args[0]) is type(args[1])


@QTensor.implements(aten.is_pinned.default)
def _(func, types, args, kwargs):
    return all(t.is_pinned() for t in args[0]._tensors())


def flat_only(t: QTensor, what: str) -> None:
    """NotImplementedError for ``what`` on the flattened view of a weight (``view(-1)``, which FSDP
    keeps as bookkeeping, ``lowbit/distributed.py``), whose elements are not addressable one by
    one; an empty one (FSDP's stand-in for an empty shard) passes."""
    if len(t._size) == 1 and t._size[0]:
        n, k = t._matrix
        raise NotImplementedError(
            f"{type(t).__name__}: {what} the flattened ({t._size[0]},) view of a [{n}, {k}] quantized weight is not "
            f"supported; view it back to [{n}, {k}] or dequantize() it"
        )


@QTensor.implements(aten.slice.Tensor)
def _(func, types, args, kwargs):
    defaults = (None, 0, None, None, 1)
    self, dim, start, end, step = list(args) + list(defaults[len(args) :])
    flat_only(self, "slicing")
    dim = dim % 2
    n = self.shape[dim]
    start = 0 if start is None else max(0, min(n, start + n if start < 0 else start))
    end = n if end is None else max(start, min(n, end + n if end < 0 else end))
    if step != 1:
        raise NotImplementedError(f"{type(self).__name__}: slicing with step {step} is not supported")
    if start == 0 and end == n:
        out = self._rebuild(lambda t: t)
    else:
        out = self.slice_rows(start, end) if dim == 0 else self.slice_cols(start, end)
    return keep_mark(self, out)  # a slice of a copy is part of that copy


@QTensor.implements(aten.split.Tensor, aten.split_with_sizes.default)
def _(func, types, args, kwargs):
    self, sizes = args[0], args[1]
    flat_only(self, "splitting")
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % 2
    n = self.shape[dim]
    if isinstance(sizes, int):
        sizes = [min(sizes, n - s) for s in range(0, n, sizes)]
    elif sum(sizes) != n or min(sizes, default=0) < 0:  # (as torch refuses them)
        raise ValueError(
            f"{type(self).__name__}.split_with_sizes: sizes {list(sizes)} must be non-negative and sum to {n}, "
            f"the size of dim {dim} (shape {tuple(self.shape)})"
        )
    out, start = [], 0
    for size in sizes:
        out.append(aten.slice.Tensor(self, dim, start, start + size))
        start += size
    return out


@QTensor.implements(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _(func, types, args, kwargs):
    self, shape = args[0], list(args[1])
    if self.ndim == 2 and shape in ([-1], [self.numel()]):
        # the flattened view (FSDP keeps ``padded_shard.view(-1)`` as bookkeeping only): the fields
        # stay, the shape is [N * K]; dequantize() gives the flattened values, slicing it refuses
        return keep_mark(self, self._rebuild(lambda t: t, shape=(self.numel(),)))
    n, k = self._matrix
    if self.ndim == 1 and self.numel() and shape in ([n, k], [-1, k], [n, -1]):  # back to [N, K]
        return keep_mark(self, self._rebuild(lambda t: t, shape=(n, k)))
    if shape.count(-1) == 1:
        known = 1
        for s in shape:
            known *= s if s != -1 else 1
        shape[shape.index(-1)] = self.numel() // max(known, 1)
    if tuple(shape) != tuple(self.shape):
        raise NotImplementedError(f"{type(self).__name__}: view to {tuple(shape)} from {tuple(self.shape)}")
    return keep_mark(self, self._rebuild(lambda t: t))


@QTensor.implements(aten.t.default)
def _(func, types, args, kwargs):
    from lowbit.qtensor.linear import TransposedQTensor  # (linear.py builds on this module)

    flat_only(args[0], "transposing")
    return TransposedQTensor(args[0])
