"""_utils.chunked_dequant_mm (the M >= DEQUANT_MIN_M path of int4 and W8A16): its chunk
schedule against float64 math, and the kernels' fills through it."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.ops.triton import _utils

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weight_and_fill(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(DEVICE, torch.bfloat16)
    filled = []

    def fill(n0, r, buf):  # a "dequantize" that is a copy, so the product is exact to check
        assert buf.shape[0] >= r, f"chunk of {r} rows in a {buf.shape[0]}-row buffer"
        buf[:r].copy_(w[n0 : n0 + r])
        filled.append((n0, r))

    return w, fill, filled


def _check_product(x, w, y):
    assert y.shape == (x.shape[0], w.shape[0]) and y.dtype == x.dtype
    expect = x.double() @ w.double().T
    err = (y.double() - expect).norm() / expect.norm().clamp_min(1e-30)
    assert err < 1e-2, f"rel err {err:.2e}"


@settings(deadline=None, max_examples=25)
@given(m=st.integers(1, 40), n=st.integers(0, 90), rows=st.integers(1, 40))
def test_chunks_cover_every_row_once_and_match_float64(m, n, rows):
    k = 48
    w, fill, filled = _weight_and_fill(n, k, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    y = _utils.chunked_dequant_mm(x, n, rows, fill)
    assert filled == [(n0, min(rows, n - n0)) for n0 in range(0, n, rows)], f"N={n}, rows={rows}"
    _check_product(x, w, y)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA-graph capture needs a GPU")
def test_chunks_in_a_cuda_graph():
    w, fill, filled = _weight_and_fill(1000, 256, seed=3)
    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(4)).to(DEVICE, torch.bfloat16)
    eager = _utils.chunked_dequant_mm(x, 1000, 256, fill)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _utils.chunked_dequant_mm(x, 1000, 256, fill)
    assert filled[-4:] == [(0, 256), (256, 256), (512, 256), (768, 232)]
    for _ in range(2):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        _check_product(x, w, out)
    _check_product(x, w, eager)


def test_int4_and_w8a16_dequant_paths_in_chunks(monkeypatch):
    # the kernels' fills through the chunked path (77 rows: two full chunks and a ragged one)
    import lowbit.ops.triton._w8 as w8_mod
    import lowbit.ops.triton.int4 as int4_mod
    from lowbit.ops import reference as ref
    from lowbit.ops.triton.int4 import int4_mm
    from lowbit.ops.triton.int8 import int8_mm

    for mod in (int4_mod, w8_mod):
        monkeypatch.setattr(mod, "DEQUANT_ROWS", 32)
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(77, 256, generator=g) * 0.02).to(DEVICE)
    x = torch.randn(260, 256, generator=g).to(DEVICE, torch.bfloat16)
    scale, zero = ref.int4_choose_qparams(w, 64, torch.bfloat16)
    q = ref.int4_quantize(w, scale, zero, 64)
    out = int4_mm(x, ref.int4_pack(q), scale, zero, 64, "plain")
    expect = ref.int4_linear(x, ref.int4_pack(q), scale, zero, 64).double()
    assert (out.double() - expect).norm() / expect.norm() < 1e-2
    s8 = ref.int8_choose_qparams(w, torch.bfloat16)
    q8 = ref.int8_quantize(w, s8)
    out = int8_mm(x, q8, s8)
    expect = ref.int8_weight_only_linear(x, q8, s8).double()
    assert (out.double() - expect).norm() / expect.norm() < 1e-2


def test_split_k_counters_never_come_from_a_capture(monkeypatch):
    # tile_counters' bookkeeping with CUDA faked on CPU: eager calls make a stream's buffer
    # outside any graph and keep spares; a stream first seen in a capture takes a spare and,
    # with none left, gets per-launch zeros that are not cached (a buffer cached from inside
    # one graph would be zeroed only by that graph's replays)
    made = []

    def outside(device, n):
        made.append(torch.zeros(n, dtype=torch.int32))
        return made[-1]

    state = dict(stream=1, capturing=False)
    monkeypatch.setattr(_utils, "_COUNTERS", {})
    monkeypatch.setattr(_utils, "_SPARE_COUNTERS", {})
    monkeypatch.setattr(_utils, "zeros_outside_pools", outside)
    monkeypatch.setattr(_utils, "current_raw_stream", lambda index: state["stream"])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, device=None, **k: real_zeros(*a, **k))
    dev = torch.device("cuda:0")

    eager1 = _utils.tile_counters(dev, 8)
    assert any(eager1 is t for t in made) and len(made) == 1 + _utils.SPARE_COUNTERS
    assert _utils.tile_counters(dev, 8) is eager1  # cached per stream
    state.update(stream=2, capturing=True)
    spare = _utils.tile_counters(dev, 8)
    assert any(spare is t for t in made) and spare is not eager1
    assert _utils.tile_counters(dev, 8) is spare  # the capturing stream keeps it
    for handle in range(3, 3 + _utils.SPARE_COUNTERS):  # use up the spares
        state["stream"] = handle
        _utils.tile_counters(dev, 8)
    state["stream"] = 99
    fresh = [_utils.tile_counters(dev, 8) for _ in range(2)]
    assert fresh[0] is not fresh[1] and not any(f is t for f in fresh for t in made)
    assert (dev, 99) not in _utils._COUNTERS
    # the next eager call tops the spares up again
    state.update(stream=1, capturing=False)
    assert _utils.tile_counters(dev, 8) is eager1
    assert len(_utils._SPARE_COUNTERS[dev]) == _utils.SPARE_COUNTERS


def test_eager_split_k_workspace_is_kept_per_stream_and_never_from_a_capture(monkeypatch):
    # split_k_buffers' bookkeeping with CUDA faked on CPU: eager launches on a stream share one
    # workspace made outside any pool (views of it, the same pair for the same shape), a larger
    # launch grows it after recording the old one on the stream, another stream has its own, and a
    # capture (or more tiles than the counters cache holds) gets a workspace of its own, not cached
    made, recorded = [], []

    def outside(device, n):
        made.append(torch.zeros(n, dtype=torch.int32))
        return made[-1]

    state = dict(stream=1, capturing=False)
    for name in ("_COUNTERS", "_SPARE_COUNTERS", "_WORKSPACES", "_SPLIT_PAIRS"):
        monkeypatch.setattr(_utils, name, {})
    monkeypatch.setattr(_utils, "zeros_outside_pools", outside)
    monkeypatch.setattr(_utils, "current_raw_stream", lambda index: state["stream"])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream {state['stream']}")
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: recorded.append((self, s)))
    real_empty, real_zeros = torch.empty, torch.zeros
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **k: real_empty(*a, **k))
    monkeypatch.setattr(torch, "zeros", lambda *a, device=None, **k: real_zeros(*a, **k))
    dev = torch.device("cuda:0")

    ws, cnt = _utils.split_k_buffers(dev, 16, 64, 4)
    kept = _utils._WORKSPACES[dev, 1]
    assert ws.shape == (4, 16, 64) and ws.dtype == torch.float32 and ws.is_contiguous()
    assert (
        ws.data_ptr() == kept.data_ptr() and kept.numel() == 4096 and any(kept.data_ptr() == t.data_ptr() for t in made)
    )
    assert cnt is _utils.tile_counters(dev, 4) and cnt.dtype == torch.int32
    again = _utils.split_k_buffers(dev, 16, 64, 4)
    assert again[0] is ws and again[1] is cnt  # the same pair: no tensor made per call
    small = _utils.split_k_buffers(dev, 3, 100, 2)[0]  # a smaller launch: a view of the same workspace
    assert (
        small.shape == (2, 3, 100)
        and small.data_ptr() == kept.data_ptr()
        and len(made) == 1 + 1 + _utils.SPARE_COUNTERS
    )
    big = _utils.split_k_buffers(dev, 33, 200, 2)[0]  # 13200 elements: grown to 16384, the old one recorded
    assert _utils._WORKSPACES[dev, 1].numel() == 16384 and big.data_ptr() == _utils._WORKSPACES[dev, 1].data_ptr()
    assert len(recorded) == 1 and recorded[0][0] is kept and recorded[0][1] == "stream 1"
    assert _utils.split_k_buffers(dev, 16, 64, 4)[0].data_ptr() == big.data_ptr()  # views of the old one dropped
    state["stream"] = 2
    other = _utils.split_k_buffers(dev, 16, 64, 4)
    assert other[0].data_ptr() != big.data_ptr() and other[1] is not cnt
    state.update(stream=3, capturing=True)
    n_made = len(made)
    captured = _utils.split_k_buffers(dev, 16, 64, 4)[0]
    assert captured.shape == (4, 16, 64) and (dev, 3) not in _utils._WORKSPACES
    assert all(captured.data_ptr() != t.data_ptr() for t in made[:n_made])
    assert all(k[1] != 3 for k in _utils._SPLIT_PAIRS)  # nothing cached for the capture
    assert len(_utils._SPARE_COUNTERS[dev]) < _utils.SPARE_COUNTERS  # (the capture took a spare counter)
    state.update(stream=1, capturing=False)
    assert _utils.split_k_buffers(dev, 16, 64, 4)[0].data_ptr() == big.data_ptr()  # the same workspace, and
    assert len(_utils._SPARE_COUNTERS[dev]) == _utils.SPARE_COUNTERS  # the spares topped up again
    rows = _utils.COUNTERS_SIZE // 4 + 1  # more tiles than the counters cache holds: fresh buffers
    huge = _utils.split_k_buffers(dev, rows * 16, 64, 2)
    assert huge[0].shape == (2, rows * 16, 64) and huge[0].data_ptr() != _utils._WORKSPACES[dev, 1].data_ptr()
