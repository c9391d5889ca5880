"""safetensors for state dicts holding lowbit tensors: flatten on save, strict validated unflatten on load.

safetensors stores plain tensors only. Each quantized tensor ``name`` is written
as its plain fields ``name.qdata``, ``name.scale``, ... (``QTensor.tensor_fields``),
and the header's string metadata gets one JSON document under the key ``"lowbit"``::

    {"format_version": 1,
     "tensors": {"layers.0.q_proj.weight": {"class": "Int4Tensor", "shape": [N, K],
                 "dtype": "bfloat16", "attrs": {"group_size": 128, "packing": "plain"}}}}

Int4 weights are always written in the ``"plain"`` packing (CPU layouts depend on
the machine) and repacked for the target device on load.

Loading trusts nothing in the file. The header is parsed here (its size, JSON,
every dtype, shape and byte range against the file size) before the safetensors
library maps any data; the lowbit metadata is checked against the header (known
class, format version not from the future, attributes, the shape and dtype of every
field as the class and logical shape imply, no missing or extra field, no metadata
for an absent tensor) and the values against the format (finite positive scales,
finite zeros, no NaN in fp8 data). Anything wrong raises ``ValueError`` naming the
file, the tensor and the field. Nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file as _st_save_file

from lowbit.ops import reference as ref
from lowbit.qtensor import QTENSOR_CLASSES, QTensor

FORMAT_VERSION = 1
METADATA_KEY = "lowbit"
INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

# safetensors dtype names -> (torch dtype or None when lowbit never needs it, bytes per element)
_ST_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I16": (torch.int16, 2),
    "U16": (None, 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "U32": (None, 4),
    "F32": (torch.float32, 4),
    "I64": (torch.int64, 8),
    "U64": (None, 8),
    "F64": (torch.float64, 8),
}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MAX_DIM = 2**40


# ----------------------------------------------------------------------------- header
@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the safetensors header describes it."""

    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _ST_DTYPES[self.dtype][0]


def _reject_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _loads(text: str | bytes, what: str):
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{what} is not valid JSON: {e}") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(raw: bytes, data_len: int, source: str = "<header>") -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate the JSON header of a safetensors file whose data section holds ``data_len`` bytes.

    Returns ``(tensors, metadata)``. Every byte range must lie inside the data
    section, match its dtype and shape, and not overlap another.
    """
    header = _loads(raw, f"{source}: safetensors header")
    if not isinstance(header, dict):
        raise ValueError(f"{source}: safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{source}: header field '__metadata__' must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    ranges = []
    for name, info in header.items():
        where = f"{source}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{where}: header entry must have exactly the fields dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise ValueError(f"{where} field 'dtype': unsupported safetensors dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < _MAX_DIM for d in shape) or len(shape) > 8:
            raise ValueError(f"{where} field 'shape': expected a list of non-negative ints, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise ValueError(f"{where} field 'data_offsets': expected [begin, end], got {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * _ST_DTYPES[dtype][1]
        if not 0 <= begin <= end <= data_len:
            raise ValueError(
                f"{where} field 'data_offsets': bytes [{begin}, {end}) lie outside the data section of "
                f"{data_len} bytes (truncated file?)"
            )
        if end - begin != nbytes:
            raise ValueError(
                f"{where} field 'data_offsets': {end - begin} bytes for {dtype} of shape {shape} ({nbytes} bytes)"
            )
        tensors[name] = TensorInfo(dtype, tuple(shape))
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, e0, n0), (b1, _, n1) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise ValueError(f"{source}: tensors {n0!r} and {n1!r} overlap in the data section")
    return tensors, metadata


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate the header of a safetensors file without touching its data."""
    source = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{source}: file of {size} bytes is too short for a safetensors header (truncated?)")
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"{source}: header claims {n} bytes but the file holds {size} (truncated or corrupt)")
        raw = f.read(n)
    return parse_header(raw, size - 8 - n, source)


# ----------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class Entry:
    """The metadata of one flattened lowbit tensor."""

    cls: type[QTensor]
    shape: tuple[int, int]
    dtype: torch.dtype
    attrs: dict[str, Any]

    def fields(self) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
        """field name -> (shape, allowed dtypes) implied by the class, logical shape and attributes."""
        return _SPECS[self.cls.__name__].fields(self.shape, self.attrs)


@dataclass(frozen=True)
class _Spec:
    attr_check: Any  # (attrs, shape, where) -> None; raises ValueError
    fields: Any  # (shape, attrs) -> {field: (shape, dtypes)}


def _check_int4_attrs(attrs: dict, shape, where: str) -> None:
    g = attrs["group_size"]
    if not _is_int(g) or g not in ref.INT4_GROUP_SIZES:
        raise ValueError(f"{where} field 'group_size': must be one of {ref.INT4_GROUP_SIZES}, got {g!r}")
    if shape[1] % g:
        raise ValueError(f"{where} field 'group_size': {g} does not divide K={shape[1]}")
    if attrs["packing"] != "plain":
        raise ValueError(f"{where} field 'packing': checkpoints hold the 'plain' packing, got {attrs['packing']!r}")


def _int4_fields(shape, attrs):
    n, k = shape
    groups = (n, k // attrs["group_size"])
    return {"qdata": ((n, k // 2), (torch.uint8,)), "scale": (groups, _FLOATS), "zero": (groups, _FLOATS)}


def _int8_fields(scale_dtypes):
    return lambda shape, attrs: {"qdata": (tuple(shape), (torch.int8,)), "scale": ((shape[0],), scale_dtypes)}


_SPECS: dict[str, _Spec] = {
    "Int4Tensor": _Spec(_check_int4_attrs, _int4_fields),
    "Int8Tensor": _Spec(lambda attrs, shape, where: None, _int8_fields(_FLOATS)),
    "Int8DynActTensor": _Spec(lambda attrs, shape, where: None, _int8_fields((torch.float32,))),
    "Float8Tensor": _Spec(
        lambda attrs, shape, where: None,
        lambda shape, attrs: {"qdata": (tuple(shape), (ref.FP8_DTYPE,)), "scale": ((shape[0],), (torch.float32,))},
    ),
}


def parse_metadata(metadata: Mapping[str, str] | None, source: str = "<metadata>") -> dict[str, Entry]:
    """Parse the ``"lowbit"`` JSON of a header's metadata into validated entries (empty if absent)."""
    if not metadata or METADATA_KEY not in metadata:
        return {}
    doc = _loads(metadata[METADATA_KEY], f"{source}: metadata {METADATA_KEY!r}")
    if not isinstance(doc, dict) or set(doc) != {"format_version", "tensors"}:
        raise ValueError(f"{source}: metadata {METADATA_KEY!r} must be an object with format_version and tensors")
    version = doc["format_version"]
    if not _is_int(version) or version < 1:
        raise ValueError(f"{source}: field 'format_version' must be a positive int, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{source}: field 'format_version' is {version}, newer than the {FORMAT_VERSION} this lowbit "
            "reads; upgrade lowbit to load this file"
        )
    if not isinstance(doc["tensors"], dict):
        raise ValueError(f"{source}: field 'tensors' must be an object")
    return {name: _parse_entry(name, e, source) for name, e in doc["tensors"].items()}


def _parse_entry(name: str, e, source: str) -> Entry:
    where = f"{source}: tensor {name!r}"
    if not isinstance(e, dict):
        raise ValueError(f"{where}: metadata entry must be an object")
    missing = {"class", "shape", "dtype", "attrs"} - set(e)
    if missing:
        raise ValueError(f"{where}: metadata field {sorted(missing)[0]!r} is missing")
    extra = set(e) - {"class", "shape", "dtype", "attrs"}
    if extra:
        raise ValueError(f"{where}: unknown metadata field {sorted(extra)[0]!r}")
    cls = QTENSOR_CLASSES.get(e["class"]) if isinstance(e["class"], str) else None
    if cls is None or e["class"] not in _SPECS:
        raise ValueError(f"{where} field 'class': {e['class']!r} is not a lowbit tensor class this version loads")
    shape = e["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and 0 < d < _MAX_DIM for d in shape)):
        raise ValueError(f"{where} field 'shape': expected [N, K] of positive ints, got {shape!r}")
    dtype = _DTYPE_BY_NAME.get(e["dtype"]) if isinstance(e["dtype"], str) else None
    if dtype is None:
        raise ValueError(f"{where} field 'dtype': expected one of {list(_DTYPE_BY_NAME)}, got {e['dtype']!r}")
    attrs = e["attrs"]
    if not isinstance(attrs, dict):
        raise ValueError(f"{where} field 'attrs': must be an object")
    want = set(cls.attr_fields)
    if set(attrs) != want:
        bad = sorted(want - set(attrs)) or sorted(set(attrs) - want)
        raise ValueError(f"{where} field {'attrs.' + bad[0]!r}: expected exactly the attributes {sorted(want)}")
    shape = (shape[0], shape[1])
    _SPECS[cls.__name__].attr_check(attrs, shape, where)
    return Entry(cls, shape, dtype, dict(attrs))


def check_entries(entries: Mapping[str, Entry], tensors: Mapping[str, TensorInfo], source: str = "<file>") -> None:
    """Check the lowbit entries against the tensors the header holds (names, shapes, dtypes)."""
    for name, entry in entries.items():
        where = f"{source}: tensor {name!r}"
        fields = entry.fields()
        present = [f for f in fields if f"{name}.{f}" in tensors]
        if not present:
            raise ValueError(f"{where}: metadata describes a tensor that is absent (no field {list(fields)} stored)")
        if name in tensors:
            raise ValueError(f"{where}: stored both as a plain tensor and as lowbit fields")
        for field, (shape, dtypes) in fields.items():
            info = tensors.get(f"{name}.{field}")
            if info is None:
                raise ValueError(f"{where} field {field!r}: missing from the file")
            if info.shape != shape:
                raise ValueError(f"{where} field {field!r}: shape {list(info.shape)}, expected {list(shape)}")
            if info.torch_dtype not in dtypes:
                names = [str(d).removeprefix("torch.") for d in dtypes]
                raise ValueError(f"{where} field {field!r}: dtype {info.dtype}, expected one of {names}")
        if "zero" in fields and tensors[f"{name}.zero"].dtype != tensors[f"{name}.scale"].dtype:
            raise ValueError(f"{where} field 'zero': dtype differs from the scale's")
    # a tensor "<entry>.<x>" that the class does not declare is an extra field
    for key in tensors:
        head, _, field = key.rpartition(".")
        if head in entries and field not in entries[head].fields():
            raise ValueError(f"{source}: tensor {head!r} field {field!r}: not a field of {entries[head].cls.__name__}")


def check_field_values(name: str, field: str, t: torch.Tensor, source: str = "<file>") -> None:
    """Range checks: scales finite and positive, zero points finite, float data without NaN/Inf."""
    where = f"{source}: tensor {name!r} field {field!r}"
    if field == "scale":
        s = t.float()
        bad = ~(torch.isfinite(s) & (s > 0))
        if bool(bad.any()):
            raise ValueError(f"{where}: scales must be finite and positive; {_first_bad(s, bad)}")
    elif field == "zero" or t.dtype.is_floating_point:
        bad = ~torch.isfinite(t.float())
        if bool(bad.any()):
            raise ValueError(f"{where}: holds NaN or Inf; {_first_bad(t.float(), bad)}")


def _first_bad(t: torch.Tensor, bad: torch.Tensor) -> str:
    """'<count> of <numel> bad, the first <value> at index <index>'."""
    first = tuple(int(i) for i in bad.nonzero()[0])
    return f"{int(bad.sum())} of {t.numel()} bad, the first {t[first].item()} at index {list(first)}"


def check_parts(where: str, cls: type, fields: Mapping[str, tuple], parts: Mapping[str, torch.Tensor]) -> None:
    """ValueError naming ``where`` unless ``parts`` are exactly ``fields``' names, each of its
    shape and one of its dtypes (``fields``: ``Entry.fields()``)."""
    for field, (shape, dtypes) in fields.items():
        t = parts.get(field)
        if t is None:
            raise ValueError(f"{where} field {field!r}: missing")
        if tuple(t.shape) != shape or t.dtype not in dtypes:
            raise ValueError(f"{where} field {field!r}: got {t.dtype} {list(t.shape)}, expected {list(shape)}")
    extra = set(parts) - set(fields)
    if extra:
        raise ValueError(f"{where} field {sorted(extra)[0]!r}: not a field of {cls.__name__}")


def build_qtensor(name: str, entry: Entry, parts: Mapping[str, torch.Tensor], source: str = "<file>") -> QTensor:
    """Check the values of the fields and build the tensor (plain packing, on the fields' device)."""
    check_parts(f"{source}: tensor {name!r}", entry.cls, entry.fields(), parts)
    for field, t in parts.items():
        check_field_values(name, field, t, source)
    tensors = [_cpu_aligned(parts[f]) for f in entry.cls.tensor_fields]
    return entry.cls(*tensors, shape=entry.shape, dtype=entry.dtype, **entry.attrs)


CPU_ALIGN = 64  # bytes: what the CPU allocator gives (aten's int8 kernels load weight rows with aligned loads)


def _cpu_aligned(t: torch.Tensor) -> torch.Tensor:
    """A CPU field that does not start on a 64-byte boundary, copied into fresh memory. Transformers
    maps a safetensors file and hands out views of it, which start wherever the file put them (8-byte
    steps); aten's AVX-512 int8 matmul (``_weight_int8pack_mm``, torch 2.11 on a Xeon) faults on
    those, SIGSEGV on the first forward."""
    if t.device.type == "cpu" and t.data_ptr() % CPU_ALIGN:
        return t.clone(memory_format=torch.contiguous_format)
    return t


# ----------------------------------------------------------------------------- flatten / unflatten
def _check_untied(state_dict: Mapping[str, torch.Tensor]) -> None:
    """ValueError if one quantized tensor is in ``state_dict`` twice (tied weights; ``state_dict()``
    gives each name its own detached wrapper, on the same fields): its fields would be saved, and
    loaded, as two independent tensors. Row views of one stack (fused siblings) differ in offset."""
    seen: dict[tuple, str] = {}
    for name, t in state_dict.items():
        if isinstance(t, QTensor) and t.device.type != "meta":
            q = t._tensors()[0]
            key = (type(t), q.untyped_storage().data_ptr(), q.storage_offset(), tuple(q.shape), q.stride())
            if key in seen:
                raise ValueError(
                    f"tensors {seen[key]!r} and {name!r} are one quantized tensor (tied weights); save it once"
                )
            seen[key] = name


def flatten_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Plain tensors for safetensors plus the header metadata describing the lowbit ones."""
    flat: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    # a field sharing storage with one met before is copied: safetensors refuses shared storage (CPU
    # int4 keeps scale and zero in one buffer; fuse_projections_ makes siblings' rows views of one stack)
    storages: set[int] = set()
    _check_untied(state_dict)
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
        if not isinstance(t, QTensor):
            _put(flat, name, t)
            continue
        if QTENSOR_CLASSES.get(type(t).__name__) is not type(t) or type(t).__name__ not in _SPECS:
            raise ValueError(f"tensor {name!r}: {type(t).__name__} is not a lowbit class that can be saved")
        if getattr(t, "packing", "plain") != "plain":
            t = t.repack("plain")
        for field, part in zip(t.tensor_fields, t._tensors()):
            ptr = part.untyped_storage().data_ptr()
            part = (
                part.detach().clone(memory_format=torch.contiguous_format)
                if ptr in storages
                else part.detach().contiguous()
            )
            storages.add(ptr)
            _put(flat, f"{name}.{field}", part)
        entries[name] = {
            "class": type(t).__name__,
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "attrs": t._attrs(),
        }
    for name in entries:
        if name in flat:
            raise ValueError(f"tensor {name!r}: name used by a plain tensor and a lowbit tensor")
    metadata = {METADATA_KEY: json.dumps({"format_version": FORMAT_VERSION, "tensors": entries}, sort_keys=True)}
    return flat, metadata


def _put(flat: dict, key: str, t: torch.Tensor) -> None:
    if key in flat:
        raise ValueError(f"tensor {key!r}: name collides with a flattened lowbit field")
    flat[key] = t


def unflatten_state_dict(
    tensors: Mapping[str, torch.Tensor], entries: Mapping[str, Entry], source: str = "<state dict>"
) -> dict[str, torch.Tensor]:
    """Rebuild lowbit tensors from their fields; plain tensors pass through."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in entries}
    for key, t in tensors.items():
        head, _, field = key.rpartition(".")
        if head in entries:
            parts[head][field] = t
        else:
            out[key] = t
    for name, entry in entries.items():
        out[name] = build_qtensor(name, entry, parts[name], source)
    return out


# ----------------------------------------------------------------------------- files
def save_file(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Like ``safetensors.torch.save_file``; lowbit tensors are flattened into plain fields."""
    flat, meta = flatten_state_dict(state_dict)
    _st_save_file(flat, os.fspath(path), metadata=_merge_metadata(metadata, meta))


def _merge_metadata(user: Mapping[str, str] | None, ours: dict[str, str]) -> dict[str, str]:
    user = dict(user or {})
    if METADATA_KEY in user:
        raise ValueError(f"metadata key {METADATA_KEY!r} is reserved for lowbit")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in user.items()):
        raise TypeError("safetensors metadata must map strings to strings")
    return {"format": "pt", **user, **ours}


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    return t.to_device(torch.device(device)) if isinstance(t, QTensor) else t.to(device)


def _read_tensors(path: str, names, source: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in names}
    except Exception as e:  # the library's own checks; its error type is not a ValueError
        raise ValueError(f"{source}: safetensors could not read the file: {e}") from None


def load_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Like ``safetensors.torch.load_file``; validates everything and rebuilds lowbit tensors."""
    source = os.fspath(path)
    tensors, metadata = read_header(source)
    entries = parse_metadata(metadata, source)
    check_entries(entries, tensors, source)
    plain = _read_tensors(source, tensors, source)
    return {k: _to_device(v, device) for k, v in unflatten_state_dict(plain, entries, source).items()}


# ----------------------------------------------------------------------------- sharded
def _parse_size(size: int | str) -> int:
    if _is_int(size):
        return int(size)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a string such as '5GB'")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def save_sharded(
    state_dict: Mapping[str, torch.Tensor],
    directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Write ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``.

    The fields of one lowbit tensor always land in the same shard; a shard is
    closed once it would exceed ``max_shard_size`` bytes (one tensor larger than
    that gets a shard of its own). Returns the shard file names.
    """
    limit = _parse_size(max_shard_size)
    _check_untied(state_dict)  # (each shard checks its own tensors only)
    os.makedirs(directory, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state_dict.items():
        nbytes = t.nbytes_packed if isinstance(t, QTensor) else t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    names = []
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        flat, meta = flatten_state_dict(shard)
        _st_save_file(flat, os.path.join(directory, fname), metadata=_merge_metadata(metadata, meta))
        weight_map.update({k: fname for k in flat})
        total += sum(t.numel() * t.element_size() for t in flat.values())
        names.append(fname)
    index = {"metadata": {"total_size": total, "lowbit_format_version": FORMAT_VERSION}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return names


def load_sharded(directory: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load what ``save_sharded`` wrote; the index and every shard are validated like ``load_file``."""
    index_path = os.path.join(directory, INDEX_NAME)
    try:
        with open(index_path, "rb") as f:
            raw = f.read(MAX_HEADER_BYTES + 1)
    except OSError as e:
        raise ValueError(f"{index_path}: cannot read the shard index: {e}") from None
    index = _loads(raw, f"{index_path}: index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path}: field 'weight_map' must map tensor names to file names")
    by_file: dict[str, set[str]] = {}
    for key, fname in weight_map.items():
        if os.path.basename(fname) != fname or fname in ("", ".", "..") or not fname.endswith(".safetensors"):
            raise ValueError(f"{index_path}: tensor {key!r} field 'weight_map': bad shard file name {fname!r}")
        by_file.setdefault(fname, set()).add(key)
    # Transformers' save_pretrained writes the whole model's metadata into every shard, this
    # module's save_sharded each shard's own: merge the entries, check them against the
    # tensors of all shards together, then rebuild.
    headers: dict[str, dict] = {}
    entries: dict[str, Entry] = {}
    infos: dict[str, TensorInfo] = {}
    for fname, keys in sorted(by_file.items()):
        path = os.path.join(directory, fname)
        if not os.path.isfile(path):
            raise ValueError(f"{index_path}: shard {fname!r} listed in 'weight_map' does not exist")
        tensors, metadata = read_header(path)
        if set(tensors) != keys:
            diff = sorted(keys ^ set(tensors))[0]
            raise ValueError(f"{path}: tensor {diff!r}: the shard and the index disagree about where it is stored")
        for name, entry in parse_metadata(metadata, path).items():
            if entries.setdefault(name, entry) != entry:
                raise ValueError(f"{path}: tensor {name!r}: shards disagree about its lowbit metadata")
        headers[path] = tensors
        infos.update(tensors)
    check_entries(entries, infos, os.fspath(directory))
    plain: dict[str, torch.Tensor] = {}
    for path, tensors in headers.items():
        plain.update(_read_tensors(path, tensors, path))
    out = unflatten_state_dict(plain, entries, os.fspath(directory))
    return {k: _to_device(v, device) for k, v in out.items()}
