"""Probe: does an L2 prefetch of a weight, issued before a DRAM-idle window, speed up its GEMV?

    python bench/l2_prefetch_probe.py [--shapes KxN,...] [--sleeps 0,5,10,20] [--out D]  # GPU

In a batch-1 decode step the int4 GEMVs read DRAM at 1.2-2.3 TB/s while the kernels between them
(norms, RoPE, the KV-cache update, attention: ~1.1 ms of the 3.07 ms fused step) leave it almost
idle. If the next GEMV's weight could stream into L2 during that window, the GEMV would read it
from L2. This probe times, per layer of a >= 1 GiB stack (never L2-resident as a whole), in one
CUDA graph:

- ``cold``: ``sleep(S)`` then the GEMV (the window without a prefetch);
- ``pf``: a prefetch kernel over the layer's codes, scales and zeros, ``sleep(S)``, the GEMV;
- the same two sequences without the GEMV, so the GEMV's own time is the difference.

``mode`` picks the prefetch: ``line`` (``prefetch.global.L2::evict_last``, one per 128-byte line)
or ``bulk`` (``cp.async.bulk.prefetch.L2.global``, sm_90: one instruction per 4 KB chunk).
``during``: the prefetch of layer l + 1's weight issued right before layer l's large GEMV
(``--big``), i.e. riding that GEMV's spare bandwidth: the big GEMV's time with and without it.
Every GEMV output is checked against the reference once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gemv_mma_probe import int4_stack  # noqa: E402

from lowbit.ops import reference as ref  # noqa: E402
from lowbit.ops.triton.int4 import int4_mm  # noqa: E402

_LINE = tl.constexpr("prefetch.global.L2::evict_last [$1];\nmov.u32 $0, 0;")
_BULK = tl.constexpr("cp.async.bulk.prefetch.L2.global [$1], $2;\nmov.u32 $0, 0;")


@triton.jit
def _prefetch_kernel(base, nbytes, out_ptr, BULK: tl.constexpr, CHUNK: tl.constexpr, NW: tl.constexpr):
    """Prefetch [base, base + nbytes) into L2: each lane one 128-byte line (or one CHUNK-byte bulk
    range) per program; ``out_ptr`` keeps the asm results alive (never written: mask false)."""
    pid = tl.program_id(0)
    lane = tl.arange(0, NW * 32).to(tl.int64)
    step = 128 if not BULK else CHUNK
    off = (pid * NW * 32 + lane) * step
    ok = off < nbytes
    off = tl.where(ok, off, 0)
    addr = base + off
    if BULK:
        size = tl.minimum(nbytes - off, CHUNK).to(tl.int32)
        size = tl.where(ok, size, 16)
        r = tl.inline_asm_elementwise(_BULK, "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)
    else:
        r = tl.inline_asm_elementwise(_LINE, "=r,l", [addr], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(out_ptr + lane, r, mask=lane < 0)


_SINK = {}


def prefetch(tensors, bulk: bool, chunk: int = 4096, nw: int = 4):
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        step = chunk if bulk else 128
        sink = _SINK.setdefault(t.device, torch.empty(nw * 32, dtype=torch.int32, device=t.device))
        grid = (triton.cdiv(nbytes, step * nw * 32),)
        _prefetch_kernel[grid](t.data_ptr(), nbytes, sink, BULK=bulk, CHUNK=chunk, NW=nw, num_warps=nw)


def graph_us(fn, n: int) -> float:
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=200, return_mode="median") * 1e3 / n


def probe_shape(k, n, sleeps, cycles_per_us, modes):
    packed, g = int4_stack(k, n, 128, "tiled")
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=g)
    q0 = ref.int4_pack(ref.int4_tiled_unpack(packed[0][0]))
    r = ref.int4_linear(x, q0, *packed[0][1:], 128)
    y = int4_mm(x, *packed[0], 128, "tiled")
    err = ((y.float() - r.float()).norm() / r.float().norm()).item()
    L = len(packed)
    gemv = [lambda p=p: int4_mm(x, *p, 128, "tiled") for p in packed]
    rows = []
    for s in sleeps:
        cyc = int(s * cycles_per_us)

        def seq(with_gemv, mode, cyc=cyc):
            def run():
                for i in range(L):
                    if mode:
                        prefetch(packed[i], bulk=mode == "bulk")
                    if cyc:
                        torch.cuda._sleep(cyc)
                    if with_gemv:
                        gemv[i]()

            return run

        base = graph_us(seq(True, None), L) - graph_us(seq(False, None), L)
        row = dict(K=k, N=n, M=1, sleep_us=s, layers=L, rel_err=err, cold_us=round(base, 3))
        for mode in modes:
            t = graph_us(seq(True, mode), L) - graph_us(seq(False, mode), L)
            row[f"{mode}_us"] = round(t, 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows, packed


def probe_during(small, big, modes):
    """Prefetch layer l's small weight, then run big layer l's GEMV, then the small GEMV."""
    (ks, ns), (kb, nb) = small, big
    ps, g = int4_stack(ks, ns, 128, "tiled")
    pb, _ = int4_stack(kb, nb, 128, "tiled")
    L = min(len(ps), len(pb))
    xs = torch.randn(1, ks, device="cuda", dtype=torch.bfloat16, generator=g)
    xb = torch.randn(1, kb, device="cuda", dtype=torch.bfloat16, generator=g)
    rows = []

    # small_too False: the big GEMVs alone (with or without the prefetches); True: big then small
    def seq(mode, small_too):
        def run():
            for i in range(L):
                if mode:
                    prefetch(ps[i], bulk=mode == "bulk")
                int4_mm(xb, *pb[i], 128, "tiled")
                if small_too:
                    int4_mm(xs, *ps[i], 128, "tiled")

        return run

    pf_alone = {m: graph_us(lambda m=m: [prefetch(ps[i], bulk=m == "bulk") for i in range(L)], L) for m in modes}
    row = dict(small=f"{ks}x{ns}", big=f"{kb}x{nb}", layers=L, big_us=round(graph_us(seq(None, False), L), 3))
    row["big_small_us"] = round(graph_us(seq(None, True), L), 3)
    for m in modes:
        row[f"{m}_prefetch_alone_us"] = round(pf_alone[m], 3)
        row[f"{m}_big_us"] = round(graph_us(seq(m, False), L), 3)
        row[f"{m}_big_small_us"] = round(graph_us(seq(m, True), L), 3)
    print(json.dumps(row), flush=True)
    rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096,4096x6144,14336x4096")
    ap.add_argument("--sleeps", default="0,5,10,20")
    ap.add_argument("--modes", default="line,bulk")
    ap.add_argument("--during", default="4096x6144:14336x4096,4096x4096:4096x6144")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    # clock for the sleep: time a long sleep
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    torch.cuda._sleep(2_000_000)
    e1.record()
    torch.cuda.synchronize()
    cpu = 2_000_000 / (e0.elapsed_time(e1) * 1e3)
    out = dict(
        env=dict(torch=torch.__version__, triton=triton.__version__, gpu=torch.cuda.get_device_name()),
        sleep_cycles_per_us=round(cpu, 1),
        rows=[],
        during=[],
    )
    sleeps = [float(s) for s in a.sleeps.split(",")]
    for shape in a.shapes.split(","):
        k, n = map(int, shape.split("x"))
        rows, packed = probe_shape(k, n, sleeps, cpu, modes)
        out["rows"] += rows
        del packed
        torch.cuda.empty_cache()
    for pair in [p for p in a.during.split(",") if p]:
        s, b = (tuple(map(int, t.split("x"))) for t in pair.split(":"))
        out["during"] += probe_during(s, b, modes)
        torch.cuda.empty_cache()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "l2_prefetch_probe.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
