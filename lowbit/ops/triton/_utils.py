"""Helpers shared by the Triton launchers: interpreter detection and autotune plumbing."""

from __future__ import annotations

import inspect
import os

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
