"""The int4 GEMV tile's one assumption about Triton's code generation, checked on the compiled IR.

``_int4_gemv`` hands each lane's registers to ``mma.sync`` through ``inline_asm_elementwise``,
which is only right if element e of every [W * 32] operand lives in lane e % 32 of warp e // 32
(the mma reads the other lanes' registers). The GPU tests check the results; this compiles every
GEMV config for sm_90 with the installed Triton (CPU only, its bundled ptxas, as
test_triton_pdl_ptx.py does) and checks the layout of every inline-asm operand and result, so a
Triton whose layouts change fails here on the CPU CI before anything runs on a GPU."""

from __future__ import annotations

import pytest
from _offline_compile import run_compile_script

# the layouts of a compiled kernel's inline-asm operands and its mma.sync count
_IR_OF = r"""
import json, re

def ir_of(k, warps):
    ttgir = k.asm["ttgir"]
    layouts = dict(re.findall(r"^(#\w+) = (#ttg\.blocked<.*>)$", ttgir, re.M))
    asm_types = set()
    for line in ttgir.splitlines():
        if "elementwise_inline_asm" in line:
            asm_types |= set(re.findall(r"tensor<(\d+)x\w+, (#\w+)>", line))
    return dict(warps=warps, asm_types=sorted([n, layouts.get(l, l)] for n, l in asm_types),
                mma=k.asm["ptx"].count("mma.sync.aligned.m16n8k16"))
"""

_SCRIPT = (
    _IR_OF
    + r"""
import sys
sys.path.insert(0, "bench")
import offline_sass
import lowbit.ops.triton.int4 as int4

named = dict(m_bucket=1, K=4096, N=14336, SWAP_MODE=1, GS=128, ASM=True, SZ=True)
gemv = [c for c in int4._prune(int4._gemm_configs(), named) if c.kwargs.get("GEMV")]
print(json.dumps([ir_of(offline_sass.compile_config(c, 90), c.num_warps) for c in gemv]))
"""
)


@pytest.fixture(scope="module")
def gemv_ir():
    return run_compile_script(_SCRIPT)


def test_gemv_inline_asm_operands_are_one_element_per_lane(gemv_ir):
    assert {r["warps"] for r in gemv_ir} == {1, 2, 4, 8}, gemv_ir
    for r in gemv_ir:
        w = r["warps"]
        want = f"#ttg.blocked<{{sizePerThread = [1], threadsPerWarp = [32], warpsPerCTA = [{w}], order = [0]}}>"
        assert r["asm_types"] == [[str(32 * w), want]], r
        assert r["mma"] > 0, r  # the PTX reached the kernel


_GLU_SCRIPT = (
    _IR_OF
    + r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowbit.ops.triton import _int4_gemv as G

fn = G._glu_kernel.fn
names = fn.arg_names
ptrs = {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*bf16", "z_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32",
        "cnt_ptr": "*i32"}
out = []
for c in G._GLU_CONFIGS:
    consts = dict(GS=128, ASM=True, TILED=1, PDL=2, **c.kwargs)
    sig = {a: ptrs.get(a, "i32") for a in names}
    sig.update({a: "constexpr" for a in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(a),): v for a, v in consts.items()},
                    attrs={(names.index(a),): [["tt.divisibility", 16]] for a in ptrs})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=c.num_warps, num_stages=1))
    out.append(ir_of(k, c.num_warps))
print(json.dumps(out))
"""
)


def test_fused_glu_tile_compiles_with_one_element_per_lane():
    """Every config of the gate / up + SwiGLU tile (``_int4_gemv._glu_kernel``: 2 W warps, W per
    half) compiles for sm_90 with the installed Triton (a shape error in a branch the interpreter
    never runs fails here), its inline-asm operands one element per lane of all 2 W warps."""
    ir = run_compile_script(_GLU_SCRIPT)
    assert {r["warps"] for r in ir} == {2, 4, 8}, ir
    for r in ir:
        w = r["warps"]
        want = f"#ttg.blocked<{{sizePerThread = [1], threadsPerWarp = [32], warpsPerCTA = [{w}], order = [0]}}>"
        assert r["asm_types"] == [[str(32 * w), want]], r
        assert r["mma"] > 0, r
