"""Time the int4 GEMM as compiled by *another* Triton than the GPU machine has.

The device image has triton 3.6; CI and users of torch 2.13 get triton 3.9, whose
layout passes compile the same kernel differently (the "mma" byte order keeps its
weights in registers on 3.9 but goes through shared memory on 3.6). So:

    # CPU, with the Triton to test installed: cubins + launch metadata into DIR
    python bench/aot_int4.py build --dir DIR
    # GPU: load the cubins through the CUDA driver (ctypes), check them against the
    # reference and time them against bf16 F.linear (same harness as kernels.py)
    python bench/aot_int4.py time --dir DIR --out OUT

Only ``_gemm_kernel`` of lowbit/ops/triton/int4.py, bf16, group size 128, fixed
configs (no autotuning): each (packing, tile, split) is its own cubin.
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GS = 128
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, splits): the small-M part of _gemm_configs
TILES = [
    (16, 32, 128, 2, 6, (1, 4, 8)),
    (16, 64, 128, 4, 6, (1, 2, 8)),
    (16, 128, 128, 8, 4, (2, 8)),
    (32, 64, 128, 4, 6, (1, 4)),
    (32, 128, 128, 8, 4, (1, 8)),
    (64, 32, 128, 4, 8, (1, 2)),
    (64, 32, 128, 2, 6, (1, 2)),
    (64, 64, 128, 4, 8, (1,)),
    (64, 64, 128, 4, 4, (1,)),
    (128, 64, 128, 4, 3, (1, 4)),
    (64, 256, 64, 8, 3, (1,)),
    (128, 128, 64, 8, 3, (1,)),
    (128, 128, 64, 4, 4, (1,)),
]
ARGS = ["x_ptr", "q_ptr", "s_ptr", "z_ptr", "y_ptr", "ws_ptr", "cnt_ptr"]
INTS = ["M", "N", "K", "m_bucket", "stride_xm", "stride_ym", "stride_q", "stride_s", "SWAP_MODE"]


def build(out: str) -> None:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lowbit.ops.triton.int4 import _gemm_kernel, pair_stages

    fn = _gemm_kernel.fn
    names = fn.arg_names
    assert names[: len(ARGS) + len(INTS)] == ARGS + INTS, names
    os.makedirs(out, exist_ok=True)
    index = []
    for packing in ("mma", "plain"):
        for bm, bn, bk, warps, stages, splits in TILES:
            for split in splits:
                ce = dict(GS=GS, ASM=True, DOT_F32=False, MMA=packing == "mma" and bm < 64, SPLIT_K=split, SWAP=False)
                ce.update(SZ=True, QDT=tl.bfloat16)  # qparams as int32 words, as the launcher passes them
                ce.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
                ce.update({p.name: p.default for p in fn.params if p.is_constexpr and p.name not in ce
                           and p.default is not inspect.Parameter.empty})  # PDL, GEMV, UNROLL  # fmt: skip
                st = pair_stages(stages) if bk == GS else stages  # two K tiles per iteration (_prune)
                sig = {a: "i32" for a in names}
                sig.update(x_ptr="*bf16", q_ptr="*u8", s_ptr="*i32")
                sig.update(z_ptr="*i32", y_ptr="*bf16", ws_ptr="*fp32", cnt_ptr="*i32")
                sig.update({c: "constexpr" for c in ce})
                div = [
                    i for i, a in enumerate(names) if a in ARGS or a in ("N", "K", "stride_xm", "stride_ym", "stride_q")
                ]
                src = ASTSource(
                    fn=fn,
                    signature=sig,
                    constexprs={(names.index(c),): v for c, v in ce.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in div},
                )
                k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=st))
                tag = f"{packing}-{bm}x{bn}x{bk}-w{warps}-s{stages}-k{split}"
                with open(os.path.join(out, tag + ".cubin"), "wb") as f:
                    f.write(k.asm["cubin"])
                md = k.metadata
                index.append(dict(tag=tag, packing=packing, tile=[bm, bn, bk, warps, stages], split=split,
                                  name=md.name, shared=md.shared, num_warps=md.num_warps,
                                  global_scratch_size=md.global_scratch_size,
                                  profile_scratch_size=getattr(md, "profile_scratch_size", 0)))  # fmt: skip
                print(tag, md.shared, flush=True)
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump({"triton": triton.__version__, "kernels": index}, f, indent=1)


# ----------------------------------------------------------------------------- GPU side
class Driver:
    """The few CUDA driver calls needed to load a cubin and launch it on a stream."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")

    def check(self, rc, what):
        if rc != 0:
            raise RuntimeError(f"{what}: CUDA driver error {rc}")

    def load(self, path: str, name: str, shared: int):
        mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
        data = open(path, "rb").read()
        self.check(self.lib.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(data)), "cuModuleLoadData")
        self.check(self.lib.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode()), "cuModuleGetFunction")
        if shared > 49152:  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            self.check(self.lib.cuFuncSetAttribute(fn, 8, ctypes.c_int(shared)), "cuFuncSetAttribute")
        return fn

    def launch(self, fn, grid, threads, shared, stream, params):
        arr = (ctypes.c_void_p * len(params))(*[ctypes.cast(ctypes.byref(p), ctypes.c_void_p) for p in params])
        rc = self.lib.cuLaunchKernel(
            fn, grid[0], grid[1], grid[2], threads, 1, 1, shared, ctypes.c_void_p(stream), arr, None
        )
        self.check(rc, "cuLaunchKernel")


def time_all(d: str, out: str, shapes: str, ms: str) -> None:
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench_cudagraph

    from lowbit.ops import reference as ref
    from lowbit.ops.triton._utils import split_k_buffers
    from lowbit.ops.triton.int4 import _pair_order, int4_mm, qparam_words

    meta = json.load(open(os.path.join(d, "index.json")))
    drv = Driver()
    torch.zeros(1, device="cuda")  # makes the primary context current for the driver calls
    kernels = []
    for e in meta["kernels"]:
        e["fn"] = drv.load(os.path.join(d, e["tag"] + ".cubin"), e["name"], e["shared"])
        kernels.append(e)
    assert all(e["global_scratch_size"] == 0 and e["profile_scratch_size"] == 0 for e in kernels)

    def launcher(e, x, q, s, z):
        m, k = x.shape
        n = q.shape[0]
        bm, bn = e["tile"][:2]
        split = e["split"]
        if e["packing"] == "mma" and bm >= 64:  # as the launcher does: the byte path, x reordered
            x = _pair_order(x)
        y = torch.empty(m, n, device="cuda", dtype=x.dtype)
        ws, cnt = split_k_buffers(x.device, m, n, split)
        sw, zw = qparam_words(s), qparam_words(z)
        ptrs = [ctypes.c_uint64(t.data_ptr()) for t in (x, q, sw, zw, y, ws, cnt)]
        # the ints of the signature in order: ..., SWAP_MODE (0), GEMV_MAX (0: a plain int argument)
        ints = [ctypes.c_int32(v) for v in (m, n, k, m, x.stride(0), y.stride(0), q.stride(0), sw.stride(0), 0, 0)]
        params = ptrs + ints + [ctypes.c_uint64(0), ctypes.c_uint64(0)]
        grid = (triton_cdiv(n, bn), split, triton_cdiv(m, bm))
        drv.launch(e["fn"], grid, 32 * e["num_warps"], e["shared"], torch.cuda.current_stream().cuda_stream, params)
        return y

    def bench(fns, x):
        run = lambda: [f(x) for f in fns]  # noqa: E731
        run()
        torch.cuda.synchronize()
        return do_bench_cudagraph(run, rep=100, return_mode="median") / len(fns) * 1e3

    rows = []
    for shape in shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        layers = max(2, math.ceil(2**30 / (n * k * 2)))
        g = torch.Generator(device="cuda").manual_seed(k + n)
        ws_ = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(layers)]
        packs = {"plain": [], "mma": []}
        for w in ws_:
            s, z = ref.int4_choose_qparams(w, GS, torch.bfloat16)
            q = ref.int4_quantize(w, s, z, GS)
            packs["plain"].append((ref.int4_pack(q), s, z))
            packs["mma"].append((ref.int4_mma_pack(q), s, z))
        for m in (int(v) for v in ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            want = ref.int4_linear(x, *packs["plain"][0], GS).double()
            t_bf = bench([lambda x, w=w: F.linear(x, w) for w in ws_], x)
            t_36 = {p: bench([lambda x, a=a, p=p: int4_mm(x, *a, GS, p) for a in packs[p]], x) for p in packs}
            base = dict(K=k, N=n, M=m, bf16_us=round(t_bf, 2))
            base.update({f"tuned36_{p}_x": round(t_bf / t, 3) for p, t in t_36.items()})
            print(json.dumps(base), flush=True)
            for e in kernels:
                bm = e["tile"][0]
                if not (bm <= max(16, m) and 2 * bm > min(m, 64)) if m <= 64 else bm < 64:
                    continue
                if e["split"] > 1 and k // (e["split"] * e["tile"][2]) < 2:
                    continue
                row = dict(base, tag=e["tag"], packing=e["packing"], tile=e["tile"], split=e["split"])
                try:
                    got = launcher(e, x, *packs[e["packing"]][0]).double()
                    row["rel_err"] = float((got - want).norm() / want.norm())
                    t = bench([lambda x, a=a, e=e: launcher(e, x, *a) for a in packs[e["packing"]]], x)
                    row.update(us=round(t, 2), x_bf16=round(t_bf / t, 3))
                except Exception as ex:  # keep going: one bad cubin must not stop the table
                    row["error"] = f"{type(ex).__name__}: {ex}"[:200]
                rows.append(row)
                print(json.dumps(row), flush=True)
    best = {}
    for r in rows:
        if "x_bf16" in r and r["rel_err"] < 1e-2:
            key = (r["K"], r["N"], r["M"], r["packing"])
            if key not in best or r["x_bf16"] > best[key]["x_bf16"]:
                best[key] = r
    lines = [
        f"# int4 GEMM compiled by triton {meta['triton']} (offline), run on {torch.cuda.get_device_name()}",
        "",
        f"- command: `python bench/aot_int4.py time --dir {d} --shapes {shapes} --ms {ms}`; runtime torch "
        f"{torch.__version__}; speedup over bf16 F.linear, same run, CUDA graphs over a >= 1 GiB layer stack",
        "- tuned36_*: the shipped launcher (autotuned, compiled by the machine's own Triton) in each byte order",
        "",
        "| K | N | M | 3.9 mma best | cfg | 3.9 plain best | cfg | 3.6 tuned mma | 3.6 tuned plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted({k[:3] for k in best}):
        a, b = best.get(key + ("mma",), {}), best.get(key + ("plain",), {})
        base = a or b
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {a.get('x_bf16', '-')} | {a.get('tag', '-')} | {b.get('x_bf16', '-')} "
            f"| {b.get('tag', '-')} | {base.get('tuned36_mma_x', '-')} | {base.get('tuned36_plain_x', '-')} |"
        )
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "aot-int4.json"), "w") as f:
        json.dump({"triton_compiled": meta["triton"], "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}, f)
    with open(os.path.join(out, "aot-int4.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["build", "time"])
    p.add_argument("--dir", required=True)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096,4096x1024")
    p.add_argument("--ms", default="1,8,32,128")
    a = p.parse_args()
    if a.what == "build":
        build(a.dir)
    else:
        time_all(a.dir, a.out, a.shapes, a.ms)


if __name__ == "__main__":
    main()
