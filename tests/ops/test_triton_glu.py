"""The int4 gate / up tile with silu(gate) * up in its epilogue (``_int4_gemv.int4_mm_swiglu``)
against the reference (CPU: under TRITON_INTERPRET=1; CUDA: native)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_triton_int4 import DEVICE, _weight

from lowbit.ops import reference as ref
from lowbit.ops.triton._int4_gemv import GLU_SHAPES

# silu(gate) * up of two rounded outputs: bf16 roundings of both factors and of the product
TOL_GLU = {torch.bfloat16: 1e-2, torch.float16: 6e-3}


@settings(deadline=None, max_examples=5 if DEVICE == "cpu" else 40)
@given(
    m=st.integers(1, 8),
    nh=st.sampled_from([16, 21, 48]),
    kb=st.integers(1, 3),
    gs=st.sampled_from([32, 64, 128]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    tiled=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(m=1, nh=48, kb=2, gs=128, dtype=torch.bfloat16, tiled=True, seed=0)
def test_int4_mm_swiglu_matches_the_reference(m, nh, kb, gs, dtype, tiled, seed):
    """The gate / up GEMV with silu(gate) * up in its epilogue (``_int4_gemv._glu_kernel``: a CTA's
    warps on one row tile of each half) against ``reference.swiglu`` of the reference linear, at
    every M it serves, odd halves ("plain") and whole tiles ("tiled"); a swapped or misplaced half
    reads rel. err ~1."""
    from lowbit.ops.triton._int4_gemv import int4_mm_swiglu, swiglu_fits

    packing = "tiled" if tiled and nh % 16 == 0 else "plain"
    n, k = 2 * nh, kb * 128
    qdata, scale, zero, plain = _weight(n, k, gs, dtype, seed, packing)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    assert swiglu_fits(m, n, k, packing, dtype, scale.dtype, x.device)  # the fused tile, not the fallback
    got = int4_mm_swiglu(x, qdata, scale, zero, gs, packing)
    want = ref.swiglu(ref.int4_linear(x, plain, scale, zero, gs)).double()
    assert got.shape == (m, nh) and got.dtype == dtype
    err = float((got.double() - want).norm() / want.norm())
    assert err < TOL_GLU[dtype], f"rel err {err:.2e}"


@pytest.mark.parametrize(
    "w, split, unroll, packing",
    [(*c, p) for c in GLU_SHAPES for p in ("tiled", "plain")] if DEVICE == "cuda" else [(2, 2, 2, "tiled")],
)
def test_every_glu_config_matches_the_reference(w, split, unroll, packing):
    """Each config of the fused gate / up tile's space (on the interpreter one), "tiled" halves of
    whole tiles and "plain" halves of an odd row count, with a K whose blocks leave some warps and
    splits without work."""
    import triton

    from lowbit.ops.triton import _int4_gemv as gemv_mod
    from lowbit.ops.triton._utils import INTERPRET, m_bucket, split_k_buffers

    m, nh, gs, k = 3, 32 if packing == "tiled" else 21, 128, 5 * 128
    n = 2 * nh
    qdata, scale, zero, plain = _weight(n, k, gs, torch.bfloat16, 7, packing)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(8)).to(DEVICE, torch.bfloat16)
    want = ref.swiglu(ref.int4_linear(x, plain, scale, zero, gs)).double()
    y = torch.full((m, nh), float("nan"), device=DEVICE, dtype=x.dtype)
    ws, cnt = split_k_buffers(x.device, m, n, split)
    gemv_mod._glu_kernel.fn[(triton.cdiv(nh, 16), split)](
        x, qdata, scale, zero, y, ws, cnt, m, n, k, nh, m_bucket(m), x.stride(0), y.stride(0), qdata.stride(0),
        scale.stride(0), GS=gs, ASM=not INTERPRET, TILED=int(packing == "tiled"), SPLIT_K=split, W=w, UNROLL=unroll,
        ADJ=int(unroll == 2),
        num_warps=2 * w, num_stages=1,
    )  # fmt: skip
    err = float((y.double() - want).norm() / want.norm())
    assert err < TOL_GLU[torch.bfloat16], err


def test_int4_mm_swiglu_outside_the_tile_and_bad_weights():
    """Where the tile does not serve (M > 8, fp32 x) the launcher composes int4_mm and the
    reference product; an odd row count or mismatched qparams raise, naming what was expected."""
    from lowbit.ops.triton._int4_gemv import int4_mm_swiglu, swiglu_fits

    nh, k, gs = 8, 128, 64
    qdata, scale, zero, plain = _weight(2 * nh, k, gs, torch.float32, 3)
    for m, dtype in ((9, torch.float32), (2, torch.float32), (9, torch.bfloat16)):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
        assert not swiglu_fits(m, 2 * nh, k, "plain", dtype, scale.dtype, x.device)
        got = int4_mm_swiglu(x, qdata, scale, zero, gs)
        want = ref.swiglu(ref.int4_linear(x, plain, scale, zero, gs)).double()
        tol = 2e-3 if dtype == torch.float32 else TOL_GLU[dtype]
        assert got.shape == (m, nh) and float((got.double() - want).norm() / want.norm()) < tol
    x = torch.randn(1, k).to(DEVICE, torch.float32)
    with pytest.raises(ValueError, match="even number"):
        int4_mm_swiglu(x, qdata[:-1], scale[:-1], zero[:-1], gs)
    with pytest.raises(ValueError, match="do not match group_size"):
        int4_mm_swiglu(x, qdata, scale[:, :1], zero[:, :1], gs)
