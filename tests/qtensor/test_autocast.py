"""Quantized linears under ``torch.autocast`` behave as ``F.linear`` does there: the input and the
bias are cast to the autocast dtype and the output has it. The reference is the same linear
called outside autocast on explicitly cast operands (which the previous code, returning fp32,
failed), and the gradient reaches an fp32 input in fp32."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit

CONFIGS = {
    "int4": lambda: lowbit.int4_weight_only(group_size=32),
    "int8": lowbit.int8_weight_only,
    "w8a8": lowbit.int8_dynamic_activation_int8_weight,
    "fp8": lowbit.float8_dynamic_activation_float8_weight,
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _layer(scheme, weight_dtype, device, bias=True, n=48, k=64, seed=0):
    torch.manual_seed(seed)
    m = nn.Linear(k, n, bias=bias).to(device, weight_dtype)
    lowbit.quantize_(m, CONFIGS[scheme]())
    return m


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", sorted(CONFIGS))
@settings(max_examples=6, deadline=None)
@given(
    weight_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    cast_to=st.sampled_from([torch.bfloat16, torch.float16]),
    rows=st.integers(1, 9),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_autocast_casts_the_input_and_bias_as_f_linear_does(device, scheme, weight_dtype, cast_to, rows, bias, seed):
    m = _layer(scheme, weight_dtype, device, bias, seed=seed)
    x = torch.randn(rows, 64, device=device, generator=torch.Generator(device).manual_seed(seed))
    with torch.autocast(device, dtype=cast_to):
        got = m(x)
        assert torch.is_autocast_enabled(device)  # (left as it was)
    want = nn.functional.linear(x.to(cast_to), m.weight, None if m.bias is None else m.bias.to(cast_to))
    assert got.dtype == cast_to
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_gradients_reach_a_float32_input(device):
    m = _layer("int4", torch.float32, device)
    x = torch.randn(3, 5, 64, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = m(x)
    y.float().square().sum().backward()
    # d/dx sum(y^2) = 2 y @ W, with y and W as the autocast linear used them (bf16)
    w = m.weight.dequantize(torch.bfloat16)
    want = (2 * y.detach() @ w).float()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, want, rtol=2e-2, atol=2e-2)


def test_autocast_compiles_fullgraph():
    m = _layer("int8", torch.float32, "cpu")
    x = torch.randn(4, 64)

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, f(x), rtol=0, atol=0)


def test_float64_inputs_are_not_cast_under_autocast():
    """F.linear under autocast leaves float64 alone; a quantized linear, which takes no float64
    input, refuses it as it does outside autocast (it was silently computed in bf16)."""
    m = _layer("int8", torch.float32, "cpu")
    x = torch.randn(2, 64, dtype=torch.float64)
    for ctx in (torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad()):
        with ctx, pytest.raises(TypeError, match="activation dtype torch.float64 is not supported"):
            m(x)
