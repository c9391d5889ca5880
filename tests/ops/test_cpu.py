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


@given(
    m=st.integers(1, 9),
    k=st.integers(1, 300),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    zero_row=st.booleans(),
    seed=st.integers(0, 999),
)
def test_int8_rows_as_float_is_the_reference_quantizer(m, k, dtype, zero_row, seed):
    """The CPU W8A8 fast path's activation quantizer gives the reference's codes and scales bit for bit."""
    from lowbit.ops import reference as ref

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-6, 3, m)[:, None]).to(dtype)
    if zero_row:
        x[0] = 0
    codes, xs = cpu.int8_rows_as_float(x)
    want_q, want_s = ref.int8_quantize_rows(x)
    assert torch.equal(xs, want_s)
    assert torch.equal(codes.to(torch.int8), want_q) and torch.equal(codes, want_q.float())
