"""Where the GEMMs wait for their predecessor under programmatic dependent launch, read from the
PTX that Triton emits for sm_90 (compiled on the CPU: Triton bundles ptxas; no GPU needed).

A kernel launched with PDL may start while the previous kernel still runs, so its
``griddepcontrol.wait`` must come before its first global memory access. A GPU test of a
dependent chain cannot catch a missing wait reliably (the race seldom shows), so this checks
the code itself, for every ``PDL`` mode of the int4 GEMM (modes 1 and 3 of its M <= 8 GEMV branch
too) and the 8-bit GEMM."""

from __future__ import annotations

import json

import pytest
from _offline_compile import run_compile_script

_SCRIPT = r"""
import json, re, sys
sys.path.insert(0, "bench")
import triton
import offline_sass

out = []
for kernel, mode in json.loads(sys.argv[1]):
    name = "int4" if kernel.startswith("int4") else kernel  # int4_gemv: the GEMM's GEMV branch
    offline_sass.KERNELS[name][2]["PDL"] = mode
    meta = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, SWAP=False)
    if name != "int4":
        meta["GROUP_M"] = 8
    if kernel == "int4_gemv":
        meta.update(BLOCK_N=16, GEMV=4, UNROLL=2, ADJ=1)
    k = offline_sass.compile_config(triton.Config(meta, num_warps=4, num_stages=3), 90, name)
    ptx = k.asm["ptx"].splitlines()

    def first(pattern):
        return next((i for i, line in enumerate(ptx) if re.search(pattern, line)), None)

    out.append(dict(kernel=kernel, mode=mode, wait=first(r"griddepcontrol\.wait"),
                    trigger=first(r"griddepcontrol\.launch_dependents"),
                    memory=first(r"\b(ld|st|atom|red)\.global|cp\.async"),
                    store=first(r"\b(st|atom|red)\.global"),
                    triggers=sum("griddepcontrol.launch_dependents" in line for line in ptx)))
print(json.dumps(out))
"""

CASES = [("int4", 0), ("int4", 1), ("int4", 2), ("int4", 3), ("int4_gemv", 1), ("int4_gemv", 3), ("w8a8", 1), ("w8", 3)]


@pytest.fixture(scope="module")
def ptx_positions():
    rows = run_compile_script(_SCRIPT, json.dumps(CASES))
    return {(r["kernel"], r["mode"]): r for r in rows}


@pytest.mark.parametrize("kernel,mode", CASES)
def test_gemm_waits_before_any_memory_access(ptx_positions, kernel, mode):
    r = ptx_positions[(kernel, mode)]
    assert r["memory"] is not None and r["store"] is not None, r
    if mode == 0:  # plain launch: no griddepcontrol at all
        assert r["wait"] is None and r["trigger"] is None, r
        return
    assert r["wait"] is not None and r["wait"] < r["memory"], r
    if mode == 1:  # trigger right after the wait
        assert r["wait"] < r["trigger"] < r["memory"] and r["triggers"] == 1, r
    elif mode == 2:  # no explicit trigger: CTAs trigger as they exit
        assert r["trigger"] is None, r
    else:  # mode 3: after the main loop's loads, before the results are stored
        assert r["memory"] < r["trigger"] < r["store"] and r["triggers"] == 1, r
