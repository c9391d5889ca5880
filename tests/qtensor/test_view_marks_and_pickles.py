"""A slice that refuses copy_ keeps refusing through detach, alias, view and nn.Parameter; split
sizes, overflowing float checkpoints and tampered pickles are errors; pickles keep Parameters."""

import io
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit
from lowbit.qtensor import Float8Tensor, Int4Tensor, Int8DynActTensor, Int8Tensor


def _w(n=16, k=128, seed=0, dtype=torch.bfloat16):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


# formats whose column slices share per-row scales with the other columns, or are repacked copies
COLUMN_SLICED = {
    "int8": Int8Tensor.from_float,
    "int8dyn": Int8DynActTensor.from_float,
    "fp8": Float8Tensor.from_float,
    "int4_cpu": lambda w: Int4Tensor.from_float(w, group_size=32),
}
DERIVED = {
    "detach": lambda t: t.detach(),
    "alias": lambda t: torch.ops.aten.alias(t),
    "view": lambda t: t.view(t.shape),
    "reshape": lambda t: t.reshape(-1, t.shape[1]),
    "parameter": lambda t: nn.Parameter(t, requires_grad=False),
    "detach_of_view": lambda t: t.view(t.shape).detach(),
}


@pytest.mark.parametrize("derive", list(DERIVED))
@pytest.mark.parametrize("fmt", list(COLUMN_SLICED))
def test_a_derived_column_slice_still_refuses_writes_and_the_parent_is_unchanged(fmt, derive):
    parent = COLUMN_SLICED[fmt](_w())
    if fmt == "int4_cpu" and parent.packing == "plain":
        pytest.skip("no CPU int4 packing on this machine")
    before = parent.dequantize().clone()
    sliced = DERIVED[derive](parent[:, :64])
    with pytest.raises(NotImplementedError, match="copy_ into a slice of a .*write the whole weight"):
        with torch.no_grad():
            sliced.copy_(_w(16, 64, seed=1) * 10)
    assert torch.equal(parent.dequantize(), before)
    # clone is an independent copy: it takes the write, the parent stays as it was
    copy = parent[:, :64].clone()
    new = _w(16, 64, seed=1)
    copy.copy_(new)
    want = type(parent).from_float(new, **({"group_size": 32} if fmt == "int4_cpu" else {}))
    assert torch.equal(copy.dequantize(), want.dequantize())
    assert torch.equal(parent.dequantize(), before)


@pytest.mark.parametrize("fmt", list(COLUMN_SLICED))
def test_load_state_dict_into_a_parameter_of_a_column_slice_is_refused(fmt):
    """nn.Parameter detaches; the mark was dropped there and load_state_dict rewrote the parent's
    per-row scales, changing its columns outside the slice."""
    parent = nn.Linear(128, 16, bias=False).bfloat16()
    cfg = lowbit.int4_weight_only(group_size=32) if fmt == "int4_cpu" else None
    cfg = (
        cfg
        or {
            "int8": lowbit.int8_weight_only(),
            "int8dyn": lowbit.int8_dynamic_activation_int8_weight(),
            "fp8": lowbit.float8_dynamic_activation_float8_weight(),
        }[fmt]
    )
    lowbit.quantize_(parent, cfg, filter_fn=lambda m, f: True)
    if fmt == "int4_cpu" and parent.weight.packing == "plain":
        pytest.skip("no CPU int4 packing on this machine")
    before = parent.weight.dequantize().clone()
    half = nn.Linear(64, 16, bias=False)
    half.weight = nn.Parameter(parent.weight[:, :64], requires_grad=False)
    with pytest.raises(RuntimeError, match="copy_ into a slice of a"):  # (torch wraps it)
        half.load_state_dict({"weight": _w(16, 64, seed=1) * 10})
    assert torch.equal(parent.weight.dequantize(), before)


def test_a_flattened_column_slice_still_refuses_writes():
    """FSDP's view(-1) (lowbit/distributed.py) keeps the fields: it keeps the mark too."""
    parent, other = Int8Tensor.from_float(_w()), Int8Tensor.from_float(_w(seed=1))
    before = parent.dequantize().clone()
    with pytest.raises(NotImplementedError, match="per-row scales are shared"):
        parent[:, :64].view(-1).copy_(other[:, :64].clone().view(-1))
    assert torch.equal(parent.dequantize(), before)


@pytest.mark.parametrize("fmt", ["int8", "int4_plain"])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("sizes", [[8, 4], [3, 3], [12, -2], [18, -2], [16, 0, 1]])
def test_split_sizes_that_do_not_sum_to_the_dim_size_are_refused(fmt, dim, sizes):
    w = _w(16, 128)
    q = Int8Tensor.from_float(w) if fmt == "int8" else Int4Tensor.from_float(w, group_size=32, packing="plain")
    sizes = sizes if dim == 0 else [s * 8 for s in sizes]
    with pytest.raises(RuntimeError):  # plain torch refuses them
        torch.split(w, sizes, dim)
    with pytest.raises(ValueError, match=rf"{type(q).__name__}.*{re.escape(str(sizes))}.*{w.shape[dim]}"):
        torch.split(q, sizes, dim)
    good = [8, 8] if dim == 0 else [32, 96]
    for got, want in zip(torch.split(q, good, dim), torch.split(q.dequantize(), good, dim)):
        assert torch.equal(got.dequantize(), want)


@pytest.mark.parametrize("cfg", [lowbit.int8_weight_only(), lowbit.int4_weight_only(group_size=32)], ids=str)
def test_a_float_checkpoint_that_overflows_the_weights_dtype_is_refused(cfg):
    """A finite fp32 value above fp16's max becomes inf in the fp16 weight's dtype: quantizing it
    gave NaN scales and NaN outputs with no error."""
    model = lowbit.quantize_(nn.Sequential(nn.Linear(128, 16)).half(), cfg)
    before = model[0].weight.dequantize().clone()
    sd = {"0.weight": _w(16, 128, dtype=torch.float32), "0.bias": torch.zeros(16)}
    sd["0.weight"][0, 0] = 7e4
    assert torch.isfinite(sd["0.weight"]).all() and not torch.isfinite(sd["0.weight"].half()).all()
    name = type(model[0].weight).__name__
    with pytest.raises(RuntimeError, match=rf"copy_ into {name} \(16, 128\).*1 NaN/Inf values of 2048"):  # (wrapped)
        model.load_state_dict(sd)
    assert torch.equal(model[0].weight.dequantize(), before)
    # in range it loads, as quantizing the fp16 cast
    sd["0.weight"][0, 0] = 6e4
    model.load_state_dict(sd)
    want = type(model[0].weight).from_float(sd["0.weight"].half(), **model[0].weight._attrs()).dequantize()
    assert torch.equal(model[0].weight.dequantize(), want)


class _Pickled:
    """Pickles as ``fn(*args)``: a hand-edited pickle of a lowbit tensor."""

    def __init__(self, fn, args):
        self.reduced = (fn, tuple(args))

    def __reduce_ex__(self, protocol):
        return self.reduced


def _load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _tampered(q, **changes):
    fn, args = q.__reduce_ex__(2)
    args = list(args)
    for i, key in enumerate(("cls", "tensors", "shape", "dtype", "attrs")):
        if key in changes:
            args[i] = changes[key]
    return _Pickled(fn, args)


def _plain_int4(w):
    return Int4Tensor.from_float(w, group_size=64, packing="plain")


def _fields(q, **dtypes):
    return [t.to(dtypes[f]) if f in dtypes else t for f, t in zip(q.tensor_fields, q._tensors())]


TAMPERED = {
    "dtype_float64": (Int8Tensor.from_float, lambda q: dict(dtype=torch.float64)),
    "dtype_int32": (_plain_int4, lambda q: dict(dtype=torch.int32)),
    "dtype_fp8": (Float8Tensor.from_float, lambda q: dict(dtype=torch.float8_e4m3fn)),
    "shape_3d": (
        Int8Tensor.from_float,
        lambda q: dict(tensors=[q.qdata.reshape(16, 2, 64), q.scale], shape=(16, 2, 64)),
    ),
    "shape_1d": (Int8Tensor.from_float, lambda q: dict(shape=(2048,))),
    "shape_negative": (Int8Tensor.from_float, lambda q: dict(shape=(-16, -128))),
    "dynact_bf16_scale": (Int8DynActTensor.from_float, lambda q: dict(tensors=_fields(q, scale=torch.bfloat16))),
    "fp8_bf16_scale": (Float8Tensor.from_float, lambda q: dict(tensors=_fields(q, scale=torch.bfloat16))),
    "int8_float64_scale": (Int8Tensor.from_float, lambda q: dict(tensors=_fields(q, scale=torch.float64))),
    "int4_mixed_scale_zero": (_plain_int4, lambda q: dict(tensors=_fields(q, scale=torch.float64, zero=torch.half))),
    "int4_int8_qdata": (_plain_int4, lambda q: dict(tensors=_fields(q, qdata=torch.int8))),
    "extra_attr": (Int8Tensor.from_float, lambda q: dict(attrs={"evil": 1})),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_pickles_are_refused(case):
    """As a safetensors file's metadata is checked: the outer dtype (fp32/bf16/fp16), a 2-D shape
    of non-negative sizes, exactly the class's attributes and each field's dtype."""
    make, change = TAMPERED[case]
    q = make(_w(16, 128))
    assert isinstance(_load(q), type(q))  # untampered, it loads
    with pytest.raises(ValueError, match=rf"pickled {type(q).__name__}"):
        _load(_tampered(q, **change(q)))


QUANTIZED = {
    "int8": lowbit.int8_weight_only(),
    "int4": lowbit.int4_weight_only(group_size=32),
    "fp8": lowbit.float8_dynamic_activation_float8_weight(),
}


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("fmt", list(QUANTIZED))
def test_a_pickled_quantized_linear_keeps_its_weight_parameter(fmt, requires_grad):
    """As a plain nn.Linear's: torch.save of the module (or of its weight) loads back an
    nn.Parameter with its requires_grad, with weights_only=True, and the same outputs."""
    plain = nn.Linear(128, 16).bfloat16()
    model = lowbit.quantize_(nn.Sequential(nn.Linear(128, 16).bfloat16()), QUANTIZED[fmt])[0]
    for m in (plain, model):
        m.weight.requires_grad_(requires_grad)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.serialization.safe_globals([nn.Linear]):
        plain_back, back = _load(plain), _load(model)
    weight_back = _load({"w": model.weight})["w"]
    for w in (plain_back.weight, back.weight, weight_back):
        assert isinstance(w, nn.Parameter) and w.requires_grad == requires_grad
    assert type(back.weight) is type(model.weight)
    with torch.no_grad():
        assert torch.equal(back(x), model(x)) and torch.equal(F.linear(x, weight_back), F.linear(x, model.weight))
    # a plain tensor stays plain
    inner = model.weight.detach()
    assert not isinstance(_load(inner), nn.Parameter) and not _load(inner).requires_grad


def test_a_plain_pickle_is_what_earlier_versions_read():
    # state_dict() entries (detached, no grad, not Parameters) pickle as before session 26: five
    # arguments, which the earlier _rebuild_qtensor takes; the extra state only when it is not the default
    q = Int8Tensor.from_float(_w())
    assert len(q.__reduce_ex__(2)[1]) == 5
    assert len(q[:, :64].__reduce_ex__(2)[1]) == 8  # (a shared-scale slice keeps its mark)
    assert len(nn.Parameter(q, requires_grad=False).__reduce_ex__(2)[1]) == 8


def test_an_unpickled_repacked_int4_slice_owns_its_fields_and_takes_writes():
    parent = Int4Tensor.from_float(_w(), group_size=32)
    if parent.packing == "plain":
        pytest.skip("no CPU int4 packing on this machine")
    buf = io.BytesIO()
    torch.save(parent[:, :64], buf)
    buf.seek(0)
    sliced = torch.load(buf, weights_only=True)
    new = _w(16, 64, seed=3)
    sliced.copy_(new)  # (a repacked copy: its fields were never the parent's)
    assert torch.equal(sliced.dequantize(), Int4Tensor.from_float(new, group_size=32).dequantize())


def test_finite_weights_near_the_float32_max_quantize():
    # int4's group range hi - lo overflows float32 for values of both signs near its max: the scales were
    # inf (first NaN weights, then a refusal); the range is now taken by halves and the scale capped
    # (tests/qtensor/test_near_max_weights.py), so the group decodes finite within a step
    w = _w(dtype=torch.float32)
    w[2, :32] = torch.tensor([3e38, -3e38]).repeat(16)
    q4 = Int4Tensor.from_float(w, group_size=32, packing="plain")
    assert bool(torch.isfinite(q4.dequantize()).all())
    torch.testing.assert_close(q4.dequantize()[2], w[2], rtol=0, atol=float(q4.scale[2, 0]))
    q = Int8Tensor.from_float(w)
    torch.testing.assert_close(q.dequantize()[2], w[2], rtol=1e-2, atol=3e38 / 127)
