"""W8A8 (int8, fp8) at large M, one GPU command: the shipped ops against bf16 F.linear,
the two-pass activation quantizer, torch._scaled_mm with exact accumulation and fixed
tiles of the TMA GEMM (fp8 with bf16 x, which the shipped op sends to torch._scaled_mm;
int8, which it sends to the pointer GEMM).

    python bench/w8_large_m.py [--out DIR] [--ms 2048,512] [--shapes 4096x4096,...]

Same harness as ``kernels.py`` (a >= 1 GiB stack of distinct layers in one CUDA graph,
median, ratio to bf16 in the same run). Every variant is the whole op (activation
quantization included) and is checked against ``lowbit.ops.reference`` on layer 0.
Writes ``<device>-w8-large-m.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import device_tag, env, log, time_stack  # noqa: E402

from lowbit.ops import reference as ref  # noqa: E402
from lowbit.ops.triton import _w8 as w8_mod  # noqa: E402
from lowbit.ops.triton import fp8 as fp8_mod  # noqa: E402
from lowbit.ops.triton import quant as quant_mod  # noqa: E402
from lowbit.ops.triton.fp8 import fp8_dyn_mm  # noqa: E402
from lowbit.ops.triton.int8 import int8_dyn_mm  # noqa: E402

# fp8 TMA tiles: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages)
TILES = [
    (128, 256, 128, 8, 8, 4),
    (128, 128, 128, 8, 4, 4),
]  # exact accumulation (max_num_imprecise_acc=128, commit 10bcb8e) cost 25-35%: results/h100-w8-large-m-promote.md


def variants(scheme):
    """name -> patches {(module, attr): value} applied around the shipped op."""
    out = {"shipped": {}, "two_pass_quant": {(quant_mod, "ONE_PASS_MAX_K"): 1}}
    if scheme == "fp8":
        out["scaled_mm_exact_acc"] = {(fp8_mod, "SCALED_MM_FAST_ACCUM"): False}
        route = (fp8_mod, "SCALED_MM_MIN_M"), 1 << 30  # bf16 x off torch._scaled_mm
    else:
        route = (w8_mod, "TMA_DTYPES"), (torch.int8,)  # int8 weights into the TMA GEMM
    for t in TILES:
        c = dict(BLOCK_M=t[0], BLOCK_N=t[1], BLOCK_K=t[2], GROUP_M=t[3], num_warps=t[4], num_stages=t[5])
        name = "tma_" + "x".join(map(str, t[:3])) + f"_w{t[4]}_s{t[5]}"
        out[name] = {(w8_mod, "tma_config"): lambda *a, c=c: c, route[0]: route[1]}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096")
    p.add_argument("--ms", default="2048,512")
    p.add_argument("--schemes", default="int8_dyn,fp8")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting new shapes after this")
    args = p.parse_args()
    info = env()
    log(json.dumps(info))
    rows, t_start = [], time.time()
    for shape in args.shapes.split(","):
        if time.time() - t_start > args.budget_s:
            log(f"budget spent, skipping {shape}")
            continue
        k, n = map(int, shape.split("x"))
        n_layers = max(1, math.ceil(1024**3 / (k * n * 2)))
        g = torch.Generator(device="cuda").manual_seed(k * 7 + n)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(n_layers)]
        q = {"int8_dyn": [], "fp8": []}
        for w in ws:
            s = ref.int8_choose_qparams(w, torch.float32)
            q["int8_dyn"].append((ref.int8_quantize(w, s), s))
            s = ref.fp8_choose_qparams(w)
            q["fp8"].append((ref.fp8_quantize(w, s), s))
        ops = {"int8_dyn": (int8_dyn_mm, ref.int8_dynamic_linear), "fp8": (fp8_dyn_mm, ref.fp8_dynamic_linear)}
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            t_bf, _ = time_stack([lambda x, w=w: F.linear(x, w) for w in ws], x)
            base = dict(K=k, N=n, M=m, layers=n_layers)
            rows.append({**base, "scheme": "bf16", "impl": "bf16", "us": round(t_bf * 1e3, 2), "speedup": 1.0,
                         "TFLOPs": round(2 * m * k * n / t_bf / 1e9, 1)})  # fmt: skip
            for scheme in args.schemes.split(","):
                op, spec = ops[scheme]
                want = spec(x, *q[scheme][0])
                for name, patches in variants(scheme).items():
                    saved = {key: getattr(*key) for key in patches}
                    row = {**base, "scheme": scheme, "impl": name}
                    try:
                        for (mod, attr), val in patches.items():
                            setattr(mod, attr, val)
                        with torch.no_grad():
                            y = op(x, *q[scheme][0])
                        row["rel_err_vs_ref"] = float(
                            f"{(y.double() - want.double()).norm() / want.double().norm():.2e}"
                        )
                        t, row["how"] = time_stack([lambda x, p=p, op=op: op(x, *p) for p in q[scheme]], x)
                        row.update(us=round(t * 1e3, 2), speedup=round(t_bf / t, 3),
                                   TFLOPs=round(2 * m * k * n / t / 1e9, 1))  # fmt: skip
                    except Exception as e:
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                    finally:
                        for (mod, attr), val in saved.items():
                            setattr(mod, attr, val)
                    rows.append(row)
                    log(f"K={k} N={n} M={m} {scheme} {name}: {row.get('speedup', row.get('error'))} "
                        f"err {row.get('rel_err_vs_ref')}")  # fmt: skip
        del ws, q
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{device_tag()}-w8-large-m")
    with open(stem + ".json", "w") as f:
        json.dump({"env": info, "rows": rows}, f, indent=1)
    lines = [f"- command: `{info['command']}`", f"- device: {info['gpu']}; torch {info['torch']}, triton {info['triton']}",
             "", "| K | N | M | scheme | variant | x bf16 | TFLOP/s | rel err |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["impl"] != "bf16":
            lines.append(f"| {r['K']} | {r['N']} | {r['M']} | {r['scheme']} | {r['impl']} | "
                         f"{r.get('speedup', 'err')} | {r.get('TFLOPs', '-')} | {r.get('rel_err_vs_ref', r.get('error'))} |")  # fmt: skip
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    log(f"wrote {stem}.json/.md")


if __name__ == "__main__":
    main()
