"""FP8 W8A8 Triton kernel (and its activation quantizer) vs the reference."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.ops import reference as ref
from lowbit.ops.triton.fp8 import fp8_dyn_mm
from lowbit.ops.triton.quant import quantize_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-3}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9), reason="fp8 needs sm_89+"
)


def _rand(*shape, seed, dtype=torch.float32, std=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std).to(DEVICE, dtype)


def _check(m, n, k, dtype, seed):
    w = _rand(n, k, seed=seed, std=0.02)
    scale = ref.fp8_choose_qparams(w)
    qdata = ref.fp8_quantize(w, scale)
    x = _rand(m, k, seed=seed + 1, dtype=dtype)
    out = fp8_dyn_mm(x, qdata, scale)
    expect = ref.fp8_dynamic_linear(x, qdata, scale)
    assert out.shape == (m, n) and out.dtype == dtype
    err = float((out.double() - expect.double()).norm() / expect.double().norm())
    assert err < TOL[dtype], f"rel err {err:.2e} for M={m} N={n} K={k} {dtype}"


@settings(deadline=None, max_examples=10)
@given(
    m=st.integers(1, 17),
    n=st.sampled_from([5, 33, 123]),
    k=st.sampled_from([64, 101, 255, 512]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_fp8_dyn_mm_matches_reference(m, n, k, dtype, seed):
    _check(m, n, k, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("one_pass_max_k", [128, 32768])  # rows read twice / once
def test_quantize_rows_fp8_exact(dtype, one_pass_max_k, monkeypatch):
    import lowbit.ops.triton.quant as quant_mod

    monkeypatch.setattr(quant_mod, "ONE_PASS_MAX_K", one_pass_max_k)
    x = _rand(7, 301, seed=3, dtype=dtype) * 3
    x[2] = 0
    x[4, :5] = torch.tensor([1e-4, -3e-3, 0.5, 2.0**-9, -100.0])  # subnormal range after scaling
    xq, xs = quantize_rows(x, ref.FP8_DTYPE)
    rq, rs = ref.fp8_quantize_rows(x)
    assert torch.equal(xs, rs)
    assert torch.equal(xq.view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.skipif(DEVICE != "cuda", reason="large tiles are for the GPU")
@pytest.mark.parametrize("m", [31, 64, 200, 1000, 2055])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_large_m_cuda(m, dtype):
    _check(m, 4096 + 16, 2048, dtype, m)  # bf16: the _scaled_mm path from M=128
    _check(m, 4096 + 5, 2048 + 3, dtype, m)  # odd shapes: the Triton path


@pytest.mark.parametrize("m, n, k", [(256, 45, 80), (300, 70, 96), (261, 33, 50), (255, 40, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp8_persistent_tma_gemm(m, n, k, dtype, monkeypatch):
    """From TMA_MIN_M rows with K a multiple of 16 the persistent TMA GEMM runs (tiles
    zero-filled past M, N, K; more tiles than programs); other shapes the pointer GEMM.
    fp16/fp32 x keeps torch._scaled_mm out of the way."""
    import lowbit.ops.triton._w8 as w8_mod

    calls = []
    real = w8_mod._tma_mm
    monkeypatch.setattr(w8_mod, "_tma_mm", lambda *a: calls.append(1) or real(*a))
    _check(m, n, k, dtype, m)
    assert len(calls) == (m >= w8_mod.TMA_MIN_M and k % 16 == 0)


def test_fp8_empty():
    qdata = torch.ones(33, 64, device=DEVICE).to(ref.FP8_DTYPE)
    out = fp8_dyn_mm(torch.randn(0, 64, device=DEVICE), qdata, torch.ones(33, device=DEVICE))
    assert out.shape == (0, 33)


@pytest.mark.skipif(DEVICE != "cuda", reason="compile and CUDA graphs need a GPU")
@pytest.mark.parametrize("m, dtype", [(8, torch.bfloat16), (256, torch.bfloat16), (300, torch.float16)])
def test_fp8_compile_and_cuda_graph(m, dtype):  # M=256 bf16: torch._scaled_mm; M=300 fp16: the TMA GEMM
    w = _rand(256, 512, seed=0, std=0.02)
    scale = ref.fp8_choose_qparams(w)
    qdata = ref.fp8_quantize(w, scale)
    x = _rand(m, 512, seed=1, dtype=dtype)
    expect = fp8_dyn_mm(x, qdata, scale)
    fn = torch.compile(lambda x: fp8_dyn_mm(x, qdata, scale), fullgraph=True)
    torch.testing.assert_close(fn(x), expect)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_dyn_mm(x, qdata, scale)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, fp8_dyn_mm(x, qdata, scale))
