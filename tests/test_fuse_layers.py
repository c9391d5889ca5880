"""lowbit.fuse_layers (``fuse_projections_(norms=True)``, off by default): a Llama decoder layer's residual adds
and RMSNorms computed by its o_proj / down_proj launches.

On the CPU the int4 weight's ``linear_add_rmsnorm`` is the reference's composition (the CUDA
kernel's definition, tests/ops/test_triton_norm.py), so a fused model's logits equal the unfused
model's bitwise: the same roundings in the same order. Each test also counts the fused calls, so a
silent fallback to the layer's own forward fails it."""

from __future__ import annotations

import copy

import pytest
import torch
from test_fuse import IDS, IDS1, int4_llama
from torch import nn

import lowbit
from lowbit import fuse as fuse_mod
from lowbit import fuse_layers as fl
from lowbit.qtensor.linear import linear_add_rmsnorm


@pytest.fixture(autouse=True)
def _kernel_here(monkeypatch):
    """Int4Tensor says its fused kernel serves up to 8 tokens (on the CPU: the reference's
    composition), and counts the calls; compiled forwards take the weights as they are."""
    calls = []

    def spy(x, *args):
        calls.append(x.numel() // x.shape[-1])
        return linear_add_rmsnorm(x, *args)

    monkeypatch.setattr(lowbit.Int4Tensor, "add_rmsnorm_max_tokens", lambda self: 8)
    monkeypatch.setattr(fuse_mod, "linear_add_rmsnorm", spy)
    monkeypatch.setattr(fuse_mod, "REBUILD_IN_GRAPH", False)
    torch._dynamo.reset()
    return calls


def _channels_empty():
    return not (fuse_mod._PENDING or fuse_mod._RESULT or fl._PRENORMED)


def test_fused_layers_give_the_unfused_logits(_kernel_here):
    """Both layers fused and linked: o_proj and down_proj of layer 0, o_proj of layer 1 run the
    fused call (the last layer's down_proj has no next layer: the model's final norm is its own),
    layer 1's input_layernorm is not called (layer 0's down_proj normalised for it), and the
    logits are the unfused model's bitwise, eager; 14 tokens run the layers' own forwards."""
    plain, fused = int4_llama(layers=3), int4_llama(layers=3)
    names = lowbit.fuse_projections_(fused, swiglu=False, norms=True)
    assert names[-3:] == [f"model.layers.{i}: residual + RMSNorm" for i in range(3)]
    assert type(fused.model.layers[0]).__name__ == "LlamaDecoderLayer"
    assert len(_kernel_here) == 6  # fusing checked each layer's fused forward (o_proj, down_proj) on two tokens
    _kernel_here.clear()
    norm_calls = []
    fused.model.layers[1].input_layernorm.register_forward_pre_hook(lambda *a: norm_calls.append(1))
    with torch.no_grad():
        assert torch.equal(fused(IDS1).logits, plain(IDS1).logits)
        # the hook on layer 1's input norm made layer 1 run its own forward (hooks are honoured)
        assert norm_calls == [1] and len(_kernel_here) == 3  # layer 0: o, down; layer 2: o
        fused.model.layers[1].input_layernorm._forward_pre_hooks.clear()
        _kernel_here.clear()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        want, norms, real = plain(IDS1).logits, [], LlamaRMSNorm.forward
        LlamaRMSNorm.forward = lambda self, x: norms.append(1) or real(self, x)
        try:
            assert torch.equal(fused(IDS1).logits, want)
        finally:
            LlamaRMSNorm.forward = real
        assert _kernel_here == [2] * 5 and _channels_empty()  # 3 layers x (o, down) but the last down
        # the norms computed by a norm module: layer 0's input norm and the model's final norm (the
        # others came from o_proj / down_proj, handed to the next layer with its input)
        assert len(norms) == 2
        _kernel_here.clear()
        assert torch.equal(fused(IDS).logits, plain(IDS).logits) and _kernel_here == []


def test_compiled_fused_layers_match_the_compiled_unfused_model(_kernel_here):
    """fullgraph compile (no graph break in the side channels); Inductor sums the norms' means in
    its own order, so compiled against compiled agree to rounding."""
    plain, fused = int4_llama(), int4_llama()
    lowbit.fuse_projections_(fused, norms=True)
    _kernel_here.clear()
    with torch.no_grad():
        want = torch.compile(plain, fullgraph=True)(IDS1).logits.float()
        got = torch.compile(fused, fullgraph=True)(IDS1).logits.float()
    assert len(_kernel_here) == 3 and _channels_empty()
    assert (got - want).abs().max() <= 1e-2 * want.abs().max(), (got - want).abs().max()


def test_fused_layers_fall_back_where_the_checks_fail(_kernel_here):
    """The layer's own forward (no fused call), with the unfused logits, for: an input that needs a
    gradient, a hooked o_proj, an o_proj wrapped by another module (an adapter), a swapped norm;
    after ``.to()`` unfuses the singles. Copies are the plain class."""
    plain, fused = int4_llama(), int4_llama()
    lowbit.fuse_projections_(fused, norms=True)
    _kernel_here.clear()
    layer = fused.model.layers[0]
    x = torch.randn(1, 1, 128, dtype=torch.bfloat16, requires_grad=True)
    pe = (torch.ones(1, 1, 32, dtype=torch.bfloat16), torch.zeros(1, 1, 32, dtype=torch.bfloat16))
    want = plain.model.layers[0](x, position_embeddings=pe, attention_mask=None)
    assert torch.equal(layer(x, position_embeddings=pe, attention_mask=None), want) and _kernel_here == []

    def check(model, n_calls):
        _kernel_here.clear()
        with torch.no_grad():
            assert torch.equal(model(IDS1).logits, plain(IDS1).logits)
        assert len(_kernel_here) == n_calls and _channels_empty()

    h = layer.self_attn.o_proj.register_forward_hook(lambda *a: None)
    check(fused, 1)  # layer 0 on its own forward, then layer 1's o_proj (its input norm: its own)
    h.remove()
    check(fused, 3)  # o_proj, down_proj of layer 0 (which normalises for layer 1), o_proj of layer 1

    class Wrapper(nn.Module):  # an adapter around the fused single: it must not see the residual
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 2

    for model in (plain, fused):
        model.model.layers[0].self_attn.o_proj = Wrapper(model.model.layers[0].self_attn.o_proj)
    check(fused, 1)
    for model in (plain, fused):
        model.model.layers[0].self_attn.o_proj = model.model.layers[0].self_attn.o_proj.inner
    norm = layer.post_attention_layernorm
    layer.post_attention_layernorm = copy.deepcopy(norm)  # another module: the layer's own forward
    check(fused, 1)
    layer.post_attention_layernorm = norm
    check(fused, 3)
    o1 = fused.model.layers[1].self_attn.o_proj
    o1.weight = nn.Parameter(o1.weight.detach().clone(), requires_grad=False)  # a new weight unfuses the single
    check(fused, 2)  # layer 1 drops what layer 0's down_proj normalised for it and runs its own forward
    twin = copy.deepcopy(fused)
    assert type(twin.model.layers[0]).__module__ == "transformers.models.llama.modeling_llama"
    assert not hasattr(twin.model.layers[0], "_lowbit_layer_id")


def test_layers_of_another_structure_are_left_alone(_kernel_here):
    """A layer whose forward is not the pre-norm pattern (here: no residual around the MLP) or whose
    norm is Gemma's ``(1 + weight)`` keeps its class and forward; 8-bit formats (no kernel) too."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

    class NoMlpResidual(LlamaDecoderLayer):
        def forward(self, hidden_states, **kwargs):
            residual = hidden_states
            h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
            h = residual + h
            return self.mlp(self.post_attention_layernorm(h))

    class OnePlus(LlamaRMSNorm):
        def forward(self, x):
            return super().forward(x) * (1 + self.weight) / self.weight

    model = int4_llama()
    model.model.layers[0].__class__ = NoMlpResidual
    model.model.layers[1].post_attention_layernorm.__class__ = OnePlus
    names = lowbit.fuse_projections_(model, norms=True)
    assert not any("RMSNorm" in n for n in names)
    assert type(model.model.layers[0]) is NoMlpResidual and not hasattr(model.model.layers[1], "_lowbit_layer_id")
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear  # its single was undone
    from test_fuse import tiny_llama

    assert not any("RMSNorm" in n for n in lowbit.fuse_projections_(tiny_llama("int8"), norms=True))


def test_linear_add_rmsnorm_checks_its_inputs():
    w = lowbit.Int4Tensor.from_float(torch.randn(32, 64).bfloat16(), group_size=32, packing="plain")
    x, res, nw = torch.randn(3, 64).bfloat16(), torch.randn(3, 32).bfloat16(), torch.ones(32).bfloat16()
    h, y = linear_add_rmsnorm(x[None], w, res[None], nw, 1e-5)
    assert h.shape == y.shape == (1, 3, 32)
    with pytest.raises(ValueError, match=r"residual \(3, 31\) and norm_weight \(32,\).*want residual \(3, 32\)"):
        linear_add_rmsnorm(x, w, res[:, :31], nw, 1e-5)
    with pytest.raises(TypeError, match="norm_weight torch.float32 must be x's dtype"):
        linear_add_rmsnorm(x, w, res, nw.float(), 1e-5)
    with pytest.raises(RuntimeError, match="for inference"):
        linear_add_rmsnorm(x.requires_grad_(), w, res, nw, 1e-5)


def test_an_exception_inside_the_layer_leaves_no_request_behind(_kernel_here):
    """An error raised inside the attention after o_proj took the layer's request (here an instance
    forward that raises after the attention's own) leaves no request or result in the side
    channels: the next calls, fused or on the layers' own forwards, give the unfused numbers."""
    plain, fused = int4_llama(), int4_llama()
    lowbit.fuse_projections_(fused, norms=True)
    attn = fused.model.layers[0].self_attn
    real = type(attn).forward

    def boom(self, *args, **kwargs):
        real(self, *args, **kwargs)  # (o_proj takes the request and returns h)
        raise KeyboardInterrupt

    attn.forward = boom.__get__(attn)
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        fused(IDS1)
    del attn.forward
    assert _channels_empty()
    with torch.no_grad():
        assert torch.equal(fused(IDS1).logits, plain(IDS1).logits)
        assert torch.equal(fused(IDS).logits, plain(IDS).logits)  # 14 tokens: the layers' own forwards
        h = fused.model.layers[0].register_forward_hook(lambda *a: None)
        assert torch.equal(fused(IDS1).logits, plain(IDS1).logits)
        h.remove()
    assert _channels_empty()


def test_layers_whose_modules_change_the_fused_output_are_not_fused(_kernel_here):
    """An MLP that scales down_proj's output, or a bias-free LayerNorm as a layer's norm (equal to
    an RMSNorm on rows of mean zero): checked when fusing, the layer keeps its own forward."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    class HalfMlp(LlamaMLP):
        def forward(self, x):
            return super().forward(x) * 0.5

    model = int4_llama()
    model.model.layers[0].mlp.__class__ = HalfMlp
    ln = nn.LayerNorm(128, bias=False, dtype=torch.bfloat16)
    ln.variance_epsilon = 1e-5
    model.model.layers[1].post_attention_layernorm = ln
    names = lowbit.fuse_projections_(model, norms=True)
    assert not any("RMSNorm" in n for n in names), names
    with torch.no_grad():
        model(IDS1)  # (runs: no request left unanswered)


def test_a_handed_norm_is_not_used_once_its_input_changed_in_place(_kernel_here):
    """The norm a layer hands the next one with its output is used only while that output is
    unchanged: written in place in between (a model's own code, say), the next layer normalises
    it again (eager: its version counter)."""
    fused = int4_llama(layers=2)
    lowbit.fuse_projections_(fused, swiglu=False, norms=True)
    layer = fused.model.layers[1]
    h0 = torch.randn(1, 2, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    pe = fused.model.rotary_emb(h0, torch.arange(2)[None])
    with torch.no_grad():
        want = layer(h0 + 1, position_embeddings=pe)
        h = h0.clone()
        fl._PRENORMED[layer._lowbit_layer_id] = (h, layer.input_layernorm(h), h._version)  # as handed
        h.add_(1)  # (in place, after the hand-over; RMSNorm would not see a scaling)
        got = layer(h, position_embeddings=pe)
    assert _kernel_here and _channels_empty()  # (the fused forward ran)
    assert torch.equal(got, want)


def test_a_norm_swapped_for_another_kind_at_the_freed_ones_address_is_not_taken_for_it(_kernel_here, monkeypatch):
    """The layer checks its norms by id(); a module made after the old one is freed often gets its
    address (so its id) in CPython. A LayerNorm put in post_attention_layernorm's place that way
    must make the layer run its own forward, not RMSNorm with the LayerNorm's weight."""
    import builtins

    plain, fused = int4_llama(layers=2), int4_llama(layers=2)
    lowbit.fuse_projections_(fused, swiglu=False, norms=True)
    old = id(fused.model.layers[0].post_attention_layernorm)
    fused.model.layers[0].post_attention_layernorm = None  # (the old norm is freed here)
    made = [nn.LayerNorm(128) for _ in range(64)]  # (kept alive: the freed address often goes to one)
    ln = next((m for m in made if id(m) == old), None)
    if ln is None:  # not this time: the same collision, by the id the layer's check sees
        ln = made[0]
        monkeypatch.setattr(fl, "id", lambda o: old if o is ln else builtins.id(o), raising=False)
    with torch.no_grad():
        ln.to(torch.bfloat16).weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(5))
    fused.model.layers[0].post_attention_layernorm = ln
    plain.model.layers[0].post_attention_layernorm = copy.deepcopy(ln)
    _kernel_here.clear()
    with torch.no_grad():
        assert torch.equal(fused(IDS1).logits, plain(IDS1).logits)
    assert len(_kernel_here) == 1  # (layer 1's o_proj; layer 0 ran its own forward)
