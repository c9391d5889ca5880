"""Weights near the top of their dtype's range quantize to codes that decode to finite values.

Before, fp16 rows reaching ~65504 decoded their top int4 / int8 code past 65504 (inf: the scale is
rounded up), and int4 groups of fp32 / bf16 spanning most of the range raised (``hi - lo``
overflowed fp32). ``reference`` caps the scale and keeps the int4 zero inside the range there
(its module doc); every other weight gets the plain formulas' qparams, bit for bit."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
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


@settings(deadline=None, max_examples=40)
@given(
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    log_mag=st.integers(-30, 30),
    gs=st.sampled_from(ref.INT4_GROUP_SIZES),
)
def test_qparams_elsewhere_are_the_plain_formulas_bit_for_bit(dtype, seed, log_mag, gs):
    """Away from the top of the range the cap and the clamp are inactive: int4 (scale, zero) and
    the int8 scale equal the unmodified formulas', computed here from their definitions."""
    mag = 2.0 ** (log_mag if dtype != torch.float16 else max(-8, min(log_mag, 8)))
    w = (torch.randn(8, 256, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * mag).to(dtype)
    wg = w.float().reshape(8, 256 // gs, gs)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ref._round_up(ref._div(hi - lo, 15.0).clamp_min(ref.SCALE_EPS), dtype)
    zero = (lo + 8.0 * scale.float()).to(dtype)
    got_s, got_z = ref.int4_choose_qparams(w, gs, dtype)
    assert torch.equal(got_s, scale) and torch.equal(got_z, zero)
    s8 = ref._round_up(ref._div(w.float().abs().amax(-1), 127.0).clamp_min(ref.SCALE_EPS), dtype)
    assert torch.equal(ref.int8_choose_qparams(w, dtype, fit=dtype), s8)
