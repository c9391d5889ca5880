"""``lowbit generate``: a prompt in, text and tokens/s out."""

from __future__ import annotations

from lowbit.cli import common as c


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="answer a prompt (greedy) and report tokens/s",
        description="Generate text greedily from a model folder (full precision or lowbit checkpoint) or .gguf file. "
        "With --scheme, a full-precision model is quantized in memory first.",
    )
    p.add_argument("model", help=f"model folder, lowbit checkpoint, .gguf file, or '{c.SMOLLM2}'")
    p.add_argument("--prompt", default="What is the capital of France?", help="the prompt (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    p.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, not through the chat template")
    p.add_argument(
        "--scheme", choices=list(c.SCHEMES), help="quantize a full-precision model in memory with this scheme first"
    )
    p.add_argument("--group-size", type=int, choices=c.GROUP_SIZES, default=128, help="int4 group size (default: 128)")
    p.add_argument("--dtype", choices=list(c.DTYPES), default="bfloat16", help="model dtype (default: bfloat16)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.max_new_tokens < 1:
        raise c.CliError("--max-new-tokens must be at least 1")
    src = c.resolve_model(args.model)
    if args.scheme and c.is_lowbit_checkpoint(src):
        raise c.CliError(f"{src} is already quantized; drop --scheme")
    tokenizer = c.load_tokenizer(src)
    model = c.load_model(src, c.DTYPES[args.dtype])
    if args.scheme:
        model = c.quantize_in_memory(model, args.scheme, args.group_size)
    g = c.generate(model, tokenizer, args.prompt, args.max_new_tokens, chat=not args.no_chat)
    print(g.text)
    print(f"[{g.new_tokens} tokens in {g.seconds:.2f} s: {g.tok_s:.1f} tokens/s]")
    return 0
