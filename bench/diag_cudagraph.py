"""What the CUDA-graph tree does across ``bench/e2e.py`` step loops (GPU diagnostic).

Each step loop of ``e2e.py`` makes a new StaticCache (as ``generate`` does), so the compiled
step's static inputs (the cache tensors) may move. This runs several loops with a new cache
each, then several sharing one cache (``--reuse-cache``), optionally as many again skipping
Dynamo's guard evaluation (``--skip-guards``, unsafe: a measurement), and prints per loop: the
first steps' and the steady steps' time, the host's issue time, what the tree manager did
during the loop (calls of its ``_run``, which re-enters itself, so about two per step; eager
warm-up runs, recordings and graph replays), the recorded graphs, the re-record count and the
mutation hints (past the re-record limit, or with a hint, the tree runs the step without a graph), and Inductor's cudagraph
counters (summed over the process, so later variants start from earlier ones' counts).
``--profile-record``: a cProfile of one loop's first steps with a forced re-recording.

    python bench/diag_cudagraph.py --variants bf16,lowbit_int4[,lowbit_int4_unwrapped,lowbit_int4_fused]
        [--layers 32] [--with-head] [--skip-guards] [--profile-record] [--profile] --out DIR
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402  (bench/, this script's folder)
from e2e_profile import profile_host  # noqa: E402

CALLS = collections.Counter()


def _count(cls, name):
    fn = getattr(cls, name)

    def wrapped(self, *a, **k):
        CALLS[name] += 1
        return fn(self, *a, **k)

    setattr(cls, name, wrapped)


def patch_tree_manager():
    from torch._inductor import cudagraph_trees as ct

    for name in ("_run", "run_eager", "record_function", "execute_node"):
        _count(ct.CUDAGraphTreeManager, name)


def tree_stats() -> dict:
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees as ct

    mgr = ct.get_container(torch.cuda.current_device()).tree_manager
    nodes, stack = 0, [n for roots in mgr.roots.values() for n in roots]
    roots = len(stack)
    while stack:
        node = stack.pop()
        nodes += 1
        stack.extend(c for cs in node.children.values() for c in cs)
    hints = sum(bool(v) for d in mgr.non_cudagraph_managed_mutation_hint.values() for v in d.values())
    rerecord = sum(v for d in mgr.num_rerecord.values() for v in d.values())
    cg = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
    return dict(roots=roots, nodes=nodes, mutation_hints=hints, rerecords=rerecord, counters=cg)


def profile_record(model, ids, new_tokens, top=30) -> dict:
    """cProfile of a step loop's first steps when its new cache surely lands at new addresses
    (the last loop's cache is kept alive), so the first step re-records the graph: the ``top``
    functions by own and by cumulative time, in ms over those steps."""
    import cProfile
    import pstats

    e2e._REUSE_CACHE = True
    held = list(e2e._CACHE_POOL.values())  # alive through the loop: the new cache gets new memory
    e2e._CACHE_POOL.clear()
    first, steady = cProfile.Profile(), cProfile.Profile()
    CALLS.clear()
    torch.cuda.synchronize()
    e2e.step_loop_decode(model, ids, new_tokens, True, prof=(first, steady))
    torch.cuda.synchronize()
    stats = pstats.Stats(first).stats  # {(file, line, name): (calls, ncalls, tottime, cumtime, callers)}

    def table(col):
        rows = sorted(stats.items(), key=lambda kv: -kv[1][col])[:top]
        return {f"{n} ({os.path.basename(f)}:{ln})": [round(v[col] * 1e3, 2), v[1]] for (f, ln, n), v in rows}

    del held
    return dict(calls=dict(CALLS), total_ms=round(sum(v[2] for v in stats.values()) * 1e3, 1),
                own_ms_calls=table(2), cum_ms_calls=table(3))  # fmt: skip


def run(variant, args) -> list[dict]:
    device = torch.device("cuda")
    model = e2e.build_model(args, device)
    base = variant.removesuffix(e2e.UNWRAP).removesuffix(e2e.FUSED)
    e2e.quantize(model, base, 128, args.with_head)
    if variant.endswith(e2e.UNWRAP):
        e2e.unwrap_fields(model)
    if variant.endswith(e2e.FUSED):  # as e2e's fused variant: q/k/v and gate/up stacked, silu * up in one
        import lowbit

        lowbit.fuse_projections_(model)
    ids = torch.randint(1, 128000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    with torch.inference_mode():
        plan = [(False, False)] * args.loops + [(True, False)] * args.loops
        plan += [(True, True)] * (args.loops if args.skip_guards else 0)
        for i, (reuse, skip_guards) in enumerate(plan):
            e2e._REUSE_CACHE = reuse
            CALLS.clear()
            host: dict = {}
            torch.cuda.synchronize()
            with torch.compiler.set_stance(skip_guard_eval_unsafe=skip_guards):
                e2e.step_loop_decode(model, ids, args.new_tokens, True, host)
            torch.cuda.synchronize()
            steady = args.new_tokens - 1 - e2e.first_steps(args.new_tokens)
            row = dict(
                variant=variant,
                loop=i,
                reuse_cache=reuse,
                skip_guards=skip_guards,
                first_steps_ms=round(host["first_s"] * 1e3, 2),
                step_ms=round(host["steady_s"] / steady * 1e3, 3),
                steady_issue_ms=round(host["steady_issue_s"] / steady * 1e3, 3),
                calls=dict(CALLS),
                **tree_stats(),
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
        if args.profile_record:
            row = dict(variant=variant, record_profile=profile_record(model, ids, args.new_tokens))
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.profile:
            e2e._REUSE_CACHE = True
            prof = profile_host(model, ids, args.new_tokens, True, e2e.step_loop_decode, e2e.first_steps, top=25)
            rows.append(dict(variant=variant, host_profile=prof))
            print(json.dumps(rows[-1]), flush=True)
    e2e._CACHE_POOL.clear()
    del model
    torch._dynamo.reset()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="bf16,lowbit_int4")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (default: Llama-3-8B's 32)")
    p.add_argument("--loops", type=int, default=4, help="step loops with a new cache, then as many sharing one")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--with-head", action="store_true", help="quantize the output head too (as e2e's --with-head)")
    p.add_argument("--skip-guards", action="store_true", help="then as many loops skipping guard evaluation")
    p.add_argument("--profile-record", action="store_true", help="then a cProfile of a loop's re-recording steps")
    p.add_argument("--profile", action="store_true", help="then a cProfile of the host's steady steps (e2e_profile)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.tiny = False
    patch_tree_manager()
    rows = []
    for v in args.variants.split(","):
        rows += run(v, args)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, argv=sys.argv)
        with open(os.path.join(args.out, "diag-cudagraph.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
