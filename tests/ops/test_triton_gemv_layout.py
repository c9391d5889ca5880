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

_SCRIPT = r"""
import json, re, sys
sys.path.insert(0, "bench")
import offline_sass
import lowbit.ops.triton.int4 as int4

named = dict(m_bucket=1, K=4096, N=14336, SWAP_MODE=1, GS=128, ASM=True, SZ=True)
out = []
for c in [c for c in int4._prune(int4._gemm_configs(), named) if c.kwargs.get("GEMV")]:
    k = offline_sass.compile_config(c, 90)
    ttgir = k.asm["ttgir"]
    layouts = dict(re.findall(r"^(#\w+) = (#ttg\.blocked<.*>)$", ttgir, re.M))
    asm_types = set()
    for line in ttgir.splitlines():
        if "elementwise_inline_asm" in line:
            asm_types |= set(re.findall(r"tensor<(\d+)x\w+, (#\w+)>", line))
    out.append(dict(warps=c.num_warps, asm_types=sorted([n, layouts.get(l, l)] for n, l in asm_types),
                    mma=k.asm["ptx"].count("mma.sync.aligned.m16n8k16")))
print(json.dumps(out))
"""


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
