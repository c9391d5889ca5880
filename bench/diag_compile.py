"""GPU diagnosis: does a lowbit model keep CUDA graphs under Transformers' generate compile?

    TORCH_LOGS=perf_hints python bench/diag_compile.py [--layers 4] [--static]

Times greedy decode (static cache, the default reduce-overhead compile) for bf16 and
lowbit int4 on a few Llama-3-8B-shaped layers; with --static it also marks every field
of every quantized weight as a static address (what a Parameter gets), to test whether
CUDA-graph trees copy the packed weights in on every replay.
"""

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit


def build(layers):
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    for p in m.parameters():
        p.data.normal_(0, 0.02)
    return m.eval()


def run(name, layers, static, profile=False, inference_mode=False, cprofile=False):
    torch._dynamo.reset()
    m = build(layers)
    if name.endswith("_slowmeta"):  # A/B: size()/stride() through __torch_function__ again
        del lowbit.QTensor.size, lowbit.QTensor.stride
    if name != "bf16":
        config = lowbit.int8_weight_only() if name.startswith("int8") else lowbit.int4_weight_only(128)
        lowbit.quantize_(m.model, config)
        if static:
            for mod in m.modules():
                w = getattr(mod, "weight", None)
                if isinstance(w, lowbit.QTensor):
                    for t in w._tensors():
                        torch._dynamo.mark_static_address(t)
    ids = torch.randint(0, 128000, (1, 16), device="cuda")
    kw = dict(max_new_tokens=128, min_new_tokens=128, do_sample=False, cache_implementation="static")
    ctx = torch.inference_mode if inference_mode else torch.no_grad
    with ctx():
        m.generate(ids, **kw)
        torch.cuda.synchronize()
        t = time.time()
        out = m.generate(ids, **kw)
        torch.cuda.synchronize()
    tok_s = (out.shape[1] - 16) / (time.time() - t)
    print(
        f"RESULT {name} static={static} inference_mode={inference_mode} layers={layers}: {tok_s:.1f} tok/s", flush=True
    )
    if cprofile:
        import cProfile
        import pstats

        kw.update(max_new_tokens=32, min_new_tokens=32)
        pr = cProfile.Profile()
        with ctx():
            pr.enable()
            m.generate(ids, **kw)
            torch.cuda.synchronize()
            pr.disable()
        st = pstats.Stats(pr)
        st.sort_stats("tottime").print_stats(30)
        st.sort_stats("cumulative").print_stats(40)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        kw.update(max_new_tokens=16, min_new_tokens=16)
        with ctx(), prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            m.generate(ids, **kw)
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="device_time_total", row_limit=18, max_name_column_width=70))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--variant", default="bf16")
    p.add_argument("--static", action="store_true")
    p.add_argument("--profile", action="store_true", help="print the top kernels of 16 decode steps")
    p.add_argument("--inference-mode", action="store_true")
    p.add_argument("--cprofile", action="store_true", help="cProfile (Python) of 32 decode steps")
    a = p.parse_args()
    run(a.variant, a.layers, a.static, a.profile, a.inference_mode, a.cprofile)
