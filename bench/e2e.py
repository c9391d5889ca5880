"""End-to-end benchmark: a Llama-3-8B-shaped model through Transformers ``generate``.

    python bench/e2e.py [--out DIR] [--variants bf16,lowbit_int4,...] [--layers N] [--tiny]

Random weights, N(0, 0.02), built from a ``LlamaConfig`` directly on the GPU in
bf16. Per variant, in its own process (clean peak-memory numbers, no state
shared between variants):

* quantize: seconds to quantize the decoder's linear layers (the output head stays bf16);
* decode: greedy ``generate`` with a static cache (Transformers compiles the
  decode step), a 16-token random prompt, exactly ``--new-tokens`` (256) new
  tokens, batch 1 and batch 8; one warm-up call (compilation), then the best of
  ``--reps`` timed calls; tokens/s per sequence and peak memory;
* step loop (``--step-loop``): the same greedy decode as a plain loop over the
  compiled forward (``step_loop_decode``), without ``generate``'s per-token work;
* prefill: one 2048-token forward (logits for the last position only, as
  ``generate`` computes them), median of ``--reps`` after a warm-up;
* profiles: ``--profile-prefill``, the top ops of one prefill forward; ``--profile-decode`` (with
  ``--step-loop``), GPU kernel time per decode step by kind against the step's wall time and the
  GPU's idle time after each kind; ``--profile-host`` (with ``--step-loop``), cProfile of the loop
  that issues the decode steps.
* ``--compile-prefill``: prefill through ``torch.compile`` (default mode) instead of eager,
  which takes the per-linear host cost of eager dispatch out of the measurement.

Variants: bf16; torchao int4 (tinygemm, g128) and fp8 (dynamic, per row) when
torchao imports (else from a wheel in ``--wheels``; else skipped); lowbit
int4 g128 / int8 weight-only / W8A8 / fp8. Writes ``<device>-e2e.json``,
``<device>-e2e.md`` and ``<device>-e2e.png`` (matplotlib permitting) into
``--out`` after every variant, merging with results already there, so a run
cut short or split over several commands still leaves a table.

``--rounds N`` runs the variant list N times, round robin, each run in a fresh process, and
reports per variant the median of every tok/s figure over its rounds (the samples are kept in
the JSON as ``<key>_samples``). Eager prefill of a quantized model is host-bound on a slow
host and read bimodal per process on H100 (``results/h100-e2e-prefill-s9.md``), so one
process per variant is one sample, not a measurement.

``--tiny`` runs a tiny config on CPU in one process (a smoke check for tests).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch
from e2e_env import device_name, torchao_pythonpath
from e2e_profile import (  # bench/ (this folder) is on sys.path
    profile_decode,
    profile_forward,
    profile_host,
    sleep_cycles_per_s,
    unwrap_fields,
)
from e2e_report import merge_rounds, write_outputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = ["bf16", "ao_int4", "ao_fp8", "lowbit_int4", "lowbit_int8", "lowbit_w8a8", "lowbit_fp8"]
LABELS = {
    "bf16": "bf16",
    "ao_int4": "torchao int4 g128 (tinygemm)",
    "ao_fp8": "torchao fp8 dyn per-row",
    "lowbit_int4": "lowbit int4 g128",
    "lowbit_int8": "lowbit int8 weight-only",
    "lowbit_w8a8": "lowbit W8A8 (int8 dyn)",
    "lowbit_fp8": "lowbit fp8 dyn",
}
# the lowbit variants with programmatic dependent launch off (``_utils.PDL``), for A/B runs
NO_PDL = "_nopdl"
for _v in [v for v in VARIANTS if v.startswith("lowbit_")]:
    LABELS[_v + NO_PDL] = LABELS[_v] + ", no PDL"
# lowbit int4 with the M <= 8 GEMV tile off (``int4.GEMV_MAX_M = 0``), for A/B runs
NO_GEMV = "_nogemv"
LABELS["lowbit_int4" + NO_GEMV] = LABELS["lowbit_int4"] + ", no GEMV tile"
# lowbit int4 with its weights' plain fields as the module parameters (``unwrap_fields``; probe)
UNWRAP = "_unwrapped"
LABELS["lowbit_int4" + UNWRAP] = LABELS["lowbit_int4"] + ", fields as parameters"
_UNWRAP_FIELDS = False
# lowbit int4 / int8 with sibling projections (q / k / v, gate / up) run as one matmul each (``lowbit.fuse_projections_``)
FUSED = "_fused"
for _v in ("lowbit_int4", "lowbit_int8"):
    LABELS[_v + FUSED] = LABELS[_v] + ", q/k/v and gate/up fused"
_FUSE_SIBLINGS = False
# the same with the MLPs' silu(gate) * up left to its own kernel (fuse_projections_(swiglu=False))
NO_GLU = "_fused_noglu"
LABELS["lowbit_int4" + NO_GLU] = LABELS["lowbit_int4"] + ", q/k/v and gate/up fused, not silu(gate) * up"
_FUSE_GLU = True
# the same with compiled forwards taking the weights as subclass inputs (fuse.REBUILD_IN_GRAPH off, so no singles)
SUBCLASS = "_fused_subclass"
LABELS["lowbit_int4" + SUBCLASS] = LABELS["lowbit_int4"] + ", q/k/v and gate/up fused, weights as subclass inputs"
# the same with the layers' residual adds and RMSNorms in o_proj / down_proj (norms=True)
NORMS = "_fused_norms"
LABELS["lowbit_int4" + NORMS] = LABELS["lowbit_int4"] + ", q/k/v and gate/up fused, residual + RMSNorm in o / down"
_FUSE_NORMS = False
# the lowbit variants with the eager launch plans off (``_utils.PLANS``: Triton's launch path on
# every eager call) and / or the eager MLP's gate / up split off (``fuse.GLU_SPLIT_MIN_TOKENS``), for A/B
NO_PLANS, NO_SPLIT = "_noplans", "_nosplit"
for _v in [v for v in VARIANTS if v.startswith("lowbit_")] + ["lowbit_int4_fused"]:
    LABELS[_v + NO_PLANS] = LABELS[_v] + ", no launch plans"
for _v in ("lowbit_int4_fused", "lowbit_int4_fused" + NO_PLANS):
    LABELS[_v + NO_SPLIT] = LABELS[_v] + ", no gate / up split"
ALL_VARIANTS = list(LABELS)
LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


# ---------------------------------------------------------------------------- one variant
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(TINY if args.tiny else LLAMA3_8B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    return model.eval()


def quantize(model, variant, group_size, with_head=False):
    """The decoder layers' linears, or with ``with_head`` every linear (the output head too, as
    a bare ``quantize_(model, config)`` does in both libraries)."""
    if variant == "bf16":
        return
    target = model if with_head else model.model
    if variant.startswith("lowbit_"):
        import lowbit

        cfg = {
            "lowbit_int4": lambda: lowbit.int4_weight_only(group_size=group_size),
            "lowbit_int8": lowbit.int8_weight_only,
            "lowbit_w8a8": lowbit.int8_dynamic_activation_int8_weight,
            "lowbit_fp8": lowbit.float8_dynamic_activation_float8_weight,
        }[variant]()
        lowbit.quantize_(target, cfg)
        return
    import torchao.quantization as ao

    cfg = {
        "ao_int4": lambda: ao.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d"),
        "ao_fp8": lambda: ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerRow()),
    }[variant]()
    ao.quantize_(target, cfg)


def weight_bytes(model) -> int:
    total = 0
    for p in model.parameters():
        packed = getattr(p, "nbytes_packed", None)
        if packed is not None:
            total += packed
        elif type(p) is torch.Tensor or type(p) is torch.nn.Parameter:
            total += p.numel() * p.element_size()
        else:  # other tensor subclasses (torchao): sum their inner tensors
            names, _ = p.__tensor_flatten__()
            total += sum(getattr(p, n).numel() * getattr(p, n).element_size() for n in names)
    return total


FIRST_STEPS = 2  # timed apart from the rest of a step loop (see step_loop_decode)


def first_steps(new_tokens: int) -> int:
    """How many of a step loop's ``new_tokens - 1`` steps are timed apart: FIRST_STEPS, fewer
    in a short loop so that at least one steady step follows."""
    return min(FIRST_STEPS, max(new_tokens - 2, 0))


# --reuse-cache: step loops and generate calls of one model, batch and length share one StaticCache
# (reset before each) instead of a new one each (as ``generate`` makes), so the CUDA-graph tree
# does not re-record the step for a cache at new addresses
_REUSE_CACHE = False
_CACHE_POOL: dict = {}


def static_cache(model, batch: int, length: int):
    """A StaticCache for ``batch`` sequences of ``length`` tokens: new, or with --reuse-cache the
    pooled one, reset (same tensors, zeroed: the compiled step's static inputs keep their addresses)."""
    from transformers import StaticCache

    key = (id(model), batch, length)
    if _REUSE_CACHE and key in _CACHE_POOL:
        _CACHE_POOL[key].reset()
        return _CACHE_POOL[key]
    cache = StaticCache(config=model.config, max_cache_len=length)
    if _REUSE_CACHE:
        _CACHE_POOL[key] = cache
    return cache


def step_loop_decode(
    model, ids, new_tokens, compile_step, host: dict | None = None, prof=None, mark=None
) -> torch.Tensor:
    """Greedy decode without ``generate``: a static cache and the model's forward in a loop.

    The prompt runs eagerly (it also sizes the cache); each new token is one call of
    the forward, compiled with ``mode="reduce-overhead"`` (a CUDA graph per step on a
    GPU). Nothing in the loop waits for the GPU, so this measures the model step
    (kernels, plus torch.compile's per-call work) without Transformers' per-token
    loop, which is CPU-bound at about 10 ms per token on the H100 host. ``host``, if given,
    gets ``issue_s``: the seconds the loop took to issue every step (no sync); when that is
    close to the synchronized time, the step loop is bound by host work, not the GPU. ``prof``
    (a ``cProfile.Profile``, or a pair: the first steps', the rest's) is enabled around the
    steps after the first ``first_steps(new_tokens)`` (the eager prompt left out); ``mark()``
    runs just before the loop.
    On a GPU ``host`` also gets, from events (the eager prompt left out), ``first_s``: the first
    ``first_steps(new_tokens)`` steps (after a new cache at new addresses the CUDA-graph tree
    records the step again: the two then take lowbit int4 83-138 ms on the H100, bf16 41-68;
    ``bench/diag_cudagraph.py``), and ``steady_s``: the steps after them
    (``steady_issue_s``: the host's time to issue those). With ``host["head_start_s"]`` (and
    ``sleep_cycles_per_s``) the GPU first sleeps that long, so the host issues ahead and
    ``steady_s`` is the GPU's time alone.
    """
    batch, prompt = ids.shape
    cache = static_cache(model, batch, prompt + new_tokens)
    positions = torch.arange(prompt + new_tokens, device=ids.device)
    out = model(ids, past_key_values=cache, cache_position=positions[:prompt], use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)

    def step(tok, pos):
        return model(tok, past_key_values=cache, cache_position=pos, use_cache=True, logits_to_keep=1).logits[:, -1]

    if compile_step:
        step = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    toks = [tok]
    if mark is not None:  # (e.g. a marker kernel: what follows it on the GPU is the loop)
        mark()
    profs = prof if isinstance(prof, tuple) else (None, prof)  # (first steps', steady steps')
    events = None
    warm = first_steps(new_tokens)
    if host is not None and ids.is_cuda:
        torch.cuda.synchronize()
        if host.get("head_start_s"):  # the GPU sleeps first, so the host issues ahead of it
            torch.cuda._sleep(int(host["head_start_s"] * host["sleep_cycles_per_s"]))
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record()
    t0 = t_warm = time.perf_counter()
    if profs[0] is not None:
        profs[0].enable()
    for i in range(new_tokens - 1):
        if i == warm:
            if profs[0] is not None:
                profs[0].disable()
            if profs[1] is not None:
                profs[1].enable()
            if events is not None:
                events[1].record()
            t_warm = time.perf_counter()
        tok = step(tok, positions[prompt + i : prompt + i + 1]).argmax(-1, keepdim=True)
        toks.append(tok)
    if profs[1] is not None:
        profs[1].disable()
    if host is not None:
        t_end = time.perf_counter()
        host["issue_s"], host["steady_issue_s"] = t_end - t0, t_end - t_warm
        if events is not None:
            events[2].record()
            events[2].synchronize()
            host["first_s"] = events[0].elapsed_time(events[1]) / 1e3
            host["steady_s"] = events[1].elapsed_time(events[2]) / 1e3
    return torch.cat([ids, *toks], dim=1)


@contextlib.contextmanager
def _setting(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def _ab_switch(suffix):
    """The switch an A/B variant suffix sets while its base variant runs."""
    if suffix == NO_GEMV:
        from lowbit.ops.triton import int4 as int4_mod

        return _setting(int4_mod, "GEMV_MAX_M", 0)
    if suffix == NO_PDL:
        from lowbit.ops.triton import _utils

        return _setting(_utils, "PDL", False)
    if suffix == NO_PLANS:
        from lowbit.ops.triton import _utils

        return _setting(_utils, "PLANS", False)
    if suffix == NO_SPLIT:
        import lowbit.fuse

        return _setting(lowbit.fuse, "GLU_SPLIT_MIN_TOKENS", 1 << 62)
    if suffix in (NO_GLU, SUBCLASS, NORMS):
        both, here = contextlib.ExitStack(), sys.modules[__name__]
        both.enter_context(_setting(here, "_FUSE_SIBLINGS", True))
        import lowbit.fuse

        flag = {NO_GLU: (here, "_FUSE_GLU"), SUBCLASS: (lowbit.fuse, "REBUILD_IN_GRAPH")}.get(suffix)
        both.enter_context(_setting(*(flag or (here, "_FUSE_NORMS")), flag is None))
        return both
    return _setting(sys.modules[__name__], {UNWRAP: "_UNWRAP_FIELDS", FUSED: "_FUSE_SIBLINGS"}[suffix], True)


def run_variant(variant, args) -> dict:
    device = torch.device("cpu" if args.tiny else "cuda")
    res = dict(variant=variant, label=LABELS[variant])
    if variant.startswith("ao_"):
        if device.type != "cuda":
            return dict(res, skipped="torchao variants need CUDA")
        try:
            import torchao  # noqa: F401
        except Exception as e:
            return dict(res, skipped=f"torchao not importable: {type(e).__name__}: {e}")
    if variant.endswith("fp8") and device.type == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        return dict(res, skipped="fp8 needs sm_89+")
    for suffix in (NO_SPLIT, NO_PLANS, NO_GEMV, UNWRAP, NO_PDL, FUSED, NO_GLU, SUBCLASS, NORMS):  # A/B: a switch set
        if variant.endswith(suffix):
            with _ab_switch(suffix):
                return run_variant(variant.removesuffix(suffix), args) | dict(variant=variant, label=LABELS[variant])
    global _REUSE_CACHE
    _REUSE_CACHE = args.reuse_cache
    _CACHE_POOL.clear()  # (--in-process: no variant keeps another's caches)
    t0 = time.perf_counter()
    model = build_model(args, device)
    sync(device)
    res["build_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    quantize(model, variant, args.group_size, args.with_head)
    if _UNWRAP_FIELDS:
        unwrap_fields(model)
    sync(device)
    res["quantize_s"] = round(time.perf_counter() - t0, 2)
    res["weights_GB"] = round(weight_bytes(model) / 1e9, 3)
    if _FUSE_SIBLINGS:  # (a lowbit variant: quantize imported lowbit)
        fused = sys.modules["lowbit"].fuse_projections_(model, swiglu=_FUSE_GLU, norms=_FUSE_NORMS)
        res["fused_groups"] = sum("{" in f for f in fused)
        res["fused_swiglu"] = sum(": silu" in f for f in fused)  # MLPs with silu(gate) * up in the gate / up call
        res["fused_layers"] = sum(": residual" in f for f in fused)  # layers with residual + RMSNorm in o / down
        res["fused_singles"] = sum("{" not in f and ": " not in f for f in fused)  # groups of one
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    kw = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        cache_implementation="static",
        pad_token_id=0,
    )
    if args.no_compile:
        kw["disable_compile"] = True
    with torch.inference_mode():
        for batch in args.batches:
            ids = torch.randint(1, min(vocab, 128000), (batch, args.prompt_tokens), generator=gen).to(device)
            out = None

            def gen_kw(batch=batch):  # --reuse-cache: generate takes the pooled cache (and no cache_implementation)
                if not _REUSE_CACHE:
                    return kw
                cache = static_cache(model, batch, args.prompt_tokens + args.new_tokens)
                return {k: v for k, v in kw.items() if k != "cache_implementation"} | dict(past_key_values=cache)

            if not args.no_generate:
                warm_kw = gen_kw()
                t0 = time.perf_counter()
                model.generate(ids, **warm_kw)  # warm-up: compiles the decode step
                sync(device)
                res[f"b{batch}_first_generate_s"] = round(time.perf_counter() - t0, 1)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(args.reps):
                    rep_kw = gen_kw()
                    sync(device)
                    t0 = time.perf_counter()
                    out = model.generate(ids, **rep_kw)
                    sync(device)
                    times.append(time.perf_counter() - t0)
                new = out.shape[1] - ids.shape[1]
                res[f"b{batch}_tok_s"] = round(new / min(times), 2)  # per sequence
                if device.type == "cuda":
                    res[f"b{batch}_peak_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            if args.step_loop:
                step_loop_decode(model, ids, args.new_tokens, not args.no_compile)  # warm-up / compile
                times, runs, ahead = [], [], []
                steps = args.new_tokens - 1
                steady = steps - first_steps(args.new_tokens)
                for _ in range(args.reps):
                    sync(device)
                    t0 = time.perf_counter()
                    host: dict = {}
                    loop_out = step_loop_decode(model, ids, args.new_tokens, not args.no_compile, host)
                    sync(device)
                    times.append(time.perf_counter() - t0)
                    runs.append(host)
                res[f"b{batch}_step_tok_s"] = round((loop_out.shape[1] - ids.shape[1]) / min(times), 2)
                issue = min(h["issue_s"] for h in runs)
                # host time to issue one step (compiled call + argmax, no sync) against the step time
                res[f"b{batch}_step_issue_ms"] = round(issue / steps * 1e3, 3)
                if device.type == "cuda":
                    # the loop alone (no eager prompt): its first steps, then the steady steps; then
                    # the same with the host issuing ahead (the start event fires when the sleep ends)
                    best = min(runs, key=lambda h: h["steady_s"])
                    res[f"b{batch}_first_steps_ms"] = round(min(h["first_s"] for h in runs) * 1e3, 1)
                    res[f"b{batch}_step_loop_ms"] = round(best["steady_s"] / steady * 1e3, 3)
                    res[f"b{batch}_step_steady_issue_ms"] = round(best["steady_issue_s"] / steady * 1e3, 3)
                    # each rep's own split (whole loop, first steps, steady steps, ms): "outside" from one
                    # rep's figures, since minima taken over different reps mix their steady rates
                    res[f"b{batch}_step_reps"] = [
                        [round(t * 1e3, 2), round(h["first_s"] * 1e3, 2), round(h["steady_s"] * 1e3, 2)]
                        for t, h in zip(times, runs)
                    ]
                    cycles = sleep_cycles_per_s()
                    for _ in range(args.reps):
                        host = dict(head_start_s=1.5 * issue + 0.05, sleep_cycles_per_s=cycles)
                        step_loop_decode(model, ids, args.new_tokens, not args.no_compile, host)
                        ahead.append(host["steady_s"])
                    res[f"b{batch}_step_gpu_ms"] = round(min(ahead) / steady * 1e3, 3)
                if args.profile_decode and device.type == "cuda":
                    res[f"b{batch}_decode_profile"] = profile_decode(
                        model, ids, args.new_tokens, not args.no_compile, step_loop_decode
                    )
                    print(f"{variant} b{batch} decode profile: {res[f'b{batch}_decode_profile']}", flush=True)
                if args.profile_host:
                    res[f"b{batch}_host_profile"] = profile_host(
                        model, ids, args.new_tokens, not args.no_compile, step_loop_decode, first_steps
                    )
                    print(f"{variant} b{batch} host profile: {res[f'b{batch}_host_profile']}", flush=True)
                if out is not None and not torch.equal(loop_out, out):
                    res[f"b{batch}_step_note"] = "tokens differ from generate (near-ties in random-weight logits?)"
                del loop_out
            del out
        if args.prefill:
            ids = torch.randint(1, min(vocab, 128000), (1, args.prefill), generator=gen).to(device)
            # eager by default (as generate runs it); --compile-prefill: Inductor, no CUDA graphs
            fwd = torch.compile(model) if args.compile_prefill else model
            fwd(ids, use_cache=False, logits_to_keep=1)
            times = []
            for _ in range(args.reps):
                sync(device)
                t0 = time.perf_counter()
                fwd(ids, use_cache=False, logits_to_keep=1)
                sync(device)
                times.append(time.perf_counter() - t0)
            res["prefill_tok_s"] = round(args.prefill / statistics.median(times), 1)
            if args.profile_prefill:
                res["prefill_profile"] = profile_forward(fwd, ids, device)
                print(f"{variant} prefill profile:\n{res['prefill_profile']}", flush=True)
    return res


# ---------------------------------------------------------------------------- driver
def run_in_subprocess(variant, args, env) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--child-out", path, *args.child_argv]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        if os.path.getsize(path):
            with open(path) as f:
                return json.load(f)
        return dict(variant=variant, label=LABELS[variant], error=f"exit {p.returncode}: {p.stderr.strip()[-800:]}")
    except subprocess.TimeoutExpired:
        return dict(variant=variant, label=LABELS[variant], error=f"timed out after {args.timeout} s")
    finally:
        os.unlink(path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", default=os.path.join(ROOT, "bench", "results"), help="output folder (default: bench/results)"
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated, from: " + ",".join(VARIANTS) + f" (and the lowbit ones + {NO_PDL!r}: PDL off; "
        f"lowbit_int4{NO_GEMV}: the M <= 8 GEMV tile off; lowbit_int4{UNWRAP}: fields as parametrized "
        f"parameters, a probe; lowbit_int{{4,8}}{FUSED}: lowbit.fuse_projections_)",
    )
    p.add_argument(
        "--layers", type=int, default=0, help="decoder layers (default: 32, or 2 with --tiny); fewer for a quick check"
    )
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU, one process, no compile (smoke check)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default: 256; 8 with --tiny)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default: 1,8; 1,2 with --tiny)")
    p.add_argument(
        "--prefill", type=int, default=None, help="prefill length, 0 to skip (default: 2048; 32 with --tiny)"
    )
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length for decode (default: 16)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions after the warm-up (default: 3)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (default: 128)")
    p.add_argument("--with-head", action="store_true", help="quantize the output head too (default: the layers)")
    p.add_argument(
        "--no-compile", action="store_true", help="eager decode (Transformers compiles static-cache decode by default)"
    )
    p.add_argument("--timeout", type=int, default=540, help="seconds per variant process (default: 540)")
    p.add_argument(
        "--wheels",
        default=None,
        help="folder with a torchao wheel to use when torchao is not installed (default: shared/wheels)",
    )
    p.add_argument(
        "--profile-prefill",
        action="store_true",
        help="also profile one prefill forward per variant (top ops, printed and saved in the JSON)",
    )
    p.add_argument(
        "--profile-decode",
        action="store_true",
        help="with --step-loop: GPU kernel time per decode step by kind (linears, head, attention, rest)",
    )
    p.add_argument(
        "--profile-host",
        action="store_true",
        help="with --step-loop: cProfile of the host's work to issue a decode step (top functions by own time)",
    )
    p.add_argument(
        "--compile-prefill",
        action="store_true",
        help="time prefill through torch.compile (default mode, no CUDA graphs) instead of eager",
    )
    p.add_argument(
        "--step-loop",
        action="store_true",
        help="also time greedy decode as a plain loop over the compiled forward (no generate): the model step alone",
    )
    p.add_argument(
        "--no-generate",
        action="store_true",
        help="skip the generate timing (with --step-loop: decode timed by the step loop only; saves a compile)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the variant list this many times, round robin, one process each; report medians (default: 1)",
    )
    p.add_argument(
        "--reuse-cache",
        action="store_true",
        help="one StaticCache per batch and length, reset before each step loop or generate call (passed to it "
        "as past_key_values) (default: a new one each, as generate makes; CUDA-graph trees may re-record for it)",
    )
    p.add_argument("--in-process", action="store_true", help="run every variant in this process (default with --tiny)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.child_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    if args.new_tokens is None:
        args.new_tokens = 8 if args.tiny else 256
    if args.prefill is None:
        args.prefill = 32 if args.tiny else 2048
    args.batches = [int(b) for b in (args.batches or ("1,2" if args.tiny else "1,8")).split(",")]
    if args.tiny:
        args.no_compile = True
        args.in_process = True
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.step_loop and args.new_tokens < 2:
        p.error(f"--step-loop needs --new-tokens >= 2 (at least one decode step), got {args.new_tokens}")
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variant_list if v not in ALL_VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {ALL_VARIANTS}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:  # one variant, result to a file (the parent reads it)
        try:
            res = run_variant(args.child, args)
        except Exception as e:
            res = dict(variant=args.child, label=LABELS[args.child], error=f"{type(e).__name__}: {e}")
            traceback.print_exc()
        with open(args.child_out, "w") as f:
            json.dump(res, f)
        return 0
    if not args.tiny and not torch.cuda.is_available():
        print("bench/e2e.py needs a CUDA GPU (use --tiny for a CPU smoke check)", file=sys.stderr)
        return 2
    import transformers

    # drop --variants from what children get: each child gets its own --child
    child_argv, skip = [], False
    for a in args.child_argv:
        if skip:
            skip = False
            continue
        if a in ("--variants", "--rounds"):
            skip = True
            continue
        if a.startswith(("--variants=", "--rounds=")):
            continue
        child_argv.append(a)
    args.child_argv = child_argv
    name = device_name(args)
    meta = dict(
        device=torch.cuda.get_device_name()
        if name not in ("cpu", "cpu-tiny")
        else f"CPU ({platform.machine()}, tiny config)",
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        layers=args.layers or None,
        new_tokens=args.new_tokens,
        prefill=args.prefill,
        prefill_compiled=args.compile_prefill,
        reuse_cache=args.reuse_cache,
        batches=args.batches,
        group_size=args.group_size,
        with_head=args.with_head,
    )
    env = dict(os.environ)
    if not args.in_process and any(v.startswith("ao_") for v in args.variant_list):
        extra = torchao_pythonpath(args)
        if extra:
            env["PYTHONPATH"] = os.pathsep.join([extra, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        import lowbit  # noqa: F401

        meta["lowbit"] = lowbit.__version__
    except Exception:
        pass
    print(json.dumps(meta), flush=True)
    meta["rounds"] = args.rounds
    rounds: dict[str, list[dict]] = {}
    for i in range(args.rounds):
        for v in args.variant_list:
            t0 = time.perf_counter()
            if args.in_process:
                try:
                    r = run_variant(v, args)
                except Exception as e:
                    r = dict(variant=v, label=LABELS[v], error=f"{type(e).__name__}: {e}")
            else:
                r = run_in_subprocess(v, args, env)
            rounds.setdefault(v, []).append(r)
            tag = f" round {i + 1}/{args.rounds}" if args.rounds > 1 else ""
            print(f"{v}{tag} ({time.perf_counter() - t0:.0f} s): {json.dumps(r)}", flush=True)
            md = write_outputs(merge_rounds(rounds), meta, args.out, name, ALL_VARIANTS)
    print()
    print(md)
    print(f"written to {args.out}/{name}-e2e.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
