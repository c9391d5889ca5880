"""LoRA training step under FSDP2 on a Llama-shaped model: lowbit int4 base vs bf16 base.

Run on one host with 2 GPUs (NCCL)::

    torchrun --nproc-per-node 2 bench/fsdp_lora.py            # Llama-3-8B layer shapes, 4 layers
    torchrun --nproc-per-node 2 bench/fsdp_lora.py --layers 8 --seq 2048

and on CPU as a smoke test of the script itself (gloo, tiny shapes)::

    torchrun --nproc-per-node 2 bench/fsdp_lora.py --smoke

Each mode builds the same random-weight model (Transformers ``LlamaForCausalLM``),
freezes it, quantizes every decoder linear to int4 (``int4`` mode; embeddings and
the head stay bf16), adds rank-16 LoRA adapters to every decoder linear, shards
each decoder layer and the root with ``fully_shard`` and times full steps
(forward + backward + AdamW), median after warm-up. It reports tokens/s over
both ranks, peak memory, and the bytes all-gathered per step counted at the
collective. Rank 0 writes ``bench/results/fsdp_lora_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) / rank)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x):
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        return self.base(x) + (x @ a.t()) @ b.t()


class CountAllGather:
    """Bytes of every all-gather output, counted at the c10d call FSDP makes."""

    def __init__(self):
        self.bytes = 0
        for name in ("all_gather_single", "all_gather_into_tensor"):
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, fn):
        def counted(output_tensor, input_tensor, *args, **kwargs):
            self.bytes += output_tensor.numel() * output_tensor.element_size()
            return fn(output_tensor, input_tensor, *args, **kwargs)

        return counted


def build(args, mode, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    import lowbit

    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_hidden_layers=args.layers,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 128),
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.requires_grad_(False)
    if mode == "int4":
        lowbit.quantize_(model.model.layers, lowbit.int4_weight_only(group_size=args.group_size))
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, args.rank))
    return model


def shard(model):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # adapters are fp32 master weights, computed in bf16
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def run_mode(args, mode, device, counter):
    model = build(args, mode, device)
    base_bytes = sum(
        p.nbytes_packed if hasattr(p, "nbytes_packed") else p.numel() * p.element_size()
        for layer in model.model.layers
        for n, p in layer.named_parameters()
        if "lora_" not in n
    )
    shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(dist.get_rank())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, gathered, losses = [], [], []
    for step in range(args.warmup + args.steps):
        sync()
        counter.bytes = 0
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            gathered.append(counter.bytes)
            losses.append(loss.item())
    step_s = statistics.median(times)
    result = {
        "mode": mode,
        "step_s_median": step_s,
        "tokens_per_s": args.batch * args.seq * dist.get_world_size() / step_s,
        "all_gather_bytes_per_step": statistics.median(gathered),
        "decoder_base_weight_bytes": base_bytes,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "losses": losses,
    }
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="bf16,int4")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=2, help="sequences per rank")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU/gloo: checks the script runs")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/fsdp_lora_<device>.json)")
    args = p.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads = 2, 128, 256, 4, 2
        args.vocab, args.group_size, args.rank, args.batch, args.seq = 512, 32, 4, 2, 16
        args.warmup, args.steps = 1, 2

    use_cuda = torch.cuda.is_available() and not args.smoke
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=5))
    counter = CountAllGather()
    results = [run_mode(args, mode, device, counter) for mode in args.modes.split(",")]

    if dist.get_rank() == 0:
        name = torch.cuda.get_device_name(device) if use_cuda else platform.processor() or "cpu"
        report = {
            "bench": "fsdp_lora",
            "device": name,
            "world_size": dist.get_world_size(),
            "torch": torch.__version__,
            "args": vars(args),
            "results": results,
        }
        for r in results:
            print(
                f"{r['mode']:>5}: {r['tokens_per_s']:9.0f} tok/s  step {r['step_s_median'] * 1e3:8.1f} ms  "
                f"all-gather {r['all_gather_bytes_per_step'] / 2**20:9.1f} MiB/step  "
                f"peak {r['peak_memory_gib'] or 0:.1f} GiB"
            )
        if len(results) == 2:
            print(f"int4/bf16 throughput: {results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x")
        slug = "smoke" if args.smoke else name.replace(" ", "_").lower()
        out = args.out or os.path.join(os.path.dirname(__file__), "results", f"fsdp_lora_{slug}.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
