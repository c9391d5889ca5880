"""Sibling projections as one quantized matmul: ``fuse_projections_``.

A decoder layer reads one input through several linears: Llama's attention through q_proj,
k_proj and v_proj, its MLP through gate_proj and up_proj. At small batch each is a separate
memory-bound launch, and the small ones (k / v: 1024 rows) are mostly launch and ramp.
``fuse_projections_`` stacks each group's quantized weights along the output rows into one
weight (every field of a lowbit weight that slices as a view is row-major in N, so the stack is
a concatenation of fields) and makes each member's ``weight`` its rows of the stack, a view: no
memory is added, and the state dict keeps its keys and values. The first member called with a
new input runs one matmul for the whole group; each member returns its columns of it (a
gate_proj / up_proj group's members, eagerly from ``GLU_SPLIT_MIN_TOKENS`` tokens, a long prompt,
run on their own rows instead: contiguous outputs, which eager silu and product read faster than
column slices of one output; the unfused model's numbers). The memo
is dropped when every member has been served, and after every call of the members' parent
module (a forward hook), so nothing carries over from one forward to the next.

With ``swiglu=True`` (the default) a module with children gate_proj, up_proj, down_proj and
act_fn whose act_fn is SiLU (checked on a grid) and whose forward is
``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (Llama, Mistral, Qwen2 MLPs; checked on a
random row when fusing), and whose stacked weight's format has a kernel for it (int4), also gets
the activation fused: where that kernel runs (int4 on CUDA at M <= 8) its forward is
``down_proj(swiglu_linear(x, stack))``, one launch for the gate / up matmul and
``silu(gate) * up``, so the separate pointwise kernel goes. Numerics there: silu(gate) * up in
fp32 from the rounded gate and up, rounded once (``reference.swiglu``, what torch.compile gives
unfused; eager PyTorch rounds silu(gate) first). Everywhere else (more tokens, other devices, a
gradient, other arguments, and once the group is unfused, a member replaced or hooked, a bias
added or act_fn swapped: checked by id(), and once the fused act_fn is freed no module passes, its
id being reusable) the module runs its own forward.

Under torch.compile, where this torch flattens tensor-subclass graph inputs in Python on every
call (``REBUILD_IN_GRAPH``: torch 2.11), each group's weight is rebuilt inside the graph from its
fields, held as plain Parameters, and ``singles`` makes the other quantized linears groups of one,
so the compiled model takes no subclass input (see ``fuse_projections_``).

For inference, as the last step (after ``.to()``, sharding, adapters):
- a member called with an input that needs a gradient runs alone (the unfused result);
- a new weight reaching a member (assigned, or written into ``_parameters`` as
  ``torch.func.functional_call`` and accelerate do; inside a compiled region through a graph
  break), ``.to()``, ``load_state_dict(assign=True)`` or anything else that leaves a member's
  weight no longer a view of the stack unfuses the whole group (the members become plain
  ``nn.Linear`` again, on their own weights); in-place writes (``load_state_dict``, ``copy_``) go
  through the views into the stack and keep it fused. Not seen, compiled: an assignment in a
  forward pre-hook that Dynamo traces (it skips the module's ``__setattr__``; so did the id check
  before session 27);
- ``copy.deepcopy`` and pickling give plain, unfused ``nn.Linear`` members (fuse the copy again);
- compile the whole model: a member's group id is a constant to ``torch.compile``, so compiling
  each decoder layer on its own recompiles for every fused layer (8 by default, then eager);
- the memo is shared by the group, so one model must not run forwards in several threads at
  once, and an input changed in place between two members' calls is caught only eagerly (its
  version counter; not for inference-mode tensors).
"""

from __future__ import annotations

import copyreg
import functools
import importlib.util
import itertools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.ops import reference as ref
from lowbit.qtensor import QTensor
from lowbit.qtensor.linear import autocast_dtype, linear_add_rmsnorm, swiglu_linear

DEFAULT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

# The groups and their open rounds, by group id. A member reaches its group only through these
# (by its id), never through an attribute holding the group: torch.compile guards every object it
# meets under two names with an identity check evaluated in Python on each call, and a group
# object on each member (and on the parent's hook) made ~5 such checks per group, 320 in a
# 32-layer model (0.3-0.5 ms per decode step); an integer id is one value guard.
_GROUPS: dict[int, _Group] = {}
_MEMO: dict[int, tuple] = {}  # group id -> (input, the group's output, members served, input version)
# a fused decoder layer's request to a group of one (``fuse_layers``): group id -> (residual, norm
# weight, eps), and what the single returned: group id -> (h, normed)
_PENDING: dict[int, tuple] = {}
_RESULT: dict[int, tuple] = {}
_IDS = itertools.count()


def _storage(t: QTensor) -> int:
    return t._tensors()[0].untyped_storage().data_ptr()


def _end_round(gid: int, *_):
    """The parent's forward hook: drop the group's memo (a dropped memo only costs a recompute)."""
    _MEMO.pop(gid, None)


class _Group:
    """A fused group: its stacked weight, its members and their parameters as fused."""

    def __init__(self, weight: QTensor, members: list[nn.Linear], params: list[nn.Parameter]):
        self.gid = next(_IDS)
        # a Parameter (of no module): torch.compile takes parameters as static inputs, so CUDA graphs
        # read the stack where it is (a plain tensor reached from a global would be copied into the
        # graph's input buffer on every replay: 2 ms per Llama-8B step on the H100)
        self.weight = nn.Parameter(weight, requires_grad=False)
        # the stack's fields as plain Parameters (views, no memory) and what rebuilds it from them:
        # a compiled forward rebuilds the weight in its graph (``traced_weight``), so the graph takes
        # no tensor-subclass input, which torch 2.11's AOT wrapper would flatten on every call
        # (~9 us each: 1.0-1.4 ms of host time per Llama-3-8B decode step on the H100, session 22)
        names, ctx = weight.__tensor_flatten__()
        self.fields = tuple(nn.Parameter(getattr(weight, n), requires_grad=False) for n in names)
        self.meta = (type(weight), tuple(names), ctx, tuple(weight.shape), tuple(weight.stride()))
        self.members = [weakref.ref(m) for m in members]  # (the registry must not keep a model alive)
        self.params = params
        self.full = (1 << len(members)) - 1
        self.hook = None
        self.glu = None  # the parent whose forward fuses silu(gate) * up (a weak reference)
        self.split = False  # gate / up: long eager prompts run each member on its own rows (GLU_SPLIT_MIN_TOKENS)

    def traced_weight(self) -> QTensor:
        """The stack as seen by a compiled forward: rebuilt from ``fields`` (plain inputs)."""
        cls, names, ctx, size, stride = self.meta
        return cls.__tensor_unflatten__(dict(zip(names, self.fields)), ctx, size, stride)

    def intact(self) -> bool:
        """Every member holds the parameter it was fused with, and it is still a view of the stack."""
        base, members = _storage(self.weight), [r() for r in self.members]
        return all(m is not None and m.weight is p and _storage(p) == base for m, p in zip(members, self.params))

    def unfuse(self):
        for m in (r() for r in self.members):
            if type(m) is FusedLinear and m._lowbit_gid == self.gid:
                _make_plain(m)
        if self.hook is not None:
            self.hook.remove()
        parent = self.glu() if self.glu is not None else None
        if parent is not None and getattr(parent, "_lowbit_glu_gid", None) == self.gid:
            _make_plain_glu(parent)
        _forget(self.gid)
        self.weight = self.fields = self.meta = self.members = self.params = self.glu = None


# Whether AOT autograd flattens tensor-subclass graph inputs in Python on every call (torch 2.11;
# from the release with ``subclass_codegen`` it runs generated code, ~1.7 us per weight on the CI
# CPU, and rebuilding from plain fields gained nothing measurable on a 32-layer tiny Llama:
# bench/results/cpu-singles-s22.md). Where it does, compiled forwards rebuild each weight from
# plain fields, and ``singles`` defaults to on.
REBUILD_IN_GRAPH = importlib.util.find_spec("torch._functorch._aot_autograd.subclass_codegen") is None and tuple(
    int(p) for p in torch.__version__.split("+")[0].split(".")[:2]
) < (2, 13)  # (a private module: a later torch that moves it keeps the flag off)


def _weight(g: _Group, member: nn.Module | None = None) -> QTensor:
    """The group's stack: under torch.compile with ``REBUILD_IN_GRAPH``, rebuilt from its plain
    fields inside the graph; else ``member``'s own weight (a single's), or the stack itself."""
    if REBUILD_IN_GRAPH and torch.compiler.is_compiling():
        return g.traced_weight()
    return g.weight if member is None else member.weight


def _replaced(m: nn.Module) -> bool:
    """Member ``m``'s weight is not the parameter it was fused with (it then runs alone): checked
    eagerly. A compiled forward reads no member's weight: torch.compile guards each quantized weight
    it meets with Python checks of its metadata on every call (two ``__tensor_flatten__``, ~8 us a
    weight: ~1.8 ms per Llama-3-8B decode step on an H100 host, session 27). There a new weight
    reaching a member has unfused the group first (``_new_weight``: an assignment, a write into
    ``_parameters``; inside a compiled region through a graph break, so it runs eagerly), which
    changes the members' class: the compiled forward recompiles or, mid-call, finds no group."""
    return not torch.compiler.is_compiling() and id(m.weight) != m._lowbit_param_id


def _new_weight(m: nn.Module) -> None:
    """``m`` (a member) got a new weight: unfuse its group unless it still holds its fused view."""
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break()  # (eagerly: a traced write would not unfuse)
    if type(m) is FusedLinear:
        g = _GROUPS.get(m._lowbit_gid)
        if g is None:
            _make_plain(m)
        elif not g.intact():
            g.unfuse()


_FUSED_ATTRS = ("_lowbit_gid", "_lowbit_index", "_lowbit_rows", "_lowbit_param_id")


def _make_plain(m: nn.Module):
    m.__class__ = nn.Linear
    for name in _FUSED_ATTRS:
        m.__dict__.pop(name, None)
    m.__dict__["_parameters"] = dict(m._parameters)  # (no _WatchedParams)


class _WatchedParams(dict):
    """A member's ``_parameters``: a ``weight`` written there (an assignment, which
    ``nn.Module.__setattr__`` makes such a write, ``torch.func.functional_call``, accelerate's
    ``set_module_tensor_to_device``) unfuses the group (``_new_weight``)."""

    __slots__ = ("owner",)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        m = self.owner() if key == "weight" else None
        if m is not None:
            _new_weight(m)


def _watch(m: nn.Module) -> None:
    params = _WatchedParams(m._parameters)
    params.owner = weakref.ref(m)
    m.__dict__["_parameters"] = params


# From this many tokens the members of a gate_proj / up_proj group, eagerly, run as matmuls on their
# own rows of the stack, not one over the stack, whose members' outputs are column slices of one
# [tokens, 2 I] tensor: eager PyTorch runs silu and the product over such strided views with its
# generic element-wise kernels, ~84 us more per Llama-3-8B layer at 2048 tokens on an H100 than
# over contiguous ones (bench/KERNEL_NOTES.md, session 29), against one more launch of host time
# (~50 us). Compiled forwards keep the one matmul (Inductor's fused kernel reads the slices as they are).
GLU_SPLIT_MIN_TOKENS = 1024


class FusedLinear(nn.Linear):
    """An ``nn.Linear`` in a fused group (``fuse_projections_`` swaps the class in place). Copies
    and pickles of it are plain, unfused ``nn.Linear`` modules."""

    _lowbit_gid: int
    _lowbit_index: int
    _lowbit_rows: tuple[int, int]
    _lowbit_param_id: int  # id() of the parameter fused (the group holds it, so the id stays its own)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gid = self.__dict__.get("_lowbit_gid")
        if gid is None:  # unfused since this call began (a pre-hook assigned a single's weight)
            return F.linear(x, self.weight, self.bias)
        bit = 1 << self._lowbit_index
        g = _GROUPS.get(gid)
        replaced = g is None or _replaced(self)  # since fusing: runs alone
        if replaced or (torch.is_grad_enabled() and x.requires_grad):  # (training: the unfused graph)
            return F.linear(x, self.weight, self.bias)
        if not torch.compiler.is_compiling() and g.split and x.numel() >= GLU_SPLIT_MIN_TOKENS * x.shape[-1]:
            return F.linear(x, self.weight, self.bias)  # a long eager prompt: a contiguous output of its own rows
        if g.full == 1:  # a group of one (``singles``): no memo; eagerly its own weight as it is
            pending = _PENDING.pop(gid, None)
            if pending is not None and self.bias is None:  # a fused layer's o_proj / down_proj: + residual, RMSNorm
                _RESULT[gid] = linear_add_rmsnorm(x, _weight(g, self), *pending)
                return _RESULT[gid][0]
            return F.linear(x, _weight(g, self), self.bias)
        eager = not torch.compiler.is_compiling() and not x.is_inference()
        memo = _MEMO.get(gid)
        if memo is None or memo[0] is not x or memo[2] & bit or (eager and memo[3] != x._version):
            memo = (x, F.linear(x, _weight(g)), 0, x._version if eager else None)  # a new input: one matmul
        served = memo[2] | bit
        if served == g.full:
            _MEMO.pop(gid, None)
        else:
            _MEMO[gid] = (memo[0], memo[1], served, memo[3])
        start, end = self._lowbit_rows
        out = memo[1][..., start:end]
        if self.bias is None:
            return out
        if autocast_dtype(x) is not None:  # (the matmul's output is in the autocast dtype, as F.linear's)
            return out + self.bias.to(out.dtype)
        if self.bias.dtype != out.dtype:
            raise TypeError(f"FusedLinear: bias is {self.bias.dtype}, the output {out.dtype}; they must match")
        return out + self.bias

    def __reduce_ex__(self, protocol):
        """copy.deepcopy and pickle make a plain nn.Linear of it (the copy shares nothing with the group)."""
        state = {k: v for k, v in self.__dict__.items() if k not in _FUSED_ATTRS}
        state["_parameters"] = dict(state["_parameters"])
        return copyreg._reconstructor, (nn.Linear, object, None), state

    def _apply(self, fn, recurse=True):
        g = _GROUPS.get(self._lowbit_gid) if type(self) is FusedLinear else None
        members = [m for m in (r() for r in g.members) if type(m) is FusedLinear] if g is not None else []
        if any(isinstance(m.weight, nn.Parameter) and weakref.getweakrefcount(m.weight) for m in members):
            # torch.compile holds weak references to the members' weights (its guards on their id()),
            # and swap_tensors, which moves a subclass weight, refuses such a tensor: each gets a new
            # Parameter object (one per shared weight), and the group unfuses before the move, so a
            # move that fails leaves plain modules rather than a half-fused group
            fresh = {}
            for m in members:
                p = m.weight
                if isinstance(p, nn.Parameter):
                    new = fresh.setdefault(id(p), nn.Parameter(p.detach(), requires_grad=p.requires_grad))
                    m._parameters["weight"] = new
            g.unfuse()
        out = nn.Linear._apply(self, fn, recurse)  # (self may be a plain nn.Linear by now)
        if type(self) is FusedLinear:
            self._unfuse_if_broken()  # moved or replaced
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        gid = self._lowbit_gid  # (an assigning load may unfuse the group: _WatchedParams)
        super()._load_from_state_dict(*args, **kwargs)
        _MEMO.pop(gid, None)  # an open round's output is of the old weights
        FusedLinear._unfuse_if_broken(self)  # assign=True (self may be a plain nn.Linear by now)

    def _unfuse_if_broken(self):
        """Unfuse the group once a member's weight is no longer its fused view of the stack (an
        earlier member's call may already have unfused it)."""
        if type(self) is not FusedLinear:
            return
        g = _GROUPS.get(self._lowbit_gid)
        if g is None:
            _make_plain(self)
        elif not g.intact():
            g.unfuse()


def _glu_forward(self, *args, **kwargs):
    """The forward of a fused Llama-style MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))`` with
    the gate / up matmul and the product in one kernel where the stack's format has one for this
    input (``QTensor.swiglu_max_tokens``, asked when fusing: int4 on CUDA up to 8 tokens of its
    dtype); else, and whenever what was checked
    at fuse time no longer holds (the group, the members and their weights, no bias, no hooks or
    instance forward on them, the same act_fn; type / id / emptiness checks, constant guards under torch.compile), or
    the input needs a gradient or comes with other arguments, the module's own forward."""
    gid = self.__dict__.get("_lowbit_glu_gid")
    if gid is None:  # unfused since this call began (e.g. a pre-hook assigned a member's weight)
        return type(self).forward(self, *args, **kwargs)
    base = self._lowbit_glu_base
    if len(args) != 1 or kwargs:
        return base.forward(self, *args, **kwargs)
    x = args[0]
    if x.numel() > self._lowbit_glu_max_m * x.shape[-1]:  # more tokens than the kernel serves (a prompt; from
        return base.forward(self, x)  # GLU_SPLIT_MIN_TOKENS, eagerly, gate and up run apart: FusedLinear.forward)
    gate, up = self.gate_proj, self.up_proj
    g = _GROUPS.get(gid)
    if (
        g is None
        or type(gate) is not FusedLinear
        or type(up) is not FusedLinear
        or gate._lowbit_gid != gid
        or up._lowbit_gid != gid
        or _replaced(gate)
        or _replaced(up)
        or gate.bias is not None
        or up.bias is not None
        or id(self.act_fn) != self._lowbit_glu_act
        or _hooked(gate)
        or _hooked(up)
        or "forward" in gate.__dict__  # an instance forward (a dispatch hook, a patch) would be skipped
        or "forward" in up.__dict__
        or (torch.is_grad_enabled() and x.requires_grad)
        or x.dtype != self._lowbit_glu_dtype
        or autocast_dtype(x) not in (None, x.dtype)  # (the linears cast x: their own forward)
    ):
        return base.forward(self, x)
    return self.down_proj(swiglu_linear(x, _weight(g)))


def _hooked(m: nn.Module) -> bool:
    """Hooks that a fused call would skip: the module's own, or global module hooks."""
    from torch.nn.modules import module as mod

    return bool(m._forward_hooks or m._forward_pre_hooks or mod._global_forward_hooks or mod._global_forward_pre_hooks)


_GLU_ATTRS = ("_lowbit_glu_gid", "_lowbit_glu_act", "_lowbit_glu_max_m", "_lowbit_glu_dtype")


def same_named_subclass(registry: dict, base: type, forward, attrs: tuple, base_attr: str) -> type:
    """A subclass of ``base`` with ``forward``, the same name, one per base (kept in ``registry``),
    and ``base`` as its attribute ``base_attr``; copy.deepcopy and pickle make ``base`` of an
    instance, without the instance attributes ``attrs`` (with plain, unfused members)."""
    if base not in registry:

        def reduce_ex(self, protocol):
            state = {k: v for k, v in self.__dict__.items() if k not in attrs}
            return copyreg._reconstructor, (getattr(self, base_attr), object, None), state

        body = {"forward": forward, "__reduce_ex__": reduce_ex, base_attr: base}
        body.update(__module__=base.__module__, __qualname__=base.__qualname__)
        registry[base] = type(base.__name__, (base,), body)
    return registry[base]


_GLU_CLASSES: dict[type, type] = {}


def _glu_class(base: type) -> type:
    """A subclass of the MLP's class with the fused forward (one per class, same name)."""
    return same_named_subclass(_GLU_CLASSES, base, _glu_forward, _GLU_ATTRS, "_lowbit_glu_base")


def _make_plain_glu(parent: nn.Module):
    parent.__class__ = parent._lowbit_glu_base
    for name in _GLU_ATTRS:
        parent.__dict__.pop(name, None)


def _is_silu(act) -> bool:
    """``act`` computes SiLU: on a fixed fp32 grid over [-8, 8], to fp32 rounding."""
    t = torch.linspace(-8, 8, 257)
    try:
        with torch.no_grad():
            got = act(t)
    except Exception:  # (a device-bound activation: not one we can check, so not fused)
        return False
    return isinstance(got, torch.Tensor) and got.shape == t.shape and torch.allclose(got, F.silu(t), 1e-5, 1e-6)


def _fuse_glu(parent: nn.Module, group: _Group, mods) -> bool:
    """Give ``parent`` the fused MLP forward if the stack's format has a kernel for it on its
    device (``QTensor.swiglu_max_tokens``, under the backend current when fusing), its
    act_fn is SiLU (checked on a grid) and its forward computes down_proj(act_fn(gate) * up)
    (checked on one row against the fused formula: another structure reads rel. err ~1, the fused
    one differs by roundings). False, and nothing changed, otherwise."""
    gate, up = mods
    w = group.weight
    base = getattr(type(parent), "_lowbit_glu_base", type(parent))  # (a parent fused before: its class)
    down = parent._modules.get("down_proj")
    max_m = w.swiglu_max_tokens()
    if (
        max_m < 1  # no kernel for it here: the module's own forward is as good
        or down is None
        or "forward" in parent.__dict__  # an instance forward (e.g. a dispatch hook) would bypass ours
        or gate.bias is not None
        or up.bias is not None
        or gate.weight.shape != up.weight.shape
        or gate.weight.device.type == "meta"
        or not _is_silu(parent._modules.get("act_fn"))
    ):
        return False
    x = torch.randn(1, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    try:
        with torch.no_grad():
            want = base.forward(parent, x).float()
            got = down(ref.swiglu(F.linear(x, w))).float()
    except (TypeError, ValueError, RuntimeError):  # a forward that wants other inputs: not this pattern
        return False
    finally:
        _MEMO.pop(group.gid, None)
    if want.shape != got.shape or not bool(torch.isfinite(want).all()):
        return False
    if float((got - want).norm()) > 0.05 * float(want.norm()) + 1e-6:
        return False
    parent.__class__ = _glu_class(base)
    parent._lowbit_glu_gid = group.gid
    parent._lowbit_glu_act = id(parent.act_fn)
    parent._lowbit_glu_max_m, parent._lowbit_glu_dtype = max_m, w.dtype
    group.glu = weakref.ref(parent)
    clear_when_freed(parent.act_fn, parent, "_lowbit_glu_act", None)
    return True


def clear_when_freed(obj, owner, attr: str, cleared) -> None:
    """Once ``obj`` is freed, set ``owner.<attr>`` (obj's id, or a tuple holding it, that a per-call
    check compares with id()) to ``cleared``: CPython often gives an object made next the freed
    one's address, so its id (a GELU there would pass for the fused SiLU, a LayerNorm for an RMSNorm)."""
    weakref.finalize(obj, _clear_id, weakref.ref(owner), attr, id(obj), cleared)


def _clear_id(owner_ref, attr: str, obj_id: int, cleared):
    owner = owner_ref()
    held = owner.__dict__.get(attr) if owner is not None else None
    if held == obj_id or (isinstance(held, tuple) and obj_id in held):
        setattr(owner, attr, cleared)


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


def fuse_projections_(
    model: nn.Module, groups=DEFAULT_GROUPS, swiglu: bool = True, singles: bool | None = None, norms: bool = False
) -> list[str]:
    """Fuse, in place, every group of sibling quantized linears of ``model``: the children of
    one module named as in one tuple of ``groups`` (default: q_proj / k_proj / v_proj and
    gate_proj / up_proj), all plain ``nn.Linear`` (subclasses and adapter wrappers are left as
    they are). Returns the fused groups as ``"<module>.{a,b,c}"``, and with ``swiglu`` each module
    whose activation was fused too (see the module doc) as ``"<module>: silu(gate_proj) * up_proj"``.

    With ``singles`` every other plain ``nn.Linear`` with a lowbit weight becomes a group of one
    (listed as ``"<module>"``): it computes what it did, and under torch.compile it reads its
    weight as the groups do. Where this torch flattens tensor-subclass graph inputs in Python on
    every call (``REBUILD_IN_GRAPH``: torch 2.11), compiled forwards rebuild each weight from its
    plain fields inside the graph, so a compiled model takes no subclass input (1.0-1.4 ms of host time
    per Llama-3-8B decode step on the H100, which made batch-1 decode host-bound). ``singles=None``
    (the default) means ``REBUILD_IN_GRAPH``.

    With ``norms`` (off by default) each Llama-style decoder layer whose o_proj and down_proj have a
    ``linear_add_rmsnorm`` kernel here (int4 on CUDA, M <= 2) gets its residual adds and RMSNorms
    computed in those linears' launches (``lowbit.fuse_layers``; listed as ``"<layer>: residual +
    RMSNorm"``). On the H100 a batch-1 Llama-3-8B step ran 2.945 against 2.992 ms on the GPU in
    one call (within the spread between calls) and took ~1 ms more host time per compiled step
    (not explained yet; bench/KERNEL_NOTES.md, session 23).

    Raises ``ValueError`` naming the layer, and changes nothing, when a group's weights are not
    lowbit weights of one class, in_features, dtype, device and attributes, when a format's rows
    are not views of its fields (int4's CPU packings), or when a member is already in a fused
    group or in two groups (a group of one made by an earlier call joins the new group).
    """
    plans, seen = [], {}
    for fqn, parent in model.named_modules():
        for names in groups:
            mods = [parent._modules.get(n) for n in names]
            if not all(type(m) in (nn.Linear, FusedLinear) for m in mods):
                continue
            where = fqn or "<root>"
            label = f"{where}.{{{','.join(names)}}}"
            if any(type(m) is FusedLinear and not _single(m) for m in mods):
                raise ValueError(f"fuse_projections_: {label} is already fused")
            for m in mods:
                if seen.setdefault(id(m), label) != label:
                    raise ValueError(f"fuse_projections_: a member of {label} is also in {seen[id(m)]}")
            plans.append((label, parent, mods, *_plan(where, names, mods)))
    out = [p[0] for p in plans]
    for label, parent, mods, stacked, views in plans:  # every group checked: now change them
        for m in mods:  # a group of one (an earlier call's ``singles``) joins this group
            if type(m) is FusedLinear:
                g = _GROUPS.get(m._lowbit_gid)
                if g is not None:
                    g.unfuse()
                else:
                    _make_plain(m)
        params = [nn.Parameter(v, requires_grad=False) for v, _ in views]
        group = _Group(stacked, mods, params)
        for i, (m, p, (_, rows)) in enumerate(zip(mods, params, views)):
            m.weight = p
            m.__class__ = FusedLinear
            m._lowbit_gid, m._lowbit_index, m._lowbit_rows, m._lowbit_param_id = group.gid, i, rows, id(p)
            _watch(m)
        _GROUPS[group.gid] = group
        _drop_stale_hooks(parent)
        group.hook = parent.register_forward_hook(functools.partial(_end_round, group.gid), always_call=True)
        weakref.finalize(parent, _forget, group.gid)  # the registry does not keep a model alive
        group.split = label.endswith(".{gate_proj,up_proj}")
        if swiglu and group.split and _fuse_glu(parent, group, mods):
            out.append(f"{label[: -len('.{gate_proj,up_proj}')]}: silu(gate_proj) * up_proj")
    if REBUILD_IN_GRAPH if singles is None else singles:
        for fqn, m in list(model.named_modules()):
            if type(m) is nn.Linear and isinstance(m.weight, QTensor) and m.weight.device.type != "meta":
                _fuse_single(m)
                out.append(fqn or "<root>")
    if norms:
        from lowbit.fuse_layers import fuse_layers

        out += fuse_layers(model)
    return out


def _single(m: FusedLinear) -> bool:
    """``m`` is a group of one (or its group is gone)."""
    g = _GROUPS.get(m._lowbit_gid)
    return g is None or g.full == 1


def _fuse_single(m: nn.Linear):
    """``m`` as a group of one: its weight is the stack (no copy, no memo, no parent hook)."""
    p = m.weight
    group = _Group(p, [m], [p])
    m.__class__ = FusedLinear
    m._lowbit_gid, m._lowbit_index, m._lowbit_rows, m._lowbit_param_id = group.gid, 0, (0, p.shape[0]), id(p)
    _watch(m)
    _GROUPS[group.gid] = group
    weakref.finalize(m, _forget, group.gid)


def _drop_stale_hooks(parent: nn.Module):
    """A copied or unpickled parent keeps its original's hooks, for groups it does not have."""
    children = {id(c) for c in parent.children()}
    for key, hook in list(parent._forward_hooks.items()):
        if not (isinstance(hook, functools.partial) and hook.func is _end_round):
            continue
        group = _GROUPS.get(hook.args[0])
        if group is None or not any(id(r()) in children for r in group.members):
            del parent._forward_hooks[key]
            parent._forward_hooks_always_called.pop(key, None)


def _forget(gid: int):
    _GROUPS.pop(gid, None)
    _MEMO.pop(gid, None)
    _PENDING.pop(gid, None)
    _RESULT.pop(gid, None)
