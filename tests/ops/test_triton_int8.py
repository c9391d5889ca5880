"""int8 Triton kernels (W8A16, W8A8 + the activation quantizer) vs the reference."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.ops import reference as ref
from lowbit.ops.triton.int8 import int8_dyn_mm, int8_mm
from lowbit.ops.triton.quant import quantize_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-3}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _rand(*shape, seed, dtype=torch.float32, std=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std).to(DEVICE, dtype)


def _rel(out, expect):
    return float((out.double() - expect.double()).norm() / expect.double().norm())


def _check_wo(m, n, k, dtype, seed):
    w = _rand(n, k, seed=seed, std=0.02)
    scale = ref.int8_choose_qparams(w, dtype)
    qdata = ref.int8_quantize(w, scale)
    x = _rand(m, k, seed=seed + 1, dtype=dtype)
    out = int8_mm(x, qdata, scale)
    assert out.shape == (m, n) and out.dtype == dtype
    assert _rel(out, ref.int8_weight_only_linear(x, qdata, scale)) < TOL[dtype]


def _check_dyn(m, n, k, dtype, seed):
    w = _rand(n, k, seed=seed, std=0.02)
    scale = ref.int8_choose_qparams(w, torch.float32)
    qdata = ref.int8_quantize(w, scale)
    x = _rand(m, k, seed=seed + 1, dtype=dtype)
    out = int8_dyn_mm(x, qdata, scale)
    assert out.shape == (m, n) and out.dtype == dtype
    assert _rel(out, ref.int8_dynamic_linear(x, qdata, scale)) < TOL[dtype]


common = dict(
    m=st.integers(1, 17),
    n=st.sampled_from([5, 33, 123]),
    k=st.sampled_from([64, 101, 255, 512]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)


@settings(deadline=None, max_examples=8)
@given(**common)
def test_int8_mm_matches_reference(m, n, k, dtype, seed):
    _check_wo(m, n, k, dtype, seed)


@settings(deadline=None, max_examples=8)
@given(**common)
def test_int8_dyn_mm_matches_reference(m, n, k, dtype, seed):
    _check_dyn(m, n, k, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("one_pass_max_k", [128, 32768])  # rows read twice / once
def test_quantize_rows_int8_exact(dtype, one_pass_max_k, monkeypatch):
    import lowbit.ops.triton.quant as quant_mod

    monkeypatch.setattr(quant_mod, "ONE_PASS_MAX_K", one_pass_max_k)
    x = _rand(7, 301, seed=3, dtype=dtype) * 3
    x[2] = 0  # an all-zero row: scale floors at SCALE_EPS, codes are zero
    xq, xs = quantize_rows(x, torch.int8)
    rq, rs = ref.int8_quantize_rows(x)
    assert torch.equal(xs, rs)
    assert torch.equal(xq, rq)


@settings(deadline=None, max_examples=12)
@given(
    k=st.integers(1, 1100),
    one_pass_max_k=st.sampled_from([128, 512, 32768]),
    qdtype=st.sampled_from(["int8", "fp8"]),
    dtype=st.sampled_from(DTYPES),
    bad=st.sampled_from([None, float("nan"), float("inf"), -float("inf")]),
    seed=st.integers(0, 2**16),
)
def test_quantize_rows_one_and_two_pass_exact_any_k(k, one_pass_max_k, qdtype, dtype, bad, seed):
    """Rows kept in registers (one read) or read twice, every K (block edges included):
    scales and codes bit-identical to the reference, also for a row holding a NaN or an
    infinity (NaN scale, zero codes)."""
    import lowbit.ops.triton.quant as quant_mod

    saved = quant_mod.ONE_PASS_MAX_K
    quant_mod.ONE_PASS_MAX_K = one_pass_max_k
    try:
        x = _rand(3, k, seed=seed, dtype=dtype) * 5
        if bad is not None:
            x[1, seed % k] = bad
        if qdtype == "int8":
            (xq, xs), (rq, rs) = quantize_rows(x, torch.int8), ref.int8_quantize_rows(x)
        else:
            (xq, xs), (rq, rs) = quantize_rows(x, ref.FP8_DTYPE), ref.fp8_quantize_rows(x)
            xq, rq = xq.view(torch.uint8), rq.view(torch.uint8)
    finally:
        quant_mod.ONE_PASS_MAX_K = saved
    assert torch.equal(xs.isnan(), rs.isnan()) and (bad is None) != bool(xs[1].isnan())
    assert torch.equal(xs.nan_to_num(), rs.nan_to_num())
    assert torch.equal(xq, rq)


@pytest.mark.skipif(DEVICE != "cuda", reason="large tiles are for the GPU")
@pytest.mark.parametrize("m", [31, 64, 200, 256, 257, 1000])
def test_int8_large_m_cuda(m):
    _check_wo(m, 4096 + 5, 2048 + 3, torch.bfloat16, m)
    _check_dyn(m, 4096 + 5, 2048 + 3, torch.bfloat16, m)


def test_int8_mm_dequant_path():  # M >= DEQUANT_MIN_M: dequantize kernel + plain matmul
    _check_wo(260, 37, 301, torch.float16, 7)


def test_int8_mm_dequant_path_in_row_chunks(monkeypatch):
    # 37 rows in chunks of 16: two full chunks and a ragged one, each into its columns of y
    import lowbit.ops.triton._w8 as w8_mod

    monkeypatch.setattr(w8_mod, "DEQUANT_ROWS", 16)
    _check_wo(260, 37, 256, torch.bfloat16, 8)


def test_int8_empty():
    qdata = torch.ones(33, 64, dtype=torch.int8, device=DEVICE)
    scale = torch.ones(33, device=DEVICE)
    x = torch.randn(0, 64, device=DEVICE)
    assert int8_mm(x, qdata, scale).shape == (0, 33)
    assert int8_dyn_mm(x, qdata, scale).shape == (0, 33)


@pytest.mark.skipif(DEVICE != "cuda", reason="compile and CUDA graphs need a GPU")
@pytest.mark.parametrize("op", [int8_mm, int8_dyn_mm])
def test_int8_compile_and_cuda_graph(op):
    w = _rand(256, 512, seed=0, std=0.02)
    scale = ref.int8_choose_qparams(w, torch.float32 if op is int8_dyn_mm else torch.bfloat16)
    qdata = ref.int8_quantize(w, scale)
    x = _rand(8, 512, seed=1, dtype=torch.bfloat16)
    expect = op(x, qdata, scale)
    fn = torch.compile(lambda x: op(x, qdata, scale), fullgraph=True)
    torch.testing.assert_close(fn(x), expect)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(x, qdata, scale)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, op(x, qdata, scale))


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("scheme", ["wo", "dyn", "fp8"])
def test_w8_gemm_split_k_reduces_in_kernel(split, scheme, monkeypatch):
    """Each split stores raw partial sums (int32 bits for W8A8, so the sum stays exact);
    the last split of a tile adds them in a fixed order, scales and stores y: bitwise the
    same on every call, and the shared per-stream tile counters are back at zero."""
    import lowbit.ops.triton._w8 as w8_mod
    from lowbit.ops.triton import _utils
    from lowbit.ops.triton.fp8 import fp8_dyn_mm

    if w8_mod.AUTOTUNE:
        pytest.skip("the split is chosen by the autotuner here")
    monkeypatch.setattr(w8_mod, "_split_k", lambda *a: split)
    w = _rand(37, 1024, seed=split, std=0.02)
    x = _rand(40, 1024, seed=split + 1, dtype=torch.bfloat16)
    if scheme == "fp8":
        scale = ref.fp8_choose_qparams(w)
        qdata = ref.fp8_quantize(w, scale)
        op, want = fp8_dyn_mm, ref.fp8_dynamic_linear(x, qdata, scale)
    else:
        scale = ref.int8_choose_qparams(w, torch.float32 if scheme == "dyn" else torch.bfloat16)
        qdata = ref.int8_quantize(w, scale)
        op = int8_dyn_mm if scheme == "dyn" else int8_mm
        want = (ref.int8_dynamic_linear if scheme == "dyn" else ref.int8_weight_only_linear)(x, qdata, scale)
    runs = [op(x, qdata, scale) for _ in range(3)]
    for out in runs:
        assert _rel(out, want) < TOL[torch.bfloat16]
        assert torch.equal(out, runs[0]), "split-K reduction is not deterministic"
    assert int(_utils.tile_counters(x.device, 1).count_nonzero()) == 0, "a tile counter was left non-zero"


@settings(deadline=None, max_examples=60)
@given(
    m=st.integers(1, 5000),
    k=st.integers(16, 20000),
    n=st.sampled_from([1, 37, 4096, 14336, 128256]),
    a_scaled=st.booleans(),
    swap=st.sampled_from(["off", "tuned", "on"]),
)
def test_w8_gemm_autotune_space_respects_the_kernel_contract(m, k, n, a_scaled, swap):
    """Every config the GPU autotuner may try fits the launcher's workspace (sized from the
    largest split kept, at most MAX_WORKSPACE), gives each split two K tiles, splits only
    for M <= 128, and carries no pre_hook (Triton's autotune disk cache skips those).
    Swapped tiles only for W8A16 as ``GEMM_SWAP`` allows (never "off", from M bucket 64,
    alone when "on"), with BLOCK_M no larger than the bucket."""
    import lowbit.ops.triton._w8 as w8_mod
    from lowbit.ops.triton._utils import m_bucket

    mb = m_bucket(m)
    mode = w8_mod._SWAP_MODES[swap]
    kept = w8_mod._prune(w8_mod._gemm_configs(), dict(m_bucket=mb, K=k, N=n, A_SCALED=a_scaled, SWAP_MODE=mode))
    assert kept
    swapped = [c.kwargs["SWAP"] for c in kept]
    if swap == "off" or a_scaled or mb < 64:
        assert not any(swapped), (swap, a_scaled, mb)
    elif swap == "on":
        assert all(swapped), mb
    else:
        assert any(swapped) and not all(swapped), mb
    for c in kept:
        split = c.kwargs["SPLIT_K"]
        assert c.pre_hook is None
        if c.kwargs["SWAP"]:
            assert c.kwargs["BLOCK_M"] <= mb, (c.kwargs, mb)
        if split > 1:
            assert mb <= 128 and k // (split * c.kwargs["BLOCK_K"]) >= 2, (c.kwargs, mb, k)
            assert split * m * n * 4 <= w8_mod.MAX_WORKSPACE, (c.kwargs, m, n)


@settings(deadline=None, max_examples=12)
@given(**{**common, "m": st.integers(1, 80)}, split=st.sampled_from([1, 2, 3]), scheme=st.sampled_from(["wo", "dyn"]))
def test_w8_swapped_gemm_matches_reference(m, n, k, dtype, seed, split, scheme):
    """GEMM_SWAP="on": W8A16 runs y.T = w @ x.T tiles (the converted weight as the MMA's A
    operand) on odd shapes and K tails, with and without split-K; W8A8 is unaffected."""
    import lowbit.ops.triton._w8 as w8_mod

    saved = w8_mod.GEMM_SWAP, w8_mod._split_k
    w8_mod.GEMM_SWAP = "on"
    if not w8_mod.AUTOTUNE:
        w8_mod._split_k = lambda *a: split
    try:
        (_check_wo if scheme == "wo" else _check_dyn)(m, n, k, dtype, seed)
    finally:
        w8_mod.GEMM_SWAP, w8_mod._split_k = saved


@pytest.mark.parametrize("mb", [64, 128, 256])
def test_every_swapped_w8a16_gpu_config_matches_reference(mb):
    """Each swapped tile of the GPU search space, launched as it is (big tiles, masks on
    N, M and a K tail, its split), against the reference: real wgmma code on the GPU,
    the same program logic on the interpreter."""
    import triton

    import lowbit.ops.triton._w8 as w8_mod
    from lowbit.ops.triton._utils import INTERPRET, split_k_buffers

    n, k, m = 133, 520, mb - 27
    w = _rand(n, k, seed=mb, std=0.02)
    scale = ref.int8_choose_qparams(w, torch.bfloat16)
    qdata = ref.int8_quantize(w, scale)
    x = _rand(m, k, seed=mb + 1, dtype=torch.bfloat16)
    want = ref.int8_weight_only_linear(x, qdata, scale)
    space = w8_mod._prune(w8_mod._gemm_configs(), dict(m_bucket=mb, K=k, N=n, A_SCALED=False, SWAP_MODE=2))
    assert space and all(c.kwargs["SWAP"] for c in space)
    for c in space:
        meta = c.kwargs
        y = torch.empty(m, n, device=DEVICE, dtype=torch.bfloat16)
        part, cnt = split_k_buffers(x.device, m, n, meta["SPLIT_K"])
        grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
        w8_mod._gemm_kernel.fn[grid](
            x, qdata, scale, scale, y, part, cnt, m, n, k, mb, x.stride(0), y.stride(0), 2,
            A_SCALED=False, INT_ACC=False, FP8=False, DOT_F32=INTERPRET, **meta,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )  # fmt: skip
        assert _rel(y, want) < TOL[torch.bfloat16], (meta, c.num_warps)


@pytest.mark.parametrize("m, n, k", [(256, 45, 80), (300, 70, 96), (261, 33, 50)])
def test_int8_persistent_tma_gemm(m, n, k, monkeypatch):
    """W8A8 int8 through the persistent TMA GEMM (int32 accumulation; not the shipped
    route; bench/w8_large_m.py times it); K not a multiple of 16 falls back to the pointer GEMM."""
    import lowbit.ops.triton._w8 as w8_mod

    monkeypatch.setattr(w8_mod, "TMA_DTYPES", (torch.int8,))
    calls = []
    real = w8_mod._tma_mm
    monkeypatch.setattr(w8_mod, "_tma_mm", lambda *a: calls.append(1) or real(*a))
    for dtype in (torch.bfloat16, torch.float16):
        _check_dyn(m, n, k, dtype, m)
    assert len(calls) == 2 * (k % 16 == 0)


@pytest.mark.skipif(DEVICE != "cuda", reason="inline PTX runs on the GPU only")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k", [(37, 301), (4096 + 5, 1024 + 8)])
def test_w8a16_gemv_alu_int8_conversion_is_exact(n, k, dtype, monkeypatch):
    """The GEMV's int8 -> fp32 by byte permute and subtract gives the same bits as the
    hardware conversion, for every code -127..127 (and -128, which the format never
    holds), and matches the reference."""
    import lowbit.ops.triton._w8 as w8_mod

    qdata = torch.randint(-128, 128, (n, k), generator=torch.Generator().manual_seed(n), dtype=torch.int8)
    qdata[0, :256] = torch.arange(-128, 128, dtype=torch.int8)
    qdata = qdata.to(DEVICE)
    scale = (torch.rand(n, generator=torch.Generator().manual_seed(k)) * 0.01 + 1e-3).to(DEVICE, dtype)
    x = _rand(1, k, seed=k, dtype=dtype)
    out = {}
    for mode in ("alu", "i2f"):
        monkeypatch.setattr(w8_mod, "GEMV_CVT", mode)
        out[mode] = int8_mm(x, qdata, scale)
    if not w8_mod.AUTOTUNE:  # the same tile for both: the same sums in the same order
        assert torch.equal(out["alu"], out["i2f"])
    assert _rel(out["alu"], ref.int8_weight_only_linear(x, qdata, scale)) < TOL[dtype]


@pytest.mark.parametrize("interpret", [False, True])
@pytest.mark.parametrize("autotune", [False, True])
def test_gemv_conversion_choice(interpret, autotune, monkeypatch):
    """The GEMV's ALU int8 conversion (inline PTX) is offered for W8A16 on the GPU only,
    never for W8A8 / fp8 or under the interpreter; GEMV_CVT "alu" / "i2f" force one
    kind, "tuned" leaves both to the autotuner; one config when autotuning is off."""
    import lowbit.ops.triton._w8 as w8_mod
    from lowbit.ops.triton._utils import cfg

    monkeypatch.setattr(w8_mod, "INTERPRET", interpret)
    monkeypatch.setattr(w8_mod, "AUTOTUNE", autotune)
    space = [cfg(BLOCK_N=bn, BLOCK_K=256, ALU_CVT=alu) for bn in (4, 8) for alu in (False, True)]
    for mode, code in w8_mod._CVT_MODES.items():
        for a_scaled in (False, True):
            kept = w8_mod._gemv_prune(space, dict(CVT_MODE=code, A_SCALED=a_scaled))
            alu = {c.kwargs["ALU_CVT"] for c in kept}
            no_alu = a_scaled or interpret or mode == "i2f"
            assert len(kept) == (1 if not autotune else 4 if mode == "tuned" and not no_alu else 2)
            if a_scaled or interpret or mode == "i2f":
                assert alu == {False}
            elif mode == "alu":
                assert alu == {True}
            elif autotune:
                assert alu == {False, True}


def _w8a8(scheme, w):
    """(qdata, scale, Triton op, spec) of a W8A8 scheme ("int8" or "fp8") for weight w."""
    from lowbit.ops.triton.fp8 import fp8_dyn_mm

    if scheme == "int8":
        scale = ref.int8_choose_qparams(w, torch.float32)
        return ref.int8_quantize(w, scale), scale, int8_dyn_mm, ref.int8_dynamic_linear
    scale = ref.fp8_choose_qparams(w)
    return ref.fp8_quantize(w, scale), scale, fp8_dyn_mm, ref.fp8_dynamic_linear


@pytest.mark.parametrize("m", [1, 5, 300])  # the GEMV, the split-K GEMM, the large-M path
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_nonfinite_activation_rows_give_nan_rows(scheme, m, dtype):
    """W8A8 int8 and fp8: a token holding a NaN or an infinity makes its whole output row
    NaN, as in the reference (on the GPU through every path: GEMV, split-K GEMM, the int8
    large-M GEMM, ``_scaled_mm`` and the TMA GEMM for fp8); the other rows are untouched."""
    if scheme == "fp8" and DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")

    w = _rand(48, 96, seed=1, std=0.02)
    qdata, scale, op, spec = _w8a8(scheme, w)
    x = _rand(m, 96, seed=2, dtype=dtype)
    bad_rows = {0: float("nan"), m // 2 + 1: float("inf"), m - 1: -float("inf")} if m > 2 else {0: float("nan")}
    for r, v in bad_rows.items():
        x[r, 7 + r % 50] = v
    out, expect = op(x, qdata, scale), spec(x, qdata, scale)
    bad = torch.zeros(m, dtype=torch.bool, device=DEVICE)
    bad[list(bad_rows)] = True
    assert out[bad].isnan().all() and expect[bad].isnan().all()
    assert not out[~bad].isnan().any()
    if (~bad).any():
        assert _rel(out[~bad], expect[~bad]) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 5, 300])  # the GEMV, the split-K GEMM, the large-M path
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_huge_weights_rescale_as_the_spec_does(scheme, m, dtype):
    """Weights near 1e36 and small activations: y ~ 1e34 is finite, but the epilogue's fp32
    ``acc * ws`` overflowed before ``* xs`` (inf where the float64 spec is finite). The scales'
    product comes first now; row 0 (+-1e35 against two weights of 1e36) makes that product inf
    with an exact zero sum, which must give 0 as the spec does, and inf elsewhere as it does."""
    from lowbit.ops.triton.fp8 import SCALED_MM_MIN_M

    if scheme == "fp8" and DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    if scheme == "fp8" and DEVICE == "cuda" and dtype == torch.bfloat16 and m >= SCALED_MM_MIN_M:
        pytest.skip("torch._scaled_mm: cuBLAS rescales in its own order")
    w = _rand(24, 64, seed=3) * 1e36
    w[0] = 0
    w[0, :2] = 1e36
    x = _rand(m, 64, seed=4, dtype=dtype, std=1e-3)
    x[0] = 0
    x[0, 0], x[0, 1] = 1e35, -1e35
    qdata, scale, op, spec = _w8a8(scheme, w)
    out, expect = op(x, qdata, scale), spec(x, qdata, scale)
    assert out[0, 0] == expect[0, 0] == 0 and expect[0].isinf().sum() > 12
    torch.testing.assert_close(out[0], expect[0], rtol=0, atol=0)
    if m > 1:
        assert expect[1:].isfinite().all() and expect[1:].abs().max() > 1e33
        assert out[1:].isfinite().all() and _rel(out[1:], expect[1:]) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 5, 300])
def test_fp8_sums_below_one_rescale_where_the_scales_product_overflows(m):
    """fp8's sum of products can be below 1 (unlike int8's), so with the two scales' product past
    fp32's max the other order, ``(acc * ws) * xs``, must be taken: y ~ 1.2e38 is finite in the spec
    and came out inf once the scales were multiplied first."""
    if DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    w = torch.zeros(16, 64, device=DEVICE)
    w[:, 0], w[:, 2] = 1e22, 1.1e19  # ws = 1e22 / 448; codes ~0.49 in column 2
    x = torch.zeros(m, 64, device=DEVICE)
    x[:, 1], x[:, 2] = 1e22, 1.1e19  # xs likewise: ws * xs ~ 5e38
    qdata, scale, op, spec = _w8a8("fp8", w)
    out, expect = op(x, qdata, scale), spec(x, qdata, scale)
    assert expect.isfinite().all() and expect.abs().max() > 1e38
    assert out.isfinite().all() and _rel(out, expect) < TOL[torch.float32]


@pytest.mark.parametrize("m", [2, 17, 300])  # split-K GEMM, GEMM, large M (fp32 skips the dequantize path)
def test_w8a16_fp32_activations_are_ieee_not_tf32(m):
    """fp32 activations get fp32 products, as F.linear does by default: tl.dot's default
    TF32 (10-bit mantissa) was 5e-4 off on the GPU, which a 2e-3 tolerance let through."""
    w = _rand(33, 64, seed=4, std=0.02)
    scale = ref.int8_choose_qparams(w, torch.float32)
    qdata = ref.int8_quantize(w, scale)
    x = _rand(m, 64, seed=5)
    assert _rel(int8_mm(x, qdata, scale), ref.int8_weight_only_linear(x, qdata, scale)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [2, 24])
def test_int8_mm_of_near_max_weights_stays_finite(m, dtype):
    """W8A16 on rows reaching the dtype's max (``reference.int8_choose_qparams`` with ``fit``:
    127 s within the range; before, fp16's rounded-up scale decoded 127 to 65532 = inf):
    one-hot rows of x give the decoded columns, finite, as the reference does."""
    top = torch.finfo(dtype).max
    w = _rand(24, 128, seed=4)
    w[0, 0], w[1, 3], w[2, 7] = top, -top, top
    scale = ref.int8_choose_qparams(w, dtype, fit=dtype)
    qdata = ref.int8_quantize(w, scale)
    x = torch.zeros(m, 128, dtype=dtype, device=DEVICE)
    x[torch.arange(m), torch.arange(m) * 5 % 8] = 1
    out, want = int8_mm(x, qdata, scale), ref.int8_weight_only_linear(x, qdata, scale)
    assert bool(torch.isfinite(want).all()) and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, want, rtol=2 * torch.finfo(dtype).eps, atol=0)
