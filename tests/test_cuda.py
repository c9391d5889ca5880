"""The CUDA product path end to end (skipped without a GPU): quantize_ on CUDA, device moves,
the auto backend (Triton) against the reference, torch.compile and CUDA-graph capture."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.ops import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CONFIGS = {
    "int4": lowbit.int4_weight_only(group_size=128),
    "int8": lowbit.int8_weight_only(),
    "w8a8": lowbit.int8_dynamic_activation_int8_weight(),
    "fp8": lowbit.float8_dynamic_activation_float8_weight(),
}


def model(dtype=torch.bfloat16):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 384)).to(dtype)
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.02)
    return m


def skip_fp8(name):
    if name == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("m_tokens", [1, 7, 17, 64, 300])
def test_auto_backend_matches_reference_on_cuda(name, m_tokens):
    skip_fp8(name)
    m = lowbit.quantize_(model().cuda(), CONFIGS[name])
    x = torch.randn(m_tokens, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fast = m(x)
        with lowbit.use_backend("reference"):
            want = m(x)
    err = float((fast.double() - want.double()).norm() / want.double().norm())
    assert err < 1.5e-2, err


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cpu_quantized_model_moves_to_cuda_and_back(name):
    skip_fp8(name)
    m = lowbit.quantize_(model(), CONFIGS[name])
    x = torch.randn(5, 512, dtype=torch.bfloat16)
    with torch.no_grad(), lowbit.use_backend("reference"):
        want = m(x)
        got = m.cuda()(x.cuda()).cpu()
        back = m.cpu()(x)
    assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(back, want)
    if name == "int4":
        assert m[0].weight.packing != "plain" or not lowbit.ops.cpu.int4_cpu_supported(1024, 512, 128)
        assert m.cuda()[0].weight.packing == "tiled"  # the default CUDA packing (whole 16 x 128 tiles)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compile_and_cuda_graph_capture(name):
    skip_fp8(name)
    torch._dynamo.reset()
    m = lowbit.quantize_(model().cuda(), CONFIGS[name])
    x = torch.randn(9, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True)(x)
        torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
        static_x = x.clone()
        m(static_x)  # warm up (autotune) outside capture
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            m(static_x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y = m(static_x)
        static_x.copy_(torch.randn_like(static_x))
        g.replay()
        torch.testing.assert_close(static_y, m(static_x), rtol=0, atol=0)


def test_int4_sqnr_on_cuda_matches_cpu_numerics():
    w = torch.randn(256, 512) * 0.02
    x = torch.randn(4, 512)
    qc = lowbit.Int4Tensor.from_float(w.cuda().bfloat16(), group_size=128)
    qh = lowbit.Int4Tensor.from_float(w.bfloat16(), group_size=128)
    # the same spec on both devices; fp32 rounding may flip a rare code at a rounding boundary
    codes_c = lowbit.ops.reference.int4_unpack(qc.repack("plain").qdata.cpu()).int()
    codes_h = lowbit.ops.reference.int4_unpack(qh.repack("plain").qdata).int()
    diff = (codes_c != codes_h).float().mean().item()
    sc, sh = qc.scale.float().cpu(), qh.scale.float()
    assert (codes_c - codes_h).abs().max() <= 1 and diff < 1e-3, (
        f"codes differ at {diff:.2e} of entries; scales differ at {(sc != sh).float().mean().item():.2e}"
    )
    with torch.no_grad():
        out = F.linear(x.cuda().bfloat16(), qc).float().cpu()
    assert ref.sqnr(F.linear(x, w), out) > 19


@pytest.mark.parametrize("m_tokens", [1, 17, 70, 300])
def test_int4_mma_packing_opt_in(monkeypatch, tmp_path, m_tokens):
    """LOWBIT_INT4_CUDA_PACKING=mma: CUDA int4 weights hold the mma byte order (word path
    for small M, reordered x on the byte path for mid M, dequantize for large M), they
    compute the reference function, compile, and round-trip through a checkpoint."""
    import lowbit.safetensors as lst

    monkeypatch.setenv("LOWBIT_INT4_CUDA_PACKING", "mma")
    m = lowbit.quantize_(model().cuda(), CONFIGS["int4"])
    assert m[0].weight.packing == "mma"
    x = torch.randn(m_tokens, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fast = m(x)
        with lowbit.use_backend("reference"):
            want = m(x)
        compiled = torch.compile(m, fullgraph=True)(x)
    err = float((fast.double() - want.double()).norm() / want.double().norm())
    assert err < 1.5e-2, err
    torch.testing.assert_close(compiled, fast, rtol=2e-2, atol=2e-2)
    lst.save_file(m.state_dict(), tmp_path / "m.safetensors")
    back = lst.load_file(tmp_path / "m.safetensors", device="cuda")
    assert back["0.weight"].packing == "mma" and torch.equal(back["0.weight"].codes(), m[0].weight.codes())


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_int4_qparam_words_path_under_compile(mode, monkeypatch):
    """CUDA int4 weights (G even) run the GEMM with scale / zero read as int32 words; compiled
    (Inductor, and cudagraph trees, which copy non-static inputs) it gives the eager output,
    and the 2-byte-load path (SZ_WORDS off) agrees with it."""
    import lowbit.ops.triton.int4 as int4_mod

    m = lowbit.quantize_(model().cuda(), CONFIGS["int4"])
    w = m[0].weight
    assert int4_mod.qparam_words(w.scale) is not None and int4_mod.qparam_words(w.zero) is not None
    calls = []
    real = int4_mod.qparam_words
    monkeypatch.setattr(int4_mod, "qparam_words", lambda t: calls.append(real(t)) or calls[-1])
    f = torch.compile(m, mode=mode, fullgraph=True)
    for tokens in (1, 9, 64):
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            eager = m(x)
            for _ in range(3):
                got = f(x)
            monkeypatch.setattr(int4_mod, "SZ_WORDS", False)
            apart = m(x)
            monkeypatch.setattr(int4_mod, "SZ_WORDS", True)
        torch.testing.assert_close(got, eager, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(apart, eager, rtol=2e-2, atol=2e-2)
    assert calls and all(c is not None for c in calls)


@st.composite
def _cuda_cases(draw):
    fmt = draw(st.sampled_from(list(CONFIGS)))
    gs = draw(st.sampled_from([32, 64, 128, 256]))
    k = gs * draw(st.integers(1, 6)) if fmt == "int4" else draw(st.integers(1, 700))
    n = draw(st.integers(1, 300))
    m = draw(st.sampled_from([1, 2, 3, 7, 8, 16, 17, 33, 64, 100, 128, 255, 256, 300, 1030]))
    lead = draw(st.sampled_from([(m,), (1, m), (2, (m + 1) // 2)]))
    wdtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
    xdtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
    bad = draw(st.sampled_from([None, None, None, float("nan"), float("inf")]))
    return (
        fmt,
        gs,
        k,
        n,
        lead,
        wdtype,
        xdtype,
        draw(st.booleans()),
        draw(st.booleans()),
        bad,
        draw(st.integers(0, 9999)),
    )


@settings(deadline=None)  # max_examples from the profile: 25 in CI's, 1000 with HYPOTHESIS_PROFILE=deep
@given(_cuda_cases())
def test_fuzz_linear_on_cuda_matches_reference(case):
    """Any format, shape (every kernel path: GEMV, split-K, wgmma tiles, TMA / cuBLAS,
    dequantize + matmul), weight and activation dtype, bias, strided or 3-D input, and a
    NaN or infinite token: the auto backend (Triton) on CUDA computes the reference's
    function on the same tensors."""
    from lowbit.qtensor import Float8Tensor, Int4Tensor, Int8DynActTensor, Int8Tensor

    fmt, gs, k, n, lead, wdtype, xdtype, use_bias, strided, bad, seed = case
    skip_fp8(fmt)
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.02).to("cuda", wdtype)
    if fmt == "int4":
        qw = Int4Tensor.from_float(w, group_size=gs)
    else:
        qw = {"int8": Int8Tensor, "w8a8": Int8DynActTensor, "fp8": Float8Tensor}[fmt].from_float(w)
    bias = torch.randn(n, generator=g).to("cuda", xdtype) if use_bias else None
    x = torch.randn(*lead, 2 * k if strided else k, generator=g).to("cuda", xdtype)
    x = x[..., ::2] if strided else x
    if bad is not None:
        x[(0,) * (x.dim() - 1) + (seed % k,)] = bad
    with torch.no_grad():
        out = F.linear(x, qw, bias)
        with lowbit.use_backend("reference"):
            want = F.linear(x, qw, bias)
    assert out.shape == want.shape == (*lead, n) and out.dtype == want.dtype == xdtype
    # weight-only formats follow F.linear's arithmetic on a bad token (inf or NaN may differ)
    assert torch.equal(out.isnan(), want.isnan()) or (bad is not None and fmt in ("int4", "int8"))
    fin = want.isfinite() & out.isfinite()
    if fin.any():
        o, r = out[fin].double(), want[fin].double()
        err = float((o - r).norm() / r.norm().clamp_min(1e-30))
        assert err < (2e-2 if xdtype != torch.float32 or fmt in ("w8a8", "fp8") else 1e-4), (err, case)
