"""torch.compile support: every kernel entry point becomes an opaque custom op.

``kernel_op`` registers a launcher as the operator ``lowbit::<name>`` with a fake
(meta) implementation, so Dynamo/Inductor trace a quantized model with no graph
break and never look inside the launcher. The launchers are plain Python (Triton
or aten calls), which also compiles on CPU under the Triton interpreter (unlike
``triton_op``).

Registered through ``torch.library.Library`` with a ``CompositeExplicitAutograd``
kernel rather than ``torch.library.custom_op``: the latter wraps every call in
Python autograd and alias-checking layers (18 us per call against 5 us, measured
on the CI CPU), which eager models pay once per quantized linear. The ops need no
autograd formula: they run with gradients off (``_QuantLinearFn`` computes the
input gradient from the dequantized weight); a small Autograd kernel raises if one
is called on a tensor that requires grad. They never return an input or a view
of one.

``kernel_op`` returns a function, not the operator: in plain eager use (x, the first positional
argument, a plain CPU or CUDA tensor; not under Dynamo, functorch transforms, torch.jit.trace or
functionalization; no dispatch or function mode active, no profiler running; nothing requiring
grad while grad mode is on) it calls the launcher itself, skipping the dispatcher's round trip; anything else
calls the operator. ``LOWBIT_DIRECT_OPS=0`` always calls the operator.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

DIRECT = os.environ.get("LOWBIT_DIRECT_OPS", "1") != "0"

_LIB = torch.library.Library("lowbit", "FRAGMENT")


def kernel_op(name: str, *, fake: Callable) -> Callable:
    """Decorator: register ``fn`` as ``lowbit::<name>`` with fake implementation ``fake``.

    ``fn`` must take and return plain tensors (and ints/floats/bools/strs), must
    not mutate its inputs and must return fresh tensors. Returns a function called like ``fn``
    that runs ``fn`` directly in plain eager use and the operator
    (``torch.ops.lowbit.<name>.default``, its ``op`` attribute) otherwise (module doc).
    """

    def register(fn: Callable):
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=()))
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        torch.library.register_fake(f"lowbit::{name}", fake, lib=_LIB)
        op = getattr(torch.ops.lowbit, name).default

        def no_gradient(*args, **kwargs):
            # Without this, a call on a tensor that requires grad would only warn and
            # leave its .grad empty. Inference mode skips this kernel altogether.
            if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
                raise RuntimeError(
                    f"lowbit::{name} has no gradient and got an input that requires grad; call F.linear "
                    "(or the module) on the quantized weight, which computes the input gradient"
                )
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args, **kwargs)

        _LIB.impl(name, no_gradient, "Autograd")

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if (
                DIRECT
                and args
                and not torch.compiler.is_compiling()
                and type(args[0]) is torch.Tensor
                and (args[0].is_cuda or args[0].is_cpu)  # (meta tensors: the fake)
                and not torch._C._len_torch_dispatch_stack()
                and not torch._C._is_torch_function_mode_enabled()
                and not torch._C._are_functorch_transforms_active()  # (vmap, grad, functionalize)
                and torch._C._get_tracing_state() is None  # (torch.jit.trace records the operator)
                and not torch.autograd._profiler_enabled()  # (profiles name the operator)
                and not torch._is_functional_tensor(args[0])
                and not (torch.is_grad_enabled() and any(_needs_grad(a) for a in (*args, *kwargs.values())))
            ):
                return fn(*args, **kwargs)
            return call.op(*args, **kwargs)

        call.op = op
        return call

    return register


def _needs_grad(a) -> bool:
    return isinstance(a, torch.Tensor) and a.requires_grad


def linear_out_fake(x: torch.Tensor, qdata: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Fake for launchers computing ``x [M, K] @ W.T -> [M, N]`` with N = qdata.shape[0]."""
    if x.dim() != 2:  # as the launchers check
        raise ValueError(f"x must be a 2-D floating tensor [M, K], got {x.dtype} {tuple(x.shape)}")
    return x.new_empty(x.shape[0], qdata.shape[0])
