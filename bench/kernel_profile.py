"""What each quantized linear launches on the GPU, and for how long: kernel names, kernels per
call and device time per call, lowbit against torchao and bf16, from a CUDA graph of a layer stack.

    python bench/kernel_profile.py [--shapes 4096x4096,4096x1024] [--ms 1,8] [--schemes int4] [--out DIR]

``bench/kernels.py`` times whole calls (graph replay time / layers), which includes any extra
kernels a scheme launches per call (copies, casts, a separate reduction) and the gaps between
them. This splits that time: one CUDA graph over a >= 1 GiB stack of distinct layers (as
kernels.py builds it), replayed under the profiler; CUPTI reports each kernel node. Rows: per
implementation, per kernel name, launches per call and microseconds per call; plus the graph's
wall time per call. Writes ``<device>-kernel-profile.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import device_tag, env, log, lowbit_layers, torchao_layers, weight_stack  # noqa: E402


def profile_stack(fns, x, replays: int = 5) -> dict:
    """Kernels of one graph replay of ``[f(x) for f in fns]``, per call (per layer)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for f in fns:  # autotune / compile outside the capture
            f(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for f in fns:
                f(x)  # warm the side stream (per-stream caches) before capturing on it
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, stream=stream):
                for f in fns:
                    f(x)
        torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / replays / len(fns) * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    count: dict[str, int] = collections.Counter()
    us: dict[str, float] = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        name = e.name[:90]
        count[name] += 1
        us[name] += e.device_time if hasattr(e, "device_time") else e.cuda_time
    calls = replays * len(fns)
    kernels = {n: dict(per_call=round(count[n] / calls, 2), us_per_call=round(us[n] / calls, 2)) for n in count}
    return dict(
        wall_us_per_call=round(wall, 2),
        kernel_us_per_call=round(sum(us.values()) / calls, 2),
        kernels_per_call=round(sum(count.values()) / calls, 2),
        kernels=dict(sorted(kernels.items(), key=lambda kv: -kv[1]["us_per_call"])),
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--shapes", default="4096x4096,4096x1024,4096x14336,14336x4096", help="KxN list")
    p.add_argument("--ms", default="1,8")
    p.add_argument("--schemes", default="int4", help="lowbit / torchao schemes (kernels.py names)")
    args = p.parse_args()
    info = env()
    log(json.dumps(info))
    schemes = args.schemes.split(",")
    rows = []
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        ws, g = weight_stack(k, n)
        impls = {"bf16": [lambda x, w=w: F.linear(x, w) for w in ws]}
        lb = lowbit_layers(ws)
        ao = torchao_layers(ws, schemes)
        for s in schemes:
            impls[f"lowbit {s}"] = lb[s][0]
            if s in ao and not isinstance(ao[s], str):  # a string: why torchao could not quantize
                impls[f"torchao {s}"] = ao[s]
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            for name, fns in impls.items():
                try:
                    r = profile_stack(fns, x)
                except Exception as e:  # e.g. a scheme that cannot be captured
                    r = dict(error=f"{type(e).__name__}: {e}"[:200])
                rows.append(dict(K=k, N=n, M=m, layers=len(ws), impl=name, **r))
                log(json.dumps({key: v for key, v in rows[-1].items() if key != "kernels"}))
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"{device_tag()}-kernel-profile")
    with open(base + ".json", "w") as f:
        json.dump(dict(env=info, command="python " + " ".join(sys.argv), rows=rows), f, indent=1)
    lines = [
        "# Kernels per quantized linear (CUDA graph of a layer stack, profiled replays)",
        "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- device: {info.get('gpu')}; torch {info.get('torch')}, triton {info.get('triton')}, torchao {info.get('torchao')}",
        "",
        "| K | N | M | impl | wall us / call | kernel us / call | kernels / call | top kernels (us / call) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['K']} | {r['N']} | {r['M']} | {r['impl']} | error: {r['error']} | | | |")
            continue
        top = "; ".join(
            f"{name[:48]} x{v['per_call']} {v['us_per_call']}" for name, v in list(r["kernels"].items())[:3]
        )
        lines.append(
            f"| {r['K']} | {r['N']} | {r['M']} | {r['impl']} | {r['wall_us_per_call']} | "
            f"{r['kernel_us_per_call']} | {r['kernels_per_call']} | {top} |"
        )
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
