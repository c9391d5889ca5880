"""Run in a fresh process by tests/test_hf.py: reload lowbit checkpoints with plain from_pretrained.

argv: <out.pt> <compile: 0|1> <checkpoint dir>...  Writes {dir: logits} for fixed input ids,
and, with compile=1, the logits of the first checkpoint's model under torch.compile.
"""

import sys

import torch

import lowbit  # noqa: F401  (registers quant_method "lowbit" with Transformers)

assert "transformers" not in sys.modules, "import lowbit must not import transformers"

from transformers import AutoModelForCausalLM  # noqa: E402

out_path, do_compile, dirs = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
ids = torch.load(out_path + ".ids", weights_only=True)
result = {}
for i, d in enumerate(dirs):
    model = AutoModelForCausalLM.from_pretrained(d)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert isinstance(m.weight, lowbit.QTensor) == (name != "lm_head"), (d, name, type(m.weight))
    with torch.no_grad():
        result[d] = model(ids).logits
    if do_compile and i == 0:
        compiled = torch.compile(model, fullgraph=False)
        with torch.no_grad():
            result["compiled"] = compiled(ids).logits
torch.save(result, out_path)
