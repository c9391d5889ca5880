"""Sibling projections as one quantized matmul: ``fuse_projections_``.

A decoder layer reads one input through several linears: Llama's attention through q_proj,
k_proj and v_proj, its MLP through gate_proj and up_proj. At small batch each is a separate
memory-bound launch, and the small ones (k / v: 1024 rows) are mostly launch and ramp.
``fuse_projections_`` stacks each group's quantized weights along the output rows into one
weight (every field of a lowbit weight that slices as a view is row-major in N, so the stack is
a concatenation of fields) and makes each member's ``weight`` its rows of the stack, a view: no
memory is added, and the state dict keeps its keys and values. The first member called with a
new input runs one matmul for the whole group; each member returns its columns of it. The memo
is dropped when every member has been served, and after every call of the members' parent
module (a forward hook), so nothing carries over from one forward to the next.

For inference, as the last step (after ``.to()``, sharding, adapters):
- a member called with an input that needs a gradient runs alone (the unfused result);
- a member whose ``weight`` is no longer the parameter it was fused with runs alone;
- ``.to()``, ``load_state_dict(assign=True)`` or anything else that leaves a member's weight no
  longer a view of the stack unfuses the whole group (the members become plain ``nn.Linear``
  again, on their own weights); in-place writes (``load_state_dict``, ``copy_``) go through the
  views into the stack and keep it fused;
- the memo is shared by the group, so one model must not run forwards in several threads at
  once, and an input changed in place between two members' calls is caught only eagerly (its
  version counter; not for inference-mode tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.qtensor import QTensor

DEFAULT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _storage(t: QTensor) -> int:
    return t._tensors()[0].untyped_storage().data_ptr()


class _Group:
    """A fused group: its stacked weight, its members and their parameters as fused, the memo."""

    def __init__(self, weight: QTensor, members: list[nn.Linear], params: list[nn.Parameter]):
        self.weight, self.members, self.params = weight, members, params
        self.full, self.dead = (1 << len(members)) - 1, 0
        self.hook = None
        self.reset()

    def reset(self, *_):
        self.x = self.y = self.version = None
        self.served = 0

    def intact(self) -> bool:
        """Every member holds the parameter it was fused with, and it is still a view of the stack."""
        base = _storage(self.weight)
        return all(m.weight is p and _storage(p) == base for m, p in zip(self.members, self.params))

    def unfuse(self):
        for m in self.members:
            if type(m) is FusedLinear:
                m.__class__ = nn.Linear
                del m._lowbit_group, m._lowbit_index, m._lowbit_rows
        if self.hook is not None:
            self.hook.remove()
        self.reset()
        self.weight = self.members = self.params = None


class FusedLinear(nn.Linear):
    """An ``nn.Linear`` in a fused group (``fuse_projections_`` swaps the class in place)."""

    _lowbit_group: _Group
    _lowbit_index: int
    _lowbit_rows: tuple[int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, bit = self._lowbit_group, 1 << self._lowbit_index
        if self.weight is not g.params[self._lowbit_index]:  # replaced since fusing: alone from now on
            g.dead |= bit
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and x.requires_grad:  # training: the unfused graph
            return F.linear(x, self.weight, self.bias)
        eager = not torch.compiler.is_compiling() and not x.is_inference()
        if g.x is not x or g.served & bit or (eager and g.version != x._version):
            g.x, g.y, g.served = x, F.linear(x, g.weight), 0  # a new input: one matmul for the group
            g.version = x._version if eager else None
        g.served |= bit
        start, end = self._lowbit_rows
        out = g.y[..., start:end]
        if g.served | g.dead == g.full:
            g.reset()
        if self.bias is None:
            return out
        if self.bias.dtype != out.dtype:
            raise TypeError(f"FusedLinear: bias is {self.bias.dtype}, the output {out.dtype}; they must match")
        return out + self.bias

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._unfuse_if_broken()  # moved or replaced
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._unfuse_if_broken()  # assign=True

    def _unfuse_if_broken(self):
        """Unfuse the group once a member's weight is no longer its fused view of the stack (an
        earlier member's call may already have unfused it)."""
        if type(self) is FusedLinear and not self._lowbit_group.intact():
            self._lowbit_group.unfuse()


def _stack(where: str, names, weights) -> QTensor:
    first = weights[0]
    for name, w in zip(names, weights):
        if type(w).__name__ == "DTensor":
            raise ValueError(f"fuse_projections_: {where}.{name} is sharded (DTensor); fusing is for unsharded models")
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


def _plan(where: str, names, mods):
    """The group's stacked weight and each member's row view of it (checked equal to its weight)."""
    weights = [m.weight for m in mods]
    stacked = _stack(where, names, weights)
    views, start = [], 0
    for name, w in zip(names, weights):
        view = stacked.slice_rows(start, start + w.shape[0])
        same = all(torch.equal(a, b) for a, b in zip(view._tensors(), w._tensors()))
        why = getattr(view, "_not_a_view", None) or (None if same else "its rows of the stack differ from its weight")
        if why:
            raise ValueError(
                f"fuse_projections_: {where}.{name} ({type(w).__name__} {w._attrs()}) cannot be fused: {why}"
            )
        views.append((view, (start, start + w.shape[0])))
        start += w.shape[0]
    return stacked, views


def fuse_projections_(model: nn.Module, groups=DEFAULT_GROUPS) -> list[str]:
    """Fuse, in place, every group of sibling quantized linears of ``model``: the children of
    one module named as in one tuple of ``groups`` (default: q_proj / k_proj / v_proj and
    gate_proj / up_proj), all plain ``nn.Linear`` (subclasses and adapter wrappers are left as
    they are). Returns the fused groups as ``"<module>.{a,b,c}"``.

    Raises ``ValueError`` naming the layer, and changes nothing, when a group's weights are not
    lowbit weights of one class, in_features, dtype, device and attributes, when a format's rows
    are not views of its fields (int4's CPU packings), or when a member is already fused.
    """
    plans = []
    for fqn, parent in model.named_modules():
        for names in groups:
            mods = [parent._modules.get(n) for n in names]
            if not all(type(m) in (nn.Linear, FusedLinear) for m in mods):
                continue
            where = fqn or "<root>"
            label = f"{where}.{{{','.join(names)}}}"
            if any(type(m) is FusedLinear for m in mods):
                raise ValueError(f"fuse_projections_: {label} is already fused")
            plans.append((label, parent, mods, *_plan(where, names, mods)))
    for _label, parent, mods, stacked, views in plans:  # every group checked: now change them
        params = [nn.Parameter(v, requires_grad=False) for v, _ in views]
        group = _Group(stacked, mods, params)
        for i, (m, p, (_, rows)) in enumerate(zip(mods, params, views)):
            m.weight = p
            m.__class__ = FusedLinear
            m._lowbit_group, m._lowbit_index, m._lowbit_rows = group, i, rows
        group.hook = parent.register_forward_hook(group.reset)
    return [p[0] for p in plans]
