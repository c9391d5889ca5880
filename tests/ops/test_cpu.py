"""The CPU int4 layout (pure-torch packing) agrees with aten's own packer; the CPU
launchers compute the reference's function."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.ops import cpu
from lowbit.ops import reference as ref
from lowbit.qtensor import Int4Tensor, Int8DynActTensor, Int8Tensor

LAYOUT = cpu.int4_cpu_layout()
needs_layout = pytest.mark.skipif(LAYOUT is None, reason="aten has no int4 CPU kernel here")


@given(
    layout=st.sampled_from(list(cpu.INT4_CPU_LAYOUTS)),
    nb=st.integers(1, 12),
    kb=st.integers(1, 8),
    seed=st.integers(0, 999),
)
def test_every_layout_round_trips(layout, nb, kb, seed):
    n, k = nb * 16, kb * 32
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = cpu.int4_cpu_pack(q, layout)
    assert packed.shape == (n, k // 2)
    assert torch.equal(cpu.int4_cpu_unpack(packed, layout), q)


@needs_layout
@given(nb=st.integers(1, 12), kb=st.integers(1, 8), seed=st.integers(0, 999))
def test_pack_matches_aten(nb, kb, seed):
    n, k = nb * 16, kb * 32
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(seed))
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).view(torch.uint8).reshape(n, k // 2)
    assert torch.equal(cpu.int4_cpu_pack(q.to(torch.uint8), LAYOUT), expected)


@given(
    m=st.integers(1, 9),
    k=st.integers(1, 300),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    zero_row=st.booleans(),
    bad=st.sampled_from([None, float("nan"), float("inf"), -float("inf")]),
    seed=st.integers(0, 999),
)
def test_int8_rows_as_float_is_the_reference_quantizer(m, k, dtype, zero_row, bad, seed):
    """The CPU W8A8 fast path's activation quantizer gives the reference's codes and scales
    bit for bit, also for a row holding a NaN or an infinity (NaN scale, zero codes)."""
    from lowbit.ops import reference as ref

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-6, 3, m)[:, None]).to(dtype)
    if zero_row:
        x[0] = 0
    if bad is not None:
        x[m - 1, seed % k] = bad
    codes, xs = cpu.int8_rows_as_float(x)
    want_q, want_s = ref.int8_quantize_rows(x)
    assert torch.equal(xs.isnan(), want_s.isnan()) and (bad is not None) == bool(xs[m - 1].isnan())
    assert torch.equal(xs.nan_to_num(), want_s.nan_to_num())
    assert torch.equal(codes.to(torch.int8), want_q) and torch.equal(codes, want_q.float())


@settings(max_examples=60)
@given(
    m=st.integers(1, 9),
    k=st.integers(1, 140),
    n=st.sampled_from([1, 5, 16, 33]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    seed=st.integers(0, 999),
)
def test_int8_cpu_kernels_any_k(m, k, n, dtype, seed):
    """W8A16 and W8A8 on the CPU backend match the reference for every K: aten's bf16 int8
    kernel reads past rows whose K is not a multiple of 8 (wrong results, or a segfault
    that ends this process), so those shapes must take the fp32 kernel. The error is measured
    against ``|x| @ |w_hat|.T`` (what rounding errors scale with): relative to the output
    itself, one cancelling bf16 output (m = n = 1) fails about one seed in 15."""
    from lowbit.ops import reference as ref

    def rel(got, want, q, s):
        scale = x.double().abs() @ (q.double() * s.double()[:, None]).abs().T
        return float((got.double() - want.double()).norm() / scale.norm().clamp_min(1e-30))

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g).to(dtype)
    # (largest seen over 1500 random draws: bf16 4.5e-3 / 1.3e-3, fp16 4.3e-4 / 0, fp32 8e-8 / 0)
    tol = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-6}[dtype]
    s_wo = ref.int8_choose_qparams(w, dtype)
    q_wo = ref.int8_quantize(w, s_wo)
    assert rel(cpu.int8_mm(x, q_wo, s_wo), ref.int8_weight_only_linear(x, q_wo, s_wo), q_wo, s_wo) < tol
    s_dyn = ref.int8_choose_qparams(w, torch.float32)
    q_dyn = ref.int8_quantize(w, s_dyn)
    got = cpu.int8_dyn_mm(x, q_dyn, s_dyn)
    assert rel(got, ref.int8_dynamic_linear(x, q_dyn, s_dyn), q_dyn, s_dyn) < tol / 2


# ---------------------------------------------------------------------------- the spec's accuracy
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _rel_errors(x, qw):
    """Normwise error of the reference and of the CPU backend against the spec's
    dequantized weight in float64, relative to that product; None if it is all zero."""
    truth = x.double() @ qw.dequantize(torch.float32).double().T
    if truth.norm() == 0:
        return None
    errs = {}
    for backend in ("reference", "cpu"):
        with lowbit.use_backend(backend):
            errs[backend] = float((F.linear(x, qw).double() - truth).norm() / truth.norm())
    return errs


def _assert_cpu_as_accurate(x, qw):
    """The CPU path's error is the reference's plus at most one rounding to x's dtype (the
    scales' cast to it, where that cast keeps them normal). A scale or int4 zero that lost
    bits in that cast gave 4-76x the reference's error."""
    errs = _rel_errors(x, qw)
    if errs is not None:
        assert errs["cpu"] <= errs["reference"] + UNIT_ROUNDOFF[x.dtype], errs


@given(
    fmt=st.sampled_from(["int8", "int4"]),
    wdtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    xdtype=st.sampled_from([torch.float16, torch.bfloat16]),
    log_mag=st.floats(-8, -1),
    m=st.integers(1, 5),
    nb=st.integers(1, 3),
    groups=st.integers(1, 3),
    gs=st.sampled_from([32, 64, 128]),
    seed=st.integers(0, 999),
)
@example(fmt="int8", wdtype=torch.float32, xdtype=torch.float16, log_mag=-4, m=4, nb=4, groups=2, gs=128, seed=0)
@example(fmt="int4", wdtype=torch.float32, xdtype=torch.float16, log_mag=-5, m=4, nb=4, groups=8, gs=32, seed=0)
@example(fmt="int4", wdtype=torch.bfloat16, xdtype=torch.float16, log_mag=-5, m=4, nb=4, groups=8, gs=32, seed=0)
@example(fmt="int4", wdtype=torch.float32, xdtype=torch.bfloat16, log_mag=-7, m=4, nb=4, groups=8, gs=32, seed=0)
def test_small_weights_keep_the_reference_accuracy(fmt, wdtype, xdtype, log_mag, m, nb, groups, gs, seed):
    """Weights of any magnitude, x in a 16-bit dtype other than (or equal to) the weight's:
    aten's kernels take the scales (and int4 zeros) in x's dtype, where small ones became
    fp16 subnormals (int8 at 1e-4: 6.3e-3 against the reference's 2.9e-4) and an int4
    group on the SCALE_EPS floor lost its zero's low bits in bf16 (4.3e-2 against 2.6e-3)."""
    if fmt == "int4" and LAYOUT is None:
        pytest.skip("aten has no int4 CPU kernel here")
    g = torch.Generator().manual_seed(seed)
    n, k = 16 * nb, gs * groups
    w = (torch.randn(n, k, generator=g) * 10.0**log_mag).to(wdtype)
    x = torch.randn(m, k, generator=g).to(xdtype)
    qw = Int8Tensor.from_float(w) if fmt == "int8" else Int4Tensor.from_float(w, group_size=gs)
    assert fmt == "int8" or qw.packing == LAYOUT  # the CPU kernel runs, not the reference
    _assert_cpu_as_accurate(x, qw)


@needs_layout
@pytest.mark.parametrize(("xdtype", "small"), [(torch.bfloat16, 1e-7), (torch.float16, 1e-5)])
def test_int4_cast_check_sees_a_copy_into_the_weight(xdtype, small):
    """The check runs on every call: ``copy_`` rewrites the stored scales in place (under
    ``__torch_dispatch__``, no version counter moves), so a remembered answer would go
    stale. After the copy: groups on the SCALE_EPS floor (bf16), fp16-subnormal scales."""
    g = torch.Generator().manual_seed(1)
    qw = Int4Tensor.from_float(torch.randn(64, 256, generator=g) * 0.02, group_size=32)
    x = torch.randn(4, 256, generator=g).to(xdtype)
    _assert_cpu_as_accurate(x, qw)  # ordinary fp32 scales: the 16-bit kernel takes them
    with torch.no_grad():
        qw.copy_(torch.randn(64, 256, generator=g) * small)
    _assert_cpu_as_accurate(x, qw)


@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16])
def test_cast_check_keeps_exact_subnormal_scales(xdtype):
    """An all-zero row's 2^-20 scale is an fp16 subnormal, but an exact one: the 16-bit
    kernel keeps running (the check is exactness or normal range, not either alone)."""
    w = torch.randn(32, 64) * 0.02
    w[3] = 0
    q8 = Int8Tensor.from_float(w)
    assert cpu.qparams_cast_ok(q8.scale.to(xdtype), q8.scale)
    q8.scale[5] = 1e-6  # an inexact fp16 subnormal (a normal bf16)
    assert cpu.qparams_cast_ok(q8.scale.to(xdtype), q8.scale) == (xdtype == torch.bfloat16)
    if LAYOUT is not None:
        q4 = Int4Tensor.from_float(w, group_size=32)
        sz = cpu._scales_and_zeros(q4.scale, q4.zero, torch.float32)
        assert cpu.qparams_cast_ok(sz.to(xdtype), sz)  # the zero row's zero is 2^-17: exact


# ---------------------------------------------------------------------------- column slices
@given(
    cls=st.sampled_from([Int8Tensor, Int8DynActTensor]),
    start=st.integers(0, 100),
    width=st.integers(1, 127),
    m=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 999),
)
@example(cls=Int8Tensor, start=32, width=64, m=3, dtype=torch.float32, seed=0)
@example(cls=Int8DynActTensor, start=32, width=64, m=3, dtype=torch.bfloat16, seed=0)
def test_linear_on_a_column_slice_matches_reference(cls, start, width, m, dtype, seed):
    """A K slice of an int8 weight keeps a strided view of qdata; aten's int8 kernel
    refused it ("expect B to be contiguous")."""
    end = min(start + width, 128)
    g = torch.Generator().manual_seed(seed)
    qw = cls.from_float(torch.randn(48, 128, generator=g) * 0.02)
    s = qw[:, start:end]
    x = torch.randn(m, end - start, generator=g).to(dtype)
    with lowbit.use_backend("reference"):
        want = F.linear(x, s)
    with lowbit.use_backend("cpu"):
        got = F.linear(x, s)
    if cls is Int8DynActTensor and not (dtype == torch.bfloat16 and (end - start) % 32 == 0):
        assert torch.equal(got, want)  # exact products, the reference's rescale
    else:
        tol = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
        assert float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)) < tol


# ---------------------------------------------------------------------------- W8A8 rescale
@given(
    m=st.integers(1, 4),
    k=st.integers(1, 140),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    w_exp=st.integers(-30, 37),
    x_exp=st.integers(-30, 30),
    seed=st.integers(0, 999),
)
@example(m=2, k=64, dtype=torch.float32, w_exp=36, x_exp=-4, seed=0)
@example(m=2, k=50, dtype=torch.float32, w_exp=36, x_exp=-4, seed=0)
@example(m=2, k=64, dtype=torch.bfloat16, w_exp=36, x_exp=-4, seed=0)
def test_w8a8_cpu_rescales_as_the_reference(m, k, dtype, w_exp, x_exp, seed):
    """The W8A8 CPU path accumulates the codes exactly (K <= 140) and rescales as the
    reference, ``acc * x_scale * w_scale`` in float64 and one cast: bit for bit, except
    bf16 with K % 32 == 0, whose product rounds to bf16 once in aten's kernel. In fp32,
    ``acc * w_scale`` overflowed to inf for weights of 1e36 with finite outputs."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.float16:
        x_exp = max(min(x_exp, 3), -3)
    w = torch.randn(16, k, generator=g) * 10.0**w_exp
    x = (torch.randn(m, k, generator=g) * 10.0**x_exp).to(dtype)
    qw = Int8DynActTensor.from_float(w)
    want = ref.int8_dynamic_linear(x, qw.qdata, qw.scale)
    with lowbit.use_backend("cpu"):
        got = F.linear(x, qw)
    assert torch.equal(got.isfinite(), want.isfinite())
    if dtype == torch.bfloat16 and k % 32 == 0:
        fin = want.isfinite()
        assert (
            float((got[fin].double() - want[fin].double()).norm() / want[fin].double().norm().clamp_min(1e-300)) < 1e-2
        )
    else:
        assert torch.equal(got, want)


@needs_layout
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_eager_int4_operand_is_the_fields_view_and_follows_writes(dtype):
    """A quantized layer's (scale, zero) are views of one [G, N, 2] buffer: in their dtype the
    kernel operand is that buffer itself (no copy), the same object on the next call; a later
    copy_ into the weight reaches it (outputs match the reference after the write); a field
    moved to other memory is not served the old operand; and the cache keeps no field alive."""
    import gc
    import weakref

    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(128, 32, bias=False).to(dtype)
    lowbit.quantize_(lin, lowbit.int4_weight_only(group_size=64), progress=False)
    w = lin.weight
    sz = cpu._scales_and_zeros(w.scale, w.zero, dtype)
    assert sz.shape == (2, 32, 2) and sz.data_ptr() == w.scale.data_ptr()
    assert torch.equal(sz[..., 0].t(), w.scale) and torch.equal(sz[..., 1].t(), w.zero)
    assert cpu._scales_and_zeros(w.scale, w.zero, dtype) is sz
    with torch.no_grad():
        w.copy_(torch.randn(32, 128, generator=g).to(dtype))
    assert torch.equal(sz[..., 0].t(), w.scale)  # the write went into the operand's storage
    x = torch.randn(3, 128, generator=g).to(dtype)
    with torch.no_grad():
        y = lin(x)
    want = ref.int4_linear(x.double(), ref.int4_pack(w.codes()), w.scale.double(), w.zero.double(), 64)
    assert torch.allclose(y.double(), want, atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=1e-2)
    scale, zero = cpu.interleave_scale_zero(w.scale * 2, w.zero)  # new memory, same layout
    w.scale.data, w.zero.data = scale, zero
    assert torch.equal(cpu._scales_and_zeros(w.scale, w.zero, dtype)[..., 0].t(), scale)
    alive = weakref.ref(w.scale)
    del lin, w, sz, scale, zero
    gc.collect()
    assert alive() is None
