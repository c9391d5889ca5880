"""A probe for bench/e2e.py: sibling projections fused into one quantized matmul per input.

Llama's attention reads one input through q_proj, k_proj and v_proj, its MLP through gate_proj
and up_proj. ``fuse_siblings(model)`` replaces each such group of quantized linears with
``Sibling`` modules that share one weight: the members' weights stacked along the output rows
(every field of a lowbit weight is row-major in N). The first member called with a new input
runs the one matmul for all of them; each member returns its columns of that output; the last
one drops the references. So a Llama-3-8B layer at batch 1 runs 4 int4 launches instead of 7,
on bigger shapes (4096 x 6144 and 4096 x 28672).

A probe, not a library feature: the members no longer hold parameters (no state dict, FSDP or
saving), and an input changed in place between the members' calls would give stale columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Shared:
    """The group's stacked weight and the output of the call in flight."""

    def __init__(self, weight: torch.Tensor, members: int):
        self.weight, self.members = weight, members
        self.x = self.y = None
        self.seen = 0


class Sibling(torch.nn.Module):
    """Columns [start, end) of the group's output for the group's current input."""

    def __init__(self, shared: _Shared, start: int, end: int, bias: torch.Tensor | None):
        super().__init__()
        self.shared, self.start, self.end = shared, start, end
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shared
        if s.x is not x:  # a new input: one matmul for every member
            s.x, s.y, s.seen = x, F.linear(x, s.weight), 0
        out = s.y[..., self.start : self.end]
        s.seen += 1
        if s.seen == s.members:
            s.x = s.y = None
        return out if self.bias is None else out + self.bias


def stack_rows(weights: list[torch.Tensor]) -> torch.Tensor:
    """lowbit weights of one class, K and attributes -> one weight with their rows stacked."""
    first = weights[0]
    same = all(
        type(w) is type(first) and w.shape[1] == first.shape[1] and w._attrs() == first._attrs() for w in weights
    )
    if not same:
        raise ValueError(f"cannot stack {[(type(w).__name__, tuple(w.shape), w._attrs()) for w in weights]}")
    fields = [torch.cat(parts) for parts in zip(*(w._tensors() for w in weights))]
    rows = sum(w.shape[0] for w in weights)
    return type(first)(*fields, shape=(rows, first.shape[1]), dtype=first.dtype, **first._attrs())


def fuse_siblings(model: torch.nn.Module, groups=GROUPS) -> int:
    """Replace each group of sibling linears (same parent, names in ``groups``) by ``Sibling``
    modules over their stacked weight; returns how many groups were fused."""
    fused = 0
    for parent in list(model.modules()):
        for names in groups:
            mods = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, torch.nn.Linear) for m in mods):
                continue
            shared = _Shared(stack_rows([m.weight for m in mods]), len(mods))
            start = 0
            for name, m in zip(names, mods):
                setattr(parent, name, Sibling(shared, start, start + m.weight.shape[0], m.bias))
                start += m.weight.shape[0]
            fused += 1
    return fused
