"""torch.compile(fullgraph=True) over quantized weights: no graph break, same output."""

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
