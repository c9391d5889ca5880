"""bench/e2e.py's results: rounds merged into one row per variant, the markdown table, the
PNG, and the files (the variant order is e2e.py's ``ALL_VARIANTS``)."""

from __future__ import annotations

import json
import os
import statistics


def merge_rounds(rounds: dict[str, list[dict]]) -> list[dict]:
    """One result per variant from its rounds: every ``*_tok_s`` and ``*_ms`` figure is the median over the
    rounds that measured it, with the samples under ``<key>_samples`` (more than one round);
    other fields come from the first round without an error. A variant whose every round
    failed keeps its first round's error."""
    out = []
    for rs in rounds.values():
        ok = [r for r in rs if "error" not in r and "skipped" not in r]
        if not ok:
            out.append(rs[0])
            continue
        merged = dict(ok[0])
        if len(rs) > 1:
            merged["rounds"] = len(rs)
            merged["failed_rounds"] = len(rs) - len(ok)
            for key in {k for r in ok for k in r if k.endswith(("_tok_s", "_ms"))}:
                samples = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
                merged[key] = round(statistics.median(samples), 2)
                merged[key + "_samples"] = samples
        out.append(merged)
    return out


def ratio(r, base, key):
    if base and r.get(key) and base.get(key):
        return f"{r[key] / base[key]:.2f}x"
    return "-"


def outside_ms(r: dict, b: int, new_tokens: int):
    """A GPU step loop's time outside its steps, ms: the loop's whole time (its tok/s) less its
    first steps and its steady steps at the loop's own rate: the eager prompt (which the loop's
    tok/s counts), the cache reset, the compiled step's wrapping. '-' without those figures. With
    ``b{b}_step_reps`` (each rep's whole, first and steady ms) the median of each rep's own difference:
    minima over different reps mix their steady rates (0.1 ms a step is 25 ms over 253 steps)."""
    from e2e import first_steps  # (e2e imports this module)

    reps = r.get(f"b{b}_step_reps")
    if reps:  # (median over reps of each rep's own whole - first - steady)
        return round(statistics.median(whole - first - steady for whole, first, steady in reps), 1)
    tok_s, first, per = r.get(f"b{b}_step_tok_s"), r.get(f"b{b}_first_steps_ms"), r.get(f"b{b}_step_loop_ms")
    if not tok_s or first is None or not per:
        return "-"
    steady = new_tokens - 1 - first_steps(new_tokens)
    return round(new_tokens / tok_s * 1e3 - first - steady * per, 1)


def markdown(results, meta) -> str:
    base = next((r for r in results if r["variant"] == "bf16" and "error" not in r and "skipped" not in r), None)
    batches = meta["batches"]
    head = ["variant", "weights GB", "quantize s"]
    steps = [b for b in batches if any(f"b{b}_step_tok_s" in r for r in results)]
    gens = [b for b in batches if any(f"b{b}_tok_s" in r for r in results)]
    for b in gens:
        head += [f"b{b} tok/s", f"b{b} x"]
    for b in steps:
        head += [f"b{b} step-loop tok/s", f"b{b} step x"]
    # GPU runs: ms per steady step (after the first two) of the loop, and of the GPU alone (the
    # host issuing ahead); the first two steps' ms (slower for lowbit after a new cache)
    timed = [b for b in steps if any(f"b{b}_step_gpu_ms" in r for r in results)]
    for b in timed:
        head += [f"b{b} first 2 steps ms", f"b{b} loop ms", f"b{b} outside ms", f"b{b} GPU-alone ms"]
        head += [f"b{b} GPU-alone x"]
    head += ["prefill tok/s", "prefill x"] + [f"peak GB b{b}" for b in gens]
    lines = [
        f"End to end on {meta['device']} ({meta['date']}): Llama-3-8B shape with random weights"
        + (f" ({meta['layers']} layers)" if meta.get("layers") else "")
        + f", Transformers {meta['transformers']} "
        + ("`generate`" if gens else "step loop (compiled forward, no `generate`)" if steps else "prefill only")
        + f", static cache, greedy, {meta['new_tokens']} new tokens; "
        f"prefill = one {meta['prefill']}-token forward"
        + (" compiled (`torch.compile`, default mode)" if meta.get("prefill_compiled") else " (eager)")
        + ("; one StaticCache reused across step loops (`--reuse-cache`)" if meta.get("reuse_cache") else "")
        + ("; the output head quantized too (`--with-head`)" if meta.get("with_head") else "; output head bf16")
        + ". tok/s is per sequence; x = ratio to bf16 in the same run"
        + (
            f"; each figure the median of {meta['rounds']} processes per variant." if meta.get("rounds", 1) > 1 else "."
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for r in results:
        if "error" in r or "skipped" in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"error: {r['error']}"
            why = why.replace("|", "/").replace("\n", " ")[:160]
            lines.append(f"| {r['label']} | {why} |" + " |" * (len(head) - 2))
            continue
        cells = [r["label"], r.get("weights_GB", "-"), r.get("quantize_s", "-")]
        for b in gens:
            cells += [r.get(f"b{b}_tok_s", "-"), ratio(r, base, f"b{b}_tok_s")]
        for b in steps:
            cells += [r.get(f"b{b}_step_tok_s", "-"), ratio(r, base, f"b{b}_step_tok_s")]
        for b in timed:
            gpu = r.get(f"b{b}_step_gpu_ms")
            cells += [r.get(f"b{b}_first_steps_ms", "-"), r.get(f"b{b}_step_loop_ms", "-")]
            cells += [outside_ms(r, b, meta["new_tokens"]), gpu or "-"]
            cells += [ratio(base or {}, r, f"b{b}_step_gpu_ms")]
        cells += [r.get("prefill_tok_s", "-"), ratio(r, base, "prefill_tok_s")]
        cells += [r.get(f"b{b}_peak_GB", "-") for b in gens]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    sampled = [r for r in results if any(k.endswith("_samples") for k in r)]
    if sampled:
        lines += ["", "Samples per process (tok/s):", ""]
        for r in sampled:
            figs = "; ".join(f"{k[: -len('_samples')]} {r[k]}" for k in sorted(r) if k.endswith("_samples"))
            failed = f" ({r['failed_rounds']} failed)" if r.get("failed_rounds") else ""
            lines.append(f"- {r['label']}{failed}: {figs}")
    return "\n".join(lines) + "\n"


def plot(results, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    base = next((r for r in results if r["variant"] == "bf16" and "error" not in r and "skipped" not in r), None)
    ok = [r for r in results if "error" not in r and "skipped" not in r]
    if base is None or not ok:
        return False
    keys = [k for k in base if k.endswith("_tok_s")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        ys = [r.get(k, 0) / base[k] for r in ok]
        ax.bar(
            [x + i * width for x in range(len(ok))],
            ys,
            width,
            label="prefill"
            if k == "prefill_tok_s"
            else "batch " + k[1:].split("_")[0] + (" step loop" if "_step_" in k else " generate"),
        )
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([x + width * (len(keys) - 1) / 2 for x in range(len(ok))])
    ax.set_xticklabels([r["label"] for r in ok], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("speed vs bf16 (same run)")
    ax.set_title("Llama-3-8B shape, static cache, greedy decode and 2048-token prefill")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(results, meta, out, name, order):
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}-e2e.json")
    merged = {}
    if os.path.exists(path):  # keep variants measured by an earlier command into the same folder
        try:
            with open(path) as f:
                for r in json.load(f).get("results", []):
                    merged[r["variant"]] = r
        except (OSError, ValueError, KeyError, TypeError):
            pass
    for r in results:
        merged[r["variant"]] = dict(r, date=meta["date"])
    ordered = [merged[v] for v in order if v in merged]
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": ordered}, f, indent=1)
    md = markdown(ordered, meta)
    with open(os.path.join(out, f"{name}-e2e.md"), "w") as f:
        f.write(md)
    plot(ordered, os.path.join(out, f"{name}-e2e.png"))
    return md
