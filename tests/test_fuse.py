"""lowbit.fuse_projections_: sibling projections as one matmul over their row-stacked weight.

Every result is checked against the same model unfused (bitwise: each output column comes from
its own row of the weight whichever matmul computes it) or against F.linear on the dequantized
weight."""

from __future__ import annotations

import copy
import gc
import io
import types
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import fuse as fuse_mod
from lowbit.safetensors import flatten_state_dict, load_file, save_file


def tiny_llama(scheme: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()
    configs = {"int8": lowbit.int8_weight_only, "w8a8": lowbit.int8_dynamic_activation_int8_weight}
    lowbit.quantize_(model, configs[scheme]())
    return model


IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _subclass_inputs(monkeypatch):
    """Every test sees one torch's behaviour: compiled forwards take the lowbit weights as they are
    and ``singles`` is off by default (torch 2.11 would rebuild them from plain fields); the
    tests of the rebuild path turn it on. Dynamo's caches start empty (the models of earlier tests
    share their code objects: fullgraph compiles would reach the recompile limit)."""
    monkeypatch.setattr(fuse_mod, "REBUILD_IN_GRAPH", False)
    torch._dynamo.reset()


class Siblings(nn.Module):
    """q / k / v over one input, int4 "plain" weights (row slices are views) of different heights."""

    def __init__(self, rows=(48, 16, 32), k=128, bias=False):
        super().__init__()
        g = torch.Generator().manual_seed(sum(rows))
        for name, n in zip(("q_proj", "k_proj", "v_proj"), rows):
            lin = nn.Linear(k, n, bias=bias, dtype=torch.bfloat16)
            w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
            lin.weight = nn.Parameter(lowbit.Int4Tensor.from_float(w, group_size=32, packing="plain"), False)
            if bias:
                lin.bias = nn.Parameter(torch.randn(n, generator=g).to(torch.bfloat16), False)
            setattr(self, name, lin)

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


@pytest.mark.parametrize("scheme", ["int8", "w8a8"])
def test_fused_llama_gives_the_unfused_logits_eager_and_compiled(scheme):
    plain, fused = tiny_llama(scheme), tiny_llama(scheme)
    names = lowbit.fuse_projections_(fused, swiglu=False)
    assert names == [
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.{q_proj,k_proj,v_proj}", "mlp.{gate_proj,up_proj}")
    ]
    with torch.no_grad():
        assert torch.equal(fused(IDS).logits, plain(IDS).logits)
        got = torch.compile(fused, fullgraph=True)(IDS).logits  # no graph break in the members
        assert torch.equal(got, torch.compile(plain, fullgraph=True)(IDS).logits)
    # compiled, the members' weights are no graph inputs (torch.compile unwraps each input weight on
    # every call): the 4 group stacks, o_proj and down_proj of 2 layers and the head, against 15
    inputs = {}
    for name, m in (("plain", plain), ("fused", fused)):
        torch._dynamo.reset()
        backend = lambda gm, args, name=name: inputs.setdefault(name, args) and gm.forward  # noqa: E731
        with torch.no_grad():
            torch.compile(m, backend=backend, fullgraph=True)(IDS)
    qtensors = {k: sum(isinstance(a, lowbit.QTensor) for a in v) for k, v in inputs.items()}
    assert qtensors == {"plain": 15, "fused": 9}, qtensors
    attn = fused.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (128, 128) and attn.k_proj.weight.shape == (64, 128)
    assert isinstance(attn.q_proj, nn.Linear) and type(attn.o_proj) is nn.Linear
    # no memory added: the members' fields are rows of the group's stacked weight
    stack = fuse_mod._GROUPS[attn.q_proj._lowbit_gid].weight
    assert stack.shape == (256, 128)
    for m in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert m.weight.qdata.untyped_storage().data_ptr() == stack.qdata.untyped_storage().data_ptr()
    # the state dict keeps its keys and values
    sd_plain, sd_fused = plain.state_dict(), fused.state_dict()
    assert list(sd_fused) == list(sd_plain)
    assert all(
        torch.equal(sd_fused[k].dequantize(), v.dequantize()) for k, v in sd_plain.items() if hasattr(v, "dequantize")
    )


def _counting(monkeypatch, calls):
    """fuse.py's F.linear, counting the weight shapes it is called with (its calls only)."""
    linear = F.linear
    monkeypatch.setattr(
        fuse_mod, "F", types.SimpleNamespace(linear=lambda *a: calls.append(tuple(a[1].shape)) or linear(*a))
    )


def _x(seed, m=5):
    return torch.randn(m, 128, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_one_matmul_per_group_and_inputs_are_not_mixed(monkeypatch):
    plain, fused = Siblings(bias=True), Siblings(bias=True)
    assert lowbit.fuse_projections_(fused) == ["<root>.{q_proj,k_proj,v_proj}"]
    x, x2 = _x(2), _x(3)
    gid, calls = fused.q_proj._lowbit_gid, []
    _counting(monkeypatch, calls)
    with torch.no_grad():
        got = fused(x)
        assert calls == [(96, 128)]  # the group's one matmul
        assert all(torch.equal(a, b) for a, b in zip(got, plain(x)))
        assert gid not in fuse_mod._MEMO  # the last member let go
        # members called with different inputs: each gets its columns for its own input
        calls.clear()
        assert torch.equal(fused.q_proj(x), plain.q_proj(x)) and torch.equal(fused.k_proj(x2), plain.k_proj(x2))
        assert torch.equal(fused.v_proj(x2), plain.v_proj(x2))  # (reuses k's matmul of x2)
        assert (
            calls == [(96, 128)] * 2 and fuse_mod._MEMO[gid][0] is x2
        )  # (outside their parent: held until a round ends)
        fused(x)
        assert gid not in fuse_mod._MEMO  # the parent's forward hook drops it
        ref = F.linear(x.float(), plain.v_proj.weight.dequantize().float(), plain.v_proj.bias.float())
        assert (fused.v_proj(x).float() - ref).abs().max() < 0.05
        # an input changed in place between two members' calls (eagerly: its version counter)
        y = x.clone()
        assert torch.equal(fused.q_proj(y), plain.q_proj(x))
        y.mul_(2)
        assert torch.equal(fused.k_proj(y), plain.k_proj(2 * x)) and torch.equal(fused.q_proj(y), plain.q_proj(2 * x))
        # a member called again on the same input (a cross-attention step that skips k / v) recomputes
        z = x.clone()
        assert torch.equal(fused.q_proj(z), plain.q_proj(x))
        calls.clear()
        assert torch.equal(fused.q_proj(z), plain.q_proj(x)) and calls == [(96, 128)]
    # training: an input that needs a gradient runs each member alone (the unfused graph)
    calls.clear()
    xg = x.clone().requires_grad_()
    outs = fused(xg)
    assert calls == [(48, 128), (16, 128), (32, 128)]
    assert all(torch.equal(a, b) for a, b in zip(outs, plain(x)))
    fused.k_proj.bias = nn.Parameter(fused.k_proj.bias.float(), False)
    with torch.no_grad(), pytest.raises(TypeError, match="bias is torch.float32, the output torch.bfloat16"):
        fused(x)
    assert gid not in fuse_mod._MEMO  # (k raised after q opened a round: the hook runs anyway)


def test_fusing_in_a_llama_drops_the_memo_after_each_layer():
    fused = tiny_llama("int8")
    lowbit.fuse_projections_(fused)
    with torch.no_grad():
        fused(IDS)
    gids = {m._lowbit_gid for m in fused.modules() if isinstance(m, fuse_mod.FusedLinear)}
    assert len(gids) == 4 and not gids & fuse_mod._MEMO.keys()


def _other_weights(m):
    """m's q / k / v with new values (one generator, so no two rows repeat another's)."""
    g = torch.Generator().manual_seed(9)
    for lin in (m.q_proj, m.k_proj, m.v_proj):
        w = torch.randn(lin.weight.shape, generator=g).to(torch.bfloat16) * 0.05
        lin.weight = nn.Parameter(lowbit.Int4Tensor.from_float(w, group_size=32, packing="plain"), False)
    return m


def _pickled(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_copies_and_pickles_are_plain_independent_modules():
    a, b, fused = Siblings(), _other_weights(Siblings()), Siblings()
    lowbit.fuse_projections_(fused)
    # (a pickled int4 weight loads in this machine's CPU packing: compare with pickled references)
    cases = (("deepcopy", copy.deepcopy(fused), a, b), ("pickle", _pickled(fused), _pickled(a), _pickled(b)))
    x = _x(14, 3)
    for how, copied, want_a, want_b in cases:
        members = (copied.q_proj, copied.k_proj, copied.v_proj)
        assert [type(m) for m in members] == [nn.Linear] * 3, how
        assert not any(k.startswith("_lowbit") for m in members for k in vars(m)), how
        with torch.no_grad():
            assert all(torch.equal(p, q) for p, q in zip(copied(x), want_a(x))), how
            copied.load_state_dict(b.state_dict())  # the copy's weights are its own
            assert all(torch.equal(p, q) for p, q in zip(copied(x), want_b(x))), how
            assert all(torch.equal(p, q) for p, q in zip(fused(x), a(x))), how
    copied = cases[0][1]
    for _ in range(2):  # (fused, copied, fused again: one hook, of the live group)
        assert lowbit.fuse_projections_(copied) == ["<root>.{q_proj,k_proj,v_proj}"]
        copied = copy.deepcopy(copied)
    assert lowbit.fuse_projections_(copied) == ["<root>.{q_proj,k_proj,v_proj}"]
    assert len(copied._forward_hooks) == 1 and len(fused._forward_hooks) == 1
    with torch.no_grad():
        assert all(torch.equal(p, q) for p, q in zip(copied(x), b(x)))


def test_a_fused_model_is_freed_with_its_group():
    m = Siblings()
    lowbit.fuse_projections_(m)
    m.k_proj.register_forward_hook(lambda *_, m=m: None)  # a member that refers back to the model
    gid, member = m.q_proj._lowbit_gid, weakref.ref(m.q_proj)
    assert gid in fuse_mod._GROUPS
    del m
    gc.collect()
    assert member() is None and gid not in fuse_mod._GROUPS


def test_an_in_place_load_during_an_open_round_is_seen():
    a, b, fused = Siblings(), _other_weights(Siblings()), Siblings()
    lowbit.fuse_projections_(fused)
    x = _x(17, 3)
    with torch.no_grad():
        assert torch.equal(fused.q_proj(x), a.q_proj(x))  # (called alone: the round stays open)
        fused.load_state_dict(b.state_dict())
        assert torch.equal(fused.k_proj(x), b.k_proj(x)) and torch.equal(fused.v_proj(x), b.v_proj(x))


def test_a_member_of_two_groups_is_refused():
    m = nn.ModuleDict({"a": Siblings(), "b": Siblings()})
    m["b"].k_proj = m["a"].k_proj
    with pytest.raises(ValueError, match=r"a member of b\.\{q_proj,k_proj,v_proj\} is also in a\."):
        lowbit.fuse_projections_(m)
    assert type(m["a"].q_proj) is nn.Linear


def test_moves_and_assigning_loads_unfuse_the_group():
    a, b = Siblings(), _other_weights(Siblings())
    for change in ("apply", "assign"):
        fused = Siblings()
        lowbit.fuse_projections_(fused)
        if change == "apply":  # what .to(another device) does: every weight a new copy
            fused._apply(lambda t: t.clone())
            fused.load_state_dict(b.state_dict())
        else:
            fused.load_state_dict(b.state_dict(), assign=True)
        assert [type(m) for m in (fused.q_proj, fused.k_proj, fused.v_proj)] == [nn.Linear] * 3, change
        x = _x(11, 3)
        with torch.no_grad():
            assert all(torch.equal(p, q) for p, q in zip(fused(x), b(x))), change
        assert all(torch.equal(p, q) for p, q in zip(Siblings()(x), a(x)))


def test_a_fused_model_saves_and_loads_unfused(tmp_path):
    fused, plain = tiny_llama("int8"), tiny_llama("int8", seed=5)
    lowbit.fuse_projections_(fused, swiglu=False)  # (bitwise against plain: the eager MLP product)
    flat, _ = flatten_state_dict(fused.state_dict())
    ptrs = [t.untyped_storage().data_ptr() for t in flat.values()]
    assert len(set(ptrs)) == len(ptrs)  # no two saved tensors share storage (safetensors refuses that)
    with pytest.raises(ValueError, match="'a' and 'b' are one quantized tensor"):  # a tie is not saved twice
        flatten_state_dict({"a": fused.lm_head.weight, "b": fused.lm_head.weight})
    save_file(fused.state_dict(), tmp_path / "m.safetensors")
    plain.load_state_dict(load_file(tmp_path / "m.safetensors"))
    fused.save_pretrained(tmp_path / "hf")  # Transformers' own save, then a plain from_pretrained
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        want = fused(IDS).logits
        assert torch.equal(plain(IDS).logits, want) and torch.equal(loaded(IDS).logits, want)


def test_groups_that_cannot_be_fused_raise_and_stay_unchanged():
    m = Siblings()
    m.k_proj.weight = nn.Parameter(lowbit.Int8Tensor.from_float(torch.randn(16, 128).to(torch.bfloat16)), False)
    with pytest.raises(ValueError, match=r"<root>\.k_proj is .*Int8Tensor.*<root>\.q_proj is .*Int4Tensor"):
        lowbit.fuse_projections_(m)
    assert type(m.q_proj) is nn.Linear  # nothing changed
    m = Siblings()
    m.v_proj.weight = nn.Parameter(torch.randn(32, 128, dtype=torch.bfloat16), False)
    with pytest.raises(ValueError, match=r"<root>\.v_proj has a Parameter weight; quantize"):
        lowbit.fuse_projections_(m)
    two = nn.ModuleDict({"a": Siblings(), "b": Siblings()})  # the second group fails: the first stays as it was
    two["b"].k_proj.weight = nn.Parameter(torch.randn(16, 128, dtype=torch.bfloat16), False)
    with pytest.raises(ValueError, match=r"b\.k_proj has a Parameter weight"):
        lowbit.fuse_projections_(two)
    assert type(two["a"].q_proj) is nn.Linear
    sub = Siblings()  # an nn.Linear subclass (its own forward) is not a plain sibling: the group is left alone
    sub.k_proj.__class__ = type("MyLinear", (nn.Linear,), {})
    assert lowbit.fuse_projections_(sub) == [] and type(sub.q_proj) is nn.Linear
    m = Siblings()
    lowbit.fuse_projections_(m)
    with pytest.raises(ValueError, match="already fused"):
        lowbit.fuse_projections_(m)
    m = Siblings()
    for lin in (m.q_proj, m.k_proj, m.v_proj):  # a CPU packing: its rows are repacked copies, not views
        lin.weight = nn.Parameter(lin.weight.repack("cpu_scalar"), False)
    with pytest.raises(ValueError, match=r"<root>\.q_proj .*cannot be fused: rows of the 'cpu_scalar' packing"):
        lowbit.fuse_projections_(m)
    assert type(m.q_proj) is nn.Linear and m.q_proj.weight.packing == "cpu_scalar"


def _cuda_int4_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False,
    )  # fmt: skip
    m = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).cuda().eval()
    return lowbit.quantize_(m, lowbit.int4_weight_only(group_size=128))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rebuild, norms", [(False, False), (True, False), (False, True), (True, True)])
def test_fused_int4_llama_on_cuda_matches_unfused(rebuild, norms):
    """int4 on CUDA ("tiled": whole 16-row x 128-k tiles, rows are views): the fused groups' one
    kernel per group against each member's own kernel, eager and compiled with CUDA graphs. The
    kernels' configs (and so the fp32 summation order) depend on N, so the logits agree to
    rounding rather than bitwise."""
    plain, fused = _cuda_int4_llama(), _cuda_int4_llama()
    assert plain.model.layers[0].self_attn.k_proj.weight.packing == "tiled"
    fuse_mod.REBUILD_IN_GRAPH = rebuild  # (the fixture restores it)
    names = lowbit.fuse_projections_(fused, norms=norms)
    # 4 groups, 2 MLPs with silu(gate) * up, with norms 2 layers with residual + RMSNorm, o / down / head
    assert len(names) == (11 if rebuild else 6) + 2 * norms and sum(n.endswith("RMSNorm") for n in names) == 2 * norms
    compiled = torch.compile(fused, mode="reduce-overhead", fullgraph=True)
    for ids in (IDS.cuda(), IDS[:, :1].cuda(), IDS[:1, :1].cuda()):  # 14 tokens; 2 and 1: the fused tiles
        with torch.no_grad():
            want = plain(ids).logits.float()
            for run in (fused, compiled):
                for _ in range(3):  # (CUDA graphs: warm-up, record, replay)
                    got = run(ids).logits.float()
                assert (got - want).abs().max() <= 0.02 * want.abs().max(), (got - want).abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the fused kernels)")
@pytest.mark.parametrize("norms", [False, True])
def test_fused_llama_under_an_autocast_of_another_dtype_runs_as_unfused(norms, monkeypatch):
    """A bf16 int4 model under fp16 autocast: the fused MLP / layer kernels (bf16 only) must not
    serve the call; the output is what the unfused model gives under the same autocast."""
    calls = []
    for name in ("swiglu_linear", "linear_add_rmsnorm"):
        real = getattr(fuse_mod, name)
        monkeypatch.setattr(fuse_mod, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))

    plain, fused = _cuda_int4_llama(), _cuda_int4_llama()
    lowbit.fuse_projections_(fused, norms=norms)
    ids = torch.randint(0, 256, (1, 1), device="cuda")
    with torch.no_grad():
        fused(ids)
        assert "swiglu_linear" in calls and ("linear_add_rmsnorm" in calls) == norms  # (the fused paths are live)
        calls.clear()
        with torch.autocast("cuda", dtype=torch.float16):
            want, got = plain(ids).logits, fused(ids).logits
    assert not calls and got.dtype == want.dtype == torch.float16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


def _reference_mlps(model):
    """``model`` with each MLP computing down_proj(reference.swiglu([gate_proj(x), up_proj(x)])):
    the fused activation's definition, from the unfused members."""
    from lowbit.ops import reference as ref

    for layer in model.model.layers:
        mlp = layer.mlp
        mlp.forward = lambda x, mlp=mlp: mlp.down_proj(ref.swiglu(torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1)))
    return model


def int4_llama(seed: int = 0, act: str = "silu", layers: int = 2):
    """A tiny Llama in int4 with "plain" codes (row slices are views, so it fuses on the CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False, hidden_act=act,
    )  # fmt: skip
    model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()
    lowbit.quantize_(model, lowbit.int4_weight_only(group_size=64))
    for m in model.modules():
        if isinstance(m, nn.Linear) and isinstance(m.weight, lowbit.Int4Tensor):
            m.weight = nn.Parameter(m.weight.repack("plain"), requires_grad=False)
    return model


@pytest.fixture
def fused_kernel(monkeypatch):
    """Int4Tensor says its fused gate / up kernel serves up to 8 tokens: on the CPU its
    linear_swiglu is then the reference's product of its linear (the CUDA kernel's definition)."""
    monkeypatch.setattr(lowbit.Int4Tensor, "swiglu_max_tokens", lambda self: 8)


IDS1 = IDS[:, :1]  # one token per sequence: 2 tokens, which the fused kernel serves


def test_swiglu_fused_mlps_give_the_reference_product(fused_kernel):
    """With swiglu (the default) each Llama MLP of an int4 model computes silu(gate) * up in the
    fused call: eager logits equal the reference formula on the unfused model bitwise; compiled with
    fullgraph they agree with the unfused compiled model; the MLP keeps its class name (a subclass)
    and the state dict is unchanged."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    plain, fused = int4_llama(), int4_llama()
    names = lowbit.fuse_projections_(fused)
    assert names[-2:] == [f"model.layers.{i}.mlp: silu(gate_proj) * up_proj" for i in (0, 1)] and len(names) == 6
    mlp = fused.model.layers[0].mlp
    assert isinstance(mlp, LlamaMLP) and type(mlp) is not LlamaMLP and type(mlp).__name__ == "LlamaMLP"
    with torch.no_grad():
        assert torch.equal(fused(IDS1).logits, _reference_mlps(int4_llama())(IDS1).logits)
        assert torch.equal(fused(IDS).logits, plain(IDS).logits)  # 14 tokens: beyond it, its own forward
        for ids in (IDS1, IDS):
            want = torch.compile(plain, fullgraph=True)(ids).logits.float()
            got = torch.compile(fused, fullgraph=True)(ids).logits.float()
            assert (got - want).abs().max() <= 1e-2 * want.abs().max(), (got - want).abs().max()
    assert fused.state_dict().keys() == plain.state_dict().keys()


def test_swiglu_is_left_alone_where_no_kernel_serves():
    """Where the format has no fused kernel on the device (int4 on the CPU, 8-bit formats) the
    MLPs keep their class and forward: only the projections fuse."""
    plain, fused = int4_llama(), int4_llama()
    assert not any(": " in n for n in lowbit.fuse_projections_(fused))
    with torch.no_grad():
        assert torch.equal(fused(IDS).logits, plain(IDS).logits)
    int8 = tiny_llama("int8")
    assert not any(": " in n for n in lowbit.fuse_projections_(int8))
    assert type(int8.model.layers[0].mlp).__module__ == "transformers.models.llama.modeling_llama"
    assert not hasattr(int8.model.layers[0].mlp, "_lowbit_glu_gid")


@pytest.mark.parametrize("scheme", ["int4", "int8", "int4 swiglu=False"])
def test_long_eager_prompts_give_silu_contiguous_gate_and_up(scheme, fused_kernel, monkeypatch):
    """From GLU_SPLIT_MIN_TOKENS tokens the members of a fused gate_proj / up_proj group run, eagerly,
    each on its own rows of the stack: silu and the product see contiguous tensors (eager PyTorch's
    strided element-wise kernels are slower), and the logits equal the unfused model's bitwise;
    with the fused MLP forward (int4 here) or without it (int8, which has no fused kernel; swiglu
    off). Between the fused kernel's tokens and that many, the one matmul over the stack (column
    slices) stays."""
    monkeypatch.setattr(fuse_mod, "GLU_SPLIT_MIN_TOKENS", 16)
    make = (lambda: tiny_llama("int8")) if scheme == "int8" else int4_llama
    plain, fused = make(), make()
    lowbit.fuse_projections_(fused, swiglu=scheme != "int4 swiglu=False")
    seen, real = [], F.silu
    monkeypatch.setattr(F, "silu", lambda t, inplace=False: seen.append(t.is_contiguous()) or real(t, inplace))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))  # 18 tokens
    with torch.no_grad():
        for want_contiguous, batch in ((True, ids), (False, ids[:, :6])):  # 18 tokens, then 12
            seen.clear()
            got = fused(batch).logits
            assert seen == [want_contiguous] * 2, seen  # (two layers)
            assert torch.equal(got, plain(batch).logits)
        gate = fused.model.layers[0].mlp.gate_proj  # an instance forward on a member: the module's own forward
        calls = []
        gate.forward = lambda x, own=gate.forward: calls.append(1) or own(x)
        assert torch.equal(fused(ids).logits, plain(ids).logits) and calls == [1]
        fused(IDS1)  # (and where the fused kernel would serve: 2 tokens)
        assert calls == [1, 1]
        del gate.forward
        # compiled (a dynamic token count), the one matmul whatever the count, with no guard on it
        from torch._dynamo.utils import counters

        monkeypatch.setattr(F, "silu", real)  # (the spy's list would be guarded)

        torch._dynamo.reset()
        counters.clear()
        mlp = torch.compile(fused.model.layers[1].mlp, dynamic=True, backend="eager")
        for t in (10, 12, 20, 24):
            mlp(torch.randn(1, t, 128, dtype=torch.bfloat16))
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_swiglu_mlps_fall_back_copy_plain_and_unfuse(fused_kernel):
    """A fused MLP runs its own forward when a member's weight is replaced or hooked, its act_fn
    swapped, the input needs a gradient or comes by keyword; copies and pickles are the plain
    class; unfusing the group restores the class; fusing again does not stack the subclass."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    plain, fused = int4_llama(), int4_llama()
    lowbit.fuse_projections_(fused)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    mlp, ref_mlp = fused.model.layers[0].mlp, plain.model.layers[0].mlp
    with torch.no_grad():
        want = plain(IDS).logits
        for other in (copy.deepcopy(fused), _pickled(fused)):
            assert type(other.model.layers[0].mlp) is LlamaMLP
            assert type(other.model.layers[0].mlp.gate_proj) is nn.Linear
            got = other(IDS).logits  # unfused: the module's forward (a loaded CPU int4 weight takes the
            assert (got - want).abs().max() <= 1e-2 * want.abs().max()  # CPU kernel's packing, so not bitwise)
        assert torch.equal(copy.deepcopy(fused)(IDS).logits, want)
        assert not torch.equal(mlp(x), ref_mlp(x))  # fused: the reference product (one rounding)
        assert torch.equal(mlp(x=x), ref_mlp(x))  # by keyword: its own forward
        handle = mlp.up_proj.register_forward_hook(lambda m, i, o: o * 0)
        assert torch.equal(mlp(x), ref_mlp.down_proj(ref_mlp.act_fn(ref_mlp.gate_proj(x)) * 0))
        handle.remove()
        act = mlp.act_fn
        mlp.act_fn = nn.GELU()
        ref_mlp.act_fn = nn.GELU()
        assert torch.equal(mlp(x), ref_mlp(x))  # a swapped act_fn: its own forward
        mlp.act_fn = ref_mlp.act_fn = act
    xg = x.clone().requires_grad_()
    assert torch.equal(mlp(xg), ref_mlp(x))  # a gradient wanted: the module's own forward
    mlp(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    new = lowbit.Int4Tensor.from_float(torch.randn(256, 128).to(torch.bfloat16), group_size=64, packing="plain")
    for m in (mlp, ref_mlp):
        m.up_proj.weight = nn.Parameter(new, requires_grad=False)
    with torch.no_grad():
        assert torch.equal(mlp(x), ref_mlp(x))  # the replaced member runs alone, gate from its group
    layer1 = fused.model.layers[1].mlp
    layer1.gate_proj._apply(lambda t: t.clone())  # (.to another device): the views break
    assert type(layer1) is LlamaMLP and type(layer1.up_proj) is nn.Linear
    # replace the members of a fused MLP and fuse again: one subclass level, copies still plain
    stale = int4_llama(seed=3)
    lowbit.fuse_projections_(stale)
    mlp0 = stale.model.layers[0].mlp
    fresh = int4_llama(seed=4).model.layers[0].mlp
    mlp0.gate_proj, mlp0.up_proj = fresh.gate_proj, fresh.up_proj
    assert lowbit.fuse_projections_(mlp0)[-1] == "<root>: silu(gate_proj) * up_proj"
    assert type(mlp0).__mro__[1] is LlamaMLP and type(mlp0)._lowbit_glu_base is LlamaMLP
    assert type(copy.deepcopy(mlp0)) is LlamaMLP
    with torch.no_grad():
        assert torch.equal(mlp0(x.requires_grad_(False)), _reference_mlps_one(mlp0)(x))


def _reference_mlps_one(mlp):
    from lowbit.ops import reference as ref

    return lambda x: mlp.down_proj(ref.swiglu(torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1)))


def test_swiglu_is_left_alone_for_other_activations(fused_kernel):
    """An MLP whose act_fn is not SiLU (GELU, tanh form, as Gemma's) keeps its own forward, whatever
    the scale of its weights (the activation is checked on a grid, not only through one row)."""
    model = int4_llama(act="gelu_pytorch_tanh", layers=1)
    with torch.no_grad():
        for p in model.model.layers[0].mlp.parameters():
            if isinstance(p, lowbit.Int4Tensor):
                p.scale.mul_(8)  # large gate values: GELU and SiLU nearly agree on one random row
                p.zero.mul_(8)
    plain = copy.deepcopy(model)
    names = lowbit.fuse_projections_(model)
    assert names == ["model.layers.0.self_attn.{q_proj,k_proj,v_proj}", "model.layers.0.mlp.{gate_proj,up_proj}"]
    assert not hasattr(model.model.layers[0].mlp, "_lowbit_glu_gid")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, plain(IDS).logits)


def test_swiglu_linear_checks_its_inputs():
    """swiglu_linear against silu(gate) * up in float64 from the linear's rounded output (any
    leading dims), and its refusals."""
    from lowbit.qtensor.linear import swiglu_linear

    w = lowbit.Int8Tensor.from_float(torch.randn(10, 16).to(torch.bfloat16))
    x = torch.randn(2, 3, 16).to(torch.bfloat16)
    y = F.linear(x, w).double()
    want = (F.silu(y[..., :5]) * y[..., 5:]).to(torch.bfloat16)
    got = swiglu_linear(x, w)
    assert got.shape == (2, 3, 5) and (got.double() - want.double()).abs().max() <= 2**-7 * want.abs().max()
    with pytest.raises(ValueError, match="11 rows"):
        swiglu_linear(x, lowbit.Int8Tensor.from_float(torch.randn(11, 16).to(torch.bfloat16)))
    with pytest.raises(RuntimeError, match="inference"):
        swiglu_linear(x.clone().requires_grad_(), w)
    with pytest.raises(ValueError, match="expects 16"):
        swiglu_linear(torch.randn(2, 8).to(torch.bfloat16), w)


def _graph_inputs(model, ids):
    """The tensors a fullgraph torch.compile of ``model`` takes as graph inputs, and its logits
    (the captured graph run as is)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(t for t in example_inputs if isinstance(t, torch.Tensor))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(ids).logits
    return seen, out


def test_compiled_fused_model_takes_no_subclass_input_where_weights_are_rebuilt(fused_kernel, monkeypatch):
    """Where torch flattens tensor-subclass graph inputs in Python on every call (2.11: 1.0-1.4 ms per
    Llama-3-8B decode step), a fused model's compiled forward rebuilds each lowbit weight from its
    plain fields inside the graph: groups, the fused MLP product and ``singles`` (o_proj, down_proj,
    the head as groups of one) alike, and the fields are static inputs (no copy per CUDA-graph
    replay). The logits are the unfused model's, bitwise, eager and through the captured graph;
    without the rebuild the same graph takes the lowbit weights themselves."""
    from torch._dynamo.utils import get_static_address_type

    plain, fused = int4_llama(), int4_llama()
    monkeypatch.setattr(fuse_mod, "REBUILD_IN_GRAPH", True)
    names = lowbit.fuse_projections_(fused)  # singles: on by default where the weights are rebuilt
    singles = ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj", "lm_head"]
    assert all(n in names for n in singles) and len(names) == 11, names
    assert type(fused.lm_head) is fuse_mod.FusedLinear and fused.state_dict().keys() == plain.state_dict().keys()
    want_mlp = _reference_mlps(int4_llama())
    for ids, want in ((IDS1, want_mlp), (IDS, plain)):  # 2 tokens: the fused MLP's path; 14: its own forward
        with torch.no_grad():
            expect = want(ids).logits
            assert torch.equal(fused(ids).logits, expect)
        inputs, got = _graph_inputs(fused, ids)
        assert torch.equal(got, expect)
        assert not any(isinstance(t, lowbit.QTensor) for t in inputs), [type(t).__name__ for t in inputs]
        gids = {m._lowbit_gid for m in fused.modules() if type(m) is fuse_mod.FusedLinear}
        fields = [f for gid in gids for f in fuse_mod._GROUPS[gid].fields]
        assert len(gids) == 9 and all(get_static_address_type(f) is not None for f in fields)
    monkeypatch.setattr(fuse_mod, "REBUILD_IN_GRAPH", False)  # (the control: the test can fail)
    inputs, got = _graph_inputs(fused, IDS)
    assert sum(isinstance(t, lowbit.QTensor) for t in inputs) == 9  # 2 x (q/k/v, gate/up, o, down) + head
    assert torch.equal(got, plain(IDS).logits)


def test_singles_unfuse_on_moves_and_copy_plain():
    """A group of one behaves as the groups do: a move unfuses it (a plain nn.Linear again, on its
    own weight) and copies are plain."""
    plain, fused = int4_llama(), int4_llama()
    names = lowbit.fuse_projections_(fused, singles=True)
    assert "model.layers.1.self_attn.o_proj" in names and type(fused.model.layers[1].self_attn.o_proj).__name__ == (
        "FusedLinear"
    )
    copied = copy.deepcopy(fused)
    assert type(copied.lm_head) is nn.Linear and type(copied.model.layers[0].mlp.down_proj) is nn.Linear
    fused._apply(lambda t: t.clone())
    assert type(fused.lm_head) is nn.Linear and type(fused.model.layers[0].self_attn.o_proj) is nn.Linear
    with torch.no_grad():
        assert torch.equal(fused(IDS).logits, plain(IDS).logits)


@pytest.mark.parametrize("rebuild", [False, True])
def test_a_compiled_fused_model_moves_and_unfuses(monkeypatch, rebuild):
    """torch.compile keeps weak references to the members' weights (its guards on their id()), and
    swap_tensors, which moves a subclass weight, refuses such a tensor: moving a compiled fused
    model must still work, unfuse it, and give the plain model's logits."""
    monkeypatch.setattr(fuse_mod, "REBUILD_IN_GRAPH", rebuild)
    plain, fused = tiny_llama("int8"), tiny_llama("int8")
    lowbit.fuse_projections_(fused)
    with torch.no_grad():
        torch.compile(fused, backend="eager", fullgraph=True)(IDS)
    fused._apply(lambda t: t.clone())  # what .to(another device) does: every weight a new copy
    assert not any(type(m) is fuse_mod.FusedLinear for m in fused.modules())
    with torch.no_grad():
        assert torch.equal(fused(IDS).logits, plain(IDS).logits)


def test_singles_join_a_later_group_and_a_new_weight_unfuses_them():
    """A group of one made by an earlier call joins a group of a later call; a single whose weight
    is assigned anew becomes a plain nn.Linear (the registry does not keep the old weight)."""
    plain, fused = int4_llama(), int4_llama()
    first = lowbit.fuse_projections_(fused, groups=(("q_proj", "k_proj", "v_proj"),), singles=True)
    assert "model.layers.0.mlp.gate_proj" in first
    second = lowbit.fuse_projections_(fused, groups=(("gate_proj", "up_proj"),), singles=False)
    assert second == ["model.layers.0.mlp.{gate_proj,up_proj}", "model.layers.1.mlp.{gate_proj,up_proj}"]
    head = fused.lm_head
    gid = head._lowbit_gid
    head.weight = nn.Parameter(plain.lm_head.weight.detach().clone(), requires_grad=False)
    assert type(head) is nn.Linear and gid not in fuse_mod._GROUPS
    with torch.no_grad():
        assert torch.equal(fused(IDS).logits, plain(IDS).logits)


@pytest.mark.parametrize("rebuild", [False, True])
def test_assigning_loads_and_failed_moves_leave_plain_modules(monkeypatch, rebuild):
    """With singles (the torch 2.11 default) an assigning load unfuses every group, groups of one
    included, and loads every weight; a cast that lowbit weights refuse, after compiling, leaves no
    half-fused group (each group unfused or intact), and the model runs."""
    monkeypatch.setattr(fuse_mod, "REBUILD_IN_GRAPH", rebuild)
    fused, other = tiny_llama("int8"), tiny_llama("int8", seed=1)
    names = lowbit.fuse_projections_(fused)
    assert ("lm_head" in names) == rebuild
    fused.load_state_dict(other.state_dict(), assign=True)
    assert not any(type(m) is fuse_mod.FusedLinear for m in fused.modules())
    with torch.no_grad():
        assert torch.equal(fused(IDS).logits, other(IDS).logits)
    again = tiny_llama("int8")
    lowbit.fuse_projections_(again)
    with torch.no_grad():
        torch.compile(again, backend="eager", fullgraph=True)(IDS)
    with pytest.raises(TypeError, match="casting a quantized weight"):
        again.half()  # (stops at the first quantized weight; a group a compiled model guards would unfuse)
    left = [m for m in again.modules() if type(m) is fuse_mod.FusedLinear]
    assert left and all(fuse_mod._GROUPS[m._lowbit_gid].intact() for m in left)
    with torch.no_grad():  # (the cast did reach the embedding before it stopped: not plain's logits)
        assert torch.isfinite(again(IDS).logits).all()
