"""Profile target for Nsight Compute: the int4 GEMV tile at one shape and chosen configs.

    ncu --profile-from-start off --clock-control none --section WarpStateStats ... \
        python bench/ncu_gemv.py --k 4096 --n 4096 --cfgs 4:1:2,1:8:2

Each config (W:split:unroll, as ``gemv_mma_probe.py``) runs once outside the profiled range
(compile) and twice inside it, on a fresh weight of the "tiled" packing each time.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gemv_mma_probe import _parse_cfgs, gemv  # noqa: E402

from lowbit.ops import reference as ref  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--k", type=int, default=4096)
p.add_argument("--n", type=int, default=4096)
p.add_argument("--m", type=int, default=1)
p.add_argument("--cfgs", default="4:1:2,1:8:2")
a = p.parse_args()
gs = 128
ws = []
for _ in range(3):
    w = torch.randn(a.n, a.k, device="cuda") * 0.02
    s, z = ref.int4_choose_qparams(w, gs, torch.bfloat16)
    ws.append((ref.int4_tiled_pack(ref.int4_quantize(w, s, z, gs)), s, z))
x = torch.randn(a.m, a.k, device="cuda", dtype=torch.bfloat16)
cfgs = _parse_cfgs(a.cfgs)
for cf in cfgs:
    gemv(x, *ws[0], gs, *cf, tiled=True)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
for cf in cfgs:
    for i in (1, 2):
        gemv(x, *ws[i], gs, *cf, tiled=True)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
