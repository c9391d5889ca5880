"""bench/gemv_load_probe.py under the interpreter: its tiled addressing (each 16-row x 128-k
tile as one 1 KB run) loads the same words as the tile's row-major loads, only in another
order, so its timing compares access patterns and nothing else."""

from __future__ import annotations

import functools
import operator
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
try:
    from gemv_load_probe import loads_only
finally:
    sys.path.pop(0)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter without a GPU (conftest)


@pytest.mark.parametrize("w,split,unroll", [(4, 1, 1), (1, 2, 2), (2, 1, 2)])
def test_tiled_loads_cover_the_same_words(w, split, unroll):
    g = torch.Generator().manual_seed(w * 10 + split)
    k, n = 512, 64
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    s = torch.rand(n, k // 128, generator=g).to(torch.bfloat16)
    z = torch.rand(n, k // 128, generator=g).to(torch.bfloat16)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    q, s, z, x = (t.to(DEVICE) for t in (q, s, z, x))
    plain = loads_only(x, q, s, z, 128, w, split, unroll)
    tiled = loads_only(x, q, s, z, 128, w, split, unroll, tiled=True)
    # every word of q is loaded once either way: the xor over all lanes is the same, and it
    # is the xor of q's words with the x and qparam terms, which both share
    xor = functools.partial(functools.reduce, operator.xor)
    assert xor(plain.tolist()) == xor(tiled.tolist())
    assert not torch.equal(plain, tiled)  # yet lanes read other words
    q2 = q.clone()
    q2[5, 17] ^= 0x40  # one bit of one code byte
    assert xor(loads_only(x, q2, s, z, 128, w, split, unroll, tiled=True).tolist()) != xor(tiled.tolist())


@pytest.mark.parametrize("w,split", [(2, 2), (1, 4)])
def test_adjacent_block_order_loads_every_word_once(w, split):
    """The ADJ block order (a warp's two blocks adjacent, as ``gemv_tile`` runs it) loads each
    code word once, like the strided order: the xor over all lanes agrees, lanes read other
    words than in the strided order, and a changed byte in the last block changes the xor.
    K = 7 blocks: the last pair has one block in range and one masked, and some (split, warp)
    pairs find no block."""
    g = torch.Generator().manual_seed(7 * w + split)
    k, n = 7 * 128, 32
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    s = torch.rand(n, k // 128, generator=g).to(torch.bfloat16)
    z = torch.rand(n, k // 128, generator=g).to(torch.bfloat16)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    q, s, z, x = (t.to(DEVICE) for t in (q, s, z, x))
    xor = functools.partial(functools.reduce, operator.xor)
    strided_lanes = loads_only(x, q, s, z, 128, w, split, 2)
    adjacent_lanes = loads_only(x, q, s, z, 128, w, split, 2, adj=True)
    assert not torch.equal(strided_lanes, adjacent_lanes)  # the ADJ switch changes who reads what
    strided, adjacent = xor(strided_lanes.tolist()), xor(adjacent_lanes.tolist())
    assert adjacent == strided
    q2 = q.clone()
    q2[31, k // 2 - 1] ^= 0x01
    assert xor(loads_only(x, q2, s, z, 128, w, split, 2, adj=True).tolist()) != adjacent
