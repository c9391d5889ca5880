"""Kernel benchmark: lowbit's Triton matmuls vs bf16 F.linear and torchao, one GPU command.

    python bench/kernels.py [--out DIR] [--shapes 4096x4096,...] [--ms 1,8,...] [--no-torchao]

For each (K, N) a stack of L distinct layers holding >= 1 GiB of bf16 weights
(so L2 never holds the weights) is run inside one CUDA graph
(``triton.testing.do_bench_cudagraph``, median); time per layer = graph time / L.
Every variant sees the same random N(0, 0.02) weights and N(0, 1) inputs.
Correctness per (shape, M): SQNR (dB) of each variant's layer-0 output against
the bf16 output, and for lowbit the relative error against ``lowbit.ops.reference``.
Writes ``<device>-kernels.json``, ``<device>-kernels.md`` and ``<device>-kernels.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton
import triton.runtime.autotuner
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lowbit.ops import reference as ref  # noqa: E402
from lowbit.ops.triton import _utils as utils_mod  # noqa: E402
from lowbit.ops.triton import _w8 as w8_mod  # noqa: E402
from lowbit.ops.triton import int4 as int4_mod
from lowbit.ops.triton.fp8 import fp8_dyn_mm  # noqa: E402
from lowbit.ops.triton.int4 import int4_mm  # noqa: E402
from lowbit.ops.triton.int8 import int8_dyn_mm, int8_mm  # noqa: E402
from lowbit.qtensor.int4 import Int4Tensor, cuda_packing  # noqa: E402

GS = 128
BYTES_PER_W = {"bf16": 2.0, "int4": 0.5 + 4 / GS, "int8_wo": 1.0, "int8_dyn": 1.0, "fp8": 1.0}
SCHEMES = ["int4", "int8_wo", "int8_dyn", "fp8"]
SHIPPED_INT4 = cuda_packing()
# --int4-other's byte order (--int4-other-packing; default: "mma" if "plain" is shipped, else "plain")
OTHER_INT4 = "mma" if SHIPPED_INT4 == "plain" else "plain"


def log(*a):
    print(*a, flush=True)


def env() -> dict:
    info = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "gpu": torch.cuda.get_device_name(),
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
    }
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except Exception as e:  # recorded, not fatal
        info["torchao"] = f"unavailable: {type(e).__name__}: {e}"[:200]
    return info


def ceilings() -> dict:
    n = 1024**3
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    t2 = do_bench(lambda: x @ x, warmup=25, rep=200, return_mode="median")
    torch.cuda.empty_cache()
    return {"copy_TBps": round(2 * n / t / 1e9, 3), "bf16_mm_TFLOPs": round(2 * 8192**3 / t2 / 1e9, 1)}


def device_tag() -> str:
    name = torch.cuda.get_device_name()
    for tag in ("H100", "H200", "A100", "L40S", "L4", "B200"):
        if tag in name:
            return tag.lower()
    return "".join(c if c.isalnum() else "_" for c in name).lower()


# ----------------------------------------------------------------------------- variants
def lowbit_layers(ws: list[torch.Tensor]) -> dict:
    """Per scheme: (list of per-layer callables x -> y, reference fn on layer 0)."""
    out = {}
    n, k = ws[0].shape
    # "tiled" exists for whole 16-row x 128-k tiles only; other shapes use "plain", as Int4Tensor does
    whole_tiles = ref.int4_tiled_fits(n, k)
    fit = {p: p if p != "tiled" or whole_tiles else "plain" for p in {"plain", SHIPPED_INT4, OTHER_INT4}}
    packed = {p: [] for p in set(fit.values())}
    for w in ws:  # the fields CUDA Int4Tensors hold, in each byte order
        t = Int4Tensor.from_float(w, group_size=GS, packing="plain")
        for packing in packed:
            t = t.repack(packing)
            packed[packing].append((t.qdata, t.scale, t.zero))
    # "lowbit" is the byte order CUDA Int4Tensors get (cuda_packing()); --int4-other times OTHER_INT4
    shipped, other = fit[SHIPPED_INT4], fit[OTHER_INT4]
    out["int4"] = (
        [lambda x, p=p: int4_mm(x, *p, GS, shipped) for p in packed[shipped]],
        lambda x, p=packed["plain"][0]: ref.int4_linear(x, *p, GS),
        [lambda x, p=p: int4_mm(x, *p, GS, other) for p in packed[other]],
    )
    q8 = []
    for w in ws:
        s = ref.int8_choose_qparams(w, torch.float32)
        q8.append((ref.int8_quantize(w, s), s, s.to(torch.bfloat16)))
    out["int8_wo"] = (
        [lambda x, p=p: int8_mm(x, p[0], p[2]) for p in q8],
        lambda x, p=q8[0]: ref.int8_weight_only_linear(x, p[0], p[2]),
    )
    out["int8_dyn"] = (
        [lambda x, p=p: int8_dyn_mm(x, p[0], p[1]) for p in q8],
        lambda x, p=q8[0]: ref.int8_dynamic_linear(x, p[0], p[1]),
    )
    qf = []
    for w in ws:
        s = ref.fp8_choose_qparams(w)
        qf.append((ref.fp8_quantize(w, s), s))
    out["fp8"] = (
        [lambda x, p=p: fp8_dyn_mm(x, *p) for p in qf],
        lambda x, p=qf[0]: ref.fp8_dynamic_linear(x, *p),
    )
    return out


def torchao_layers(ws: list[torch.Tensor], schemes=SCHEMES) -> dict:
    import torchao.quantization as aq

    cfgs = {
        "int4": lambda: aq.Int4WeightOnlyConfig(group_size=GS, int4_packing_format="tile_packed_to_4d"),
        "int8_wo": lambda: aq.Int8WeightOnlyConfig(),
        "int8_dyn": lambda: aq.Int8DynamicActivationInt8WeightConfig(),
        "fp8": lambda: aq.Float8DynamicActivationFloat8WeightConfig(granularity=aq.PerRow()),
    }
    out = {}
    for name, make in cfgs.items():
        if name not in schemes:
            continue
        try:
            mods = []
            for w in ws:
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
                lin.weight.data.copy_(w)
                m = torch.nn.Sequential(lin)
                aq.quantize_(m, make())
                mods.append(m[0])
            out[name] = [lambda x, m=m: m(x) for m in mods]
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"[:300]
            log(f"torchao {name}: quantize failed: {out[name]}")
    return out


def sqnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(ref.sqnr(a, b), 1)


def time_stack(fns, x) -> tuple[float, str]:
    run = lambda: [f(x) for f in fns]  # noqa: E731
    with torch.no_grad():
        run()  # autotune / compile outside the capture
        torch.cuda.synchronize()
        try:
            return do_bench_cudagraph(run, rep=100, return_mode="median") / len(fns), "graph"
        except Exception as e:  # e.g. a host sync inside the op: time plain launches instead
            log(f"no CUDA graph ({type(e).__name__}); timing launches")
            torch.cuda.synchronize()
            return do_bench(run, warmup=25, rep=100, return_mode="median") / len(fns), "nograph"


# lowbit variants with the algorithm switch moved, to measure crossovers (--explore)
# (module, {attribute: value, ...}, when): the attributes are set for that row only
# plain launches instead of PDL, up to the M where the scheme leaves its Triton kernels: 256 for
# W8A8 / fp8 (TMA GEMM, _scaled_mm), DEQUANT_MIN_M for W8A16
def _no_pdl(limit):
    return (utils_mod, {"PDL": False}, lambda m: m < limit())


def _w8_pdl(limit):  # the GEMM's PDL modes other than the shipped one; the quantizer keeps mode 1
    return [
        (w8_mod, {"GEMM_PDL": mode}, lambda m: w8_mod.GEMV_MAX_M < m < limit())
        for mode in (0, 1, 2, 3)
        if mode != w8_mod.GEMM_PDL
    ]


_NO_PDL, _W8_PDL = _no_pdl(lambda: 256), _w8_pdl(lambda: 256)
_WO_LIMIT = lambda: w8_mod.DEQUANT_MIN_M  # noqa: E731
ALT = {
    "int8_dyn": [_NO_PDL, *_W8_PDL],
    "fp8": [_NO_PDL, *_W8_PDL],
    "int4": [
        *[
            (int4_mod, {"GEMM_PDL": mode}, lambda m: m < int4_mod.DEQUANT_MIN_M)
            for mode in (0, 1, 2, 3)
            if mode != int4_mod.GEMM_PDL
        ],
        # no GEMV tiles at M <= 8 (the tensor-core tiles only, as before session 14)
        (int4_mod, {"GEMV_MAX_M": 0}, lambda m: m <= 8),
        # (scale, zero) loaded apart (2-byte loads outside the cp.async pipeline), as before session 12
        (int4_mod, {"SZ_WORDS": False}, lambda m: m < int4_mod.DEQUANT_MIN_M),
        (int4_mod, {"DEQUANT_MIN_M": 1 << 30}, lambda m: m >= 128),
        (int4_mod, {"GEMM_SWAP": "on"}, lambda m: 64 <= m < int4_mod.DEQUANT_MIN_M),
        (int4_mod, {"GEMM_SWAP": "tuned"}, lambda m: 64 <= m < int4_mod.DEQUANT_MIN_M),
        (int4_mod, {"DEQUANT_MIN_M": 1 << 30, "GEMM_SWAP": "on"}, lambda m: m >= int4_mod.DEQUANT_MIN_M),
        # all of w_hat in one chunk (fewer host steps; 0-3% slower on the GPU, KERNEL_NOTES session 9)
        (int4_mod, {"DEQUANT_ROWS": 1 << 20}, lambda m: m >= int4_mod.DEQUANT_MIN_M),
    ],
    "int8_wo": [
        _no_pdl(_WO_LIMIT),
        *_w8_pdl(_WO_LIMIT),
        (w8_mod, {"GEMV_MAX_M": 0}, lambda m: m <= 8),
        (w8_mod, {"DEQUANT_MIN_M": 1 << 30}, lambda m: m >= 128),
        (w8_mod, {"GEMV_CVT": "i2f"}, lambda m: m <= w8_mod.GEMV_MAX_M),
        (w8_mod, {"GEMV_CVT": "alu"}, lambda m: m <= w8_mod.GEMV_MAX_M),
        (w8_mod, {"GEMM_SWAP": "on"}, lambda m: 64 <= m < w8_mod.DEQUANT_MIN_M),
        (w8_mod, {"GEMM_SWAP": "tuned"}, lambda m: 64 <= m < w8_mod.DEQUANT_MIN_M),
        (w8_mod, {"DEQUANT_MIN_M": 1 << 30, "GEMM_SWAP": "on"}, lambda m: m >= w8_mod.DEQUANT_MIN_M),
        (w8_mod, {"DEQUANT_ROWS": 1 << 20}, lambda m: m >= w8_mod.DEQUANT_MIN_M),
    ],
}


def weight_stack(k: int, n: int) -> tuple[list[torch.Tensor], torch.Generator]:
    """Distinct random bf16 [N, K] layers totalling >= 1 GiB (never L2-resident), and the
    generator that made them (seeded by the shape) for the activations."""
    g = torch.Generator(device="cuda").manual_seed(k * 7 + n)
    n_layers = max(1, math.ceil(1024**3 / (k * n * 2)))
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(n_layers)], g


def bench_shape(k, n, ms, use_ao, rows, explore=False, schemes=SCHEMES, int4_other=False, explore_filter=""):
    ws, g = weight_stack(k, n)
    n_layers = len(ws)
    t0 = time.time()
    lb = {s: v for s, v in lowbit_layers(ws).items() if s in schemes}
    ao = torchao_layers(ws, schemes) if use_ao else {}
    log(f"K={k} N={n}: {n_layers} layers, quantized in {time.time() - t0:.1f}s")
    bf16 = [lambda x, w=w: F.linear(x, w) for w in ws]
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
        with torch.no_grad():
            y_bf16 = F.linear(x, ws[0])
        t_bf, _ = time_stack(bf16, x)
        base = dict(K=k, N=n, M=m, layers=n_layers)
        rows.append({**base, "impl": "bf16", "scheme": "bf16", "us": round(t_bf * 1e3, 2), "speedup": 1.0,
                     "GBps": round(k * n * 2 / t_bf / 1e6, 1), "TFLOPs": round(2 * m * k * n / t_bf / 1e9, 1)})  # fmt: skip
        for scheme in [s for s in SCHEMES if s in lb]:
            impls = [("lowbit", lb[scheme][0], None)]
            if use_ao:
                impls.append(("torchao", ao.get(scheme, "not run"), None))
            if int4_other and scheme == "int4":
                impls.append(("lowbit_other", lb[scheme][2], None))
            for mod, change, when in ALT.get(scheme, []) if explore else []:
                name = "lowbit_" + ",".join(f"{a}={v}" for a, v in change.items())
                if when(m) and re.search(explore_filter, name):
                    impls.append((name, lb[scheme][0], (mod, change)))
            for impl, fns, alt in impls:
                row = {**base, "impl": impl, "scheme": scheme}
                if isinstance(fns, str):
                    row["error"] = fns
                    rows.append(row)
                    continue
                saved = {}
                if alt:
                    saved = {a: getattr(alt[0], a) for a in alt[1]}
                    for a, v in alt[1].items():
                        setattr(alt[0], a, v)
                try:
                    with torch.no_grad():
                        y = fns[0](x)
                        row["sqnr_vs_bf16_db"] = sqnr(y_bf16, y)
                        if impl.startswith("lowbit"):
                            r = lb[scheme][1](x)
                            row["rel_err_vs_ref"] = float(f"{(y.double() - r.double()).norm() / r.double().norm():.2e}")
                    t, row["how"] = time_stack(fns, x)
                    row.update(us=round(t * 1e3, 2), speedup=round(t_bf / t, 3),
                               GBps=round(k * n * BYTES_PER_W[scheme] / t / 1e6, 1),
                               TFLOPs=round(2 * m * k * n / t / 1e9, 1))  # fmt: skip
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    log(f"{impl} {scheme} K={k} N={n} M={m}: {row['error']}")
                finally:
                    for a, v in saved.items():
                        setattr(alt[0], a, v)
                rows.append(row)
        log(
            f"K={k} N={n} M={m}: "
            + " ".join(f"{r['impl']}-{r['scheme']}={r.get('speedup', 'ERR')}" for r in rows if r["M"] == m and r["K"] == k and r["N"] == n and r["impl"] != "bf16")
        )  # fmt: skip
    del ws, lb, ao
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- report
def markdown(info, ceil, rows) -> str:
    lines = [
        "# lowbit kernel benchmark",
        "",
        f"- command: `{info['command']}`",
        f"- device: {info['gpu']} (CUDA {info['cuda']}); date {info['date']}",
        f"- torch {info['torch']}, triton {info['triton']}, torchao {info['torchao']}",
        f"- ceilings: copy {ceil['copy_TBps']} TB/s, bf16 8192^3 mm {ceil['bf16_mm_TFLOPs']} TFLOP/s",
        "- time per layer over a >= 1 GiB stack of distinct bf16-sized layers in one CUDA graph, median;",
        "  speedup = bf16 F.linear time / time; GB/s = weight bytes read / time (M <= 32);",
        "  TFLOP/s = 2MNK / time (M >= 512); SQNR of layer 0's output vs bf16 (dB).",
        "",
        "| K | N | M | bf16 us | scheme | lowbit x | torchao x | lowbit GB/s or TFLOP/s | lowbit SQNR dB | rel err vs ref |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    idx = {(r["impl"], r["scheme"], r["K"], r["N"], r["M"]): r for r in rows}
    for r in rows:
        if r["impl"] != "bf16":
            continue
        key = (r["K"], r["N"], r["M"])
        for s in SCHEMES:
            lb = idx.get(("lowbit", s) + key, {})
            ao = idx.get(("torchao", s) + key, {})
            if not lb and not ao:
                continue
            m = r["M"]
            rate = f"{lb.get('GBps', '-')} GB/s" if m <= 32 else f"{lb.get('TFLOPs', '-')} TF/s" if m >= 512 else "-"
            aox = ao.get("speedup", "err" if "error" in ao else "-")
            lines.append(
                f"| {r['K']} | {r['N']} | {m} | {r['us']} | {s} | {lb.get('speedup', 'err')} | {aox} | {rate} "
                f"| {lb.get('sqnr_vs_bf16_db', '-')} | {lb.get('rel_err_vs_ref', '-')} |"
            )
    plain = [r for r in rows if r["impl"] == "lowbit_other"]
    if plain:
        other = OTHER_INT4
        lines += ["", "int4 byte order (`--int4-other`), speedup over bf16 in the same run:", "",
                  f"| K | N | M | {SHIPPED_INT4} (shipped) | {other} | torchao |", "|---|---|---|---|---|---|"]  # fmt: skip
        for r in plain:
            key = (r["K"], r["N"], r["M"])
            mma, ao = idx.get(("lowbit", "int4") + key, {}), idx.get(("torchao", "int4") + key, {})
            lines.append(f"| {r['K']} | {r['N']} | {r['M']} | {mma.get('speedup', 'err')} "
                         f"| {r.get('speedup', 'err')} | {ao.get('speedup', '-')} |")  # fmt: skip
    errs = [r for r in rows if "error" in r]
    if errs:
        lines += ["", "## Errors", ""] + [f"- {r['impl']} {r['scheme']} K={r['K']} N={r['N']} M={r['M']}: {r['error'].splitlines()[0]}" for r in errs]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        log(f"no plot: {e}")
        return
    shapes = sorted({(r["K"], r["N"]) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, (k, n) in zip(axes[0], shapes):
        for impl, style in (("lowbit", "-o"), ("torchao", "--x")):
            for s in SCHEMES:
                pts = sorted((r["M"], r["speedup"]) for r in rows if r["impl"] == impl and r["scheme"] == s and r["K"] == k and r["N"] == n and "speedup" in r)  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{impl} {s}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speedup over bf16 F.linear")
        ax.set_title(f"K={k} N={n}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096", help="KxN list")
    p.add_argument("--ms", default="1,8,32,128,512,2048")
    p.add_argument("--no-torchao", action="store_true")
    p.add_argument("--explore", action="store_true", help="also time lowbit with the M switches moved")
    p.add_argument("--explore-filter", default="", help="regex: only --explore rows whose name matches")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="subset of " + ",".join(SCHEMES))
    p.add_argument("--int4-other", action="store_true", help="also time int4 in the byte order not shipped")
    p.add_argument(
        "--int4-other-packing",
        choices=["plain", "mma", "tiled"],
        default=None,
        help="that byte order (default: "
        "mma if plain is shipped, else plain); tiled needs every shape in whole 16 x 128 tiles",
    )
    args = p.parse_args()
    if args.int4_other_packing:
        global OTHER_INT4
        OTHER_INT4 = args.int4_other_packing
    torch.manual_seed(0)
    info = env()
    log(json.dumps(info))
    use_ao = not args.no_torchao and not info["torchao"].startswith("unavailable")
    ceil = ceilings()
    log(json.dumps(ceil))
    rows: list[dict] = []
    tag = device_tag()
    os.makedirs(args.out, exist_ok=True)
    ms = [int(m) for m in args.ms.split(",")]
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        try:
            bench_shape(
                k, n, ms, use_ao, rows, args.explore, args.schemes.split(","), args.int4_other, args.explore_filter
            )
        except Exception:
            traceback.print_exc()
        with open(os.path.join(args.out, f"{tag}-kernels.json"), "w") as f:
            json.dump({"env": info, "ceilings": ceil, "rows": rows}, f, indent=1)
    tuned = {}
    for mod in (int4_mod, w8_mod):
        for name, obj in vars(mod).items():
            if isinstance(obj, triton.runtime.autotuner.Autotuner):  # key -> the config it picked
                tuned[f"{mod.__name__}.{name}"] = {str(k): str(v) for k, v in obj.cache.items()}
    log("autotuned configs: " + json.dumps(tuned, indent=1))
    md = markdown(info, ceil, rows)
    with open(os.path.join(args.out, f"{tag}-kernels.md"), "w") as f:
        f.write(md)
    plot(rows, os.path.join(args.out, f"{tag}-kernels.png"))
    log(md)


if __name__ == "__main__":
    main()
