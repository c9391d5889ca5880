"""torch.compile(fullgraph=True) over quantized weights: no graph break, same output."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit


class Block(nn.Module):
    """A small pre-norm Transformer block: attention + MLP."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


CONFIGS = {
    "int4": lowbit.int4_weight_only(group_size=32),
    "int8": lowbit.int8_weight_only(),
    "w8a8": lowbit.int8_dynamic_activation_int8_weight(),
}


@pytest.mark.parametrize("name,backend", [("int4", "cpu"), ("int8", "cpu"), ("w8a8", "cpu"), ("int4", "reference")])
def test_fullgraph_compile_matches_eager_and_recompiles_at_most_once(name, backend):
    torch._dynamo.reset()
    model = Block().to(torch.bfloat16)
    lowbit.quantize_(model, CONFIGS[name])
    assert len(model.lowbit_report.quantized) == 4
    counts = {"frames": 0}

    def counting_backend(gm, example_inputs):
        counts["frames"] += 1
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=counting_backend)
    with torch.no_grad(), lowbit.use_backend(backend):
        for batch in (1, 2, 3, 8, 17):
            x = torch.randn(batch, 5, 64, dtype=torch.bfloat16)
            torch._dynamo.mark_dynamic(x, 0)
            eager = model(x)
            out = compiled(x)
            torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)
    assert counts["frames"] <= 2, f"compiled {counts['frames']} graphs for 5 batch sizes"


def _key(w):
    return w._stable_hash_for_caching()


@pytest.mark.parametrize("name", ["int4", "int8", "w8a8"])
def test_compile_cache_key_is_metadata_only_and_stable_across_processes(name):
    """AOT autograd's cache key for a quantized weight: same format/shape/attrs -> same key, values ignored."""
    import os
    import subprocess
    import sys

    def quantized(n, k, seed, config=CONFIGS[name], dtype=torch.bfloat16):
        torch.manual_seed(seed)
        m = nn.Linear(k, n, bias=False).to(dtype)
        lowbit.quantize_(m, config)
        return m.weight

    a, b = quantized(64, 128, 0), quantized(64, 128, 1)
    assert not torch.equal(a.dequantize(), b.dequantize())
    assert _key(a) == _key(b)
    assert _key(quantized(32, 128, 0)) != _key(a)
    assert _key(quantized(64, 128, 0, dtype=torch.float16)) != _key(a)
    if name == "int4":
        assert _key(quantized(64, 128, 0, config=lowbit.int4_weight_only(group_size=64))) != _key(a)
    script = (
        "import torch, lowbit; from lowbit.config import *; from torch import nn; torch.manual_seed(5); "
        f"m = nn.Linear(128, 64, bias=False).to(torch.bfloat16); lowbit.quantize_(m, {CONFIGS[name]!r}); "
        "print(m.weight._stable_hash_for_caching())"
    )
    other = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert other.stdout.strip().splitlines()[-1] == _key(a)


def test_compile_does_not_warn_about_cache_hashing():
    import warnings

    torch._dynamo.reset()
    model = Block().to(torch.bfloat16)
    lowbit.quantize_(model, CONFIGS["int8"])
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.compile(model, fullgraph=True)(torch.randn(2, 5, 64, dtype=torch.bfloat16))
    assert not [w for w in caught if "_stable_hash_for_caching" in str(w.message)]


def test_kernel_op_on_a_tensor_that_requires_grad_raises():
    """The raw kernel ops have no gradient: a call that would need one fails loudly, F.linear works."""
    from lowbit.ops import cpu

    w = lowbit.Int8Tensor.from_float(torch.randn(32, 64))
    x = torch.randn(2, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="has no gradient"):
        cpu.int8_mm(x, w.qdata, w.scale)
    with torch.no_grad():
        torch.testing.assert_close(cpu.int8_mm(x, w.qdata, w.scale), F.linear(x, w.dequantize()), rtol=1e-2, atol=1e-2)
    F.linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.dequantize().sum(0).expand(2, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
)
@pytest.mark.parametrize("name", ["int4", "int8", "w8a8"])
def test_compile_with_inductor_freezing_keeps_the_quantized_kernel(name, device):
    """Freezing (weights as graph constants) gives eager's output and still calls lowbit's kernel
    op: constant folding does not turn a quantized weight into a dense one."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Block().to(device, torch.bfloat16)
    lowbit.quantize_(model, CONFIGS[name])
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16, device=device)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        eager = model(x)
        out, codes = run_and_get_code(torch.compile(model, fullgraph=True), x)
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)
    calls = re.findall(r"= torch\.ops\.lowbit\.\w+\.default\((.*)\)", "\n".join(codes))
    # one kernel call per quantized linear takes its weight, as constants (none made dense)
    assert len([args for args in calls if "_frozen_param" in args]) == 4, calls
