"""The int4 GEMV with the residual add and RMSNorm in its epilogue (``_int4_gemv.int4_mm_add_rmsnorm``)
against the reference (CPU: under TRITON_INTERPRET=1; CUDA: native)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_triton_int4 import DEVICE, TOL, _weight

from lowbit.ops import reference as ref
from lowbit.ops.triton._int4_gemv import GEMV_CONFIGS, NORM_MAX_M


def _operands(m, n, k, gs, dtype, seed, packing):
    qdata, scale, zero, plain = _weight(n, k, gs, dtype, seed, packing)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    residual = torch.randn(m, n, generator=g).to(DEVICE, dtype)
    norm_w = (torch.rand(n, generator=g) + 0.5).to(DEVICE, dtype)
    return qdata, scale, zero, plain, x, residual, norm_w


def _norm_of(h, norm_w, eps):
    """The RMSNorm stage alone, in float64 from h's values: what the normalised output must be
    within a rounding or two (the mean's order, the rounding before the weight's product)."""
    hd = h.double()
    return norm_w.double() * hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps)


def _assert_pair(h, y, x, plain, scale, zero, gs, residual, norm_w, eps, dtype):
    want_h, _ = ref.add_rmsnorm(ref.int4_linear(x, plain, scale, zero, gs), residual, norm_w, eps)
    assert h.shape == y.shape == want_h.shape and h.dtype == y.dtype == dtype
    # h: the linear's output (summed in another order: TOL) plus the residual
    err = float((h.double() - want_h.double()).norm() / want_h.double().norm())
    assert err < TOL[dtype], f"h: rel err {err:.2e}"
    # the norm of this h, element by element: 2 roundings of the dtype (a wrong mean, weight or
    # row reads ~1e-1 and more)
    exact = _norm_of(h, norm_w, eps)
    ulp = torch.finfo(dtype).eps * exact.abs()
    bad = ~((y.double() - exact).abs() <= 1.01 * ulp + 1e-6)  # (NaN: bad)
    assert not bool(bad.any()), f"normed: {int(bad.sum())} of {bad.numel()} values off by more than an ulp"


@settings(deadline=None, max_examples=5 if DEVICE == "cpu" else 40)
@given(
    m=st.integers(1, NORM_MAX_M),
    n=st.sampled_from([16, 37, 300]),
    kb=st.integers(1, 3),
    gs=st.sampled_from([32, 64, 128]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    tiled=st.booleans(),
    eps=st.sampled_from([1e-6, 1e-5, 0.5]),
    seed=st.integers(0, 2**16),
)
@example(m=1, n=300, kb=2, gs=128, dtype=torch.bfloat16, tiled=False, eps=1e-5, seed=0)
def test_int4_mm_add_rmsnorm_matches_the_reference(m, n, kb, gs, dtype, tiled, eps, seed):
    """(h, normed) = (residual + x @ W.T, rmsnorm(h) * weight) from one launch at every M it serves
    (the kernel itself takes up to 8: the next test runs 3),
    odd N ("plain") and whole tiles ("tiled"): h against the reference linear plus the residual,
    normed against float64 RMSNorm of the h it returned."""
    from lowbit.ops.triton._int4_gemv import add_rmsnorm_fits, int4_mm_add_rmsnorm

    packing = "tiled" if tiled and n % 16 == 0 else "plain"
    k = kb * 128
    qdata, scale, zero, plain, x, residual, norm_w = _operands(m, n, k, gs, dtype, seed, packing)
    assert add_rmsnorm_fits(m, n, k, packing, dtype, scale.dtype, x.device)  # the fused tile, not the fallback
    h, y = int4_mm_add_rmsnorm(x, qdata, scale, zero, gs, residual, norm_w, eps, packing)
    _assert_pair(h, y, x, plain, scale, zero, gs, residual, norm_w, eps, dtype)


@pytest.mark.parametrize("w, split, unroll", GEMV_CONFIGS if DEVICE == "cuda" else [(1, 2, 2)])
def test_every_norm_config_matches_the_reference_twice(w, split, unroll):
    """Each config of the space (on the interpreter one): on a GPU the longest row the config's
    last CTA holds (64 values per thread) less a few (masked), a K whose blocks leave some warps
    and splits without work, and a second launch on the same counters (the last CTA puts its count
    back to zero: a count left over would make no CTA, or the wrong one, normalise). The NaN-filled
    outputs show any value not written."""
    import triton

    from lowbit.ops.triton import _int4_gemv as gemv_mod
    from lowbit.ops.triton._utils import INTERPRET, m_bucket, split_k_buffers, tile_counters

    m, n, gs, k, eps = 3, 64 * 32 * w - 37 if DEVICE == "cuda" else 300, 128, 5 * 128, 1e-5
    for seed in (3, 4):
        qdata, scale, zero, plain, x, residual, norm_w = _operands(m, n, k, gs, torch.bfloat16, seed, "plain")
        h, y = (torch.full((m, n), float("nan"), device=DEVICE, dtype=x.dtype) for _ in range(2))
        ws = split_k_buffers(x.device, m, n, max(split, 2))[0]
        cnt = tile_counters(x.device, triton.cdiv(n, 16) + 1)
        gemv_mod._norm_kernel.fn[(triton.cdiv(n, 16), split)](
            x, qdata, scale, zero, h, ws, cnt, residual, norm_w, y, m, n, k, m_bucket(m), x.stride(0), h.stride(0),
            qdata.stride(0), scale.stride(0), residual.stride(0), y.stride(0), eps, GS=gs, ASM=not INTERPRET, TILED=0,
            NP=triton.next_power_of_2(n), SPLIT_K=split, W=w, UNROLL=unroll, ADJ=int(unroll == 2), num_warps=w,
            num_stages=1,
        )  # fmt: skip
        _assert_pair(h, y, x, plain, scale, zero, 128, residual, norm_w, eps, torch.bfloat16)
        assert int(cnt[: triton.cdiv(n, 16) + 1].abs().sum()) == 0  # every counter back at zero


@pytest.mark.parametrize("m", [NORM_MAX_M + 1, 11])
def test_more_tokens_than_the_tile_serves_compose_the_gemm_and_the_reference(m):
    """M > NORM_MAX_M (and the tile's other refusals) run ``int4_mm`` and ``reference.add_rmsnorm``:
    the same numbers as composing them by hand, bitwise."""
    from lowbit.ops.triton._int4_gemv import add_rmsnorm_fits, int4_mm_add_rmsnorm
    from lowbit.ops.triton.int4 import int4_mm

    qdata, scale, zero, _, x, residual, norm_w = _operands(m, 40, 256, 64, torch.bfloat16, 5, "plain")
    assert not add_rmsnorm_fits(m, 40, 256, "plain", x.dtype, scale.dtype, x.device)
    h, y = int4_mm_add_rmsnorm(x, qdata, scale, zero, 64, residual, norm_w, 1e-5)
    want_h, want_y = ref.add_rmsnorm(int4_mm(x, qdata, scale, zero, 64), residual, norm_w, 1e-5)
    assert torch.equal(h, want_h) and torch.equal(y, want_y)


def test_bad_operands_are_refused_with_their_shapes_and_dtypes():
    from lowbit.ops.triton._int4_gemv import int4_mm_add_rmsnorm

    qdata, scale, zero, _, x, residual, norm_w = _operands(2, 32, 256, 64, torch.bfloat16, 6, "plain")
    with pytest.raises(ValueError, match=r"residual \(2, 31\).*want residual \(2, 32\)"):
        int4_mm_add_rmsnorm(x, qdata, scale, zero, 64, residual[:, :31], norm_w, 1e-5)
    with pytest.raises(ValueError, match=r"norm_weight \(33,\)"):
        int4_mm_add_rmsnorm(x, qdata, scale, zero, 64, residual, torch.ones(33, dtype=x.dtype, device=DEVICE), 1e-5)
    with pytest.raises(TypeError, match="norm_weight torch.float32 must be x's dtype torch.bfloat16"):
        int4_mm_add_rmsnorm(x, qdata, scale, zero, 64, residual, norm_w.float(), 1e-5)
    with pytest.raises(ValueError, match="2-D"):
        int4_mm_add_rmsnorm(x[0], qdata, scale, zero, 64, residual, norm_w, 1e-5)
