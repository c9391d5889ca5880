"""The CPU int4 layout (pure-torch packing) agrees with aten's own packer."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.ops import cpu

LAYOUT = cpu.int4_cpu_layout()
needs_layout = pytest.mark.skipif(LAYOUT is None, reason="aten has no int4 CPU kernel here")


@given(
    layout=st.sampled_from(list(cpu.INT4_CPU_LAYOUTS)),
    nb=st.integers(1, 12),
    kb=st.integers(1, 8),
    seed=st.integers(0, 999),
)
def test_every_layout_round_trips(layout, nb, kb, seed):
    n, k = nb * 16, kb * 32
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = cpu.int4_cpu_pack(q, layout)
    assert packed.shape == (n, k // 2)
    assert torch.equal(cpu.int4_cpu_unpack(packed, layout), q)


@needs_layout
@given(nb=st.integers(1, 12), kb=st.integers(1, 8), seed=st.integers(0, 999))
def test_pack_matches_aten(nb, kb, seed):
    n, k = nb * 16, kb * 32
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(seed))
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).view(torch.uint8).reshape(n, k // 2)
    assert torch.equal(cpu.int4_cpu_pack(q.to(torch.uint8), LAYOUT), expected)
