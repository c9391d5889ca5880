"""Timing probe (wrong numerics on purpose): Llama decoder layers without their two RMSNorms and
residual adds, i.e. the 64 norm kernels gone, as an upper bound on what fusing them into the
GEMVs could save. Runs bench/e2e.py in-process with LlamaDecoderLayer.forward patched when
LOWBIT_PROBE_NONORM=1."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if os.environ.get("LOWBIT_PROBE_NONORM") == "1":
    from transformers.models.llama import modeling_llama as ml

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):  # fmt: skip
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        return self.mlp(hidden_states)

    ml.LlamaDecoderLayer.forward = forward

import e2e  # noqa: E402

sys.exit(e2e.main(sys.argv[1:] + ["--in-process"]))
