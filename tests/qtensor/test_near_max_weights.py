"""Weights near the top of their dtype's range quantize to codes that decode to finite values.

Before, fp16 rows reaching ~65504 decoded their top int4 / int8 code past 65504 (inf: the scale is
rounded up), and int4 groups of fp32 / bf16 spanning most of the range raised (``hi - lo``
overflowed fp32). ``reference`` caps the scale and keeps the int4 zero inside the range there
(its module doc); every other weight gets the plain formulas' qparams, bit for bit."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lowbit.ops import reference as ref
from lowbit.qtensor import Float8Tensor, Int4Tensor, Int8DynActTensor, Int8Tensor

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MAKERS = {
    "int4": lambda w: Int4Tensor.from_float(w, group_size=32),  # the CPU kernel's layout
    "int4-plain": lambda w: Int4Tensor.from_float(w, group_size=32, packing="plain"),
    "int8": Int8Tensor.from_float,
    "w8a8": Int8DynActTensor.from_float,
    "fp8": Float8Tensor.from_float,
}


def _near_max(dtype, seed, frac, signs):
    """[16, 64] N(0, 1) weights whose rows 0-3 hold values at ``frac`` of the dtype's max:
    row 0 both signs in one group, row 1 one sign, row 2 one value, row 3 a whole group."""
    top = torch.finfo(dtype).max * frac
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w[0, 0], w[0, 5] = top, -top * signs
    w[1, :3] = top
    w[2, 40] = -top
    w[3, 32:] = torch.linspace(-top, top, 32, dtype=torch.float64)
    return w.to(dtype)


def _step(q, w):
    """Each weight's quantization step (its group's or row's scale), as fp64 [N, K]."""
    if isinstance(q, Int4Tensor):
        s = q.repack("plain").scale.double()  # (the CPU layout keeps [G, N, 2])
        return s.repeat_interleave(q.group_size, dim=1)
    return q.scale.double()[:, None].expand_as(w)


@settings(deadline=None, max_examples=40)
@given(
    fmt=st.sampled_from(sorted(MAKERS)),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    frac=st.sampled_from([1.0, 0.999, 0.9, 0.55, 0.5]),
    signs=st.sampled_from([1.0, -1.0, 0.5]),
)
def test_weights_near_the_top_of_the_range_decode_finite_within_a_step(fmt, dtype, seed, frac, signs):
    w = _near_max(dtype, seed, frac, signs)
    q = MAKERS[fmt](w)
    got = q.dequantize()
    assert got.dtype == dtype and bool(torch.isfinite(got).all()), f"{fmt} {dtype}: non-finite decoded weights"
    err = (got.double() - w.double()).abs()
    slack = 4 * torch.finfo(dtype).eps * torch.maximum(w.double().abs(), got.double().abs())
    if fmt == "fp8":  # e4m3: half an ulp of 3 mantissa bits, and its smallest subnormal step
        bound = w.double().abs() / 16 + q.scale.double()[:, None] * 2.0**-9 + slack
    else:  # a value the capped range does not reach clamps to an end code: one step at most
        bound = _step(q, w) + slack
    assert bool((err <= bound).all()), f"{fmt} {dtype}: error {(err - bound).max().item():.3g} past the bound"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", sorted(MAKERS))
def test_the_linear_of_a_near_max_weight_gives_its_decoded_rows(fmt, dtype):
    """The kernels read the stored qparams: one-hot inputs pick columns of the decoded weight,
    finite, on the CPU path each format runs. (W8A8 / fp8 also quantize x, whose scale's rounding
    moves the output ~1e-7 relative: at 0.9 of the max it stays inside the range.)"""
    w = _near_max(dtype, 0, 1.0 if fmt.startswith("int4") or fmt == "int8" else 0.9, 1.0)
    q = MAKERS[fmt](w)
    want = q.dequantize()
    cols = [0, 5, 40, 63]
    x = torch.zeros(len(cols), 64, dtype=dtype)
    x[range(len(cols)), cols] = 1
    y = F.linear(x, q)
    assert bool(torch.isfinite(y[:, :4]).all())
    if fmt in ("int4", "int4-plain", "int8"):  # weight-only: x is exact, one product per output
        torch.testing.assert_close(y.T.double(), want[:, cols].double(), rtol=2 * torch.finfo(dtype).eps, atol=0)


def _finite_both_ways(codes, scale, zero, dtype):
    """[groups] bool: every ``c * scale + zero`` finite in ``dtype``, from fp32 steps and from float64."""
    c = torch.tensor(codes, dtype=torch.float64)
    z = zero.double()[..., None] if zero is not None else 0.0
    fp32 = c.float() * scale.float()[..., None] + (zero.float()[..., None] if zero is not None else 0.0)
    exact = c * scale.double()[..., None] + z
    return torch.isfinite(fp32.to(dtype)).all(-1) & torch.isfinite(exact.to(dtype)).all(-1)


@settings(deadline=None, max_examples=60)
@given(
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    log_mag=st.integers(-30, 30),
    top_frac=st.sampled_from([None, 1.0, 0.9999, 0.999, 0.99, 0.9]),
    gs=st.sampled_from(ref.INT4_GROUP_SIZES),
)
def test_qparams_are_the_plain_formulas_wherever_those_decode_finite(dtype, seed, log_mag, top_frac, gs):
    """The cap and the clamp act only where the plain formulas decode some code past the dtype's
    range (computed here from their definitions; a group whose range overflows fp32 has an inf
    scale): every other group's int4 (scale, zero) and every other row's int8 / fp8 scale are the
    plain formulas', bit for bit. ``top_frac``: rows 0-2 reach that fraction of the dtype's max."""
    mag = 2.0 ** (log_mag if dtype != torch.float16 else max(-8, min(log_mag, 8)))
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * mag
    if top_frac is not None:
        top = torch.finfo(dtype).max * top_frac
        w[0, 0], w[1, :3], w[2, 5], w[2, 9] = top, -top, top, -top
    w = w.to(dtype)
    wg = w.float().reshape(8, 256 // gs, gs)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ref._round_up(ref._div(hi - lo, 15.0).clamp_min(ref.SCALE_EPS), dtype)
    zero = (lo + 8.0 * scale.float()).to(dtype)
    fine = _finite_both_ways([-8.0, 7.0], scale, zero, dtype) & torch.isfinite(scale)
    got_s, got_z = ref.int4_choose_qparams(w, gs, dtype)
    assert torch.equal(got_s[fine], scale[fine]) and torch.equal(got_z[fine], zero[fine])
    amax = w.float().abs().amax(-1)
    for qd in (dtype, torch.float32):  # Int8Tensor's scale dtype, Int8DynActTensor's
        s8 = ref._round_up(ref._div(amax, 127.0).clamp_min(ref.SCALE_EPS), qd)
        fine8 = _finite_both_ways([127.0], s8, None, dtype)
        assert torch.equal(ref.int8_choose_qparams(w, qd, fit=dtype)[fine8], s8[fine8])
    s_fp8 = ref._div(amax, ref.FP8_MAX).clamp_min(ref.SCALE_EPS)
    fine_fp8 = _finite_both_ways([ref.FP8_MAX], s_fp8, None, dtype)
    assert torch.equal(ref.fp8_choose_qparams(w, fit=dtype)[fine_fp8], s_fp8[fine_fp8])
    if top_frac is not None:  # (the near-max rows themselves: finite whatever the plain formulas did)
        assert bool(_finite_both_ways([-8.0, 7.0], got_s, got_z, dtype).all())


@settings(deadline=None, max_examples=60)
@given(
    dtype=st.sampled_from(DTYPES),
    lo_frac=st.floats(-1.0, 1.0),
    hi_frac=st.sampled_from([1.0, 0.99999, 0.999, -1.0]),
    fmt=st.sampled_from(["int4", "int4-plain"]),
)
@example(dtype=torch.float32, lo_frac=-6.854088932807699e37 / torch.finfo(torch.float32).max, hi_frac=1.0, fmt="int4")
def test_int4_end_codes_stay_finite_through_a_fused_multiply_add(dtype, lo_frac, hi_frac, fmt):
    """A group from ``lo_frac`` to ``hi_frac`` of the max: the CPU kernel decodes ``(q - 8) s + z``
    with one rounding, which took an end code past fp32's max where the reference's two roundings
    stayed below it (the review's w[0, 1] = max, w[0, 0] = -6.85e37: inf, and NaN from 0 * inf);
    an identity input gives every decoded value, finite."""
    top = torch.finfo(dtype).max
    w = torch.zeros(16, 32, dtype=torch.float64)
    w[0, 0], w[0, 1] = lo_frac * top, hi_frac * top
    w = w.to(dtype)
    q = MAKERS[fmt](w)
    y = F.linear(torch.eye(32, dtype=dtype), q)  # y[k, n] = decoded w[n, k]
    assert bool(torch.isfinite(y).all()), y[:2, 0]
    torch.testing.assert_close(y.T, q.dequantize(), rtol=2 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
def test_an_fp32_weight_near_a_16_bit_max_under_16_bit_inputs(xdtype):
    """The CPU kernels take the qparams cast to x's dtype; the cast's rounding (the review's fp32 group
    from -60928 to 65502 in fp16: scale 8428.7 -> 8432) took an end code to inf where the stored
    qparams decode finite. Such casts run the fp32 kernel now (``cpu.qparams_cast_ok``)."""
    top = torch.finfo(xdtype).max
    w = torch.tensor([-0.93 * top, top * 0.99997]).repeat(16, 16)  # fp32 [16, 32]
    for q in (Int4Tensor.from_float(w, group_size=32), Int8Tensor.from_float(w)):
        y = F.linear(torch.eye(32, dtype=xdtype), q)
        want = q.dequantize(xdtype)
        assert bool(torch.isfinite(want).all()) and bool(torch.isfinite(y).all()), type(q).__name__
        torch.testing.assert_close(y.T, want, rtol=2 * torch.finfo(xdtype).eps, atol=0)
