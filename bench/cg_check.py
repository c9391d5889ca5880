"""Whether a fused tiny int4 Llama's compiled step (mode="reduce-overhead", fullgraph) runs as CUDA
graphs, with the layers' residual + RMSNorm fusion on and off (4 layers of bench/e2e.py's TINY
config; session 23's call 9 ran hidden 256): prints Inductor's cudagraph logs
(``TORCH_LOGS=perf_hints``) and the host time per call. ``--profile``: also the Python functions
that run per call (cProfile over the timed calls, top 25 by own time), to place a difference."""

import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import TINY  # noqa: E402

import lowbit  # noqa: E402


def main():
    from transformers import LlamaConfig, LlamaForCausalLM

    for norms in (False, True):
        torch.manual_seed(0)
        cfg = LlamaConfig(**{**TINY, "num_hidden_layers": 4})  # bench/e2e.py's smoke config
        m = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).cuda().eval()
        lowbit.quantize_(m, lowbit.int4_weight_only(group_size=128))
        names = lowbit.fuse_projections_(m, norms=norms)
        torch._dynamo.reset()
        f = torch.compile(m, mode="reduce-overhead", fullgraph=True)
        ids = torch.randint(0, TINY["vocab_size"], (1, 1), device="cuda")
        with torch.no_grad():
            for _ in range(5):
                f(ids)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(50):
                f(ids)
            host = (time.perf_counter() - t) / 50 * 1e3
            torch.cuda.synchronize()
            if "--profile" in sys.argv:
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(50):
                    f(ids)
                prof.disable()
                torch.cuda.synchronize()
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
                print(f"norms={norms}: cProfile of 50 calls\n{buf.getvalue()}", flush=True)
        print(f"norms={norms} layers fused={sum('RMSNorm' in n for n in names)} host ms/call={host:.3f}", flush=True)


if __name__ == "__main__":
    main()
