"""``lowbit eval``: perplexity on a text file, full precision and quantized side by side."""

from __future__ import annotations

import time

from lowbit.cli import common as c


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity on a text file, full precision vs quantized",
        description="Perplexity of a model on a UTF-8 text file (default: a bundled public-domain text). "
        "A full-precision model is also quantized in memory with each --schemes entry and measured beside it; "
        "a lowbit checkpoint is measured as it is, beside --reference if given.",
    )
    p.add_argument("model", help=f"model folder, lowbit checkpoint, .gguf file, or '{c.SMOLLM2}'")
    p.add_argument(
        "--text",
        default=None,
        help="UTF-8 text file (default: the bundled Declaration of Independence + Gettysburg Address)",
    )
    p.add_argument(
        "--schemes",
        default="int4",
        help=f"comma-separated schemes to compare with full precision (default: int4; any of {','.join(c.SCHEMES)})",
    )
    p.add_argument("--group-size", type=int, choices=c.GROUP_SIZES, default=128, help="int4 group size (default: 128)")
    p.add_argument("--reference", default=None, help="full-precision model to compare a lowbit checkpoint with")
    p.add_argument("--ctx", type=int, default=512, help="tokens per evaluation window (default: 512)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the text")
    p.add_argument("--dtype", choices=list(c.DTYPES), default="bfloat16", help="model dtype (default: bfloat16)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.ctx < 2:
        raise c.CliError("--ctx must be at least 2")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise c.CliError("--max-tokens must be at least 2 (perplexity needs two tokens)")
    schemes = c.parse_schemes(args.schemes)
    src = c.resolve_model(args.model)
    dtype = c.DTYPES[args.dtype]
    tokenizer = c.load_tokenizer(src)
    ids = c.read_text_ids(tokenizer, args.text or c.default_text(), args.max_tokens)
    rows = []  # (name, MiB in memory, perplexity, seconds)

    def measure(name, model):
        t0 = time.perf_counter()
        ppl = c.perplexity(model, ids, args.ctx)
        rows.append((name, c.memory_bytes(model), ppl, time.perf_counter() - t0))

    if c.is_lowbit_checkpoint(src):
        if args.reference:
            measure("full precision", c.load_model(c.resolve_model(args.reference), dtype))
        measure(f"{src} (lowbit)", c.load_model(src, dtype))
    else:
        model = c.load_model(src, dtype)
        measure(f"full precision ({args.dtype})", model)
        for s in schemes:
            measure(
                s + (f" g{args.group_size}" if s == "int4" else ""), c.quantize_in_memory(model, s, args.group_size)
            )
    base = rows[0][2]
    print(f"perplexity on {args.text or c.default_text().name}: {ids.numel()} tokens, windows of {args.ctx}")
    print(f"| {'model':<32} | {'MiB':>8} | {'perplexity':>10} | {'vs first':>8} | {'eval s':>6} |")
    print(f"|{'-' * 34}|{'-' * 10}:|{'-' * 11}:|{'-' * 9}:|{'-' * 7}:|")
    for name, size, ppl, sec in rows:
        print(f"| {name:<32} | {c.mib(size):>8} | {ppl:>10.3f} | {ppl / base:>7.3f}x | {sec:>6.1f} |")
    return 0
