"""Command line: ``python -m lowbit --help``."""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import nn

import lowbit
from lowbit.ops.reference import sqnr

SCHEMES = {
    "int4_weight_only": lambda gs: lowbit.int4_weight_only(group_size=gs),
    "int8_weight_only": lambda gs: lowbit.int8_weight_only(),
    "int8_dynamic_activation_int8_weight": lambda gs: lowbit.int8_dynamic_activation_int8_weight(),
    "float8_dynamic_activation_float8_weight": lambda gs: lowbit.float8_dynamic_activation_float8_weight(),
}
CPU_SCHEMES = ("int4_weight_only", "int8_weight_only", "int8_dynamic_activation_int8_weight")


def _param_bytes(model: nn.Module) -> int:
    total = 0
    for p in model.parameters():
        total += p.nbytes_packed if isinstance(p, lowbit.QTensor) else p.numel() * p.element_size()
    return total


def _time_forward(model, x, reps: int = 20) -> float:
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x)
        return (time.perf_counter() - t0) / reps


def cmd_demo(args) -> int:
    """Quantize an MLP stack built in code with each CPU scheme; print size, speed and error."""
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
    rows = [("bf16", _param_bytes(model), base_t, float("inf"))]
    for name in CPU_SCHEMES:
        q = lowbit.quantize_(copy.deepcopy(model), SCHEMES[name](args.group_size))
        with torch.inference_mode():
            out = q(x)
        rows.append((name, _param_bytes(q), _time_forward(q, x), sqnr(ref, out)))
    print(
        f"MLP stack: {layers} blocks of {dim}->{hidden}->{dim}, bf16, {args.tokens} tokens, {torch.get_num_threads()} threads"
    )
    print(f"{'scheme':40s} {'MiB':>8s} {'ms/fwd':>8s} {'x bf16':>7s} {'SQNR dB':>8s}")
    for name, size, t, s in rows:
        print(f"{name:40s} {size / 2**20:8.2f} {t * 1e3:8.2f} {base_t / t:7.2f} {s:8.1f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="lowbit: low-bit quantized weights for PyTorch")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="quantize a model built in code with each CPU scheme and compare")
    d.add_argument("--dim", type=int, default=1024)
    d.add_argument("--layers", type=int, default=4)
    d.add_argument("--tokens", type=int, default=1)
    d.add_argument("--group-size", type=int, default=128)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
