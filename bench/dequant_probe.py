"""Where the time of int4 / W8A16 at large M goes: dequantize kernel vs chunked cuBLAS, one GPU command.

    python bench/dequant_probe.py [--out DIR] [--shapes 4096x14336,...] [--ms 512,2048]

At M >= DEQUANT_MIN_M the int4 launcher builds w_hat DEQUANT_ROWS rows at a time with
``_dequant_kernel`` and runs each chunk's GEMM with cuBLAS (``chunked_dequant_mm``).
For a stack of distinct layers (>= 1 GiB of bf16 weights, as ``kernels.py``), inside one
CUDA graph, median, per layer:

* ``bf16``: F.linear on the bf16 weights; ``shipped``: ``int4_mm`` as it ships;
* ``dequant only``: the chunks' dequantize launches alone (no GEMM), with the achieved
  bandwidth counting 0.53 B read + 2 B written per weight;
* ``mm only``: the chunks' cuBLAS GEMMs alone on a pre-filled buffer;
* candidate dequantize kernels (``_dq_probe``: BLOCK_N rows x G groups per program, the
  shipped fp32 formula or the GEMM's PTX unpack, 4 or 8 warps) alone and inside the
  chunked path, and the chunk size.

Every candidate's output is compared with the reference's w_hat (max ulp-level
difference reported). Writes ``<device>-dequant-probe.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import device_tag, env, log  # noqa: E402

from lowbit.ops import reference as ref  # noqa: E402
from lowbit.ops.triton import int4 as int4_mod  # noqa: E402
from lowbit.ops.triton._utils import chunked_dequant_mm  # noqa: E402

GS = 128


@triton.jit
def _dq_probe(q_ptr, s_ptr, z_ptr, w_ptr, N, K, GS: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr,
              ASM: tl.constexpr):  # fmt: skip
    """w_hat rows [BLOCK_N] x groups [G] per program (plain byte order)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ng = K // GS
    n_ok = rn[:, None] < N
    rj = tl.arange(0, GS // 2)
    for i in tl.static_range(G):
        grp = tl.program_id(1) * G + i
        s = tl.load(s_ptr + rn * ng + grp, mask=rn < N, other=0)[:, None]
        z = tl.load(z_ptr + rn * ng + grp, mask=rn < N, other=0)[:, None]
        qb = tl.load(q_ptr + rn[:, None] * (K // 2) + grp * (GS // 2) + rj[None, :], mask=n_ok, other=0)
        lo, hi = int4_mod._dequant_tile(qb, s, z, w_ptr.dtype.element_ty, ASM)
        w = tl.join(lo, hi).reshape(BLOCK_N, GS)
        tl.store(w_ptr + rn[:, None] * K + grp * GS + tl.arange(0, GS)[None, :], w, mask=n_ok)


def shipped_fill(p, k):
    q, s, z = p

    def fill(n0, r, buf):
        int4_mod._dequant_kernel[(triton.cdiv(r, 32), k // GS)](
            q[n0:], s[n0:], z[n0:], buf, r, k, GS=GS, MMA=False, BLOCK_N=32
        )

    return fill


def probe_fill(p, k, bn, g, asm, warps):
    q, s, z = p

    def fill(n0, r, buf):
        _dq_probe[(triton.cdiv(r, bn), k // GS // g)](
            q[n0:], s[n0:], z[n0:], buf, r, k, GS=GS, BLOCK_N=bn, G=g, ASM=asm, num_warps=warps
        )

    return fill


def dequant_only(fill, n, rows, buf):
    for n0 in range(0, n, rows):
        fill(n0, min(rows, n - n0), buf)


def mm_only(x, n, rows, buf, y):
    for n0 in range(0, n, rows):
        r = min(rows, n - n0)
        torch.mm(x, buf[:r].t(), out=y[:, n0 : n0 + r])


def t_stack(fns) -> float:
    run = lambda: [f() for f in fns]  # noqa: E731
    run()
    torch.cuda.synchronize()
    return do_bench_cudagraph(run, rep=100, return_mode="median") / len(fns) * 1e3  # us per layer


def probe_shape(k, n, ms, rows_out):
    n_layers = max(1, math.ceil(1024**3 / (k * n * 2)))
    g = torch.Generator(device="cuda").manual_seed(k * 7 + n)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(n_layers)]
    packed = []
    for w in ws:
        s, z = ref.int4_choose_qparams(w, GS, torch.bfloat16)
        packed.append((ref.int4_pack(ref.int4_quantize(w, s, z, GS)), s, z))
    w_ref = ref.int4_dequantize(*packed[0], GS, torch.bfloat16)
    gb_dq = k * n * (0.5 + 4 / GS + 2) / 1e3  # bytes / 1e3: / us -> GB/s
    cands = [(bn, gr, asm, wp) for bn in (32, 64) for gr in (1, 2) for asm in (False, True) for wp in (4, 8)]
    cands += [(16, 1, True, 4), (128, 1, True, 8), (32, 4, True, 4)]
    base = dict(K=k, N=n, layers=n_layers)

    def add(name, us, m=None, **extra):
        row = dict(base, M=m, name=name, us=round(us, 2), **extra)
        rows_out.append(row)
        log(json.dumps(row))

    # dequantize alone (no M): shipped and candidates, 4096-row chunks
    buf = torch.empty(min(n, 8192), k, device="cuda", dtype=torch.bfloat16)
    rows = min(n, 4096)

    def ulps(fill) -> float:  # the first chunk against the reference's w_hat, in bf16 ulps
        fill(0, rows, buf)
        diff = (buf[:rows].float() - w_ref[:rows].float()).abs()
        return round(float((diff / (w_ref[:rows].float().abs() * 2.0**-7).clamp_min(2.0**-133)).max()), 2)

    worst = ulps(shipped_fill(packed[0], k))
    t = t_stack([lambda p=p: dequant_only(shipped_fill(p, k), n, rows, buf) for p in packed])
    add("dequant only, shipped (BLOCK_N 32, G 1, fp32, 4 warps)", t, GBps=round(gb_dq / t, 1), max_ulps=worst)
    best = []
    for bn, gr, asm, wp in cands:
        if (k // GS) % gr:
            continue
        name = f"dequant only, BLOCK_N {bn}, G {gr}, {'ptx' if asm else 'fp32'}, {wp} warps"
        try:
            fill = probe_fill(packed[0], k, bn, gr, asm, wp)
            worst = ulps(fill)
            c = (bn, gr, asm, wp)
            t = t_stack([lambda p=p, c=c: dequant_only(probe_fill(p, k, *c), n, rows, buf) for p in packed])
            add(name, t, GBps=round(gb_dq / t, 1), max_ulps=worst)
            best.append((t, (bn, gr, asm, wp)))
        except Exception as e:
            add(name, float("nan"), error=f"{type(e).__name__}: {e}"[:200])
    best.sort()
    top = [c for _, c in best[:2]]
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        t_bf = t_stack([lambda w=w, x=x: F.linear(x, w) for w in ws])
        add("bf16 F.linear", t_bf, m, speedup=1.0, TFLOPs=round(2 * m * k * n / t_bf / 1e6, 1))
        t = t_stack([lambda p=p, x=x: int4_mod.int4_mm(x, *p, GS, "plain") for p in packed])
        add("shipped int4_mm", t, m, speedup=round(t_bf / t, 3))
        for r in sorted({2048, 4096, n // 4, n // 2, 8192} & set(range(1024, n + 1))):
            if r > buf.shape[0]:
                continue
            dequant_only(shipped_fill(packed[0], k), n, r, buf)
            t = t_stack([lambda r=r, x=x, y=y: mm_only(x, n, r, buf, y) for _ in range(n_layers)])
            add(f"mm only, chunk {r} rows", t, m, speedup=round(t_bf / t, 3))
            fills = [(f"shipped dequant, chunk {r}", lambda p: shipped_fill(p, k))]
            fills += [
                (f"dequant {c}, chunk {r}", lambda p, c=c: probe_fill(p, k, *c))
                for c in top  # (BLOCK_N, G, ptx, warps)
            ]
            for name, mk in fills:
                t = t_stack([lambda p=p, mk=mk, r=r, x=x: chunked_dequant_mm(x, n, r, mk(p)) for p in packed])
                add(name, t, m, speedup=round(t_bf / t, 3))
    del ws, packed
    torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--shapes", default="4096x14336,14336x4096,4096x4096", help="KxN list")
    p.add_argument("--ms", default="2048,512")
    a = p.parse_args()
    info = env()
    log(json.dumps(info))
    rows: list[dict] = []
    for shp in a.shapes.split(","):
        k, n = (int(v) for v in shp.split("x"))
        probe_shape(k, n, [int(m) for m in a.ms.split(",")], rows)
    os.makedirs(a.out, exist_ok=True)
    tag = device_tag()
    with open(os.path.join(a.out, f"{tag}-dequant-probe.json"), "w") as f:
        json.dump({"env": info, "rows": rows}, f, indent=1)
    lines = [f"- command: `python bench/dequant_probe.py --shapes {a.shapes} --ms {a.ms}`", f"- env: {info}", ""]
    lines += ["| K x N | M | what | us / layer | x bf16 | GB/s | max ulps |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['K']}x{r['N']} | {r['M'] or '-'} | {r['name']} | {r['us']} | {r.get('speedup', '')} | "
            f"{r.get('GBps', '')} | {r.get('max_ulps', r.get('error', ''))} |"
        )
    with open(os.path.join(a.out, f"{tag}-dequant-probe.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
