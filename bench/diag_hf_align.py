"""Does a lowbit int8 model reloaded by Transformers' ``from_pretrained`` run on this CPU?

Session 19 found a SIGSEGV on the GPU machine's host (a Xeon with AVX-512 and AMX, torch 2.11): a
tiny int8 Llama saved with ``save_pretrained`` and loaded with ``from_pretrained`` crashed on its
first forward. Transformers maps the safetensors file and hands out views of it, which start at
8-byte steps; aten's AVX-512 ``_weight_int8pack_mm`` faults on such weights.

This saves the model once, then runs the reload in child processes (a crash kills only the child):
``as-loaded`` forwards the model as ``from_pretrained`` returns it, ``copied`` first copies every
quantized field into fresh memory. It prints each child's exit code, how many quantized fields do
not start on a 64-byte boundary, and the logits' sum.

    python bench/diag_hf_align.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

import lowbit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def child(mode: str, folder: str) -> None:
    from test_fuse import IDS
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder)
    weights = [p for p in loaded.parameters() if isinstance(p, lowbit.QTensor)]
    off = sum(t.data_ptr() % 64 != 0 for p in weights for t in p._tensors())
    print(f"quantized weights {len(weights)}, fields off 64-byte boundaries {off}", flush=True)
    if mode == "copied":
        for p in weights:
            for f in p.tensor_fields:
                setattr(p, f, getattr(p, f).clone())
    with torch.no_grad():
        print("logits sum", loaded(IDS).logits.float().abs().sum().item(), flush=True)


def main() -> None:
    from test_fuse import tiny_llama

    folder = tempfile.mkdtemp()
    tiny_llama("int8").save_pretrained(folder)
    flags = open("/proc/cpuinfo").read()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"avx512f {'avx512f' in flags}, amx {'amx_tile' in flags}")  # fmt: skip
    for mode in ("as-loaded", "copied"):
        r = subprocess.run([sys.executable, __file__, mode, folder], capture_output=True, text=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("quantized", "logits"))]
        print(f"{mode}: exit code {r.returncode}; " + "; ".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 3:
        child(*sys.argv[1:])
    else:
        main()
