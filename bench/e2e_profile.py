"""Profiles for ``bench/e2e.py``'s step-loop decode (``decode`` is its ``step_loop_decode``):
GPU kernel time and idle time per step by kernel kind (``--profile-decode``), and the host's
Python time per step (``--profile-host``); and ``unwrap_fields``, the probe behind the
``lowbit_int4_unwrapped`` variant."""

from __future__ import annotations

import os
import time

import torch

# kernel name pattern -> kind, first match wins (Triton kernels keep their Python names;
# Inductor's fused kernels start with triton_; cuBLAS / CUTLASS GEMMs are nvjet, gemm, xmma)
KERNEL_KINDS = [
    (
        "lowbit linear",
        r"_gemm_kernel|_gemv_kernel|_glu_kernel|_norm_kernel|_gemm_tma_kernel|_dequant_kernel|_quant_rows|quantize_rows",
    ),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("GEMM (cuBLAS)", r"nvjet|gemm|xmma|cutlass|splitKreduce|sm90_|sm80_|ampere|hopper"),
    ("Inductor fused", r"^triton_"),
    ("other", r"."),
]


def idle_by_kind(spans, stall_us: float = 1000.0) -> tuple[dict[str, float], float]:
    """GPU idle time between kernels ``(start, end, kind)`` (us), charged to the kind of the
    kernel whose end opened each gap (kernels may overlap: the latest end so far counts); gaps of
    ``stall_us`` or more are summed apart and returned second."""
    gaps: dict[str, float] = {k: 0.0 for k, _ in KERNEL_KINDS}
    stalled = 0.0
    end, end_kind = None, None
    for start, stop, kind in sorted(spans):
        if end is not None and start > end:
            if start - end < stall_us:
                gaps[end_kind] += start - end
            else:
                stalled += start - end
        if end is None or stop > end:
            end, end_kind = stop, kind
    return gaps, stalled


def profile_decode(model, ids, new_tokens, compile_step, decode, steps=64) -> dict:
    """GPU kernel time per decode step by kind, over the loop of one step-loop decode of
    ``steps`` tokens (compiled as timed: CUDA graph replays, whose kernels CUPTI reports one by
    one). A marker kernel (``torch.cuda._sleep``) launched after the eager prompt separates the
    loop's kernels from the prompt's, so every figure is per loop step (steps - 1 of them).

    Returns microseconds per step per kind, the kernel count per step, the GPU's idle time per
    step after the kernels of each kind (the kind of the kernel whose end opened the gap; gaps
    of 1 ms or more, i.e. the GPU waiting on a stalled host, are summed apart), and the wall
    time per step of the profiled call (prompt included; the profiler adds host time)."""
    import re

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    steps = max(2, min(steps, new_tokens))
    loop_steps = steps - 1
    decode(model, ids, steps, compile_step)  # the compiled step exists already; this warms it
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        decode(model, ids, steps, compile_step, mark=lambda: torch.cuda._sleep(1000))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = [
        e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]
    marks = [e.time_range.end for e in events if "spin" in e.name.lower()]
    loop_start = max(marks) if marks else float("-inf")  # (no marker found: the prompt stays in)
    kinds: dict[str, float] = {k: 0.0 for k, _ in KERNEL_KINDS}
    top: dict[str, tuple[float, int]] = {}
    spans = []
    for e in events:
        if e.time_range.start < loop_start or "spin" in e.name.lower():
            continue
        us = e.device_time if hasattr(e, "device_time") else e.cuda_time
        kind = next(k for k, pat in KERNEL_KINDS if re.search(pat, e.name, re.I))
        kinds[kind] += us
        us0, n0 = top.get(e.name[:80], (0.0, 0))
        top[e.name[:80]] = (us0 + us, n0 + 1)
        spans.append((e.time_range.start, e.time_range.end, kind))
    gaps, stalled = idle_by_kind(spans)
    return dict(
        steps=loop_steps,
        kernel_us_per_step={k: round(v / loop_steps, 1) for k, v in kinds.items()},
        kernel_total_us_per_step=round(sum(kinds.values()) / loop_steps, 1),
        kernels_per_step=round(len(spans) / loop_steps, 1),
        gap_us_per_step_after={k: round(v / loop_steps, 1) for k, v in gaps.items()},
        gap_over_1ms_us_per_step=round(stalled / loop_steps, 1),
        loop_marked=bool(marks),
        wall_us_per_step=round(wall / loop_steps * 1e6, 1),
        top_kernels_us_and_count_per_step={
            k: (round(us / loop_steps, 1), round(n / loop_steps, 1))
            for k, (us, n) in sorted(top.items(), key=lambda kv: -kv[1][0])[:30]
        },
    )


def _top(stats: dict, top: int, per: float) -> dict:
    """pstats' table -> the ``top`` functions by own time: us and calls, each divided by ``per``."""
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return {
        f"{name} ({os.path.basename(path)}:{line})": dict(
            us_per_step=round(v[2] / per * 1e6, 1), calls_per_step=round(v[1] / per, 1)
        )
        for (path, line, name), v in rows
    }


def profile_host(model, ids, new_tokens, compile_step, decode, first_steps, steps=64, top=20) -> dict:
    """Where the host's time to issue a decode step goes: cProfile over one step-loop decode of
    ``steps`` tokens (the eager prompt excluded), the ``top`` functions by own time, in
    microseconds and calls per step. The steady steps and the first ``first_steps(steps)`` (what
    ``decode`` times apart; after a new cache they cost lowbit int4 more) are profiled apart.
    cProfile slows Python calls, so read the split, not the total."""
    import cProfile
    import pstats

    steps = max(4, min(steps, new_tokens))
    k = first_steps(steps)
    decode(model, ids, steps, compile_step)  # warm
    if ids.is_cuda:
        torch.cuda.synchronize()
    first, steady = cProfile.Profile(), cProfile.Profile()
    decode(model, ids, steps, compile_step, prof=(first, steady))
    if ids.is_cuda:
        torch.cuda.synchronize()
    n = steps - 1 - k
    stats = pstats.Stats(steady).stats  # {(file, line, name): (calls, ncalls, tottime, cumtime, callers)}
    first_stats = pstats.Stats(first).stats if first.getstats() else {}
    return dict(
        steps=n,
        host_us_per_step=round(sum(v[2] for v in stats.values()) / n * 1e6, 1),
        top_own_time=_top(stats, top, n),
        first_steps=k,
        first_steps_host_us_per_step=round(sum(v[2] for v in first_stats.values()) / k * 1e6, 1),
        first_steps_top_own_time=_top(first_stats, top, k),
    )


def unwrap_fields(model):
    """Each quantized weight becomes a parametrization whose parameters are its plain fields
    and whose forward rebuilds the QTensor (traced by Dynamo), so a compiled model takes plain
    tensors: AOT autograd flattens no subclass per call. A probe for the host cost per step
    (Dynamo guards the parametrization modules instead); state_dict keys change."""
    import torch.nn.utils.parametrize as parametrize

    import lowbit

    class Fields(torch.nn.Module):
        def __init__(self, qt):
            super().__init__()
            self.cls, (self.names, self.ctx) = type(qt), qt.__tensor_flatten__()
            self.outer = (tuple(qt.size()), tuple(qt.stride()))

        def forward(self, *fields):
            return self.cls.__tensor_unflatten__(dict(zip(self.names, fields)), self.ctx, *self.outer)

        def right_inverse(self, qt):
            return tuple(getattr(qt, n) for n in self.names)

    for mod in list(model.modules()):
        w = getattr(mod, "weight", None)
        if isinstance(w, lowbit.QTensor) and not parametrize.is_parametrized(mod, "weight"):
            parametrize.register_parametrization(mod, "weight", Fields(w), unsafe=True)
    return model


def sleep_cycles_per_s() -> float:
    """``torch.cuda._sleep`` cycles per second on this GPU (timed with events)."""
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(200_000_000)
    b.record()
    b.synchronize()
    return 200_000_000 / (a.elapsed_time(b) / 1e3)


def profile_forward(model, ids, device, rows=15) -> str:
    """The top ops (by device time on a GPU, CPU time otherwise) of one forward, as a table."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        model(ids, use_cache=False, logits_to_keep=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
