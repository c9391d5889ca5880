"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over lowbit weights.

A quantized weight is sharded along its output dimension N, and every field
(int4: ``qdata``, ``scale``, ``zero``) is row-major in N, so a shard of rows
is a shard of each field and FSDP all-gathers the packed bytes, never a
dequantized weight. What FSDP2 calls on a parameter, and what this module adds
to the ``QTensor`` op tables for it (the rest, ``split``/``slice``/``copy_``/
``detach`` and the flattened ``view(-1)``, is in ``lowbit/qtensor/base.py``):

* at ``fully_shard``: ``torch.chunk`` (-> ``split``), ``new_zeros`` for the
  padded shard, ``narrow(...).copy_(chunk)`` into it, ``view(-1)``;
* per all-gather: ``fsdp_pre_all_gather`` (shard -> plain field tensors),
  ``fsdp_post_all_gather`` (gathered fields -> full weight, built once and
  refilled in place afterwards), then ``as_strided`` to the full shape.

Packing: int4 shards are always ``packing="plain"`` (``new_zeros`` makes them
so). The CPU kernel layouts are blocked over 32/64 rows, so a row shard of
them is not a view, and FSDP writes the shard through a view. Under FSDP the
int4 forward therefore runs the plain-layout path (Triton on CUDA, the
reference on CPU).

N not divisible by the world size: FSDP pads every shard to ``P = ceil(N /
world)`` rows and requires each all-gather input of a padded shard to have the
weight's padded shape ``[P, K]``. Such layers send each row's packed bytes
spread over ``ceil(row_bytes / K)`` uint8 tensors of shape ``[P, K]`` (int4:
one, ~2x the packed bytes, still half of bf16; int8/fp8: two, the bf16 size)
and unpack after the gather. Evenly divisible layers send exactly
``nbytes_packed``. The carriers are uint8 on purpose: when every all-gather
input of an FSDP group has one float dtype, FSDP copies them with
``_foreach_copy_``, which on CUDA converts through fp32 and rewrites
signalling-NaN bit patterns (a float16 carrier corrupted int8/fp8 weights on
NCCL).

Checkpoints: ``checkpoint_state_dict(model)`` gives ``torch.distributed.checkpoint``
plain DTensors (one per field) that alias the sharded weights, so
``dcp.save``/``dcp.load`` write and read them in place, with resharding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lowbit.qtensor import QTensor
from lowbit.qtensor.base import flat_only, keep_mark

aten = torch.ops.aten


def _implements(*ops):
    return QTensor.implements(*ops)


def _plain(w: QTensor) -> QTensor:
    """``w`` in a packing whose fields are row-major in N (only int4 has others)."""
    return w.repack("plain") if getattr(w, "packing", "plain") != "plain" else w


def _with_fields(like: QTensor, fields, rows: int) -> QTensor:
    """A ``type(like)`` of ``rows`` x K built on ``fields`` (plain packing, no copy)."""
    attrs = like._attrs()
    if "packing" in attrs:
        attrs["packing"] = "plain"
    return type(like)(*fields, shape=(rows, like.shape[-1]), dtype=like.dtype, **attrs)


# ---------------------------------------------------------------------------- ops FSDP calls
@_implements(aten.new_zeros.default, aten.new_empty.default)
def _(func, types, args, kwargs):
    self, size = args[0], list(args[1])
    flat_only(self, f"new_zeros{tuple(size)} of")
    dtype = kwargs.get("dtype")
    if dtype is not None and dtype != self.dtype:
        raise TypeError(f"{type(self).__name__}.new_zeros: dtype {dtype} differs from the weight's {self.dtype}")
    if size == [0]:  # FSDP's stand-in for the empty shard of a rank past the last row (N < world size)
        return self._rebuild(lambda t: t[:0], shape=(0,))
    if len(size) != 2 or size[1] != self.shape[1]:
        raise NotImplementedError(
            f"{type(self).__name__}.new_zeros{tuple(size)}: only [rows, {self.shape[1]}] (a shard along N)"
        )
    device = kwargs.get("device") or self.device
    # all-zero codes, scales and zeros dequantize to exact zeros: safe padding rows
    fields = [torch.zeros((size[0], *t.shape[1:]), dtype=t.dtype, device=device) for t in _plain(self)._tensors()]
    return _with_fields(self, fields, size[0])


@_implements(aten.as_strided.default)
def _(func, types, args, kwargs):
    self, size, stride = args[0], list(args[1]), list(args[2])
    flat_only(self, "as_strided on")
    offset = args[3] if len(args) > 3 else kwargs.get("storage_offset") or 0
    rows = size[0] if len(size) == 2 else -1
    contiguous = len(size) == 2 and list(stride) == [size[1], 1]
    if not (contiguous and offset == 0 and size[1] == self.shape[1] and 0 <= rows <= self.shape[0]):
        raise NotImplementedError(
            f"{type(self).__name__}: as_strided{tuple(size), tuple(stride), offset} is only supported as the "
            f"first rows of the weight (shape {tuple(self.shape)})"
        )
    if getattr(self, "packing", "plain") != "plain":
        raise NotImplementedError(f"{type(self).__name__}: as_strided needs packing='plain', not {self.packing!r}")
    return keep_mark(self, _with_fields(self, [t[:rows] for t in self._tensors()], rows))


# ---------------------------------------------------------------------------- DTensor.full_tensor()
# A sharded weight's ``full_tensor()`` (``redistribute`` to Replicate) pads the last shard to the
# others' rows with ``constant_pad_nd``, all-gathers each shard with the functional collective,
# waits, and cuts the padding off with a slice: each field is gathered as it is (packed bytes)
_c10d = torch.ops._c10d_functional


@_implements(aten.constant_pad_nd.default)
def _(func, types, args, kwargs):
    self, pad = args[0], list(args[1])
    value = args[2] if len(args) > 2 else kwargs.get("value", 0)
    if not (self.ndim == 2 and len(pad) == 4 and pad[:3] == [0, 0, 0] and pad[3] >= 0 and value == 0):
        raise NotImplementedError(
            f"{type(self).__name__}: constant_pad_nd{tuple(pad)} with value {value}: only zero rows after the "
            f"last one (pad (0, 0, 0, rows), a shard padded for a gather along N) are supported"
        )
    plain = _plain(self)  # zero codes / scales / zeros decode to exact zeros
    fields = [torch.cat([t, t.new_zeros((pad[3], *t.shape[1:]))]) for t in plain._tensors()]
    return _with_fields(self, fields, self.shape[0] + pad[3])


@_implements(_c10d.all_gather_into_tensor.default)
def _(func, types, args, kwargs):
    """Each field gathered along N (all are row-major in N) as its rows' bytes: gloo has no fp8,
    and a float carrier may rewrite NaN bit patterns (module doc)."""
    self, group_size, group_name = args
    rows = self.shape[0] * group_size
    local = [t.contiguous() for t in _plain(self)._tensors()]
    fields = [
        _c10d.all_gather_into_tensor(b, group_size, group_name).view(t.dtype).reshape(rows, *t.shape[1:])
        for t, b in zip(local, _row_bytes(local))
    ]
    return _with_fields(self, fields, rows)


def _wait(func, types, args, kwargs):
    """``wait_tensor``, and torch 2.13's ``_wrap_tensor_autograd`` (an AsyncCollectiveTensor
    around the gathered tensor, a deferred wait): each field waited for now, the weight as it is."""
    self = args[0]
    for t in self._tensors():
        _c10d.wait_tensor(t)
    return self


_implements(_c10d.wait_tensor.default)(_wait)
if hasattr(_c10d, "_wrap_tensor_autograd"):  # (torch >= 2.13)
    _implements(_c10d._wrap_tensor_autograd.default)(_wait)


# ---------------------------------------------------------------------------- all-gather hooks
def fsdp_pre_all_gather(self: QTensor, mesh, outer_size, outer_stride, module: nn.Module, mp_policy):
    """This rank's shard as the plain tensors FSDP all-gathers (see the module docstring)."""
    n, k = outer_size
    if self.ndim != 2 or self.shape[1] != k:
        raise NotImplementedError(
            f"lowbit weights shard along dim 0 (output features) only; got a shard of shape "
            f"{tuple(self.shape)} of a {tuple(outer_size)} {type(self).__name__} in {type(module).__name__}"
        )
    world = mesh.size()
    fields = [t.contiguous() for t in _plain(self)._tensors()]
    if n % world == 0:
        return tuple(fields), ("fields", n)
    padded = -(-n // world)
    return _pack_rows(fields, padded, k), ("rows", n)


def fsdp_post_all_gather(self: QTensor, outputs, metadata, param_dtype, *, out: QTensor | None = None):
    """The full weight on the gathered fields; with ``out``, refill the weight built on the first call.

    ``param_dtype`` (mixed precision) is ignored: packed fields have no other dtype to gather in.
    """
    kind, n = metadata
    if kind == "fields":
        fields = list(outputs)
    else:
        fields = _unpack_rows([t[:n] for t in outputs], self._tensors())
    if out is not None:
        dsts = out._tensors()
        if kind == "rows":
            # A refill, not a new value: keep the version counters, as FSDP does for its own
            # all-gather copy-out. Autograd (a compiled backward in particular) saves these
            # fields; bumping them fails that backward with "modified by an inplace operation".
            tracked = tuple(t for t in dsts if not t.is_inference())
            with torch.autograd._unsafe_preserve_version_counter(tracked):
                for dst, src in zip(dsts, fields):
                    dst.copy_(src)
            return None
        for dst, src in zip(dsts, fields):
            if dst.untyped_storage().data_ptr() != src.untyped_storage().data_ptr():
                raise AssertionError(
                    f"{type(self).__name__}: FSDP's unsharded weight no longer aliases its all-gather output"
                )
        return None
    return _with_fields(self, fields, fields[0].shape[0]), tuple(fields)


def _row_bytes(fields) -> list[torch.Tensor]:
    return [t.reshape(t.shape[0], math.prod(t.shape[1:])).view(torch.uint8) for t in fields]


def _pack_rows(fields, padded: int, k: int) -> tuple[torch.Tensor, ...]:
    """Each row's bytes over ``ceil(width / k)`` zero-padded uint8 ``[padded, k]`` tensors."""
    rows = torch.cat(_row_bytes(fields), dim=1)
    width = rows.shape[1]
    buf = rows.new_zeros(padded, -(-width // k) * k)
    buf[: rows.shape[0], :width] = rows
    return tuple(c.contiguous() for c in buf.split(k, dim=1))


def _unpack_rows(parts, like) -> list[torch.Tensor]:
    """The fields packed by ``_pack_rows``, each in a storage of its own, at offset 0.

    FSDP frees and reallocates each unsharded inner tensor's storage to that
    tensor's own size (``free_storage``/``alloc_storage``) and later refills
    them with ``out=``, so fields must never share a storage. ``.contiguous()``
    is not enough: with one row (N = 1) a column slice is already contiguous and
    would stay a view into ``raw``, and every field would alias one buffer.
    For N > 1 the slices are strided and ``contiguous()`` copied them anyway.
    """
    raw = torch.cat(list(parts), dim=1)
    n = raw.shape[0]
    fields, start = [], 0
    for t in like:
        width = math.prod(t.shape[1:]) * t.element_size()
        f = raw[:, start : start + width].clone(memory_format=torch.contiguous_format).view(t.dtype)
        fields.append(f.reshape(n, *t.shape[1:]))
        start += width
    return fields


QTensor.fsdp_pre_all_gather = fsdp_pre_all_gather
QTensor.fsdp_post_all_gather = fsdp_post_all_gather


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_state_dict(model: nn.Module) -> dict[str, Any]:
    """``model.state_dict()`` ready for ``torch.distributed.checkpoint``.

    Each quantized weight ``<fqn>`` becomes its fields ``<fqn>.qdata``,
    ``<fqn>.scale``, ... as plain tensors (DTensors sharded like the weight
    under ``fully_shard``). They alias the weight, so ``dcp.load`` into this
    dict loads the model in place; the attributes (group size) come from the
    model, and a field whose shape differs in the checkpoint is an error in
    ``dcp.load``. Call it on a model quantized with the same config.
    """
    from torch.distributed.tensor import DTensor

    out: dict[str, Any] = {}
    for name, value in model.state_dict().items():
        local = value._local_tensor if isinstance(value, DTensor) else value
        if not isinstance(local, QTensor):
            out[name] = value
            continue
        plain = _plain(local)
        if plain is not local and isinstance(value, DTensor):
            raise ValueError(f"{name}: a sharded weight in packing {local.packing!r}; FSDP shards are plain")
        for field, t in zip(local.tensor_fields, plain._tensors()):
            if isinstance(value, DTensor):
                shape = (value.shape[0], *t.shape[1:])
                t = DTensor.from_local(
                    t, value.device_mesh, value.placements, run_check=False, shape=shape, stride=_contiguous(shape)
                )
            out[f"{name}.{field}"] = t
    return out


def load_checkpoint_state_dict(model: nn.Module, state_dict: dict[str, Any]) -> None:
    """Copy a ``checkpoint_state_dict`` (e.g. filled by ``dcp.load``) into ``model``.

    Only needed for weights the dict does not alias: unsharded int4 weights in a
    CPU packing. Sharded models are loaded by ``dcp.load`` itself.
    """
    from torch.distributed.tensor import DTensor

    for name, value in model.state_dict().items():
        local = value._local_tensor if isinstance(value, DTensor) else value
        if not isinstance(local, QTensor) or _plain(local) is local:
            continue
        fields = []
        for field in local.tensor_fields:
            t = state_dict[f"{name}.{field}"]
            fields.append(t.full_tensor() if isinstance(t, DTensor) else t)
        with torch.no_grad():
            local.copy_(_with_fields(local, fields, fields[0].shape[0]))


def _contiguous(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


__all__ = ["checkpoint_state_dict", "load_checkpoint_state_dict", "fsdp_pre_all_gather", "fsdp_post_all_gather"]
