"""``fuse_projections_``' per-call checks that compare a module's id() with the one fused: CPython
often gives an object made after another is freed that one's address, so its id. A module put in
place of a freed fused one must not pass for it (the norms' case: tests/test_fuse_layers.py)."""

from __future__ import annotations

import builtins
import copy

import torch
from test_fuse import IDS1, int4_llama
from torch import nn

import lowbit
from lowbit import fuse as fuse_mod


def test_an_activation_at_the_freed_silus_address_does_not_run_as_silu(monkeypatch):
    monkeypatch.setattr(lowbit.Int4Tensor, "swiglu_max_tokens", lambda self: 8)  # (the CPU: the reference)
    calls, real = [], fuse_mod.swiglu_linear
    monkeypatch.setattr(fuse_mod, "swiglu_linear", lambda *a: calls.append(1) or real(*a))
    plain, fused = int4_llama(layers=1), int4_llama(layers=1)
    assert any(": silu" in n for n in lowbit.fuse_projections_(fused))
    mlp = fused.model.layers[0].mlp
    old = id(mlp.act_fn)
    mlp.act_fn = None  # (the SiLU module is freed here)
    made = [nn.GELU() for _ in range(64)]  # (kept alive: the freed address often goes to one)
    gelu = next((m for m in made if id(m) == old), None)
    if gelu is None:  # not this time: the same collision, by the id the MLP's check sees
        gelu = made[0]
        monkeypatch.setattr(fuse_mod, "id", lambda o: old if o is gelu else builtins.id(o), raising=False)
    mlp.act_fn = gelu
    plain.model.layers[0].mlp.act_fn = copy.deepcopy(gelu)
    with torch.no_grad():
        assert torch.equal(fused(IDS1).logits, plain(IDS1).logits)
    assert not calls  # (the MLP ran its own forward: gelu(gate) * up)
