"""Compile lowbit's GEMM kernels for a GPU target on a machine without one, and read the SASS.

    python bench/offline_sass.py [--kernel int4|w8|w8a8|fp8] [--arch 90] [--swap on|off|all]
                                 [--buckets 64,128,256] [--json F]

For each config of the kernel's GPU search space that the autotuner could try for the given
M buckets (its ``_prune``, K=4096, N=14336, bf16 activations; int4: group size 128, "plain"
codes; w8: W8A16; w8a8 / fp8: int8 / e4m3 x and w), compile the kernel (``int4._gemm_kernel``
or ``_w8._gemm_kernel``) with the installed Triton for ``sm_<arch>`` and report: registers and spills (``cuobjdump
-res-usage``), shared memory, the main loop's length in SASS instructions (the longest
backward branch), its MMA instruction and whether the A operand comes from registers
(``HGMMA ... R``, Hopper), shared-memory stores inside the loop, and whether ptxas had to
serialize the wgmmas (its C7515 note: no overlap of MMA and other work). It needs Triton's
bundled ``ptxas``/``cuobjdump`` only, no driver: run it with the Triton the GPU machine has
(e.g. ``PYTHONPATH=/path/to/triton-3.6``) to predict that machine's code.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GS, K, N = 128, 4096, 14336
# kernel -> (pointer argument types, arguments with 16-byte divisibility, fixed constexprs)
_W8_PTRS = dict(ws_ptr="*fp32", xs_ptr="*fp32", y_ptr="*bf16", part_ptr="*fp32", cnt_ptr="*i32")
KERNELS = {
    "int4": (  # the qparams as int32 words (int4.qparam_words), as CUDA weights with an even G run
        dict(x_ptr="*bf16", q_ptr="*u8", s_ptr="*i32", z_ptr="*i32", y_ptr="*bf16", ws_ptr="*fp32", cnt_ptr="*i32"),
        ["N", "K", "stride_xm", "stride_ym", "stride_q"],
        dict(GS=GS, ASM=True, DOT_F32=False, MMA=False, PDL=0, SZ=True, QDT="bf16"),
    ),
    "w8": (
        dict(_W8_PTRS, x_ptr="*bf16", w_ptr="*i8", ws_ptr="*bf16"),
        ["N", "K", "stride_xm", "stride_ym"],
        dict(A_SCALED=False, INT_ACC=False, FP8=False, DOT_F32=False, PDL=0),
    ),
    "w8a8": (
        dict(_W8_PTRS, x_ptr="*i8", w_ptr="*i8"),
        ["N", "K", "stride_xm", "stride_ym"],
        dict(A_SCALED=True, INT_ACC=True, FP8=False, DOT_F32=False, PDL=0),
    ),
    "fp8": (  # e4m3 travels as bytes (the launcher's view)
        dict(_W8_PTRS, x_ptr="*u8", w_ptr="*u8"),
        ["N", "K", "stride_xm", "stride_ym"],
        dict(A_SCALED=True, INT_ACC=False, FP8=True, DOT_F32=False, PDL=0),
    ),
}


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _module(kernel: str):
    from lowbit.ops.triton import _w8, int4

    return int4 if kernel == "int4" else _w8  # w8, w8a8, fp8: the 8-bit GEMM


def compile_config(c, arch: int, kernel: str = "int4"):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers, aligned, fixed = KERNELS[kernel]
    fn = _module(kernel)._gemm_kernel.fn
    names = fn.arg_names
    consts = dict(fixed, **c.kwargs)
    # constexpr parameters with defaults (PDL, int4's GEMV / UNROLL) not set above keep them
    consts.update({p.name: p.default for p in fn.params if p.is_constexpr and p.name not in consts
                   and p.default is not inspect.Parameter.empty})  # fmt: skip
    if consts.get("QDT") == "bf16":
        import triton.language as tl

        consts["QDT"] = tl.bfloat16
    sig = {a: pointers.get(a, "i32") for a in names}
    sig.update({a: "constexpr" for a in consts})
    src = ASTSource(
        fn=fn,
        signature=sig,
        constexprs={(names.index(a),): v for a, v in consts.items()},
        attrs={(names.index(a),): [["tt.divisibility", 16]] for a in [*pointers, *aligned]},
    )
    return triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=c.num_warps, num_stages=c.num_stages)
    )


def _instructions(sass: str) -> list[tuple[int, str]]:
    out = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def analyse(kernel) -> dict:
    d = tempfile.mkdtemp()
    path = os.path.join(d, "k.cubin")
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    ins = _instructions(sass)
    loop: list[str] = []
    for addr, text in ins:  # the longest backward branch is the main loop
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", text)
        if m and m.group(1) and int(m.group(1), 16) < addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            if len(body) > len(loop):
                loop = body
    # ptxas says when it had to make the wgmmas wait for each other (no MMA / ALU overlap)
    ptx = os.path.join(d, "k.ptx")
    with open(ptx, "w") as f:
        f.write(kernel.asm["ptx"])
    arch = re.search(r"\.target (sm_\w+)", kernel.asm["ptx"]).group(1)
    info = subprocess.run(
        [_tool("ptxas"), f"-arch={arch}", "-v", ptx, "-o", os.path.join(d, "v.cubin")], capture_output=True, text=True
    )
    serialized = re.search(r"C7515\).*?serialized due to (.*?) (?:in the function|$)", info.stdout + info.stderr)
    counts = collections.Counter(_opcode(t) for t in loop)
    mma = next((t for t in loop if "MMA" in _opcode(t)), "")
    return dict(
        shared=kernel.metadata.shared,
        regs=int(regs.group(1)) if regs else None,
        stack=int(stack.group(1)) if stack else None,
        loop_instructions=len(loop),
        mma=re.sub(r"\s+", " ", mma),
        a_in_registers=bool(re.search(r"GMMA\.\S+ R\d+, R\d+, gdesc", mma)),
        wgmma_serialized=serialized.group(1) if serialized else None,
        loop_shared_stores=sum(v for k, v in counts.items() if k in ("STS", "STSM")),
        # plain global loads in the loop: not cp.async, so each iteration waits for them
        loop_global_loads=counts.get("LDG", 0),
        top_opcodes=dict(counts.most_common(12)),
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", choices=sorted(KERNELS), default="int4")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--swap", choices=["on", "off", "all"], default="all")
    p.add_argument("--buckets", default="64,128,256")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()

    import triton

    mod = _module(args.kernel)
    rows, seen = [], set()
    for mb in map(int, args.buckets.split(",")):
        named = dict(
            m_bucket=mb, K=K, N=N, SWAP_MODE=1, GS=GS, ASM=True, A_SCALED=args.kernel in ("w8a8", "fp8"), SZ=True
        )
        for c in mod._prune(mod._gemm_configs(), named):
            swap = c.kwargs["SWAP"]
            if args.swap != "all" and swap != (args.swap == "on"):
                continue
            key = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
            if key in seen:
                continue
            seen.add(key)
            kw = c.kwargs
            kind = f"gemv u{kw['UNROLL']}" if kw.get("GEMV") else "swap" if swap else "plain"
            tag = f"{kind} {kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{c.num_warps} s{c.num_stages} k{kw['SPLIT_K']}"
            try:
                row = dict(tag=tag, **analyse(compile_config(c, args.arch, args.kernel)))
            except Exception as e:  # a config that does not compile for this target is a finding
                row = dict(tag=tag, error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            meta = dict(triton=triton.__version__, kernel=args.kernel, arch=args.arch, K=K, N=N, group_size=GS)
            json.dump(dict(meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
