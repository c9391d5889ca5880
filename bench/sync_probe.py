"""Which ops of one eager forward synchronize the host with the GPU (CUDA sync debug mode).

    python bench/sync_probe.py [--layers 4] [--shapes 1x2048,1x16] [--variants bf16,lowbit_int4_fused]   # GPU

A forward that waits for the GPU part-way reads as host-bound in ``eager_probe.py --prompt``
(its ``returned_ms`` near ``wall_ms``) whether or not its host work is the bound. Per variant and
shape: one warm forward (``use_cache=False``, logits of the last position), then one under
``torch.cuda.set_sync_debug_mode("warn")``; prints each synchronizing call site (the innermost
frames outside torch) with its count.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import e2e  # noqa: E402


def sync_sites(model, ids) -> collections.Counter:
    sites: collections.Counter = collections.Counter()
    real = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "site-packages/torch/" not in f.filename]
        where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in frames[-4:])
        sites[f"{str(message)[:60]} at {where}"] += 1

    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(ids, use_cache=False, logits_to_keep=1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = real
    torch.cuda.synchronize()
    return sites


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--shapes", default="1x2048,1x16")
    p.add_argument("--variants", default="bf16,lowbit_int4_fused")
    a = p.parse_args()
    args = argparse.Namespace(tiny=False, layers=a.layers)
    for variant in a.variants.split(","):
        model = e2e.build_model(args, torch.device("cuda"))
        e2e.quantize(model, variant.removesuffix("_fused"), 128, with_head=True)
        if variant.endswith("_fused"):
            import lowbit

            lowbit.fuse_projections_(model)
        with torch.inference_mode():
            for shp in a.shapes.split(","):
                b, t = (int(v) for v in shp.split("x"))
                ids = torch.randint(1, 128000, (b, t), device="cuda")
                model(ids, use_cache=False, logits_to_keep=1)  # warm: compiles, tunes, makes plans
                torch.cuda.synchronize()
                sites = sync_sites(model, ids)
                print(f"{variant} {shp}: {sum(sites.values())} synchronizing calls", flush=True)
                for site, n in sites.most_common(12):
                    print(f"  {n:4d}  {site}", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
