"""lowbit.safetensors: round trips for every format, sharding, and strict rejection of malformed files."""

import json
import os
import pickle
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file as st_save_file

import lowbit
from lowbit import safetensors as lst
from lowbit.qtensor import QTENSOR_CLASSES

N, K = 96, 256


def _weights():
    w = torch.randn(N, K, dtype=torch.bfloat16) * 0.02
    return {
        "int4.weight": lowbit.Int4Tensor.from_float(w, group_size=64),
        "int4_fp32.weight": lowbit.Int4Tensor.from_float(w.float(), group_size=128),
        "int8.weight": lowbit.Int8Tensor.from_float(w),
        "w8a8.weight": lowbit.Int8DynActTensor.from_float(w),
        "fp8.weight": lowbit.Float8Tensor.from_float(w.float()),
        "norm.weight": torch.randn(K),
        "ids": torch.arange(5),
    }


def _same(a, b):
    if isinstance(a, lowbit.QTensor):
        assert type(a) is type(b) and a.shape == b.shape and a.dtype == b.dtype
        x = torch.randn(3, K, dtype=a.dtype)
        return torch.equal(a.dequantize(), b.dequantize()) and torch.equal(F_linear(x, a), F_linear(x, b))
    return torch.equal(a, b)


def F_linear(x, w):
    return torch.nn.functional.linear(x, w)


def test_every_class_has_a_spec_that_from_float_satisfies():
    # the field table in lowbit.safetensors must follow the tensor classes
    sd = _weights()
    flat, meta = lst.flatten_state_dict(sd)
    entries = lst.parse_metadata(meta)
    assert {e.cls.__name__ for e in entries.values()} == set(QTENSOR_CLASSES)
    infos = {k: lst.TensorInfo(_st_name(v.dtype), tuple(v.shape)) for k, v in flat.items()}
    lst.check_entries(entries, infos)


def _st_name(dtype):
    return next(k for k, (d, _) in lst._ST_DTYPES.items() if d == dtype)


def test_round_trip_every_format(tmp_path):
    sd = _weights()
    path = tmp_path / "m.safetensors"
    lst.save_file(sd, path, metadata={"note": "hello"})
    out = lst.load_file(path)
    assert set(out) == set(sd)
    for k in sd:
        assert _same(sd[k], out[k]), k
    # int4 is stored plain and comes back in this machine's CPU layout
    assert out["int4.weight"].packing == sd["int4.weight"].packing
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["note"] == "hello"
        assert "int4.weight.qdata" in f.keys() and "int4.weight" not in f.keys()
        assert f.get_tensor("int4.weight.qdata").shape == (N, K // 2)


def test_stored_int4_is_the_reference_packing(tmp_path):
    w = torch.randn(N, K, dtype=torch.bfloat16)
    q = lowbit.Int4Tensor.from_float(w, group_size=32)
    lst.save_file({"w": q}, tmp_path / "a.safetensors")
    with safe_open(tmp_path / "a.safetensors", framework="pt") as f:
        qdata = f.get_tensor("w.qdata")
    plain = lowbit.Int4Tensor.from_float(w, group_size=32, packing="plain")
    assert torch.equal(qdata, plain.qdata)


def test_reserved_metadata_key_and_non_tensors(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        lst.save_file({"a": torch.zeros(1)}, tmp_path / "a.safetensors", metadata={"lowbit": "x"})
    with pytest.raises(TypeError):
        lst.save_file({"a": 3}, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="collides|used by"):
        lst.flatten_state_dict({"a": _weights()["int8.weight"], "a.qdata": torch.zeros(1)})


def test_sharded_round_trip_keeps_fields_together(tmp_path):
    sd = _weights()
    names = lst.save_sharded(sd, tmp_path, max_shard_size=20_000)
    assert len(names) > 2
    index = json.loads((tmp_path / lst.INDEX_NAME).read_text())
    for name in ("int4.weight", "int8.weight", "fp8.weight"):
        files = {f for k, f in index["weight_map"].items() if k.startswith(name + ".")}
        assert len(files) == 1
    out = lst.load_sharded(tmp_path)
    assert set(out) == set(sd)
    assert all(_same(sd[k], out[k]) for k in sd)


def test_a_tie_across_shards_is_refused(tmp_path):
    # one quantized tensor under two names would load as two independent copies
    sd = _weights()
    sd["tied.weight"] = sd["int8.weight"]
    for save in (
        lambda: lst.save_sharded(sd, tmp_path, max_shard_size=20_000),
        lambda: lst.save_file(sd, tmp_path / "a"),
    ):
        with pytest.raises(ValueError, match="'int8.weight' and 'tied.weight' are one quantized tensor"):
            save()


def test_sharded_index_is_validated(tmp_path):
    lst.save_sharded(_weights(), tmp_path, max_shard_size="20KB")
    index_path = tmp_path / lst.INDEX_NAME
    index = json.loads(index_path.read_text())
    bad = dict(index, weight_map=dict(index["weight_map"], **{"int8.weight.qdata": "../x.safetensors"}))
    index_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="int8.weight.qdata"):
        lst.load_sharded(tmp_path)
    moved = dict(index["weight_map"])
    moved["norm.weight"] = next(f for k, f in moved.items() if f != moved["norm.weight"])
    index_path.write_text(json.dumps(dict(index, weight_map=moved)))
    with pytest.raises(ValueError, match="norm.weight"):
        lst.load_sharded(tmp_path)
    index_path.write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        lst.load_sharded(tmp_path)


# ----------------------------------------------------------------------------- malformed files
def _flat():
    sd = {"layer.weight": lowbit.Int4Tensor.from_float(torch.randn(N, K, dtype=torch.bfloat16), group_size=64)}
    sd["w8.weight"] = lowbit.Int8Tensor.from_float(torch.randn(N, K))
    flat, meta = lst.flatten_state_dict(sd)
    return flat, json.loads(meta["lowbit"])


def _write(tmp_path, flat, doc):
    path = tmp_path / "bad.safetensors"
    st_save_file(flat, str(path), metadata={"lowbit": json.dumps(doc)})
    return path


def _expect(path, *words):
    with pytest.raises(ValueError) as e:
        lst.load_file(path)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize(
    "field, make",
    [
        ("qdata", lambda t: t[:, :-1].contiguous()),  # wrong shape
        ("qdata", lambda t: t.to(torch.int8)),  # wrong dtype
        ("scale", lambda t: t[:-1].contiguous()),
        ("scale", lambda t: t.to(torch.int16)),
        ("zero", lambda t: torch.cat([t, t], 1)),
        ("zero", lambda t: t.float()),  # differs from the scale's dtype
    ],
)
def test_wrong_shape_or_dtype_of_a_part(tmp_path, field, make):
    flat, doc = _flat()
    key = f"layer.weight.{field}"
    flat[key] = make(flat[key])
    _expect(_write(tmp_path, flat, doc), "'layer.weight'", repr(field))


def test_wrong_int8_parts(tmp_path):
    flat, doc = _flat()
    flat["w8.weight.qdata"] = flat["w8.weight.qdata"].to(torch.uint8)
    _expect(_write(tmp_path, flat, doc), "'w8.weight'", "'qdata'")


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda d: d["tensors"]["layer.weight"].update({"class": "Int2Tensor"}), ["'class'", "Int2Tensor"]),
        (lambda d: d["tensors"]["layer.weight"].update({"class": "QTensor"}), ["'class'"]),
        (lambda d: d.update({"format_version": lst.FORMAT_VERSION + 1}), ["'format_version'", "upgrade"]),
        (lambda d: d["tensors"]["layer.weight"].pop("attrs"), ["'layer.weight'", "'attrs'"]),
        (lambda d: d["tensors"]["layer.weight"].pop("shape"), ["'layer.weight'", "'shape'"]),
        (lambda d: d["tensors"]["layer.weight"]["attrs"].pop("group_size"), ["'layer.weight'", "group_size"]),
        (lambda d: d["tensors"]["layer.weight"]["attrs"].update(group_size=96), ["'layer.weight'", "'group_size'"]),
        (lambda d: d["tensors"]["layer.weight"]["attrs"].update(group_size=True), ["'group_size'"]),
        (lambda d: d["tensors"]["layer.weight"]["attrs"].update(packing="cpu_avx2"), ["'packing'"]),
        (lambda d: d["tensors"]["layer.weight"].update(shape=[N, K + 2]), ["'layer.weight'"]),
        (lambda d: d["tensors"]["layer.weight"].update(shape=[N, K, 1]), ["'shape'"]),
        (lambda d: d["tensors"]["layer.weight"].update(dtype="int8"), ["'dtype'"]),
        (
            lambda d: d["tensors"].update(
                ghost={"class": "Int8Tensor", "shape": [2, 2], "dtype": "float32", "attrs": {}}
            ),
            ["'ghost'", "absent"],
        ),
        (lambda d: d.update(tensors=[]), ["'tensors'"]),
        (lambda d: d.pop("format_version"), ["format_version"]),
    ],
)
def test_malformed_metadata(tmp_path, mutate, words):
    flat, doc = _flat()
    mutate(doc)
    _expect(_write(tmp_path, flat, doc), *words)


def test_group_size_that_does_not_divide_k(tmp_path):
    w = torch.randn(N, 3 * 64, dtype=torch.bfloat16)
    flat, meta = lst.flatten_state_dict({"w": lowbit.Int4Tensor.from_float(w, group_size=64)})
    doc = json.loads(meta["lowbit"])
    doc["tensors"]["w"]["attrs"]["group_size"] = 128
    _expect(_write(tmp_path, flat, doc), "'w'", "'group_size'", "does not divide")


def test_missing_and_extra_fields(tmp_path):
    flat, doc = _flat()
    del flat["layer.weight.zero"]
    _expect(_write(tmp_path, flat, doc), "'layer.weight'", "'zero'", "missing")
    flat, doc = _flat()
    flat["layer.weight.bias"] = torch.zeros(3)
    _expect(_write(tmp_path, flat, doc), "'layer.weight'", "'bias'")


@pytest.mark.parametrize(
    "field, value",
    [("scale", float("nan")), ("scale", -1.0), ("scale", 0.0), ("scale", float("inf")), ("zero", float("nan"))],
)
def test_bad_values(tmp_path, field, value):
    flat, doc = _flat()
    flat[f"layer.weight.{field}"][3, 1] = value
    _expect(_write(tmp_path, flat, doc), "'layer.weight'", repr(field), f"the first {value} at index [3, 1]")


def test_nan_in_fp8_data(tmp_path):
    flat, meta = lst.flatten_state_dict({"f": lowbit.Float8Tensor.from_float(torch.randn(N, K))})
    flat["f.qdata"].view(torch.uint8)[0, 0] = 0x7F  # e4m3fn NaN
    _expect(_write(tmp_path, flat, json.loads(meta["lowbit"])), "'f'", "'qdata'")


def test_truncated_file(tmp_path):
    path = tmp_path / "ok.safetensors"
    lst.save_file(_weights(), path)
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    for cut in (0, 5, 8, 8 + header_len // 2, 8 + header_len, len(raw) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="truncated|too short|outside"):
            lst.load_file(bad)


def test_header_lies_about_offsets(tmp_path):
    path = tmp_path / "ok.safetensors"
    st_save_file({"a": torch.zeros(4), "b": torch.zeros(4)}, str(path))
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["b"]["data_offsets"] = [0, 16]  # overlaps a
    body = json.dumps(header).encode()
    (tmp_path / "lie.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    with pytest.raises(ValueError, match="overlap"):
        lst.load_file(tmp_path / "lie.safetensors")


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    path = tmp_path / "ok.safetensors"
    lst.save_file(_weights(), path)

    def boom(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(torch, "load", boom)
    out = lst.load_file(path)
    assert isinstance(out["int4.weight"], lowbit.Int4Tensor)


# ----------------------------------------------------------------------------- fuzz
def _only_value_error(fn, *args):
    """Run ``fn``; any exception but ValueError propagates. Returns the ValueError, or None."""
    try:
        fn(*args)
    except ValueError as e:
        return e
    return None


def _accepted_or_explained(err) -> bool:
    """Parsed, or rejected with a message saying why."""
    return err is None or len(str(err)) > 0


@given(st.binary(max_size=300), st.integers(0, 1 << 20))
def test_fuzz_header_bytes(raw, data_len):
    assert _accepted_or_explained(_only_value_error(lst.parse_header, raw, data_len))


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
_field_names = st.sampled_from(["class", "shape", "dtype", "attrs", "group_size", "packing", "format_version", "x"])


_VALID_DOC = json.dumps(
    {
        "format_version": lst.FORMAT_VERSION,
        "tensors": {
            "layer.weight": {
                "class": "Int4Tensor",
                "shape": [N, K],
                "dtype": "bfloat16",
                "attrs": {"group_size": 64, "packing": "plain"},
            }
        },
    }
)


@st.composite
def _mutated_doc(draw):
    """A valid metadata document with a few values removed or replaced by arbitrary JSON."""
    doc = json.loads(_VALID_DOC)
    entry = doc["tensors"]["layer.weight"]
    nodes = [doc, entry, entry["attrs"]]
    for _ in range(draw(st.integers(1, 3))):
        node = draw(st.sampled_from(nodes))
        if draw(st.booleans()) and node:
            node.pop(draw(st.sampled_from(sorted(node))))
        else:
            node[draw(_field_names)] = draw(_json)
    return doc


_INFOS = {
    "layer.weight.qdata": lst.TensorInfo("U8", (N, K // 2)),
    "layer.weight.scale": lst.TensorInfo("BF16", (N, K // 64)),
    "layer.weight.zero": lst.TensorInfo("BF16", (N, K // 64)),
}


def _parse_and_check(text):
    entries = lst.parse_metadata({"lowbit": text})
    lst.check_entries(entries, _INFOS)


@given(st.one_of(_mutated_doc().map(json.dumps), _json.map(json.dumps), st.text(max_size=200)))
def test_fuzz_metadata_parser(text):
    assert _accepted_or_explained(_only_value_error(_parse_and_check, text))


def test_fuzz_deeply_nested_metadata():
    assert _accepted_or_explained(_only_value_error(_parse_and_check, "[" * 100_000))
    with pytest.raises(ValueError):
        lst.parse_header(b"{" * 100_000, 0)


@given(st.binary(min_size=0, max_size=64), st.integers(0, 400))
def test_fuzz_file_bytes(tmp_path_factory, junk, cut):
    # a real file, cut and with junk spliced in: read_header/load_file raise ValueError only
    d = tmp_path_factory.mktemp("fz")
    path = os.path.join(d, "f.safetensors")
    flat, meta = lst.flatten_state_dict({"w": lowbit.Int8Tensor.from_float(torch.ones(4, 8))})
    st_save_file(flat, path, metadata=meta)
    raw = open(path, "rb").read()
    cut = min(cut, len(raw))
    with open(path, "wb") as f:
        f.write(raw[:cut] + junk + raw[cut + len(junk) :])
    assert _accepted_or_explained(_only_value_error(lst.load_file, path))


_header_entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["U8", "F32", "BF16", "Q4"]) | _json,
        "shape": st.lists(st.integers(-2, 1 << 45), max_size=3) | _json,
        "data_offsets": st.lists(st.integers(-5, 1 << 62), max_size=3) | _json,
    }
)


@given(st.dictionaries(st.text(max_size=5), _header_entry | _json, max_size=3), st.integers(0, 1 << 20))
def test_fuzz_structured_header(header, data_len):
    assert _accepted_or_explained(_only_value_error(lst.parse_header, json.dumps(header).encode(), data_len))


def test_a_tie_from_state_dict_is_refused_but_fused_siblings_are_not(tmp_path):
    # state_dict() detaches every entry into its own wrapper: a module registered twice still ties them
    shared = torch.nn.Linear(K, N, bias=False)
    m = torch.nn.ModuleDict({"a": shared, "b": shared, "c": torch.nn.Linear(K, N, bias=False)})
    lowbit.quantize_(m, lowbit.int8_weight_only())
    with pytest.raises(ValueError, match="'a.weight' and 'b.weight' are one quantized tensor"):
        lst.save_file(m.state_dict(), tmp_path / "tied.safetensors")
    stack = lowbit.Int8Tensor.from_float(torch.randn(2 * N, K))  # two row views of one stack: two tensors
    sd = {"q.weight": stack[:N], "k.weight": stack[N:]}
    lst.save_file(sd, tmp_path / "fused.safetensors")
    back = lst.load_file(tmp_path / "fused.safetensors")
    assert all(torch.equal(back[k].dequantize(), sd[k].dequantize()) for k in sd)
