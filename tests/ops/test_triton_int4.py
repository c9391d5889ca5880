"""W4A16 Triton kernel vs the reference (CPU: under TRITON_INTERPRET=1; CUDA: native)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lowbit.ops import reference as ref
from lowbit.ops.triton.int4 import int4_mm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-3}


PACK = {"plain": ref.int4_pack, "mma": ref.int4_mma_pack, "tiled": ref.int4_tiled_pack}


def _weight(n, k, gs, qdtype, seed, packing="plain"):
    """(qdata in ``packing``, scale, zero, qdata in the plain order for the reference)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.02).to(DEVICE)
    scale, zero = ref.int4_choose_qparams(w, gs, qdtype)
    q = ref.int4_quantize(w, scale, zero, gs)
    return PACK[packing](q), scale, zero, ref.int4_pack(q)


def _check(m, n, k, gs, dtype, seed, packing="mma"):
    qdata, scale, zero, plain = _weight(n, k, gs, dtype, seed, packing)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    out = int4_mm(x, qdata, scale, zero, gs, packing)
    expect = ref.int4_linear(x, plain, scale, zero, gs)
    assert out.shape == (m, n) and out.dtype == dtype
    err = (out.double() - expect.double()).norm() / expect.double().norm()
    assert err < TOL[dtype], f"rel err {err:.2e} for M={m} N={n} K={k} gs={gs} {dtype}"


# odd shapes, every group size, dtype and byte order (M drawn by each test)
CASES = dict(
    n=st.sampled_from([5, 33, 123]),
    groups=st.integers(1, 3),
    gs=st.sampled_from(ref.INT4_GROUP_SIZES),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    seed=st.integers(0, 2**16),
    packing=st.sampled_from(["mma", "plain"]),
)


@settings(deadline=None, max_examples=10)
@given(m=st.integers(1, 17), **CASES)
def test_int4_mm_matches_reference(m, n, groups, gs, dtype, seed, packing):
    _check(m, n, groups * max(gs, 64), gs, dtype, seed, packing)


@settings(deadline=None, max_examples=10)
@given(
    m=st.integers(1, 17),
    tiles=st.integers(1, 3),
    blocks=st.integers(1, 3),
    gs=st.sampled_from(ref.INT4_GROUP_SIZES),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_int4_mm_tiled_matches_reference(m, tiles, blocks, gs, dtype, seed):
    """ "tiled" codes (each 16-row x 128-k tile one 1 KB run): any N of whole tiles, K of whole
    128-k blocks (and groups), every group size and dtype, the same products as the reference."""
    _check(m, 16 * tiles, 128 * blocks * max(1, gs // 128), gs, dtype, seed, "tiled")


@pytest.mark.parametrize("m", [70, 260])  # the GEMM's byte path; the dequantize kernel
def test_int4_mm_tiled_mid_and_large_m(m):
    _check(m, 48, 384, 64, torch.bfloat16, m, "tiled")


def test_int4_tiled_pack_places_each_tile_in_one_run():
    """The "tiled" layout built by hand from the plain bytes: tile (i, j) (rows 16 i .., bytes
    64 j ..) is bytes (i K / 128 + j) 1024 .. + 1024, row r of it at 64 (r % 16)."""
    g = torch.Generator().manual_seed(3)
    n, k = 48, 384
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    plain, flat = ref.int4_pack(q), ref.int4_tiled_pack(q).flatten()
    for i in range(n // 16):
        for j in range(k // 128):
            for r in range(16):
                start = (i * (k // 128) + j) * 1024 + 64 * r
                assert torch.equal(flat[start : start + 64], plain[16 * i + r, 64 * j : 64 * j + 64])
    assert torch.equal(ref.int4_tiled_unpack(ref.int4_tiled_pack(q)), q)


def test_int4_mm_tiled_rejects_partial_tiles():
    """ "tiled" codes exist only for whole 16-row x 128-k tiles: the launcher names the shape."""
    x = torch.randn(1, 256, device=DEVICE, dtype=torch.bfloat16)
    q = torch.zeros(40, 128, dtype=torch.uint8, device=DEVICE)
    s = torch.ones(40, 2, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match=r"'tiled' codes need N % 16 == 0 and K % 128 == 0, got N=40, K=256"):
        int4_mm(x, q, s, s, 128, "tiled")
    with pytest.raises(ValueError, match="'tiled' packing needs N % 16 == 0"):
        ref.int4_tiled_pack(torch.zeros(16, 192, dtype=torch.uint8))


@pytest.mark.skipif(DEVICE != "cuda", reason="large tiles are for the GPU")
@pytest.mark.parametrize("m", [31, 64, 200, 256, 257, 1000])  # 256: the last M of the GEMM; 257 dequantizes
@pytest.mark.parametrize("gs", [32, 128, 256])
@pytest.mark.parametrize("packing", ["mma", "plain"])
def test_int4_mm_large_m_cuda(m, gs, packing):
    _check(m, 4096 + 5, 2048, gs, torch.bfloat16, m, packing)


@pytest.mark.parametrize("packing", ["mma", "plain"])
def test_int4_mm_dequant_path(packing):  # M >= DEQUANT_MIN_M: dequantize kernel + plain matmul
    _check(260, 37, 256, 32, torch.bfloat16, 7, packing)


def test_int4_and_w8a16_leave_the_gemm_after_m_256(monkeypatch):
    """M = 256 (the last M of bucket 256) runs the fused GEMM, M = 257 dequantizes + cuBLAS, in
    int4 and W8A16 (session 13 measured the GEMM ahead at M=256); both agree with the reference."""
    import lowbit.ops.triton._w8 as w8_mod
    import lowbit.ops.triton.int4 as int4_mod
    from lowbit.ops.triton.int8 import int8_mm

    calls = []
    for mod in (int4_mod, w8_mod):
        real = mod.planned_dequant_mm
        monkeypatch.setattr(
            mod, "planned_dequant_mm", lambda *a, real=real, name=mod.__name__: calls.append(name) or real(*a)
        )
    qdata, scale, zero, plain = _weight(19, 64, 32, torch.bfloat16, 5, "plain")
    w = (torch.randn(19, 64, generator=torch.Generator().manual_seed(6)) * 0.02).to(DEVICE)
    s8 = ref.int8_choose_qparams(w, torch.bfloat16)
    q8 = ref.int8_quantize(w, s8)
    for m, dequant in ((256, False), (257, True)):
        calls.clear()
        x = torch.randn(m, 64, generator=torch.Generator().manual_seed(m)).to(DEVICE, torch.bfloat16)
        want4 = ref.int4_linear(x, plain, scale, zero, 32).double()
        got4 = int4_mm(x, qdata, scale, zero, 32, "plain").double()
        want8 = ref.int8_weight_only_linear(x, q8, s8).double()
        got8 = int8_mm(x, q8, s8).double()
        assert calls == (["lowbit.ops.triton.int4", "lowbit.ops.triton._w8"] if dequant else []), (m, calls)
        for got, want in ((got4, want4), (got8, want8)):
            assert (got - want).norm() / want.norm() < TOL[torch.bfloat16], m


@pytest.mark.parametrize("packing", ["mma", "plain"])
def test_int4_mm_mid_m_byte_path(packing):
    # M in [64, 256]: "mma" codes go through the byte path with x's columns reordered
    _check(70, 37, 256, 64, torch.bfloat16, 9, packing)


def test_int4_pair_order_matches_the_mma_byte_order():
    """Column 2 j + b of the reordered x is the k whose code sits in byte j, nibble b."""
    from lowbit.ops.triton.int4 import _pair_order

    k = 96
    ks = torch.arange(k).repeat(2, 1).float()  # x[m, k] = k
    codes = torch.arange(k).remainder(16).repeat(3, 1).to(torch.uint8)  # any codes
    packed = ref.int4_mma_pack(codes)
    placed = _pair_order(ks)[0].long()  # which k each column holds
    nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(3, k)  # column 2 j + b
    assert sorted(placed.tolist()) == list(range(k))
    assert torch.equal(nibbles[0], codes[0, placed])


def test_int4_mm_rejects_unknown_packing():
    qdata, scale, zero, _ = _weight(8, 64, 32, torch.bfloat16, 0)
    x = torch.randn(1, 64, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="packing must be 'plain', 'mma' or 'tiled', got 'cpu'"):
        int4_mm(x, qdata, scale, zero, 32, "cpu")


def _force_split(monkeypatch, split):
    """Run the split-K path with ``split`` (fixed-config mode; skipped where the autotuner picks)."""
    import lowbit.ops.triton.int4 as int4_mod

    if int4_mod.AUTOTUNE:
        pytest.skip("the split is chosen by the autotuner here")
    monkeypatch.setattr(int4_mod, "_split_k", lambda *a: split)
    return int4_mod


@pytest.mark.parametrize("split", [1, 3, 8])
@pytest.mark.parametrize("packing", ["plain", "mma"])
@pytest.mark.parametrize("gs", [32, 64])
def test_int4_qparam_word_pairs_every_split_and_view(split, packing, gs, monkeypatch):
    """Group size 32 = the fixed config's BLOCK_K, so 16-bit qparams take the two-tiles-per-iteration
    loop (at 64 the words' 16-bit halves are read one by one): for G = 2, 4, 6, each split count
    (8 leaves most splits without a pair), whole tensors, row and column views, it matches the
    reference and the 2-byte loads; a one-row weight whose qparam row stride is odd (a column
    slice) takes the 2-byte loads instead of failing."""
    int4_mod = _force_split(monkeypatch, split)
    n = 37
    for ng in (2, 4, 6):
        k = ng * gs
        qdata, scale, zero, plain = _weight(n, k, gs, torch.bfloat16, ng + split, packing)
        x = torch.randn(5, k, generator=torch.Generator().manual_seed(ng)).to(DEVICE, torch.bfloat16)
        views = [(x, qdata, scale, zero, plain), (x, qdata[7:], scale[7:], zero[7:], plain[7:])]
        if packing == "plain" and ng > 2:
            views.append((x[:, 2 * gs :], qdata[:, gs:], scale[:, 2:], zero[:, 2:], plain[:, gs:]))
        for xx, q, s, z, p in views:
            assert int4_mod.qparam_words(s) is not None
            want = ref.int4_linear(xx, p, s.contiguous(), z.contiguous(), gs).double()
            got = int4_mm(xx, q, s, z, gs, packing)
            monkeypatch.setattr(int4_mod, "SZ_WORDS", False)
            apart = int4_mm(xx, q, s, z, gs, packing)
            monkeypatch.setattr(int4_mod, "SZ_WORDS", True)
            for y in (got, apart):
                assert (y.double() - want).norm() / want.norm() < TOL[torch.bfloat16], (ng, split, tuple(s.shape))
    qdata, scale, zero, plain = _weight(1, 3 * gs, gs, torch.bfloat16, 1, "plain")
    s, z = scale[:, :2], zero[:, :2]  # row stride 3: no int32 view
    assert int4_mod.qparam_words(s) is None
    xx = torch.randn(2, 2 * gs, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.bfloat16)
    want = ref.int4_linear(xx, plain[:, :gs].contiguous(), s.contiguous(), z.contiguous(), gs).double()
    got = int4_mm(xx, qdata[:, :gs], s, z, gs, "plain")
    assert (got.double() - want).norm() / want.norm() < TOL[torch.bfloat16]


@pytest.mark.parametrize("split", [2, 3, 8])
def test_int4_gemm_split_k_reduces_in_kernel(split, monkeypatch):
    # every split stores its partial sums into its own workspace slice; the last split of
    # each output tile (a zeroed counter per tile) adds them in a fixed order and resets it
    _force_split(monkeypatch, split)
    qdata, scale, zero, plain = _weight(37, 1024, 64, torch.bfloat16, split, "mma")
    x = torch.randn(40, 1024, generator=torch.Generator().manual_seed(split)).to(DEVICE, torch.bfloat16)
    expect = ref.int4_linear(x, plain, scale, zero, 64).double()
    runs = [int4_mm(x, qdata, scale, zero, 64, "mma") for _ in range(3)]  # one cached counter buffer
    for out in runs:
        assert (out.double() - expect).norm() / expect.norm() < TOL[torch.bfloat16]
        assert torch.equal(out, runs[0]), "split-K reduction is not deterministic"
    from lowbit.ops.triton import _utils

    counters = _utils.tile_counters(x.device, 1)
    assert counters.numel() == _utils.COUNTERS_SIZE
    assert int(counters.count_nonzero()) == 0, "a tile counter was left non-zero"


def test_int4_mm_dequant_path_in_row_chunks(monkeypatch):
    # 37 rows in chunks of 16: two full chunks and a ragged one, each into its columns of y
    import lowbit.ops.triton.int4 as int4_mod

    monkeypatch.setattr(int4_mod, "DEQUANT_ROWS", 16)
    _check(260, 37, 256, 32, torch.bfloat16, 8)
    _check(260, 48, 256, 32, torch.bfloat16, 8, "tiled")  # chunks of whole tiles: qdata[n0:] at n0 = 16, 32
    monkeypatch.setattr(int4_mod, "DEQUANT_ROWS", 24)  # not whole tiles: "tiled" chunks round down to 16 rows
    _check(260, 48, 256, 32, torch.bfloat16, 8, "tiled")


def test_int4_mm_empty():
    qdata, scale, zero, plain = _weight(33, 128, 64, torch.bfloat16, 0, "mma")
    out = int4_mm(torch.randn(0, 128, device=DEVICE, dtype=torch.bfloat16), qdata, scale, zero, 64, "mma")
    assert out.shape == (0, 33)


@pytest.mark.skipif(DEVICE != "cuda", reason="compile and CUDA graphs need a GPU")
def test_int4_mm_compile_and_cuda_graph():
    qdata, scale, zero, plain = _weight(256, 512, 128, torch.bfloat16, 0, "mma")
    x = torch.randn(8, 512, device=DEVICE, dtype=torch.bfloat16)
    expect = ref.int4_linear(x, plain, scale, zero, 128)
    fn = torch.compile(lambda x: int4_mm(x, qdata, scale, zero, 128, "mma"), fullgraph=True)
    torch.testing.assert_close(fn(x), expect, rtol=2e-2, atol=2e-2)
    int4_mm(x, qdata, scale, zero, 128, "mma")  # autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = int4_mm(x, qdata, scale, zero, 128, "mma")
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, ref.int4_linear(x, plain, scale, zero, 128), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs and streams need a GPU")
def test_int4_split_k_counters_in_cuda_graph_and_concurrent_streams(monkeypatch):
    _force_split(monkeypatch, 4)
    qdata, scale, zero, plain = _weight(1000, 2048, 128, torch.bfloat16, 5, "mma")
    xs = [torch.randn(3, 2048, device=DEVICE, dtype=torch.bfloat16) for _ in range(2)]
    want = [ref.int4_linear(x, plain, scale, zero, 128) for x in xs]
    int4_mm(xs[0], qdata, scale, zero, 128, "mma")  # compile outside the capture
    # a stream whose first split-K launch is captured: its counters come from the graph
    stream, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(graph, stream=stream):
        out = int4_mm(xs[0], qdata, scale, zero, 128, "mma")
    for _ in range(3):
        graph.replay()
        torch.testing.assert_close(out, want[0], rtol=2e-2, atol=2e-2)
    del graph
    # many launches on two streams at once: each stream has its own counters
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = [[], []]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for _ in range(20):
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                outs[i].append(int4_mm(xs[i], qdata, scale, zero, 128, "mma"))
    torch.cuda.synchronize()
    for i in range(2):
        for o in outs[i]:
            torch.testing.assert_close(o, want[i], rtol=2e-2, atol=2e-2)
    with torch.cuda.stream(stream):  # the graph-made counters outlive the graph
        torch.testing.assert_close(int4_mm(xs[1], qdata, scale, zero, 128, "mma"), want[1], rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_int4_split_k_under_compile_reduce_overhead(monkeypatch):
    # cudagraph trees reject any tensor an op keeps alive in their pool: the cached
    # counters are made outside it; warm-up, recording and replays must all be right
    _force_split(monkeypatch, 4)
    qdata, scale, zero, plain = _weight(1000, 2048, 128, torch.bfloat16, 6, "mma")
    fn = torch.compile(lambda x: int4_mm(x, qdata, scale, zero, 128, "mma") * 2, mode="reduce-overhead")
    for _ in range(4):
        x = torch.randn(2, 2048, device=DEVICE, dtype=torch.bfloat16)
        want = ref.int4_linear(x, plain, scale, zero, 128) * 2
        torch.testing.assert_close(fn(x).clone(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("gs", [32, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_mm_m1_odd_n_and_few_groups(gs, dtype):
    # one token, N=37 exercises the row mask, 5 groups an odd number of K tiles
    _check(1, 37, 5 * gs, gs, dtype, 11)


@pytest.mark.parametrize("packing", ["mma", "plain"])
def test_int4_mm_m1_extreme_codes_fp32(packing):
    """Codes 0 and 15 only (every nibble position, both halves of a byte), fp32 x and
    qparams, against float64 math: fp32 inputs get fp32 products (not TF32)."""
    n, k, gs = 9, 256, 32
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 2, (n, k), generator=g) * 15
    q[0] = 15
    qdata = PACK[packing](q.to(torch.uint8)).to(DEVICE)
    scale = (torch.rand(n, k // gs, generator=g) + 0.5).to(DEVICE, torch.float32)
    zero = torch.randn(n, k // gs, generator=g).to(DEVICE, torch.float32)
    x = torch.randn(1, k, generator=g).to(DEVICE)
    expect = ref.int4_linear(x.double(), ref.int4_pack(q.to(torch.uint8)).to(DEVICE), scale.double(), zero.double(), gs)
    # fp32 accumulation of 256 terms up to ~20 in size: ~1e-5; one wrong code is off by >= 0.5
    out = int4_mm(x, qdata, scale, zero, gs, packing)
    torch.testing.assert_close(out.double(), expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("swap", ["off", "on"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qdtype", ["same", torch.float32])
@pytest.mark.parametrize("packing", ["mma", "plain"])
def test_int4_gemm_dequant_exact_every_code_and_position(dtype, qdtype, packing, swap, monkeypatch):
    """One-hot rows of x read single weights back through the GEMM path (M = 128).

    Scales are powers of two and zeros small multiples of them, so every weight
    (q - 8) * s + z is exact in x.dtype: the output must equal the float64
    dequantization bit for bit, for all 16 codes in both nibbles of every byte
    of a K tile (on the GPU this is the inline-PTX unpack's lane mapping), on the plain
    and the swapped tiles (``GEMM_SWAP``: the nibbles joined back into k order).
    """
    import lowbit.ops.triton.int4 as int4_mod

    monkeypatch.setattr(int4_mod, "GEMM_SWAP", swap)
    qdtype = dtype if qdtype == "same" else qdtype
    n, k, gs = 37, 256, 64
    g = torch.Generator().manual_seed(5)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    q[:, :32] = torch.arange(16, dtype=torch.uint8).repeat(2)  # every code at even and odd k
    scale = 2.0 ** -torch.randint(2, 8, (n, k // gs), generator=g).double()
    zero = torch.randint(-8, 9, (n, k // gs), generator=g).double() * scale
    qdata = PACK[packing](q).to(DEVICE)
    want = ((q.double().reshape(n, k // gs, gs) - 8) * scale[..., None] + zero[..., None]).reshape(n, k)
    for k0 in (0, 128):
        x = torch.eye(k, dtype=dtype)[k0 : k0 + 128].to(DEVICE)
        out = int4_mm(x, qdata, scale.to(DEVICE, qdtype), zero.to(DEVICE, qdtype), gs, packing)
        got = out.double().cpu().t()  # [n, 128]: column j is weight column k0 + j
        assert torch.equal(got, want[:, k0 : k0 + 128]), (got - want[:, k0 : k0 + 128]).abs().max()


@settings(deadline=None, max_examples=60)
@given(
    gs=st.sampled_from(ref.INT4_GROUP_SIZES),
    m=st.integers(1, 5000),
    k_groups=st.integers(1, 200),
    n=st.sampled_from([1, 37, 4096, 14336, 128256]),
    swap=st.sampled_from(["off", "tuned", "on"]),
    sz=st.booleans(),
)
@example(gs=128, m=1, k_groups=40, n=4096, swap="tuned", sz=True)  # the GEMV configs (M <= 8)
@example(gs=32, m=8, k_groups=200, n=37, swap="off", sz=True)
def test_int4_gemm_autotune_space_respects_the_kernel_contract(gs, m, k_groups, n, swap, sz):
    """Every config the GPU autotuner may try keeps the kernel's assumptions.

    The kernel loads one scale per K tile, so BLOCK_K must divide the group size
    (a config with BLOCK_K 128 at group size 32 computes wrong results); a split
    config stores partial sums into the [SPLIT_K, M, N] fp32 workspace, which the
    launcher sizes from the largest split kept and allocates only for M <= 128 within
    MAX_WORKSPACE; each split needs two K tiles of work; no config carries a
    pre_hook (Triton's autotune disk cache skips kernels whose configs have one).
    With qparam words (SZ) a BLOCK_K == GS tile runs two K tiles per loop iteration, so
    its stage count is halved (rounded up, at least 2).
    Swapped tiles appear only as ``GEMM_SWAP`` allows (never when "off"; from M bucket
    64, alone when "on"), with BLOCK_M no larger than the bucket.
    Checked on the GPU search space even where (CPU CI) only the fixed config runs.
    """
    import lowbit.ops.triton.int4 as int4_mod
    from lowbit.ops.triton._utils import m_bucket

    k = k_groups * gs
    mb = m_bucket(m)
    mode = int4_mod._SWAP_MODES[swap]
    named = dict(GS=gs, m_bucket=mb, K=k, N=n, SWAP_MODE=mode, ASM=True)  # ASM: as on the GPU (GEMV configs too)
    kept = int4_mod._prune(int4_mod._gemm_configs(), {**named, "SZ": sz})
    assert kept, (gs, m, k)
    plain = int4_mod._prune(int4_mod._gemm_configs(), named)
    stages = {}
    for c in plain:
        stages.setdefault((tuple(sorted(c.kwargs.items())), c.num_warps), set()).add(c.num_stages)
    assert len(kept) <= len(plain)
    for c in kept:
        before = stages[(tuple(sorted(c.kwargs.items())), c.num_warps)]
        pairs = sz and c.kwargs["BLOCK_K"] == gs and not c.kwargs.get("GEMV")  # (a GEMV tile has no pipeline)
        assert c.num_stages in ({max(2, (b + 1) // 2) for b in before} if pairs else before), (c.kwargs, before)
    swapped = [c.kwargs["SWAP"] for c in kept]
    if swap == "off" or mb < 64:
        assert not any(swapped), (swap, mb)
    elif swap == "on":
        assert all(swapped), mb
    else:
        assert any(swapped) and not all(swapped), mb
    for c in kept:
        meta = c.kwargs
        if meta.get("GEMV"):  # the M <= 8 GEMV warps: 128-k blocks, two per split at least
            assert mb <= int4_mod.GEMV_MAX_M and c.num_warps == meta["GEMV"], (meta, mb)
            assert k // (128 * meta["SPLIT_K"]) >= 2, (meta, k)
        assert gs % meta["BLOCK_K"] == 0, (gs, meta)
        assert c.pre_hook is None, meta
        if meta["SWAP"]:
            assert meta["BLOCK_M"] <= mb, (meta, mb)
        if meta["SPLIT_K"] > 1:
            assert mb <= 128 and k // (meta["SPLIT_K"] * meta["BLOCK_K"]) >= 2, (meta, mb, k)
            assert meta["SPLIT_K"] * m * n * 4 <= int4_mod.MAX_WORKSPACE, (meta, m, n)


@settings(deadline=None, max_examples=12)
@given(m=st.integers(1, 80), split=st.sampled_from([1, 2, 3]), **CASES)
def test_int4_swapped_gemm_matches_reference(m, n, groups, gs, dtype, seed, packing, split):
    """GEMM_SWAP="on": y.T = w_hat @ x.T tiles (the dequantized weight as the MMA's A
    operand) on odd shapes, every dtype and byte order ("mma" codes with x reordered from
    M bucket 64), with and without split-K (forced where one fixed config runs)."""
    import lowbit.ops.triton.int4 as int4_mod

    saved = int4_mod.GEMM_SWAP, int4_mod._split_k
    int4_mod.GEMM_SWAP = "on"
    if not int4_mod.AUTOTUNE:
        int4_mod._split_k = lambda *a: split
    try:
        _check(m, n, groups * max(gs, 64), gs, dtype, seed, packing)
    finally:
        int4_mod.GEMM_SWAP, int4_mod._split_k = saved


def _config_error(c, x, qdata, scale, zero, want, gs, swap_mode, sz, tiled=False):
    """Launch ``_gemm_kernel`` once with config ``c`` as the launcher would (qparam words when
    ``sz``; "tiled" codes when ``tiled``) into a NaN-filled output; the relative error against
    ``want``."""
    import triton

    import lowbit.ops.triton.int4 as int4_mod
    from lowbit.ops.triton._utils import INTERPRET, m_bucket, split_k_buffers

    (m, k), n, meta = x.shape, qdata.shape[0], c.kwargs
    y = torch.full((m, n), float("nan"), device=DEVICE, dtype=x.dtype)
    ws, cnt = split_k_buffers(x.device, m, n, meta["SPLIT_K"])
    s, z = (int4_mod.qparam_words(scale), int4_mod.qparam_words(zero)) if sz else (scale, zero)
    grid = (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], triton.cdiv(m, meta["BLOCK_M"]))
    int4_mod._gemm_kernel.fn[grid](
        x, qdata, s, z, y, ws, cnt, m, n, k, m_bucket(m), x.stride(0), y.stride(0), qdata.stride(0), s.stride(0),
        swap_mode, GS=gs, ASM=not INTERPRET, DOT_F32=INTERPRET, MMA=False, SZ=sz,
        QDT=int4_mod._TL_DTYPES[x.dtype] if sz else None, **meta, num_warps=c.num_warps, num_stages=c.num_stages,
        TILED=tiled,
    )  # fmt: skip
    return float((y.double() - want).norm() / want.norm())


def _every_config_error(mb, mode, gs, k, packing="plain"):
    """Launch each config of the GPU search space for M bucket ``mb`` (GEMM_SWAP ``mode``), with
    and without qparam words, as it is (big tiles, masks on N and M, its split), on codes in
    ``packing`` ("plain", or "tiled" on whole 16-row tiles); returns {(config, words): relative
    error against the reference}."""
    import lowbit.ops.triton.int4 as int4_mod

    n, m = 133 if packing == "plain" else 144, mb - 27 if mb > 32 else mb - 3  # M inside the bucket, off the tiles
    qdata, scale, zero, plain = _weight(n, k, gs, torch.bfloat16, mb, packing)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(mb)).to(DEVICE, torch.bfloat16)
    want = ref.int4_linear(x, plain, scale, zero, gs).double()
    named = dict(GS=gs, m_bucket=mb, K=k, N=n, SWAP_MODE=int4_mod._SWAP_MODES[mode])
    spaces = {sz: int4_mod._prune(int4_mod._gemm_configs(), dict(named, SZ=sz)) for sz in (True, False)}
    assert all(space and all(c.kwargs["SWAP"] == (mode == "on") for c in space) for space in spaces.values())
    return {
        (str(c), sz): _config_error(c, x, qdata, scale, zero, want, gs, named["SWAP_MODE"], sz, packing == "tiled")
        for sz, space in spaces.items()
        for c in space
    }


@pytest.mark.parametrize(
    "mb, packing",
    [(mb, p) for mb in (64, 128, 256) for p in ("plain", "tiled")]
    if DEVICE == "cuda"
    else [(64, "plain"), (128, "plain"), (256, "plain"), (64, "tiled")],
)
def test_every_swapped_gpu_config_matches_reference(mb, packing):
    """Each swapped tile: on the GPU the real wgmma code, on the interpreter the same program
    logic; "plain" and "tiled" codes."""
    errors = _every_config_error(mb, "on", 64, 512, packing)
    assert errors and all(e < TOL[torch.bfloat16] for e in errors.values()), errors


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter runs the fixed config's logic (tested above)")
@pytest.mark.parametrize("mb", [16, 64, 128])
@pytest.mark.parametrize("gs", [64, 128])
@pytest.mark.parametrize("packing", ["plain", "tiled"])
def test_every_plain_gpu_config_matches_reference(mb, gs, packing):
    """Each plain tile on the GPU, with and without qparam words: at group size 64 every tile
    runs two K tiles per iteration with words, at 128 the BLOCK_K 64 ones read 16-bit halves;
    "plain" and "tiled" codes."""
    errors = _every_config_error(mb, "off", gs, 1024, packing)
    assert errors and all(e < TOL[torch.bfloat16] for e in errors.values()), errors


# every (M, dtype, group size) on the GPU; two on the interpreter (~45 s each on the CI's CPU)
_GEMV_CASES = [(m, dt, gs) for m in (1, 3, 8) for dt in (torch.bfloat16, torch.float16) for gs in (32, 128)]


@pytest.mark.parametrize(
    "m, dtype, gs, packing",
    [(*c, p) for c in _GEMV_CASES for p in ("plain", "tiled")]
    if DEVICE == "cuda"
    else [(3, torch.bfloat16, 128, "plain"), (8, torch.float16, 32, "plain"), (3, torch.bfloat16, 128, "tiled")],
)
def test_every_gemv_config_matches_reference(m, dtype, gs, packing):
    """Each GEMV config of the M <= 8 buckets (``_int4_gemv``: the weight as the mma's A operand,
    each lane's own k pairs in its fragment slots), with and without qparam words, in "plain"
    codes on a row count that is no multiple of 16 and in "tiled" codes (whole 16-row tiles), on a
    K that leaves some warps' last blocks empty. On the GPU the
    inline-PTX mma; on the interpreter its lane-by-lane emulation (a wrong pairing of weight and
    x fragments reads rel. err ~0.9)."""
    import lowbit.ops.triton.int4 as int4_mod
    from lowbit.ops.triton._utils import INTERPRET, m_bucket

    # some warps of the 8- and 16-block strides find no block; with 21 blocks (group size < 128:
    # an even group count, as qparam words need) an ADJ pair ends with one block in range and one
    # masked
    n, k = 37 if packing == "plain" else 48, (21 if gs < 128 else 22) * 128  # ("tiled": whole 16-row tiles)
    qdata, scale, zero, plain = _weight(n, k, gs, dtype, m, packing)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + 1)).to(DEVICE, dtype)
    want = ref.int4_linear(x, plain, scale, zero, gs).double()
    named = dict(GS=gs, m_bucket=m_bucket(m), K=k, N=n, SWAP_MODE=0, ASM=not INTERPRET, x_ptr=x)
    space = [c for c in int4_mod._prune(int4_mod._gemm_configs(), named) if c.kwargs.get("GEMV")]
    assert {c.kwargs["GEMV"] for c in space} == {1, 2, 4, 8}
    # one block per warp per iteration, or two adjacent ones (ADJ): both block orders are checked
    assert {(c.kwargs["UNROLL"], c.kwargs.get("ADJ", 0)) for c in space} == {(1, 0), (2, 1)}
    errors = {
        (str(c), sz): _config_error(c, x, qdata, scale, zero, want, gs, 0, sz, packing == "tiled")
        for c in space
        for sz in (True, False)
    }
    assert errors and all(e < TOL[dtype] for e in errors.values()), errors


def test_int4_mm_small_m_reads_misaligned_views():
    """x and qdata views that start off a 16-byte boundary (contiguous, so kept as they are):
    the M <= 8 path reads both as 16-byte vectors on the GPU, so the launcher copies them;
    results equal the reference and the caller's tensors are untouched."""
    import lowbit.ops.triton.int4 as int4_mod

    qdata, scale, zero, plain = _weight(40, 256, 64, torch.bfloat16, 5)
    big_q = torch.zeros(40 * 128 + 1, dtype=torch.uint8, device=DEVICE)
    big_q[1:] = qdata.flatten()
    q_view = big_q[1:].view(40, 128)
    big_x = torch.randn(1, 257, generator=torch.Generator().manual_seed(6)).to(DEVICE, torch.bfloat16)
    x_view = big_x[:, 1:]
    assert x_view.is_contiguous() and q_view.is_contiguous() and x_view.data_ptr() % 16 and q_view.data_ptr() % 16
    x_before = x_view.clone()
    got = int4_mod.int4_mm(x_view, q_view, scale, zero, 64)
    want = ref.int4_linear(x_view, plain, scale, zero, 64)
    assert (got.double() - want.double()).norm() / want.double().norm() < TOL[torch.bfloat16]
    assert torch.equal(x_view, x_before)


def test_int4_tensor_every_packing_through_the_triton_backend():
    """Int4Tensor.linear on the Triton path in each byte order: "plain" and "mma" run as
    they are, a CPU layout is repacked to "mma"; all equal the reference function."""
    import torch.nn.functional as F

    import lowbit
    from lowbit.ops import cpu

    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(2)) * 0.02
    plain = lowbit.Int4Tensor.from_float(w.to(DEVICE, torch.bfloat16), group_size=64, packing="plain")
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.bfloat16)
    want = ref.int4_linear(x, plain.qdata, plain.scale, plain.zero, 64).double()
    for packing in ["plain", "mma", *cpu.INT4_CPU_LAYOUTS]:
        with lowbit.use_backend("triton"), torch.no_grad():
            got = F.linear(x, plain.repack(packing)).double()
        assert (got - want).norm() / want.norm() < TOL[torch.bfloat16], packing
    # "tiled" on whole 16-row tiles (48 rows)
    plain48 = lowbit.Int4Tensor.from_float(
        torch.cat([w, w[:8]]).to(DEVICE, torch.bfloat16), group_size=64, packing="plain"
    )  # fmt: skip
    want48 = ref.int4_linear(x, plain48.qdata, plain48.scale, plain48.zero, 64).double()
    with lowbit.use_backend("triton"), torch.no_grad():
        got48 = F.linear(x, plain48.repack("tiled")).double()
    assert (got48 - want48).norm() / want48.norm() < TOL[torch.bfloat16]


@settings(deadline=None, max_examples=12)
@given(m=st.sampled_from([1, 5, 17, 100]), odd_groups=st.booleans(), **CASES)
def test_int4_mm_qparam_words_match_the_two_byte_loads(m, odd_groups, n, groups, gs, dtype, seed, packing):
    """16-bit scale / zero read as int32 words (two groups each; even G): the GEMM matches the
    reference and the 2-byte-load path (SZ_WORDS off), on whole tensors, a row slice and a
    column slice (views); odd G, fp32 qparams and odd offsets take the 2-byte loads."""
    import lowbit.ops.triton.int4 as int4_mod

    ng = 2 * groups + (1 if odd_groups else 0)
    k = ng * gs
    qdata, scale, zero, plain = _weight(n, k, gs, dtype, seed, packing)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    cases = [(x, qdata, scale, zero, plain), (x, qdata[n // 3 :], scale[n // 3 :], zero[n // 3 :], plain[n // 3 :])]
    if packing == "plain":  # column slices of "mma" bytes are not whole words of the slice
        c0 = 2 if ng > 2 else 1
        kc = c0 * gs
        cases.append((x[:, kc:], qdata[:, kc // 2 :], scale[:, c0:], zero[:, c0:], plain[:, kc // 2 :]))
    for xx, q, s, z, p in cases:
        words = int4_mod.qparam_words(s)
        even = s.shape[1] % 2 == 0 and s.storage_offset() % 2 == 0
        assert (words is not None) == (dtype != torch.float32 and even)
        if words is not None:
            halves = torch.stack([words & 0xFFFF, (words >> 16) & 0xFFFF], -1).reshape(s.shape)
            assert torch.equal(halves, s.contiguous().view(torch.int16).int() & 0xFFFF)
        got = int4_mm(xx, q, s, z, gs, packing)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(int4_mod, "SZ_WORDS", False)
            apart = int4_mm(xx, q, s, z, gs, packing)
        want = ref.int4_linear(xx, p, s.contiguous(), z.contiguous(), gs).double()
        for y in (got, apart):
            err = (y.double() - want).norm() / want.norm()
            assert err < TOL[dtype], (m, n, k, gs, dtype, float(err))
        # same products; only the split-K partition of the K tiles (its fp32 sum order) may differ
        assert (got.double() - apart.double()).norm() <= TOL[dtype] / 4 * want.norm()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("packing,m", [("tiled", 4), ("plain", 4), ("mma", 24), ("tiled", 24)])
def test_int4_mm_of_near_max_weights_stays_finite(packing, m, dtype):
    """Weights at the top of the dtype's range (``reference``'s capped qparams): one-hot rows of x
    pick decoded columns, which the GEMV tile (M <= 8, one of its configs launched directly) and
    the tensor-core tiles (``int4_mm``) must give finite and equal to the reference's (before the
    cap, fp16's top code decoded past 65504)."""
    import lowbit.ops.triton.int4 as int4_mod
    from lowbit.ops.triton._utils import INTERPRET, m_bucket

    top = torch.finfo(dtype).max
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w[0, :2], w[1, 0], w[2, 128:] = top, -top, torch.linspace(-top, top, 128, dtype=torch.float64)
    w = w.to(dtype).to(DEVICE)
    scale, zero = ref.int4_choose_qparams(w, 128, dtype)
    q = ref.int4_quantize(w, scale, zero, 128)
    x = torch.zeros(m, 256, dtype=dtype, device=DEVICE)
    x[torch.arange(m), torch.arange(m) * 11] = 1
    want = ref.int4_linear(x, ref.int4_pack(q), scale, zero, 128)
    assert bool(torch.isfinite(want).all()) and want.abs().max() > top / 2
    if m <= 8:
        named = dict(GS=128, m_bucket=m_bucket(m), K=256, N=32, SWAP_MODE=0, ASM=not INTERPRET, x_ptr=x)
        gemv = [c for c in int4_mod._prune(int4_mod._gemm_configs(), named) if c.kwargs.get("GEMV")][0]
        err = _config_error(gemv, x, PACK[packing](q), scale, zero, want.double(), 128, 0, False, packing == "tiled")
        assert err <= 2 * torch.finfo(dtype).eps, err  # (NaN / inf outputs fail here too)
    else:
        out = int4_mm(x, PACK[packing](q), scale, zero, 128, packing)
        assert bool(torch.isfinite(out).all())
        torch.testing.assert_close(out, want, rtol=2 * torch.finfo(dtype).eps, atol=0)
