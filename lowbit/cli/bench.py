"""``lowbit bench``: run the GPU benchmarks in bench/ (kernels.py, e2e.py) from the command line."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from lowbit.cli import common as c

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="GPU benchmarks: kernels (matmuls vs bf16/torchao) or e2e (Llama-3-8B-shaped generate)",
        description="Runs bench/kernels.py or bench/e2e.py from the source checkout; the arguments after the "
        "benchmark name go to the script (try `lowbit bench e2e --help`). Both need a CUDA GPU; "
        "`lowbit bench e2e --tiny` runs a tiny model on CPU as a smoke check.",
    )
    p.add_argument("which", choices=["kernels", "e2e"], help="which benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed on to the benchmark script")
    p.set_defaults(func=run)


def run(args) -> int:
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    script = BENCH_DIR / f"{args.which}.py"
    if not script.is_file():
        raise c.CliError(f"{script} not found: the benchmarks live in the source checkout's bench/ folder")
    help_only = any(a in ("-h", "--help") for a in rest)
    cpu_ok = args.which == "e2e" and "--tiny" in rest
    if not (torch.cuda.is_available() or help_only or cpu_ok):
        raise c.CliError(
            f"`lowbit bench {args.which}` needs a CUDA GPU and none is visible"
            + (" (for a CPU smoke check: lowbit bench e2e --tiny)" if args.which == "e2e" else "")
        )
    return subprocess.call([sys.executable, str(script), *rest])
