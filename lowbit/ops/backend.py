"""Which implementation runs a quantized matmul: ``lowbit.use_backend``."""

from __future__ import annotations

import contextlib
import contextvars

import torch

BACKENDS = ("auto", "reference", "cpu", "triton")
_backend: contextvars.ContextVar[str] = contextvars.ContextVar("lowbit_backend", default="auto")


@contextlib.contextmanager
def use_backend(name: str):
    """Force a kernel path inside the block.

    ``auto`` picks the fastest path for the tensor's device (Triton on CUDA,
    PyTorch's packed kernels on CPU); ``reference`` runs the pure-torch spec;
    ``cpu`` and ``triton`` force those paths (``triton`` on CPU tensors needs
    ``TRITON_INTERPRET=1``).

    Under ``torch.compile`` the backend is read when the function is traced and put no guard
    on: a compiled function keeps the backend of its first call, inside or outside a block
    (``torch._dynamo.reset()`` or a fresh ``torch.compile`` under the block takes the new one).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown lowbit backend {name!r}; expected one of {BACKENDS}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def current_backend() -> str:
    return _backend.get()


def resolve(device: torch.device) -> str:
    """The concrete backend for a tensor on ``device``: reference, cpu or triton."""
    name = _backend.get()
    if name != "auto":
        return name
    return "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else "reference"
