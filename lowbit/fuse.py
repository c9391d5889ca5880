"""Sibling projections as one quantized matmul: ``fuse_projections_``.

A decoder layer reads one input through several linears: Llama's attention through q_proj,
k_proj and v_proj, its MLP through gate_proj and up_proj. At small batch each is a separate
memory-bound launch, and the small ones (k / v: 1024 rows) are mostly launch and ramp.
``fuse_projections_`` stacks each group's quantized weights along the output rows into one
weight (every field of a lowbit weight that slices as a view is row-major in N, so the stack is
a concatenation of fields) and makes each member's ``weight`` its rows of the stack, a view: no
memory is added, and the state dict keeps its keys and values. The first member called with a
new input runs one matmul for the whole group; each member returns its columns of it; the last
one lets go of the input and the output.

Inference only, and after everything that replaces parameters (``.to()``, FSDP, PEFT): a member
whose ``weight`` is no longer the parameter it was fused with runs alone on its own weight
(correct, unfused). In-place writes (``load_state_dict``, ``copy_``) go through the views into
the stack, so they stay in effect. An input changed in place between two members' calls would
give the later members columns of the old input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.qtensor import QTensor

DEFAULT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Group:
    """A fused group: its stacked weight, each member's parameter as fused, the call in flight."""

    def __init__(self, weight: QTensor, params: list[nn.Parameter]):
        self.weight, self.params = weight, params
        self.x = self.y = None
        self.seen = 0


class FusedLinear(nn.Linear):
    """An ``nn.Linear`` in a fused group (``fuse_projections_`` swaps the class in place)."""

    _lowbit_group: _Group
    _lowbit_index: int
    _lowbit_rows: tuple[int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self._lowbit_group
        if self.weight is not g.params[self._lowbit_index]:  # replaced since fusing: run alone
            return F.linear(x, self.weight, self.bias)
        if g.x is not x:  # a new input: one matmul for every member
            g.x, g.y, g.seen = x, F.linear(x, g.weight), 0
        start, end = self._lowbit_rows
        out = g.y[..., start:end]
        g.seen += 1
        if g.seen == len(g.params):
            g.x = g.y = None
        return out if self.bias is None else out + self.bias


def _stack(where: str, names, weights) -> QTensor:
    first = weights[0]
    for name, w in zip(names, weights):
        if not isinstance(w, QTensor):
            raise ValueError(
                f"fuse_projections_: {where}.{name} has a {type(w).__name__} weight; "
                "quantize the model with lowbit.quantize_ first"
            )
        got = (type(w).__name__, w.shape[1], w.dtype, w.device, w._attrs())
        want = (type(first).__name__, first.shape[1], first.dtype, first.device, first._attrs())
        if got != want:
            raise ValueError(
                f"fuse_projections_: {where}.{name} is (class, in_features, dtype, device, attributes) {got}, "
                f"but {where}.{names[0]} is {want}; a group needs one format"
            )
    fields = [torch.cat(parts) for parts in zip(*(w._tensors() for w in weights))]
    rows = sum(w.shape[0] for w in weights)
    return type(first)(*fields, shape=(rows, first.shape[1]), dtype=first.dtype, **first._attrs())


def fuse_projections_(model: nn.Module, groups=DEFAULT_GROUPS) -> list[str]:
    """Fuse, in place, every group of sibling quantized linears of ``model``: the children of
    one module named as in one tuple of ``groups`` (default: q_proj / k_proj / v_proj and
    gate_proj / up_proj), all ``nn.Linear``. Returns the fused groups as ``"<module>.{a,b,c}"``.

    Raises ``ValueError`` naming the layer when a group's weights are not lowbit weights of one
    class, in_features, dtype, device and attributes, when a format's rows are not views of its
    fields (int4's CPU packings), or when a member is already fused; nothing is changed then
    for that group.
    """
    fused = []
    for fqn, parent in list(model.named_modules()):
        for names in groups:
            mods = [parent._modules.get(n) for n in names]
            if not all(isinstance(m, nn.Linear) for m in mods):
                continue
            where = fqn or "<root>"
            label = f"{where}.{{{','.join(names)}}}"
            if any(isinstance(m, FusedLinear) for m in mods):
                raise ValueError(f"fuse_projections_: {label} is already fused")
            weights = [m.weight for m in mods]
            stacked = _stack(where, names, weights)
            views, start = [], 0
            for name, w in zip(names, weights):
                view = stacked.slice_rows(start, start + w.shape[0])
                same = all(torch.equal(a, b) for a, b in zip(view._tensors(), w._tensors()))
                if getattr(view, "_not_a_view", None) or not same:
                    why = getattr(view, "_not_a_view", None) or "its rows of the stack differ from its weight"
                    raise ValueError(
                        f"fuse_projections_: {where}.{name} ({type(w).__name__} {w._attrs()}) cannot be fused: {why}"
                    )
                views.append((view, (start, start + w.shape[0])))
                start += w.shape[0]
            params = [nn.Parameter(v, requires_grad=False) for v, _ in views]
            group = _Group(stacked, params)
            for i, (m, p, (_, rows)) in enumerate(zip(mods, params, views)):
                m.weight = p
                m.__class__ = FusedLinear
                m._lowbit_group, m._lowbit_index, m._lowbit_rows = group, i, rows
            fused.append(label)
    return fused
