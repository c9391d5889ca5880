"""Helpers shared by the Triton launchers: interpreter detection and autotune plumbing."""

from __future__ import annotations

import functools
import inspect
import os
import threading

import torch
import triton

# The interpreter (CPU CI) runs exactly one config and computes ``tl.dot`` on
# bf16/fp16/int8 operands wrongly, so kernels upcast dot operands to fp32 there.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# LOWBIT_TRITON_AUTOTUNE=0 runs the small fixed config on the GPU too (fast test runs).
AUTOTUNE = not INTERPRET and os.environ.get("LOWBIT_TRITON_AUTOTUNE", "1") != "0"


# Autotune results go to Triton's cache dir and are reused by later processes (a model
# compiles without re-timing every config). Triton >= 3.4 has the option.
TUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def m_bucket(m: int) -> int:
    """Autotune key for the number of rows: the next power of two, capped at 4096.

    Keying on the bucket (not raw M) keeps the number of tuning runs small when
    the batch size varies (prefill lengths, dynamic batching).
    """
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def configs(gpu: list[triton.Config], interp: triton.Config) -> list[triton.Config]:
    """The GPU search space, or the single fixed config (interpreter, autotune off)."""
    return gpu if AUTOTUNE else [interp]


def cfg(num_warps: int = 4, num_stages: int = 3, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------- split-K
@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so CPU tests exercise the split-K path


# (device, stream) -> int32 split-K tile counters, shared by every split-K GEMM (int4, 8-bit):
# launches on a stream run in order and each leaves its counters at zero. Splits only run
# for M <= 128, so 65536 counters (16x16 tiles) cover N up to 131072.
_COUNTERS: dict = {}
COUNTERS_SIZE = 1 << 16


def zeros_outside_pools(device: torch.device, n: int) -> torch.Tensor:
    """torch.zeros from a plain thread: torch.compile's cudagraph trees route the calling
    thread's allocations into their pool during warm-up and reject tensors an op keeps
    alive there; a cache must not live in that pool."""
    box: list = []

    def make():
        try:
            box.append(torch.zeros(n, device=device, dtype=torch.int32))
            torch.cuda.synchronize(device)
        except BaseException as e:  # re-raised in the caller
            box.append(e)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 counters for one split-K launch, one cached buffer per stream.

    The kernel puts every counter it used back to zero, so the launches that follow each
    other on a stream share a buffer; concurrent streams get their own. Made outside any
    CUDA graph (from a plain thread, see ``zeros_outside_pools``), or, for a stream first
    seen inside a capture, by that graph (its zeroing is captured once). A launch that
    needs more counters than the cache holds gets fresh zeros."""
    if tiles > COUNTERS_SIZE:
        return torch.zeros(tiles, device=device, dtype=torch.int32)
    on_gpu = device.type == "cuda"
    key = (device, torch.cuda.current_stream(device).cuda_stream if on_gpu else 0)
    if key not in _COUNTERS:
        if on_gpu and not torch.cuda.is_current_stream_capturing():
            _COUNTERS[key] = zeros_outside_pools(device, COUNTERS_SIZE)
        else:
            _COUNTERS[key] = torch.zeros(COUNTERS_SIZE, device=device, dtype=torch.int32)
    return _COUNTERS[key]
