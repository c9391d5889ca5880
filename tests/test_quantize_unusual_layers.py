"""quantize_ on layers it must not quantize as they are: tied weights, sharded (DTensor) weights,
empty, lazy and parametrized weights; and saving a QAT-converted Transformers model."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lowbit
from lowbit.qtensor import QTensor


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 32)
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 16, bias=False)
        self.head.weight = self.embed.weight  # tied, as an LM's output head and input embedding

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


def test_a_tied_weight_is_left_alone_and_stays_tied():
    torch.manual_seed(0)
    m = TiedLM()
    ids = torch.randint(0, 16, (2, 5))
    lowbit.quantize_(m, lowbit.int8_weight_only())
    assert isinstance(m.body.weight, QTensor)
    assert m.head.weight is m.embed.weight and not isinstance(m.head.weight, QTensor)
    assert "tied to embed.weight" in m.lowbit_report.skipped["head"]
    h = nn.functional.linear(m.embed(ids), m.body.weight.dequantize(), m.body.bias)
    torch.testing.assert_close(m(ids), h @ m.embed.weight.T, rtol=1e-4, atol=1e-4)


def test_two_linears_sharing_a_weight_are_both_left_alone_but_one_linear_used_twice_is_quantized():
    a, b = nn.Linear(32, 32), nn.Linear(32, 32)
    b.weight = a.weight
    shared = nn.Linear(32, 32)
    m = nn.ModuleDict({"a": a, "b": b, "first": shared, "again": shared})
    lowbit.quantize_(m, lowbit.int8_weight_only())
    assert a.weight is b.weight and not isinstance(a.weight, QTensor)
    assert "tied to b.weight" in m.lowbit_report.skipped["a"] and "tied to a.weight" in m.lowbit_report.skipped["b"]
    assert isinstance(shared.weight, QTensor) and m.lowbit_report.quantized == ["first"]


def test_empty_lazy_and_parametrized_weights_are_skipped_with_a_reason():
    m = nn.ModuleDict(
        {
            "empty_in": nn.Linear(0, 8),
            "empty_out": nn.Linear(32, 0),
            "lazy": nn.LazyLinear(8),
            "normed": nn.utils.parametrizations.weight_norm(nn.Linear(32, 8)),
            "plain": nn.Linear(32, 8),
        }
    )
    for config in (
        lowbit.int4_weight_only(group_size=32),
        lowbit.int8_weight_only(),
        lowbit.int8_dynamic_activation_int8_weight(),
    ):
        lowbit.quantize_(m, config)
        skipped = m.lowbit_report.skipped
        assert "empty" in skipped["empty_in"] and "empty" in skipped["empty_out"]
        assert "not initialized" in skipped["lazy"] and "parametrized" in skipped["normed"]
        assert isinstance(m["plain"].weight, QTensor)
        m["plain"] = nn.Linear(32, 8)


@pytest.fixture
def one_process_group():
    if not dist.is_gloo_available():
        pytest.skip("needs gloo")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:  # a CPU mesh: fully_shard's default mesh is on the GPU where there is one
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_sharded_weights_are_refused_before_any_layer_changes(one_process_group):
    mesh = one_process_group
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(3, 32)
    want = m(x)
    fully_shard(m[0], mesh=mesh)
    fully_shard(m, mesh=mesh)
    with pytest.raises(ValueError, match=r"layer '0' \(and 1 more\) is a sharded DTensor.*before fully_shard"):
        lowbit.quantize_(m, lowbit.int8_weight_only())
    assert not any(isinstance(getattr(p, "_local_tensor", p), QTensor) for p in m.parameters())
    torch.testing.assert_close(m(x), want)  # (still the float model)


def test_qat_convert_of_a_sharded_model_is_refused_but_prepare_is_not(one_process_group):
    mesh = one_process_group
    from torch.distributed.fsdp import fully_shard

    base = lowbit.int8_weight_only()
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    lowbit.quantize_(m, lowbit.QATConfig(base, step="prepare"))
    fully_shard(m, mesh=mesh)
    m(torch.randn(2, 32)).sum().backward()
    with pytest.raises(ValueError, match="sharded DTensor"):
        lowbit.quantize_(m, lowbit.QATConfig(base, step="convert"))


def _tiny_llama(tmp_path, tied: bool):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    src = tmp_path / "src"
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src)
    return transformers.AutoModelForCausalLM.from_pretrained(src)


def _reloads(model, tmp_path) -> bool:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        return torch.equal(back(ids).logits, want)


def test_a_tied_transformers_model_saves_a_checkpoint_that_loads(tmp_path):
    m = _tiny_llama(tmp_path, tied=True)
    lowbit.quantize_(m, lowbit.int8_weight_only())
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert _reloads(m, tmp_path)


def test_a_qat_converted_transformers_model_saves_a_checkpoint_that_loads(tmp_path):
    m = _tiny_llama(tmp_path, tied=False)
    base = lowbit.int8_weight_only()
    keep_head = lambda mod, fqn: isinstance(mod, nn.Linear) and fqn != "lm_head"  # noqa: E731
    lowbit.quantize_(m, lowbit.QATConfig(base, step="prepare"), keep_head)
    lowbit.quantize_(m, lowbit.QATConfig(base, step="convert"), keep_head)
    assert m.config.quantization_config.scheme == "int8_weight_only"
    assert _reloads(m, tmp_path)
