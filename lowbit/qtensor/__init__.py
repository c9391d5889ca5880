"""Quantized weight tensor subclasses, one class per (dtype, packing format)."""

import torch

from lowbit.qtensor.base import QTensor, _rebuild_qtensor
from lowbit.qtensor.fp8 import Float8Tensor
from lowbit.qtensor.int4 import Int4Tensor
from lowbit.qtensor.int8 import Int8DynActTensor, Int8Tensor
from lowbit.qtensor.linear import TransposedQTensor  # (and F.linear, mm, addmm registered)

QTENSOR_CLASSES = {c.__name__: c for c in (Int4Tensor, Int8Tensor, Int8DynActTensor, Float8Tensor)}

# torch.load(weights_only=True) may rebuild these and nothing else of ours.
torch.serialization.add_safe_globals([*QTENSOR_CLASSES.values(), _rebuild_qtensor])

__all__ = [
    "QTensor",
    "TransposedQTensor",
    "Int4Tensor",
    "Int8Tensor",
    "Int8DynActTensor",
    "Float8Tensor",
    "QTENSOR_CLASSES",
]
