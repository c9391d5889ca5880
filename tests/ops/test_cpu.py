"""The CPU int4 layout (pure-torch packing) agrees with aten's own packer."""

import pytest
import torch
from hypothesis import given, settings
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
    bad=st.sampled_from([None, float("nan"), float("inf"), -float("inf")]),
    seed=st.integers(0, 999),
)
def test_int8_rows_as_float_is_the_reference_quantizer(m, k, dtype, zero_row, bad, seed):
    """The CPU W8A8 fast path's activation quantizer gives the reference's codes and scales
    bit for bit, also for a row holding a NaN or an infinity (NaN scale, zero codes)."""
    from lowbit.ops import reference as ref

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-6, 3, m)[:, None]).to(dtype)
    if zero_row:
        x[0] = 0
    if bad is not None:
        x[m - 1, seed % k] = bad
    codes, xs = cpu.int8_rows_as_float(x)
    want_q, want_s = ref.int8_quantize_rows(x)
    assert torch.equal(xs.isnan(), want_s.isnan()) and (bad is not None) == bool(xs[m - 1].isnan())
    assert torch.equal(xs.nan_to_num(), want_s.nan_to_num())
    assert torch.equal(codes.to(torch.int8), want_q) and torch.equal(codes, want_q.float())


@settings(max_examples=60)
@given(
    m=st.integers(1, 9),
    k=st.integers(1, 140),
    n=st.sampled_from([1, 5, 16, 33]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    seed=st.integers(0, 999),
)
def test_int8_cpu_kernels_any_k(m, k, n, dtype, seed):
    """W8A16 and W8A8 on the CPU backend match the reference for every K: aten's bf16 int8
    kernel reads past rows whose K is not a multiple of 8 (wrong results, or a segfault
    that ends this process), so those shapes must take the fp32 kernel."""
    from lowbit.ops import reference as ref

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g).to(dtype)
    tol = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    s_wo = ref.int8_choose_qparams(w, dtype)
    q_wo = ref.int8_quantize(w, s_wo)
    want = ref.int8_weight_only_linear(x, q_wo, s_wo).double()
    assert float((cpu.int8_mm(x, q_wo, s_wo).double() - want).norm() / want.norm().clamp_min(1e-30)) < tol
    s_dyn = ref.int8_choose_qparams(w, torch.float32)
    q_dyn = ref.int8_quantize(w, s_dyn)
    want = ref.int8_dynamic_linear(x, q_dyn, s_dyn).double()
    got = cpu.int8_dyn_mm(x, q_dyn, s_dyn).double()
    assert float((got - want).norm() / want.norm().clamp_min(1e-30)) < max(tol, 1e-2 if dtype != torch.float32 else tol)
