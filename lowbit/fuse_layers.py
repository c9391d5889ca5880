"""A pre-norm decoder layer's residual adds and RMSNorms in its linears' epilogues.

Llama's decoder layer (Mistral's, Qwen2's and Qwen3's run the same forward) computes, between its
matmuls, ``h = residual + o_proj(a)``, ``post_attention_layernorm(h)``, ``h + down_proj(m)`` and
the next layer's ``input_layernorm``: at decode time two small kernels of their own per layer
(Inductor fuses each add into its norm), 64 launches and ~0.2 ms of a Llama-3-8B step on the H100.
``fuse_projections_(norms=True)`` (``fuse_layers``) gives each such layer a forward that asks its
o_proj and down_proj (made groups of one, ``fuse.FusedLinear``) for
``linear_add_rmsnorm(x, w, residual, norm.weight, eps)``: one launch returns h and the
normalised h (``reference.add_rmsnorm``; int4 on CUDA at M <= 2: the CTA that finishes the last
row tile normalises the row). o_proj's normalised h is the MLP's input; down_proj's is the next
layer's input_layernorm output, handed over with h (by identity) when that layer is called with h
(eagerly, and only while h's version counter says it was not written in place since).

The layer's forward calls the same modules as the original (``self_attn(hidden_states=normed,
**kwargs)``, ``mlp``); it runs the original forward instead for positional arguments beyond
hidden_states, more tokens than the kernel serves (``QTensor.add_rmsnorm_max_tokens``: int4 on
CUDA up to ``_int4_gemv.NORM_MAX_M`` = 2), another dtype, an input that needs a gradient, hooks on
the layer's modules (or global ones), and once o_proj or down_proj is no longer the fused single
it was (replaced, wrapped by an adapter, unfused by ``.to()``), or a norm module was swapped (checked
by id(); once a fused norm module is freed no module passes, its id being reusable). A
layer is fused only where its own forward equals the fused one, linked to itself, on a random
two-token input, h and the normalised h it hands on (checked when fusing: another structure, e.g.
post-norms, a module scaling o_proj's or down_proj's output, or a norm of ``(1 + weight)``, reads
rel. err ~1), and both norms compute Llama's RMSNorm (checked on random rows of mean 4).
A request to a single and its result never outlive the layer's call, an exception included.
``copy.deepcopy`` and pickling give the layer's own class.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from lowbit.fuse import (
    _GROUPS,
    _PENDING,
    _RESULT,
    FusedLinear,
    _end_round,
    _fuse_single,
    _hooked,
    _make_plain,
    _single,
    clear_when_freed,
    same_named_subclass,
)
from lowbit.ops import reference as ref
from lowbit.qtensor import QTensor
from lowbit.qtensor.linear import autocast_dtype

# layer id -> (h, input_layernorm(h), h's version or None) computed by the layer before
_PRENORMED: dict[int, tuple] = {}
_LINKS: dict[int, tuple] = {}  # layer id -> (the next fused layer's id, that layer's input_layernorm)
_IDS = itertools.count()
_LAYER_ATTRS = (
    "_lowbit_layer_id", "_lowbit_layer_gids", "_lowbit_layer_norms", "_lowbit_layer_max_m", "_lowbit_layer_dtype",
    "_lowbit_layer_hooks",
)  # fmt: skip


def _eps(norm: nn.Module) -> float:
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps


def _rmsnorm_ok(norm, n: int, dtype: torch.dtype) -> bool:
    """``norm`` is a module with a [n] weight of ``dtype`` and a float eps whose forward computes
    Llama's RMSNorm (``reference.add_rmsnorm``'s norm) on two random rows."""
    w = norm._parameters.get("weight") if isinstance(norm, nn.Module) else None
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if w is None or w.shape != (n,) or w.dtype != dtype or not isinstance(eps, float) or _hooked(norm):
        return False
    if "forward" in norm.__dict__ or w.device.type == "meta":
        return False
    # (rows of mean 4: a LayerNorm, which subtracts the mean, reads rel. err ~1)
    x = (torch.randn(2, n, generator=torch.Generator().manual_seed(0)) * 3 + 4).to(w.device, dtype)
    try:
        with torch.no_grad():
            got = norm(x)
    except (TypeError, ValueError, RuntimeError):
        return False
    want = ref.add_rmsnorm(x, torch.zeros_like(x), w.detach(), eps)[1].float()
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != dtype:
        return False
    return float((got.float() - want).norm()) <= 1e-2 * float(want.norm()) + 1e-6


def _fused_single(m, gid: int) -> bool:
    """``m`` is the group of one the layer asks (its own forward then serves the request only while
    its weight is the fused one, with no bias: ``FusedLinear.forward``). No access to the weight
    here: under torch.compile each one is a tensor-subclass guard run in Python (~9 us a call)."""
    return type(m) is FusedLinear and m._lowbit_gid == gid


def _ready(self, x: torch.Tensor, attn, mlp, inorm, post) -> bool:
    """What the fused forward needs holds for this call (see the module doc)."""
    o_gid, d_gid = self._lowbit_layer_gids
    o, down = attn._modules.get("o_proj"), mlp._modules.get("down_proj")
    return not (
        (torch.is_grad_enabled() and x.requires_grad)
        or x.dtype != self._lowbit_layer_dtype
        or autocast_dtype(x) not in (None, x.dtype)
        or x.numel() > self._lowbit_layer_max_m * x.shape[-1]
        or not _fused_single(o, o_gid)
        or not _fused_single(down, d_gid)
        or (id(inorm), id(post)) != self._lowbit_layer_norms
        or _hooked(self)
        or any(_hooked(m) for m in (o, down, inorm, post))
        or _hooked_besides(attn, self._lowbit_layer_hooks[0])
        or _hooked_besides(mlp, self._lowbit_layer_hooks[1])
    )


def _hooked_besides(m: nn.Module, ours: frozenset) -> bool:
    """Hooks on ``m`` other than the fused groups' memo hooks (keys ``ours``), or global ones."""
    return any(k not in ours for k in m._forward_hooks) or (_hooked(m) and not m._forward_hooks)


def _memo_hooks(m: nn.Module) -> frozenset:
    """The keys of ``m``'s forward hooks that only drop a fused group's memo (``fuse._end_round``)."""
    return frozenset(k for k, h in m._forward_hooks.items() if getattr(h, "func", None) is _end_round)


def _layer_forward(self, hidden_states, *args, **kwargs):
    """The fused forward of a Llama-style decoder layer (see the module doc)."""
    lid = self._lowbit_layer_id
    pre = _PRENORMED.pop(lid, None)
    attn, mlp = self._modules.get("self_attn"), self._modules.get("mlp")
    inorm, post = self._modules.get("input_layernorm"), self._modules.get("post_attention_layernorm")
    if args or not _ready(self, hidden_states, attn, mlp, inorm, post):
        return self._lowbit_layer_base.forward(self, hidden_states, *args, **kwargs)
    o_gid, d_gid = self._lowbit_layer_gids
    fresh = pre is not None and pre[0] is hidden_states and (pre[2] is None or pre[2] == hidden_states._version)
    normed = pre[1] if fresh else inorm(hidden_states)  # (h written in place since: normalised again)
    h, normed, out = _ask(
        o_gid, (hidden_states, post.weight, _eps(post)), attn, "self_attn", hidden_states=normed, **kwargs
    )
    if h is None:  # o_proj ran plain (its own checks: e.g. a replaced weight)
        h = hidden_states + out
        normed = post(h)
    link = _LINKS.get(lid)
    if link is None:
        return h + mlp(normed)
    nxt, nxt_normed, out = _ask(d_gid, (h, link[1].weight, _eps(link[1])), mlp, "mlp", normed)
    if nxt is None:
        return h + out
    # (the version, eagerly: an in-place write to nxt before the next layer drops the hand-over)
    eager = not torch.compiler.is_compiling() and not nxt.is_inference()
    _PRENORMED[link[0]] = (nxt, nxt_normed, nxt._version if eager else None)
    return nxt


def _ask(gid: int, request: tuple, module, where: str, *args, **kwargs):
    """Call ``module`` with a request to the single ``gid`` (residual, norm weight, eps) -> (h,
    normed, module's output): (None, None, output) if the single did not take the request. The
    request and the single's result never outlive the call (an exception included), and a taken
    request whose result is not the module's output raises: that output holds the residual."""
    _PENDING[gid] = request
    try:
        out = module(*args, **kwargs)
    finally:
        untaken = _PENDING.pop(gid, None)
        got = _RESULT.pop(gid, None)
    if where == "self_attn":
        out = out[0]
    if untaken is not None:
        return None, None, out
    if got is None or got[0] is not out:  # something between the linear and the layer changed it
        raise RuntimeError(
            f"fused decoder layer: {where} returned another tensor than its fused linear's output (which "
            "includes the residual); fuse the model again after wrapping or changing its modules "
            "(lowbit.fuse_projections_ checks each layer when fusing)"
        )
    return got[0], got[1], out


_LAYER_CLASSES: dict[type, type] = {}


def _layer_class(base: type) -> type:
    return same_named_subclass(_LAYER_CLASSES, base, _layer_forward, _LAYER_ATTRS, "_lowbit_layer_base")


def _make_plain_layer(layer: nn.Module):
    _LINKS.pop(getattr(layer, "_lowbit_layer_id", None), None)
    layer.__class__ = layer._lowbit_layer_base
    for name in _LAYER_ATTRS:
        layer.__dict__.pop(name, None)


def _fuse_layer(layer: nn.Module) -> bool:
    """Give ``layer`` the fused forward if it has the structure (see the module doc); False, and
    nothing changed, otherwise."""
    attn, mlp = layer._modules.get("self_attn"), layer._modules.get("mlp")
    inorm, post = layer._modules.get("input_layernorm"), layer._modules.get("post_attention_layernorm")
    if attn is None or mlp is None or "forward" in layer.__dict__ or getattr(attn, "head_dim", None) is None:
        return False
    o, down = attn._modules.get("o_proj"), mlp._modules.get("down_proj")
    if not all(type(m) in (nn.Linear, FusedLinear) and isinstance(m.weight, QTensor) for m in (o, down)):
        return False
    if any(type(m) is FusedLinear and not _single(m) for m in (o, down)) or o.bias is not None or down.bias is not None:
        return False
    w = o.weight
    n, dtype = w.shape[0], w.dtype
    max_m = min(w.add_rmsnorm_max_tokens(), down.weight.add_rmsnorm_max_tokens())
    if max_m < 1 or down.weight.shape[0] != n or down.weight.dtype != dtype or w.device.type == "meta":
        return False
    if not (_rmsnorm_ok(inorm, n, dtype) and _rmsnorm_ok(post, n, dtype)):
        return False
    base = getattr(type(layer), "_lowbit_layer_base", type(layer))  # (a layer fused before: its class)
    made = [m for m in (o, down) if type(m) is nn.Linear or _GROUPS.get(m._lowbit_gid) is None]
    for m in made:
        if type(m) is FusedLinear:  # (its group is gone)
            _make_plain(m)
        _fuse_single(m)
    if type(layer) is not base:
        _make_plain_layer(layer)
    layer.__class__ = _layer_class(base)
    layer._lowbit_layer_id = next(_IDS)
    layer._lowbit_layer_gids = (o._lowbit_gid, down._lowbit_gid)
    layer._lowbit_layer_norms = (id(inorm), id(post))
    layer._lowbit_layer_max_m, layer._lowbit_layer_dtype = max_m, dtype
    layer._lowbit_layer_hooks = (_memo_hooks(attn), _memo_hooks(mlp))
    same = False
    try:
        same = _same_as_base(layer, base, n, dtype, attn.head_dim, w.device, inorm)
    finally:  # (also when the check raises, e.g. a kernel that does not compile here)
        if not same:
            _make_plain_layer(layer)
            for m in made:
                _GROUPS[m._lowbit_gid].unfuse()
    if not same:
        return False
    weakref.finalize(layer, _LINKS.pop, layer._lowbit_layer_id, None)
    for norm in (inorm, post):
        clear_when_freed(norm, layer, "_lowbit_layer_norms", (None, None))
    return True


def _same_as_base(layer, base, n, dtype, head_dim, device, inorm) -> bool:
    """The fused forward, linked to itself so that both o_proj and down_proj take requests, equals
    the layer's own on two random tokens (no cache, no mask, RoPE of angle zero), and so does the
    normalised output it hands on (against ``inorm`` of the layer's own output), to a few
    roundings of dtype."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, n, generator=g).to(device, dtype)
    pe = (
        torch.ones(1, 2, head_dim, device=device, dtype=dtype),
        torch.zeros(1, 2, head_dim, device=device, dtype=dtype),
    )
    lid, probe = layer._lowbit_layer_id, -1 - layer._lowbit_layer_id  # (no layer has a negative id)
    _LINKS[lid] = (probe, inorm)
    try:
        with torch.no_grad():
            want = base.forward(layer, x, attention_mask=None, position_embeddings=pe)
            got = _layer_forward(layer, x, attention_mask=None, position_embeddings=pe)
            handed = _PRENORMED.pop(probe, None)
            want_normed = inorm(want) if isinstance(want, torch.Tensor) else None
    except (TypeError, ValueError, RuntimeError, AttributeError):  # another signature or structure
        return False
    finally:
        _LINKS.pop(lid, None)
        _PRENORMED.pop(probe, None)
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or want.shape != got.shape:
        return False
    if handed is None or handed[0] is not got:
        return False
    return bool(torch.isfinite(want).all()) and _close(got, want) and _close(handed[1], want_normed)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    want, got = want.float(), got.float()
    return float((got - want).norm()) <= 0.02 * float(want.norm()) + 1e-6


def fuse_layers(model: nn.Module) -> list[str]:
    """Fuse every Llama-style decoder layer of ``model`` whose o_proj and down_proj formats have a
    ``linear_add_rmsnorm`` kernel here, and link each fused layer of a ``ModuleList`` to the next
    (its down_proj then normalises for that layer). Returns the fused layers' names as
    ``"<layer>: residual + RMSNorm"``."""
    out, fused = [], {}
    for fqn, layer in model.named_modules():
        if _fuse_layer(layer):
            fused[id(layer)] = layer
            out.append(f"{fqn or '<root>'}: residual + RMSNorm")
    for lst in model.modules():
        if isinstance(lst, nn.ModuleList):
            kids = list(lst)
            for a, b in zip(kids, kids[1:]):
                if id(a) in fused and id(b) in fused:
                    _LINKS[a._lowbit_layer_id] = (b._lowbit_layer_id, b._modules["input_layernorm"])
    return out
