"""Misuse of quantized weights gets a clear error or the right answer, never a silent wrong
one: writes through slices, copies, addmm, loading, pickles, configs, bias dtypes."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit
from lowbit.ops import reference as ref
from lowbit.ops.backend import use_backend
from lowbit.qtensor import Float8Tensor, Int4Tensor, Int8DynActTensor, Int8Tensor


def _w(n=64, k=128, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


CLASSES = [
    lambda w: Int4Tensor.from_float(w, group_size=32),  # the CPU layout where the CPU kernel runs
    lambda w: Int4Tensor.from_float(w, group_size=32, packing="plain"),
    Int8Tensor.from_float,
    Int8DynActTensor.from_float,
    Float8Tensor.from_float,
]


def test_writes_through_row_slices_land_or_raise():
    for make in CLASSES:
        a, b = make(_w(seed=1)), make(_w(seed=2))
        try:
            a[0:16] = b[0:16]
        except NotImplementedError as e:  # a slice that is a copy (CPU-packed int4 rows)
            assert "write the whole weight" in str(e) and a.packing not in ("plain", "mma")
            continue
        assert torch.equal(a.dequantize()[:16], b.dequantize()[:16]), type(a).__name__
        assert torch.equal(a.dequantize()[16:], make(_w(seed=1)).dequantize()[16:])


@pytest.mark.parametrize("packing", ["auto", "tiled"])
@pytest.mark.parametrize("cut", ["rows", "cols"])
def test_a_slice_of_a_copied_slice_refuses_writes_and_never_changes_the_parent(packing, cut):
    """A slice that is a copy (CPU layout or "tiled" int4 rows not on 16-row tile rows, int4
    columns of a non-plain packing) owns every field, and slices of it stay marked: writing into
    one raises, and the parent is unchanged either way."""
    a = Int4Tensor.from_float(_w(n=64, k=256, seed=1), group_size=32, packing=packing)
    src = Int4Tensor.from_float(_w(n=64, k=256, seed=2), group_size=32, packing="plain")
    before = a.dequantize().clone()
    if cut == "rows":
        copied, dst, new = a[8:40], a[8:40][0:16], src[0:16]
    else:
        copied, dst, new = a.narrow(1, 32, 128), a.narrow(1, 32, 128)[0:16], src.narrow(1, 32, 128)[0:16]
    assert copied.packing != "plain" or a.packing != "plain", "the parent and slice must not both be plain here"
    for mine, theirs in zip(copied._tensors(), a._tensors()):
        assert mine.untyped_storage().data_ptr() != theirs.untyped_storage().data_ptr()
    with pytest.raises(NotImplementedError, match="write the whole weight"):
        copied[:].copy_(Int4Tensor.from_float(copied.dequantize(), group_size=32))
    with pytest.raises(NotImplementedError, match="write the whole weight"):
        dst.copy_(new)
    assert torch.equal(a.dequantize(), before)


@pytest.mark.parametrize("make", [Int8Tensor.from_float, Int8DynActTensor.from_float, Float8Tensor.from_float])
def test_writes_through_column_slices_of_per_row_scales_raise(make):
    a, b = make(_w(seed=1)), make(_w(seed=2))
    with pytest.raises(NotImplementedError, match="per-row scales are shared"):
        a.narrow(1, 0, 64).copy_(b.narrow(1, 0, 64))
    assert torch.equal(a.dequantize(), make(_w(seed=1)).dequantize())  # untouched


def test_int4_plain_column_slices_write_through_or_raise():
    # a view where the slice keeps the plain packing; on CPU it is repacked for the CPU kernel
    a, b = (Int4Tensor.from_float(_w(seed=s), group_size=32, packing="plain") for s in (1, 2))
    dst = a.narrow(1, 32, 64)
    if dst.packing != "plain":
        with pytest.raises(NotImplementedError, match="repacked into a copy"):
            dst.copy_(b.narrow(1, 32, 64))
        return
    dst.copy_(b.narrow(1, 32, 64))
    assert torch.equal(a.dequantize()[:, 32:96], b.dequantize()[:, 32:96])
    untouched = Int4Tensor.from_float(_w(seed=1), group_size=32, packing="plain").dequantize()
    assert torch.equal(a.dequantize()[:, :32], untouched[:, :32])


@pytest.mark.parametrize("make", CLASSES)
def test_to_with_copy_never_shares_fields(make):
    q = make(_w(seed=1))
    before = q.dequantize().clone()
    c = q.to("cpu", copy=True)
    c.copy_(make(_w(seed=2)))
    assert torch.equal(q.dequantize(), before)
    assert torch.equal(c.dequantize(), make(_w(seed=2)).dequantize())


def test_addmm_takes_only_the_linear_form():
    q = Int8Tensor.from_float(_w())
    x, bias = torch.randn(4, 128).bfloat16(), torch.randn(64).bfloat16()
    assert torch.equal(torch.addmm(bias, x, q.t()), F.linear(x, q, bias))
    with pytest.raises(NotImplementedError, match="beta=0.5, alpha=2.0"):
        torch.addmm(bias, x, q.t(), beta=0.5, alpha=2.0)
    with pytest.raises(NotImplementedError, match="without out="):
        torch.mm(x, q.t(), out=torch.empty(4, 64, dtype=torch.bfloat16))


def test_bias_dtype_must_match_and_keywords_work():
    q = Int8Tensor.from_float(_w())
    x = torch.randn(4, 128).bfloat16()
    with pytest.raises(TypeError, match="bias is torch.float32 but the input is torch.bfloat16"):
        F.linear(x, q, torch.zeros(64))
    bias = torch.randn(64).bfloat16()
    assert torch.equal(F.linear(input=x, weight=q, bias=bias), F.linear(x, q, bias))


def test_loading_a_non_finite_float_checkpoint_into_a_quantized_model_is_an_error():
    model = lowbit.quantize_(nn.Sequential(nn.Linear(128, 64)).bfloat16(), lowbit.int8_weight_only())
    sd = nn.Sequential(nn.Linear(128, 64)).bfloat16().state_dict()
    sd["0.weight"][3, 5] = float("nan")
    with pytest.raises(RuntimeError, match="1 NaN/Inf values of 8192; cannot quantize"):  # (torch wraps it)
        model.load_state_dict(sd)


@pytest.mark.parametrize("make", CLASSES)
def test_pickles_round_trip_and_tampered_fields_are_refused(make):
    q = make(_w())
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    assert type(back) is type(q) and torch.equal(back.dequantize(), q.dequantize())
    # the same fields under a logical shape they do not fit
    wrong = type(q)(*q._tensors(), shape=(32, 128), dtype=q.dtype, **q._attrs())
    buf = io.BytesIO()
    torch.save(wrong, buf)
    buf.seek(0)
    with pytest.raises(ValueError, match=r"\(32, 128\): field"):
        torch.load(buf, weights_only=True)


def test_int4_pickle_with_a_mismatched_group_size_is_refused():
    q = Int4Tensor.from_float(_w(), group_size=32, packing="plain")
    bad = Int4Tensor(q.qdata, q.scale, q.zero, shape=(64, 128), dtype=torch.bfloat16, group_size=64, packing="plain")
    buf = io.BytesIO()
    torch.save(bad, buf)
    buf.seek(0)
    with pytest.raises(ValueError, match="field 'scale'"):
        torch.load(buf, weights_only=True)


def _reloaded(t):
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("make", CLASSES)
@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf")])
def test_pickles_with_tampered_values_are_refused(make, bad):
    """As a safetensors file's: a scale that is not finite and positive, a zero point or fp8
    code that is not finite, is an error on load, not a wrong output later."""
    q = make(_w())
    fields = {f: t.clone(memory_format=torch.contiguous_format) for f, t in zip(q.tensor_fields, q._tensors())}
    targets = ["scale"] + (["zero"] if "zero" in fields and bad != 0.0 and bad != -1.0 else [])
    if fields["qdata"].dtype == ref.FP8_DTYPE and bad != bad:  # (inf saturates to 448 in e4m3fn)
        targets.append("qdata")
    for field in targets:
        tampered = dict(fields)
        tampered[field] = fields[field].clone()
        tampered[field].view(-1)[5] = bad
        t = type(q)(*[tampered[f] for f in q.tensor_fields], shape=q.shape, dtype=q.dtype, **q._attrs())
        with pytest.raises(ValueError, match=f"field '{field}'"):
            _reloaded(t)


@pytest.mark.parametrize("packing", ["plain", None])
def test_int4_pickle_with_reshaped_scales_is_refused(packing):
    """Same number of elements, wrong shape ([G, N] for [N, G]): refused on load, for the CPU
    layouts too (it failed only at the first forward, with a broadcasting error)."""
    q = Int4Tensor.from_float(_w(), group_size=32, **({"packing": packing} if packing else {}))
    s, z = q.scale.contiguous(), q.zero.contiguous()
    t = Int4Tensor.__new__(Int4Tensor, q.qdata, s, z, shape=q.shape, dtype=q.dtype, group_size=32, packing=q.packing)
    QTensorInit = super(Int4Tensor, t).__init__  # keep the fields as given (no interleaving)
    QTensorInit(q.qdata, s.reshape(4, 64), z.reshape(4, 64), shape=q.shape, dtype=q.dtype, group_size=32,
                packing=q.packing)  # fmt: skip
    with pytest.raises(ValueError, match="field 'scale'"):
        _reloaded(t)


@pytest.mark.parametrize("g", [0, 16, 100, 512, 128.0, True, "128", None])
def test_int4_config_rejects_unsupported_group_sizes(g):
    with pytest.raises(ValueError, match="group_size must be one of"):
        lowbit.int4_weight_only(g)


def test_weights_of_unsupported_dtypes_are_skipped_with_a_reason():
    model = lowbit.quantize_(nn.Sequential(nn.Linear(128, 64)).double(), lowbit.int8_weight_only())
    assert not isinstance(model[0].weight, lowbit.QTensor)
    assert "float64 is not supported" in model.lowbit_report.skipped["0"]


def test_w8a8_fp16_activations_on_cpu_keep_fp16_precision():
    q = Int8DynActTensor.from_float(_w(256, 1024) * 0.05)
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(3)).half()
    xq, xs = ref.int8_quantize_rows(x)
    exact = (xq.double() @ q.qdata.double().T) * xs.double()[:, None] * q.scale.double()

    def rel(y):
        return float((y.double() - exact).norm() / exact.norm())

    with use_backend("cpu"):
        cpu_out = F.linear(x, q)
    with use_backend("reference"):
        ref_out = F.linear(x, q)
    assert rel(cpu_out) <= 1.5 * rel(ref_out) + 1e-6, (rel(cpu_out), rel(ref_out))


@pytest.mark.parametrize("make", CLASSES)
def test_empty_row_slices(make):
    q = make(_w())
    for empty in (q[64:], q[5:5]):
        assert tuple(empty.shape) == (0, 128) and empty.dequantize().shape == (0, 128)


@pytest.mark.parametrize("make", CLASSES)
@pytest.mark.parametrize("form", ["mm", "addmm", "matmul3d"])
def test_decomposed_linear_has_the_input_gradient(make, form):
    """x @ w.t() (and addmm, and a 3-D matmul) record torch's own MmBackward, which asks for
    grad @ w with the untransposed weight; it gets the dequantized weight's product (it raised
    "only supported as x @ w.t()" though that is what was written)."""
    q = make(_w(48, 128))
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(2, 3, 48, dtype=torch.bfloat16)
    if form == "mm":
        y = (x.reshape(6, 128) @ q.t()).reshape(2, 3, 48)
    elif form == "addmm":
        y = torch.addmm(torch.zeros(48, dtype=torch.bfloat16), x.reshape(6, 128), q.t()).reshape(2, 3, 48)
    else:
        y = torch.matmul(x, q.t())
    y.backward(g)
    want = (g.double().reshape(6, 48) @ q.dequantize(torch.float64)).reshape(2, 3, 128)
    assert float((x.grad.double() - want).norm() / want.norm()) < 1e-2


def test_a_quantized_weight_that_requires_grad_is_not_silently_frozen():
    """load_state_dict(assign=True) keeps the old parameter's requires_grad=True; such a weight
    still gets no gradient (quantized weights are frozen), so the forward says so."""
    src = lowbit.quantize_(nn.Sequential(nn.Linear(128, 64)), lowbit.int8_weight_only())
    fresh = nn.Sequential(nn.Linear(128, 64))
    fresh.load_state_dict(src.state_dict(), assign=True)
    assert fresh[0].weight.requires_grad
    x = torch.randn(2, 128)
    with pytest.warns(UserWarning, match=r"Int8Tensor \(64, 128\) has requires_grad=True.*gets no gradient"):
        fresh(x)
    fresh[0].weight.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh(x)
        with torch.no_grad():
            src(x)


def test_loading_a_quantized_state_dict_into_a_full_precision_model_says_what_to_do():
    src = lowbit.quantize_(nn.Sequential(nn.Linear(128, 64)).bfloat16(), lowbit.int4_weight_only(32))
    with pytest.raises(RuntimeError, match=r"into a full-precision tensor: quantize the model with the same config"):
        nn.Sequential(nn.Linear(128, 64)).bfloat16().load_state_dict(src.state_dict())  # (torch wraps it)


@pytest.mark.parametrize("saved_as", ["plain", "mma", "cpu_avx512", "cpu_avx2", "cpu_scalar"])
def test_an_int4_pickle_from_another_machine_loads_in_this_machines_layout(saved_as):
    """A CPU layout of another machine (or a GPU's row packing) kept its packing on load and
    ran the reference path on every call (1 s against 16 ms for a 4096^2 layer)."""
    from lowbit.ops import cpu

    native = Int4Tensor.from_float(_w(64, 256), group_size=64)
    if saved_as not in ("plain", "mma") and saved_as not in cpu.INT4_CPU_LAYOUTS:
        pytest.skip(f"no {saved_as} layout in this version")
    back = _reloaded(native.repack(saved_as))
    assert back.packing == native.packing
    assert torch.equal(back.dequantize(), native.dequantize())
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert torch.equal(F.linear(x, back), F.linear(x, native))


@pytest.mark.parametrize("make", CLASSES)
def test_the_flattened_view_of_a_weight_is_its_flattened_values(make):
    """``view(-1)`` / ``flatten()`` (FSDP's bookkeeping view of a shard, ``lowbit/distributed.py``)
    keeps the fields: its ``dequantize()`` is the weight's values flattened (it was the [N, K]
    matrix under a 1-D shape), it views back to [N, K] (it refused), and slicing or splitting it,
    whose elements the packed fields cannot address one by one, is a clear error (an IndexError
    before)."""
    w = make(torch.randn(24, 64, generator=torch.Generator().manual_seed(0)))
    want = w.dequantize()
    for flat in (w.view(-1), w.flatten(), w.reshape(-1)):
        assert flat.shape == (24 * 64,) and torch.equal(flat.dequantize(), want.flatten())
        for back in (flat.view(24, 64), flat.view(-1, 64), flat.reshape(24, -1)):
            assert type(back) is type(w) and back.shape == (24, 64) and torch.equal(back.dequantize(), want)
        with pytest.raises(NotImplementedError, match=r"view to \(48, 32\)"):
            flat.view(48, 32)
        for cut in (
            lambda t: t[:10],
            lambda t: t.split(512),
            lambda t: t.narrow(0, 3, 7),
            lambda t: t.t(),
            lambda t: t.as_strided((24, 64), (64, 1)),
            lambda t: F.linear(torch.randn(2, 64, dtype=want.dtype), t),
            lambda t: torch.save(t, io.BytesIO()),  # (its load would check an [N, K] shape)
            lambda t: torch.mm(torch.randn(3, 1536, dtype=want.dtype), t),  # (a vector came back)
            lambda t: t.new_zeros([4, 64]),
        ):
            with pytest.raises(NotImplementedError, match=r"flattened \(1536,\) view of a \[24, 64\] quantized weight"):
                cut(flat)
        # moves and copies keep it a flattened view of the same values (int4 "tiled" included)
        for other in (flat.to("cpu", copy=True), flat.clone().copy_(flat), copy.deepcopy(flat)):
            assert other.shape == (1536,) and torch.equal(other.dequantize(), want.flatten())
        assert flat.to("meta").shape == (1536,)


def test_a_tiled_int4_weight_flattens():
    """The "tiled" packing's check read the shape's K from a 1-D shape (IndexError)."""
    w = Int4Tensor.from_float(torch.randn(32, 128), group_size=32, packing="tiled")
    flat = w.view(-1)
    assert flat.packing == "tiled" and torch.equal(flat.dequantize(), w.dequantize().flatten())
    assert torch.equal(flat.view(32, 128).dequantize(), w.dequantize())
