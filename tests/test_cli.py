"""The command line end to end on a tiny random Llama (CPU): quantize -> generate -> eval, and usage errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.cli import common as c
from lowbit.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer Llama with a byte-level BPE tokenizer trained here on the bundled text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([c.default_text().read_text()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(fast),
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    return folder


def run_cli(*argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_generate_eval_end_to_end(tiny_model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    code, stdout, err = run_cli("quantize", tiny_model, out, "--scheme", "int4", "--group-size", "32", capsys=capsys)
    assert code == 0, err
    assert "wrote" in stdout and (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "lowbit"

    # plain from_pretrained reloads it; every decoder linear is int4, the head is not
    q = AutoModelForCausalLM.from_pretrained(out)
    fp = AutoModelForCausalLM.from_pretrained(tiny_model)
    lin = {n: m for n, m in q.named_modules() if isinstance(m, torch.nn.Linear)}
    assert not isinstance(lin.pop("lm_head").weight, lowbit.QTensor)
    assert all(isinstance(m.weight, lowbit.Int4Tensor) for m in lin.values())
    # the checkpoint holds the same function as quantizing the fp model in memory
    ref = c.quantize_in_memory(fp, "int4", 32)
    ids = torch.randint(0, fp.config.vocab_size, (1, 24))
    with torch.inference_mode():
        torch.testing.assert_close(q(ids).logits, ref(ids).logits)

    code, stdout, err = run_cli(
        "generate", out, "--prompt", "We hold these truths", "--max-new-tokens", "5", capsys=capsys
    )
    assert code == 0, err
    assert "tokens/s" in stdout

    code, stdout, err = run_cli(
        "eval",
        tiny_model,
        "--schemes",
        "int4,int8,w8a8",
        "--group-size",
        "32",
        "--ctx",
        "64",
        "--max-tokens",
        "128",
        capsys=capsys,
    )
    assert code == 0, err
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and "perplexity" not in line]
    assert [r.split("|")[1].strip().split()[0] for r in rows] == ["full", "int4", "int8", "w8a8"]
    # a random model is near-uniform over the vocabulary: perplexity within a factor of 2 of it
    for r in rows:
        ppl = float(r.split("|")[3])
        assert fp.config.vocab_size / 2 < ppl < fp.config.vocab_size * 2

    code, stdout, err = run_cli(
        "eval", out, "--reference", tiny_model, "--ctx", "64", "--max-tokens", "128", capsys=capsys
    )
    assert code == 0, err
    assert "(lowbit)" in stdout


def test_perplexity_matches_hand_computation(tiny_model):
    model = c.load_model(c.ModelSource(str(tiny_model)), torch.float32)
    tok = c.load_tokenizer(c.ModelSource(str(tiny_model)))
    ids = c.read_text_ids(tok, c.default_text(), 100)
    # by hand: two windows of 50, log-softmax, pick the next token, skip each window's first token
    logps = []
    with torch.no_grad():
        for w in (ids[:50], ids[50:100]):
            logits = model(w[None]).logits[0].double()
            lp = torch.log_softmax(logits, -1)[:-1].gather(1, w[1:, None])
            logps.append(lp)
    expected = math.exp(-torch.cat(logps).mean().item())
    assert c.perplexity(model, ids, ctx=50) == pytest.approx(expected, rel=1e-4)


def test_memory_and_disk_sizes(tiny_model, tmp_path):
    model = c.load_model(c.ModelSource(str(tiny_model)), torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    assert c.memory_bytes(model) >= params * 2
    q = c.quantize_in_memory(model, "int8", 128)
    w = q.model.layers[0].mlp.down_proj.weight
    assert isinstance(w, lowbit.Int8Tensor)
    saved = model.model.layers[0].mlp.down_proj.weight.numel() * 2 - w.nbytes_packed
    assert c.memory_bytes(model) - c.memory_bytes(q) >= saved  # at least this layer's saving
    assert c.disk_bytes(tiny_model) == (tiny_model / "model.safetensors").stat().st_size


@pytest.mark.parametrize(
    "argv, message",
    [
        (["quantize", "/nonexistent/model", "OUT"], "does not exist"),
        (["generate", "/nonexistent/model"], "does not exist"),
        (["eval", "MODEL", "--schemes", "int3"], "unknown scheme"),
        (["eval", "MODEL", "--text", "/nonexistent.txt"], "does not exist"),
        (["generate", "MODEL", "--max-new-tokens", "0"], "at least 1"),
        (["quantize", "EMPTY", "OUT"], "no config.json"),
        (["quantize", "CORRUPT", "OUT"], "could not load"),
        (["quantize", "BADJSON", "OUT"], "not valid JSON"),
        (["quantize", "NOTGGUF", "OUT"], "not a GGUF file"),
        (["quantize", "MODEL", "NONEMPTY"], "not empty"),
        (["generate", "TEXTFILE"], "not a .gguf file"),
    ],
)
def test_usage_errors_are_one_line(argv, message, tiny_model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tiny_model / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{oops")
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + b"\x00" * 64)
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "x").write_text("x")
    (tmp_path / "notes.txt").write_text("hello")
    subst = {
        "MODEL": tiny_model,
        "EMPTY": tmp_path / "empty",
        "CORRUPT": corrupt,
        "BADJSON": tmp_path / "badjson",
        "NOTGGUF": tmp_path / "fake.gguf",
        "NONEMPTY": tmp_path / "nonempty",
        "TEXTFILE": tmp_path / "notes.txt",
        "OUT": tmp_path / "out",
    }
    code, out, err = run_cli(*[subst.get(a, a) for a in argv], capsys=capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # a failed quantize leaves no half-written folder


def test_argparse_errors_and_help():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for argv, code in ([[], 2], [["quantize"], 2], [["quantize", "a", "b", "--scheme", "int3"], 2], [["--help"], 0]):
        p = subprocess.run(
            [sys.executable, "-m", "lowbit", *argv], capture_output=True, text=True, env=env, timeout=120
        )
        assert p.returncode == code, p.stderr
        assert "Traceback" not in p.stderr
    assert "quantize" in p.stdout and "generate" in p.stdout and "eval" in p.stdout and "bench" in p.stdout


def test_bench_needs_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, out, err = run_cli("bench", "kernels", capsys=capsys)
    assert code == 1 and "needs a CUDA GPU" in err


def _e2e_module():
    """bench/e2e.py as a module (bench/ is not a package)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import e2e
    finally:
        sys.path.pop(0)
    return e2e


def test_e2e_bench_tiny_on_cpu(tmp_path):
    """bench/e2e.py --tiny runs every lowbit variant and bf16, writes JSON + markdown, skips torchao on CPU."""
    e2e = _e2e_module()
    assert (
        e2e.main(
            ["--tiny", "--out", str(tmp_path), "--reps", "1", "--step-loop", "--profile-prefill"]
            + ["--variants", "bf16,ao_int4,lowbit_int4,lowbit_w8a8"]
        )
        == 0
    )
    data = json.loads((tmp_path / "cpu-tiny-e2e.json").read_text())
    by = {r["variant"]: r for r in data["results"]}
    assert "skipped" in by["ao_int4"]
    for v in ("bf16", "lowbit_int4", "lowbit_w8a8"):
        assert by[v]["b1_tok_s"] > 0 and by[v]["b2_tok_s"] > 0 and by[v]["prefill_tok_s"] > 0, by[v]
        assert by[v]["b1_step_tok_s"] > 0 and by[v]["b2_step_tok_s"] > 0, by[v]
        # issuing the n - 1 compiled steps is part of the timed loop (n tokens in all)
        n = data["meta"]["new_tokens"]
        assert 0 < by[v]["b1_step_issue_ms"] * (n - 1) <= 1e3 * n / by[v]["b1_step_tok_s"], by[v]
    assert "lowbit::int4_mm_cpu" in by["lowbit_int4"]["prefill_profile"]
    assert by["lowbit_int4"]["weights_GB"] < by["bf16"]["weights_GB"]
    md = (tmp_path / "cpu-tiny-e2e.md").read_text()
    assert "lowbit int4 g128" in md and "bf16" in md and "b1 step-loop tok/s" in md


def test_e2e_bench_step_loop_only(tmp_path, monkeypatch):
    """--no-generate: decode timed by the step loop alone; the table has no generate columns.
    A ``_nopdl`` variant runs its scheme with programmatic dependent launch off, and
    ``lowbit_int4_nogemv`` with the int4 GEMV tile off (``GEMV_MAX_M`` 0); each turns its switch
    back afterwards and gets its own row and label."""
    from lowbit.ops.triton import _utils
    from lowbit.ops.triton import int4 as int4_mod

    e2e = _e2e_module()
    seen = {}
    quantize = e2e.quantize

    def spy(model, variant, *rest):
        seen.setdefault(variant, []).append((_utils.PDL, int4_mod.GEMV_MAX_M))
        return quantize(model, variant, *rest)

    monkeypatch.setattr(e2e, "quantize", spy)
    monkeypatch.setattr(_utils, "PDL", True)
    monkeypatch.setattr(int4_mod, "GEMV_MAX_M", 8)
    argv = ["--tiny", "--out", str(tmp_path), "--reps", "1", "--step-loop", "--no-generate"]
    variants = "lowbit_int4_nopdl,bf16,lowbit_int4_nogemv,lowbit_int4"
    assert e2e.main(argv + ["--variants", variants, "--batches", "1"]) == 0
    assert seen == {"lowbit_int4": [(False, 8), (True, 0), (True, 8)], "bf16": [(True, 8)]}
    assert _utils.PDL is True and int4_mod.GEMV_MAX_M == 8
    results = json.loads((tmp_path / "cpu-tiny-e2e.json").read_text())["results"]
    names = ["bf16", "lowbit_int4", "lowbit_int4_nopdl", "lowbit_int4_nogemv"]
    assert [r["variant"] for r in results] == names
    by = {r["variant"]: r for r in results}
    for v in names:
        assert by[v]["b1_step_tok_s"] > 0 and "b1_tok_s" not in by[v] and "b1_first_generate_s" not in by[v], by[v]
    assert by["lowbit_int4_nopdl"]["label"] == "lowbit int4 g128, no PDL"
    assert by["lowbit_int4_nogemv"]["label"] == "lowbit int4 g128, no GEMV tile"
    md = (tmp_path / "cpu-tiny-e2e.md").read_text()
    assert "b1 step-loop tok/s" in md and "b1 tok/s" not in md and "no `generate`" in md, md
    assert "lowbit int4 g128, no PDL" in md and "lowbit int4 g128, no GEMV tile" in md
    with pytest.raises(SystemExit):
        e2e.parse_args(["--variants", "bf16_nopdl"])
    with pytest.raises(SystemExit):
        e2e.parse_args(["--variants", "lowbit_int8_nogemv"])


def test_e2e_bench_with_head_quantizes_the_output_head(tmp_path, monkeypatch):
    """--with-head quantizes every linear, the output head too (what a bare ``quantize_(model,
    config)`` does); by default the decoder layers alone, the head left in bf16. The table says
    which, and the quantized head makes the weights smaller."""
    import lowbit

    e2e = _e2e_module()
    quantize, heads, weights = e2e.quantize, {}, {}

    def spy(model, variant, group_size, with_head=False):
        quantize(model, variant, group_size, with_head)
        layer = model.model.layers[0].mlp.down_proj.weight
        heads[(variant, with_head)] = (
            isinstance(layer, lowbit.QTensor),
            isinstance(model.lm_head.weight, lowbit.QTensor),
        )
        weights[(variant, with_head)] = e2e.weight_bytes(model)

    monkeypatch.setattr(e2e, "quantize", spy)
    argv = ["--tiny", "--reps", "1", "--step-loop", "--no-generate", "--batches", "1", "--new-tokens", "3"]
    mds = {}
    for extra in ([], ["--with-head"]):
        out = tmp_path / ("head" if extra else "layers")
        assert e2e.main(argv + extra + ["--out", str(out), "--variants", "bf16,lowbit_int4"]) == 0
        mds[bool(extra)] = (out / "cpu-tiny-e2e.md").read_text()
    assert heads == {
        ("bf16", False): (False, False),
        ("bf16", True): (False, False),
        ("lowbit_int4", False): (True, False),
        ("lowbit_int4", True): (True, True),
    }
    assert weights[("bf16", True)] == weights[("bf16", False)]
    assert weights[("lowbit_int4", True)] < weights[("lowbit_int4", False)] < weights[("bf16", False)]
    assert "output head quantized too" in mds[True] and "output head bf16" in mds[False]


def test_e2e_bench_fused_variant(tmp_path):
    e2e = _e2e_module()
    argv = ["--tiny", "--reps", "1", "--step-loop", "--no-generate", "--batches", "1", "--new-tokens", "3"]
    assert e2e.main(argv + ["--out", str(tmp_path), "--variants", "lowbit_int8_fused,lowbit_int4_fused"]) == 0
    by = {r["variant"]: r for r in json.loads((tmp_path / "cpu-tiny-e2e.json").read_text())["results"]}
    int8, int4 = by["lowbit_int8_fused"], by["lowbit_int4_fused"]
    assert int8["fused_groups"] == 2 * e2e.TINY["num_hidden_layers"] and int8["b1_step_tok_s"] > 0, int8
    assert int8["label"] == "lowbit int8 weight-only, q/k/v and gate/up fused"
    # on the CPU int4 weights get a CPU packing where torch has one; its rows are copies, and the
    # variant says why it cannot fuse
    from lowbit.ops import cpu

    if cpu.int4_cpu_layout() is not None:
        assert "cannot be fused: rows of the 'cpu_" in int4["error"] and int4["variant"] == "lowbit_int4_fused"
    else:
        assert int4["fused_groups"] == 2 * e2e.TINY["num_hidden_layers"], int4


def test_e2e_bench_host_profile(tmp_path):
    """--profile-host: cProfile of the decode loop, per steady step (new tokens - 1 steps, less
    the first two, which are profiled apart): at most 20 functions by own time, whose sum is
    within the loop's total."""
    e2e = _e2e_module()
    argv = ["--tiny", "--out", str(tmp_path), "--reps", "1", "--step-loop", "--no-generate", "--profile-host"]
    assert e2e.main(argv + ["--variants", "lowbit_int4", "--batches", "1", "--new-tokens", "5"]) == 0
    (res,) = json.loads((tmp_path / "cpu-tiny-e2e.json").read_text())["results"]
    hp = res["b1_host_profile"]
    assert hp["steps"] == 2 and hp["host_us_per_step"] > 0 and hp["first_steps"] == 2
    for rows, total in ((hp["top_own_time"], hp["host_us_per_step"]), (hp["first_steps_top_own_time"], None)):
        total = total if total is not None else hp["first_steps_host_us_per_step"]
        assert 0 < len(rows) <= 20 and all(r["us_per_step"] >= 0 for r in rows.values())
        assert sum(r["us_per_step"] for r in rows.values()) <= total + 1e-6
        assert all(r["calls_per_step"] > 0 for r in rows.values())


def test_e2e_profile_idle_by_kind():
    """GPU idle time between kernels goes to the kind of the kernel whose end opened the gap
    (with overlapping kernels, the one that ends last so far); gaps of 1 ms or more are summed
    apart. Spans in us, given out of order."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from e2e_profile import idle_by_kind
    finally:
        sys.path.pop(0)
    spans = [
        (30.0, 50.0, "attention"),  # 5 us after the GEMM below, which ended last (at 25)
        (0.0, 10.0, "lowbit linear"),
        (8.0, 25.0, "GEMM (cuBLAS)"),  # overlaps the first (PDL): no gap between them
        (2050.0, 2060.0, "other"),  # 2000 us after attention: a host stall
        (2062.5, 2070.0, "lowbit linear"),  # 2.5 us after "other"
    ]
    gaps, stalled = idle_by_kind(spans)
    assert gaps == {"lowbit linear": 0.0, "attention": 0.0, "GEMM (cuBLAS)": 5.0, "Inductor fused": 0.0, "other": 2.5}
    assert stalled == 2000.0
    gaps, stalled = idle_by_kind(spans, stall_us=5000.0)
    assert gaps["attention"] == 2000.0 and stalled == 0.0


def test_e2e_bench_unwrapped_probe(tmp_path, monkeypatch):
    """lowbit_int4_unwrapped: every quantized weight becomes a parametrization over its plain
    fields (the module's parameters are no QTensor, module.weight still is); both variants
    decode, and the switch is off again afterwards."""
    import torch.nn.utils.parametrize as parametrize

    import lowbit

    e2e = _e2e_module()
    seen = []
    unwrap = e2e.unwrap_fields

    def spy(model):
        out = unwrap(model)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        seen.append(
            (
                sum(parametrize.is_parametrized(m, "weight") for m in linears),
                sum(isinstance(m.weight, lowbit.QTensor) for m in linears),
                any(isinstance(p, lowbit.QTensor) for p in model.parameters()),
            )
        )
        return out

    monkeypatch.setattr(e2e, "unwrap_fields", spy)
    argv = ["--tiny", "--out", str(tmp_path), "--reps", "1", "--step-loop", "--no-generate"]
    assert e2e.main(argv + ["--variants", "lowbit_int4_unwrapped,lowbit_int4", "--batches", "1"]) == 0
    assert len(seen) == 1 and seen[0][0] == seen[0][1] > 0 and seen[0][2] is False, seen
    assert e2e._UNWRAP_FIELDS is False
    by = {r["variant"]: r for r in json.loads((tmp_path / "cpu-tiny-e2e.json").read_text())["results"]}
    assert by["lowbit_int4_unwrapped"]["label"] == "lowbit int4 g128, fields as parameters"
    assert by["lowbit_int4_unwrapped"]["b1_step_tok_s"] > 0 and by["lowbit_int4"]["b1_step_tok_s"] > 0


def test_e2e_bench_compiled_prefill(tmp_path):
    """--compile-prefill times prefill through torch.compile (a quantized model compiles) and says so."""
    e2e = _e2e_module()
    argv = ["--tiny", "--out", str(tmp_path), "--reps", "1", "--no-generate", "--compile-prefill"]
    assert e2e.main(argv + ["--variants", "lowbit_w8a8", "--batches", "1"]) == 0
    data = json.loads((tmp_path / "cpu-tiny-e2e.json").read_text())
    assert data["meta"]["prefill_compiled"] is True
    assert data["results"][0]["prefill_tok_s"] > 0, data["results"][0]
    md = (tmp_path / "cpu-tiny-e2e.md").read_text()
    assert "compiled (`torch.compile`" in md and "prefill only" in md, md


def test_e2e_step_loop_decodes_like_generate():
    """The bench's generate-free decode loop produces generate's greedy tokens (fp32 tiny Llama, batch 2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    e2e = _e2e_module()
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LlamaConfig(**e2e.TINY), dtype=torch.float32).eval()
    with torch.no_grad():  # large weights: logits depend on every position, so a slip in the cache shows
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    ids = torch.randint(1, 500, (2, 7))
    kw = dict(do_sample=False, cache_implementation="static", pad_token_id=0, disable_compile=True)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, min_new_tokens=6, **kw)
        got = e2e.step_loop_decode(model, ids, 6, compile_step=False)
    assert len(set(want[:, 7:].flatten().tolist())) > 2  # not one repeated token
    assert torch.equal(got, want)


def test_e2e_merge_rounds_takes_medians_and_keeps_samples():
    e2e = _e2e_module()
    rounds = {
        "bf16": [
            dict(variant="bf16", label="bf16", prefill_tok_s=v, b1_tok_s=b)
            for v, b in ((30.0, 5), (10.0, 7), (20.0, 6))
        ],
        "lowbit_int4": [
            dict(variant="lowbit_int4", label="int4", error="boom"),
            dict(variant="lowbit_int4", label="int4", prefill_tok_s=8.0, weights_GB=1.0),
            dict(variant="lowbit_int4", label="int4", prefill_tok_s=4.0, weights_GB=1.0),
        ],
        "ao_int4": [dict(variant="ao_int4", label="ao", error="no torchao")] * 2,
    }
    by = {r["variant"]: r for r in e2e.merge_rounds(rounds)}
    assert by["bf16"]["prefill_tok_s"] == 20.0 and by["bf16"]["prefill_tok_s_samples"] == [30.0, 10.0, 20.0]
    assert by["bf16"]["b1_tok_s"] == 6 and by["bf16"]["failed_rounds"] == 0
    # the failed round is left out of the median, and counted
    assert by["lowbit_int4"]["prefill_tok_s"] == 6.0 and by["lowbit_int4"]["failed_rounds"] == 1
    assert "error" not in by["lowbit_int4"] and by["lowbit_int4"]["weights_GB"] == 1.0
    assert by["ao_int4"]["error"] == "no torchao"
    # one round: the result as measured, no sample lists
    one = e2e.merge_rounds({"bf16": rounds["bf16"][:1]})[0]
    assert one == rounds["bf16"][0]


def test_e2e_bench_rounds_on_cpu(tmp_path):
    """--rounds 2: each variant runs twice; the table shows medians and lists the samples."""
    e2e = _e2e_module()
    argv = ["--tiny", "--out", str(tmp_path), "--reps", "1", "--no-generate", "--rounds", "2"]
    assert e2e.main(argv + ["--variants", "bf16,lowbit_int4", "--batches", "1"]) == 0
    data = json.loads((tmp_path / "cpu-tiny-e2e.json").read_text())
    assert data["meta"]["rounds"] == 2
    for r in data["results"]:
        samples = r["prefill_tok_s_samples"]
        assert len(samples) == 2 and all(s > 0 for s in samples), r
        assert r["prefill_tok_s"] == round(sum(samples) / 2, 2)  # the median of two
    md = (tmp_path / "cpu-tiny-e2e.md").read_text()
    assert "median of 2 processes" in md and "Samples per process" in md
    with pytest.raises(SystemExit):
        e2e.parse_args(["--tiny", "--rounds", "0"])


def test_options_that_would_do_nothing_or_crash_are_usage_errors(tiny_model, tmp_path, capsys):
    code, _, err = run_cli(
        "quantize", tiny_model, tmp_path / "q", "--scheme", "int8", "--skip", "down_projj", capsys=capsys
    )
    assert code != 0 and "--skip 'down_projj' matches no module" in err
    code, _, err = run_cli("eval", tiny_model, "--schemes", "int8", "--max-tokens", "-5", capsys=capsys)
    assert code != 0 and "--max-tokens must be at least 2" in err
    for opt, words in (("--ctx", "--ctx must be at least 2"), ("--new-tokens", "--new-tokens must be at least 1")):
        code, _, err = run_cli("demo", "--model", tiny_model, opt, "0", "--schemes", "int8", capsys=capsys)
        assert code != 0 and words in err, err


def test_e2e_report_gpu_alone_columns():
    """GPU runs report each batch's loop time and GPU-alone time per step; the GPU-alone column's
    speedup is bf16's ms over the variant's (7.2 / 3.6 = 2.00x), the time outside the steps is the
    loop's whole time less its first two steps and its five steady ones (8 tokens: 80 ms at 100
    tok/s - 20 - 5 x 7.5 = 22.5), and rows without those figures (CPU) get dashes; tables without
    them have no such columns."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from e2e_report import markdown
    finally:
        sys.path.pop(0)
    meta = dict(device="GPU", date="d", transformers="t", new_tokens=8, prefill=0, batches=[1])
    base = dict(variant="bf16", label="bf16", b1_step_tok_s=100.0, b1_step_loop_ms=7.5, b1_step_gpu_ms=7.2)
    q = dict(variant="lowbit_int4", label="int4", b1_step_tok_s=160.0, b1_step_loop_ms=4.4, b1_step_gpu_ms=3.6)
    base["b1_first_steps_ms"], q["b1_first_steps_ms"] = 20.0, 9.0  # int4: 50 - 9 - 22 = 19.0
    rows = {line.split(" | ")[0]: line for line in markdown([base, q], meta).splitlines() if line.startswith("| ")}
    assert "b1 first 2 steps ms | b1 loop ms | b1 outside ms | b1 GPU-alone ms | b1 GPU-alone x" in rows["| variant"]
    assert "| 1.60x | 9.0 | 4.4 | 19.0 | 3.6 | 2.00x |" in rows["| int4"]
    assert "| 1.00x | 20.0 | 7.5 | 22.5 | 7.2 | 1.00x |" in rows["| bf16"]
    cpu = [{k: v for k, v in r.items() if "_ms" not in k} for r in (base, q)]
    assert "GPU-alone" not in markdown(cpu, meta)


def test_e2e_generate_reuses_one_cache(tmp_path, monkeypatch):
    """--reuse-cache also reaches ``generate``: every call of a variant gets the same StaticCache
    as past_key_values (reset, no cache_implementation) and decodes the tokens a new cache per
    call gives."""
    import torch

    e2e = _e2e_module()
    calls = []
    build = e2e.build_model

    def spy_build(args, device):
        model = build(args, device)
        generate = model.generate

        def spy(ids, **kw):
            out = generate(ids, **kw)
            calls.append((kw.get("past_key_values"), kw.get("cache_implementation"), out))
            return out

        model.generate = spy
        return model

    monkeypatch.setattr(e2e, "build_model", spy_build)
    argv = ["--tiny", "--out", str(tmp_path), "--reps", "2", "--variants", "bf16", "--batches", "1", "--prefill", "0"]
    assert e2e.main(argv) == 0
    fresh, calls[:] = list(calls), []
    assert e2e.main(argv + ["--reuse-cache"]) == 0
    assert len(fresh) == len(calls) == 3  # warm-up + 2 reps
    assert all(cache is None and impl == "static" for cache, impl, _ in fresh)
    caches = [cache for cache, _, _ in calls]
    assert caches[0] is not None and all(c is caches[0] for c in caches)
    assert all(impl is None for _, impl, _ in calls)
    assert all(torch.equal(out, fresh[0][2]) for _, _, out in fresh + calls)


def test_e2e_step_loop_reuses_one_cache(monkeypatch):
    """--reuse-cache: step loops of one model, batch and length share one StaticCache, reset
    between loops, and decode the same tokens as loops with a new cache each."""
    import types

    import torch

    e2e = _e2e_module()
    model = e2e.build_model(types.SimpleNamespace(tiny=True, layers=None), torch.device("cpu"))
    ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fresh = e2e.step_loop_decode(model, ids, 5, False)
        monkeypatch.setattr(e2e, "_REUSE_CACHE", True)
        monkeypatch.setattr(e2e, "_CACHE_POOL", {})
        first = e2e.step_loop_decode(model, ids, 5, False)
        (cache,) = e2e._CACHE_POOL.values()
        second = e2e.step_loop_decode(model, ids, 5, False)
    assert list(e2e._CACHE_POOL.values()) == [cache]
    assert torch.equal(first, fresh) and torch.equal(second, fresh)
    assert "--reuse-cache" in e2e.parse_args(["--reuse-cache"]).child_argv
    with pytest.raises(SystemExit):
        e2e.parse_args(["--step-loop", "--new-tokens", "1"])


@pytest.mark.parametrize("new_tokens, first", [(6, 2), (3, 1), (2, 0)])
def test_e2e_step_loop_profiles_first_and_steady_steps_apart(new_tokens, first):
    """A (first, steady) pair of profiles: the loop's step function runs first_steps(new_tokens)
    times under the first and the remaining new_tokens - 1 - first times under the second; short
    loops keep at least one steady step."""
    import cProfile
    import pstats
    import types

    import torch

    e2e = _e2e_module()
    assert e2e.first_steps(new_tokens) == first
    model = e2e.build_model(types.SimpleNamespace(tiny=True, layers=None), torch.device("cpu"))
    ids = torch.randint(0, 512, (1, 4), generator=torch.Generator().manual_seed(2))
    profs = cProfile.Profile(), cProfile.Profile()
    with torch.no_grad():
        e2e.step_loop_decode(model, ids, new_tokens, False, prof=profs)

    def step_calls(prof):
        if not prof.getstats():
            return 0
        stats = pstats.Stats(prof).stats
        return sum(v[1] for (path, _, name), v in stats.items() if name == "step" and path.endswith("e2e.py"))

    assert [step_calls(p) for p in profs] == [first, new_tokens - 1 - first]
