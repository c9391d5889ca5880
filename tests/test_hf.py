"""Transformers integration: quantize on load, save_pretrained, fresh-process reload, malformed checkpoints."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import lowbit

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from lowbit.hf import LowbitConfig  # noqa: E402

CPU_SCHEMES = ["int4_weight_only", "int8_weight_only", "int8_dynamic_activation_int8_weight"]
GROUP = 64


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    d = tmp_path_factory.mktemp("llama_bf16")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved(base_dir, ids, tmp_path_factory):
    """scheme -> (directory written by save_pretrained, logits before saving)."""
    out = {}
    for scheme in CPU_SCHEMES:
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=LowbitConfig(scheme, group_size=GROUP)
        )
        with torch.no_grad():
            logits = model(ids).logits
        d = str(tmp_path_factory.mktemp(scheme))
        model.save_pretrained(d)
        out[scheme] = (d, logits)
    return out


def _quantize_path(base_dir, scheme):
    """The reference: load in bf16, then lowbit.quantize_ every Linear but the output head."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    cfg = lowbit.int4_weight_only(GROUP) if scheme == "int4_weight_only" else getattr(lowbit, scheme)()
    return lowbit.quantize_(model, cfg, lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")


@pytest.mark.parametrize("scheme", CPU_SCHEMES)
def test_quantize_on_load_matches_quantize_(base_dir, ids, saved, scheme):
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=LowbitConfig(scheme, group_size=GROUP))
    assert model.dtype == torch.bfloat16
    assert not isinstance(model.lm_head.weight, lowbit.QTensor)  # the output head stays by default
    assert len(model.lowbit_report.quantized) == 2 * 7
    assert model.lowbit_report.skipped == {"lm_head": "in modules_to_not_convert"}
    ref = _quantize_path(base_dir, scheme)
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert torch.equal(got, want)
    assert torch.equal(got, saved[scheme][1])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 3)


@pytest.mark.parametrize("scheme", CPU_SCHEMES)
def test_save_pretrained_writes_flattened_fields(saved, scheme):
    from safetensors import safe_open

    d = saved[scheme][0]
    qc = json.load(open(os.path.join(d, "config.json")))["quantization_config"]
    assert qc["quant_method"] == "lowbit" and qc["scheme"] == scheme
    with safe_open(os.path.join(d, "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["lowbit"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert q not in keys and f"{q}.qdata" in keys and f"{q}.scale" in keys
    assert "lm_head.weight" in keys and "lm_head.weight" not in meta["tensors"]
    assert len(meta["tensors"]) == 14


@pytest.mark.slow
def test_fresh_process_reload_identical_and_compiles(saved, ids, tmp_path):
    out = str(tmp_path / "logits.pt")
    torch.save(ids, out + ".ids")
    dirs = [saved[s][0] for s in ("int8_weight_only", "int4_weight_only", "int8_dynamic_activation_int8_weight")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    helper = os.path.join(os.path.dirname(__file__), "_hf_reload.py")
    proc = subprocess.run([sys.executable, helper, out, "1", *dirs], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out, weights_only=True)
    for s in CPU_SCHEMES:
        assert torch.equal(result[saved[s][0]], saved[s][1]), s
    torch.testing.assert_close(result["compiled"], saved["int8_weight_only"][1], atol=2e-2, rtol=2e-2)


def test_reload_in_process_resave_and_sharded(saved, ids, tmp_path):
    d, logits = saved["int4_weight_only"]
    model = AutoModelForCausalLM.from_pretrained(d)
    assert isinstance(model.model.layers[1].mlp.down_proj.weight, lowbit.Int4Tensor)
    assert model.lowbit_report.skipped == {"lm_head": "stored in full precision in the checkpoint"}
    model.save_pretrained(tmp_path / "again", max_shard_size="40KB")
    assert os.path.exists(tmp_path / "again" / "model.safetensors.index.json")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)


def test_reloaded_cpu_fields_start_on_64_byte_boundaries(saved, ids):
    """from_pretrained hands out views of the mapped safetensors file at 8-byte offsets; aten's AVX-512
    int8 kernel faulted on them (SIGSEGV on a Xeon, torch 2.11): lowbit copies such fields."""
    d, logits = saved["int8_weight_only"]
    model = AutoModelForCausalLM.from_pretrained(d)
    fields = [t for p in model.parameters() if isinstance(p, lowbit.QTensor) for t in p._tensors()]
    assert len(fields) == 2 * 14 and all(t.data_ptr() % 64 == 0 for t in fields)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


def test_build_qtensor_copies_misaligned_cpu_fields():
    from lowbit.safetensors import build_qtensor, flatten_state_dict, parse_metadata

    w = lowbit.Int8Tensor.from_float(torch.randn(48, 64, dtype=torch.bfloat16))
    flat, meta = flatten_state_dict({"w": w})
    (entry,) = parse_metadata(meta).values()
    parts = {}
    for key, t in flat.items():  # each field a view 8 bytes into a larger buffer
        raw = torch.empty(t.numel() * t.element_size() + 72, dtype=torch.uint8)
        view = raw[8 : 8 + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        assert view.data_ptr() % 64 == 8
        parts[key.rpartition(".")[2]] = view
    got = build_qtensor("w", entry, parts)
    assert all(t.data_ptr() % 64 == 0 for t in got._tensors())
    assert all(torch.equal(a, b) for a, b in zip(got._tensors(), w._tensors()))


def test_modules_to_not_convert(base_dir):
    cfg = LowbitConfig("int8_weight_only", modules_to_not_convert=["lm_head", "mlp"])
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=cfg)
    assert isinstance(model.model.layers[0].self_attn.o_proj.weight, lowbit.Int8Tensor)
    assert not isinstance(model.model.layers[0].mlp.up_proj.weight, lowbit.QTensor)
    assert len(model.lowbit_report.quantized) == 2 * 4


def test_group_size_that_does_not_divide_k_is_skipped_and_reported(base_dir):
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=LowbitConfig("int4_weight_only", group_size=256)
    )
    # hidden 128 < 256: only down_proj (K=256) can be quantized
    assert len(model.lowbit_report.quantized) == 2
    assert "group_size=256" in model.lowbit_report.skipped["model.layers.0.self_attn.q_proj"]


def test_config_validation():
    with pytest.raises(ValueError, match="int3_weight_only"):
        LowbitConfig("int3_weight_only")
    for g in (64.0, "64", True):
        with pytest.raises(ValueError, match="group_size"):
            LowbitConfig("int4_weight_only", group_size=g)
    with pytest.raises(ValueError, match="modules_to_not_convert must be a list of module names, got 5"):
        LowbitConfig("int8_weight_only", modules_to_not_convert=5)
    # one name is one name, not its characters
    assert LowbitConfig("int8_weight_only", modules_to_not_convert="lm_head").modules_to_not_convert == ["lm_head"]
    with pytest.raises(ValueError, match="group_size"):
        LowbitConfig("int4_weight_only", group_size=48)
    with pytest.raises(ValueError, match="format version"):
        LowbitConfig(format_version=lowbit.safetensors.FORMAT_VERSION + 1)
    d = LowbitConfig("int8_weight_only").to_dict()
    assert LowbitConfig.from_dict(d).to_dict() == d


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(d, **changes):
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    cfg["quantization_config"].update(changes)
    json.dump(cfg, open(path, "w"))


def test_checkpoint_with_a_scheme_this_version_cannot_serve(saved, tmp_path):
    d = _copy(saved["int8_weight_only"][0], tmp_path / "future")
    _edit_config(d, scheme="int2_weight_only")
    with pytest.raises(ValueError, match=r"cannot serve quantization scheme 'int2_weight_only'"):
        AutoModelForCausalLM.from_pretrained(d)
    _edit_config(d, scheme="int8_weight_only", format_version=99)
    with pytest.raises(ValueError, match="format version 99"):
        AutoModelForCausalLM.from_pretrained(d)


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(scheme="int8_weight_only"), "is a Int4Tensor, but quantization_config.scheme is 'int8_weight_only'"),
        (dict(group_size=2 * GROUP), f"has group_size {GROUP}, but quantization_config.group_size is {2 * GROUP}"),
    ],
)
def test_config_json_that_disagrees_with_the_weight_files_is_refused(saved, tmp_path, changes, words):
    d = _copy(saved["int4_weight_only"][0], tmp_path / "edited")
    _edit_config(d, **changes)
    with pytest.raises(ValueError, match=re.escape(words)):
        AutoModelForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("pre_quantized", [False, True])
def test_a_weight_of_another_shape_than_the_model_is_refused(base_dir, saved, tmp_path, pre_quantized, capfd, caplog):
    """Transformers skips its own size check for weights a quantizer claims: a checkpoint whose
    config.json was edited (intermediate_size) loaded the old-shaped weights into the new
    modules, quantize-on-load and pre-quantized alike."""
    d = _copy(saved["int8_weight_only"][0] if pre_quantized else base_dir, tmp_path / "resized")
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    cfg["intermediate_size"] = 128
    json.dump(cfg, open(path, "w"))
    kw = {} if pre_quantized else {"quantization_config": LowbitConfig("int8_weight_only")}
    with pytest.raises(RuntimeError, match="conversion"):  # Transformers reports the error, then raises
        AutoModelForCausalLM.from_pretrained(d, **kw)
    out = capfd.readouterr()
    report = out.out + out.err + caplog.text
    assert re.search(
        r"mlp\.gate_proj\.weight' has shape \[256, 128\] but the model's layer expects \[128, 128\]", report
    )


def _rewrite_tensor(d, key, fn):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = os.path.join(d, "model.safetensors")
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    fn(tensors, key)
    save_file(tensors, path, metadata=meta)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda t, k: t[k + ".scale"].__setitem__(0, float("nan")), ["'scale'"]),
        (lambda t, k: t[k + ".scale"].__setitem__(0, -1.0), ["'scale'"]),
        (lambda t, k: t.__setitem__(k + ".qdata", t[k + ".qdata"][:, 1:].contiguous()), ["'qdata'", "shape"]),
        (lambda t, k: t.pop(k + ".scale"), ["'scale'", "missing"]),
    ],
)
def test_malformed_lowbit_checkpoint_raises_value_error(saved, tmp_path, edit, words):
    d = _copy(saved["int8_weight_only"][0], tmp_path / "bad")
    key = "model.layers.1.mlp.gate_proj.weight"
    _rewrite_tensor(d, key, edit)
    with pytest.raises(ValueError) as e:
        AutoModelForCausalLM.from_pretrained(d)
    for w in [repr(key), *words]:
        assert w in str(e.value)


def test_disk_offload_is_refused(base_dir):
    with pytest.raises(ValueError, match="disk"):
        AutoModelForCausalLM.from_pretrained(
            base_dir,
            quantization_config=LowbitConfig("int8_weight_only"),
            device_map={"model": "cpu", "lm_head": "disk"},
        )


def test_lora_on_quantized_base(base_dir, ids):
    peft = pytest.importorskip("peft")
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=LowbitConfig("int8_weight_only"))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)


def test_load_sharded_reads_a_sharded_save_pretrained(base_dir, tmp_path):
    """Transformers copies the whole model's lowbit metadata into every shard; load_sharded
    read each shard alone and called the entries of the other shards missing."""
    from lowbit.safetensors import load_sharded

    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=LowbitConfig("int4_weight_only", group_size=GROUP)
    )
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    sd = load_sharded(tmp_path)
    want = model.state_dict()
    assert set(sd) == set(want)
    for k, v in want.items():
        got = sd[k]
        assert type(got) is type(v), k
        assert torch.equal(
            got.dequantize() if hasattr(got, "dequantize") else got, v.dequantize() if hasattr(v, "dequantize") else v
        ), k


def test_save_pretrained_after_quantize_(base_dir, ids, tmp_path, caplog):
    """quantize_ on a Transformers model attaches the lowbit config and quantizer, so
    save_pretrained writes a checkpoint from_pretrained loads (it failed on the wrapper
    tensors' storage); a model mixing schemes gets no config and a warning instead."""
    model = lowbit.quantize_(
        AutoModelForCausalLM.from_pretrained(base_dir),
        lowbit.int4_weight_only(GROUP),
        lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head",
    )
    assert model.config.quantization_config.to_dict()["scheme"] == "int4_weight_only"
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(back.model.layers[0].mlp.up_proj.weight).__name__ == "Int4Tensor"
    with torch.no_grad():
        assert torch.equal(back(ids).logits, want)
    lowbit.quantize_(model, lowbit.int8_weight_only(), lambda m, fqn: fqn == "lm_head")
    assert model.config.quantization_config is None and "several schemes" in caplog.text


@pytest.mark.parametrize("part", ["model", "model.layers"])
def test_save_pretrained_after_quantize_on_a_submodule(base_dir, ids, tmp_path, part):
    """quantize_ on a part of a Transformers model (its base model, or its layers): the enclosing
    model's save_pretrained failed on the wrapper tensors' storage ("invalid python storage").
    It now writes the checkpoint the weights call for, and from_pretrained gives the same model."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lowbit.quantize_(model.get_submodule(part), lowbit.int8_weight_only())
    assert getattr(model, "hf_quantizer", None) is None
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(back.model.layers[1].self_attn.o_proj.weight).__name__ == "Int8Tensor"
    assert type(back.lm_head.weight) is torch.nn.Parameter
    with torch.no_grad():
        assert torch.equal(back(ids).logits, want)


def test_save_pretrained_of_parts_in_two_schemes_is_refused(base_dir, tmp_path):
    """Layers quantized with two schemes (no one quantization_config): a clear ValueError before
    anything is written, also after an earlier save attached the first scheme's quantizer
    (which would have written the int8 weights under the int4 config)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lowbit.quantize_(model.model.layers[0], lowbit.int4_weight_only(GROUP))
    model.save_pretrained(tmp_path / "first")
    lowbit.quantize_(model.model.layers[1], lowbit.int8_weight_only())
    with pytest.raises(ValueError, match=r"several schemes.*Int4Tensor.*Int8Tensor.*lowbit.safetensors.save_file"):
        model.save_pretrained(tmp_path / "second")
    assert not (tmp_path / "second").exists()


def test_save_pretrained_of_lowbit_weights_beside_another_quantizer_is_refused(base_dir, tmp_path):
    """A model another library's quantizer loaded, with lowbit weights added by quantize_: one
    quantization_config cannot describe both, and Transformers failed on an attribute of the lowbit
    tensor; now a ValueError names both before anything is written."""
    from transformers.quantizers import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class OtherConfig(QuantizationConfigMixin):
        def __init__(self):
            self.quant_method = "other"

    class OtherQuantizer(HfQuantizer):
        requires_calibration = False

        def _process_model_before_weight_loading(self, model, **kwargs):
            return model

        def is_serializable(self, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lowbit.quantize_(model.model.layers[0], lowbit.int8_weight_only())
    model.hf_quantizer = OtherQuantizer(OtherConfig())
    with pytest.raises(ValueError, match=r"quantized with other and also holds lowbit weights.*Int8Tensor"):
        model.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("probe", [False, True])
def test_import_lowbit_registers_with_transformers_on_first_registry_import(probe):
    """``import lowbit`` before Transformers' quantizer registry: the registry's own import
    registers ``quant_method="lowbit"``, also after a bare ``find_spec`` probe of it (which
    executes nothing; it used to use the hook up, so the later import registered nothing)."""
    code = (
        "import importlib.util, sys\n"
        "import lowbit\n"
        "assert 'transformers.quantizers' not in sys.modules\n"
        f"if {probe}: importlib.util.find_spec('transformers.quantizers')\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
        "print('lowbit' in AUTO_QUANTIZER_MAPPING, 'lowbit' in AUTO_QUANTIZATION_CONFIG_MAPPING,\n"
        "      [type(f).__name__ for f in sys.meta_path].count('_AfterRegistryImport'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "True", "0"], proc.stdout
