"""Profile target for Nsight Compute: the int4 kernels at one shape, autotuned first.

    ncu --profile-from-start off --section SpeedOfLight --section WarpStateStats ... \
        python bench/ncu_int4.py --k 4096 --n 14336 --ms 1,16

Autotuning (many launches) runs before ``cudaProfilerStart``; then each M runs
three times inside the profiled range.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lowbit.ops import reference as ref  # noqa: E402
from lowbit.ops.triton.int4 import int4_mm  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--k", type=int, default=4096)
p.add_argument("--n", type=int, default=14336)
p.add_argument("--ms", default="1,16")
p.add_argument("--gs", type=int, default=128)
a = p.parse_args()
w = torch.randn(a.n, a.k, device="cuda") * 0.02
s, z = ref.int4_choose_qparams(w, a.gs, torch.bfloat16)
q = ref.int4_pack(ref.int4_quantize(w, s, z, a.gs))
xs = {m: torch.randn(m, a.k, device="cuda", dtype=torch.bfloat16) for m in map(int, a.ms.split(","))}
for x in xs.values():
    int4_mm(x, q, s, z, a.gs)  # autotune outside the profiled range
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
for x in xs.values():
    for _ in range(3):
        int4_mm(x, q, s, z, a.gs)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
