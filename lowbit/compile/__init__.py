"""torch.compile support: every kernel entry point becomes an opaque custom op.

``kernel_op`` wraps a launcher in ``torch.library.custom_op`` and registers its
fake (meta) implementation, so Dynamo/Inductor trace a quantized model with no
graph break and never look inside the launcher. ``custom_op`` + ``register_fake``
(rather than ``triton_op``) is used because it also compiles on CPU under the
Triton interpreter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def kernel_op(name: str, *, fake: Callable) -> Callable:
    """Decorator: register ``fn`` as ``lowbit::<name>`` with fake implementation ``fake``.

    ``fn`` must take and return plain tensors (and ints/floats/bools/strs) and
    must not mutate its inputs.
    """

    def register(fn: Callable):
        op = torch.library.custom_op(f"lowbit::{name}", mutates_args=())(fn)
        op.register_fake(fake)
        return op

    return register


def linear_out_fake(x: torch.Tensor, qdata: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Fake for launchers computing ``x [M, K] @ W.T -> [M, N]`` with N = qdata.shape[0]."""
    return x.new_empty(x.shape[0], qdata.shape[0])
