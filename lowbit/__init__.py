"""lowbit: low-bit quantized weights for PyTorch models."""

from lowbit import (
    _transformers_hook,
    distributed,  # noqa: F401  (FSDP2 hooks on the QTensor classes)
)
from lowbit.config import (
    Float8DynamicActivationFloat8WeightConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    float8_dynamic_activation_float8_weight,
    int4_weight_only,
    int8_dynamic_activation_int8_weight,
    int8_weight_only,
)
from lowbit.fuse import fuse_projections_
from lowbit.ops.backend import use_backend
from lowbit.qat import QATConfig
from lowbit.qtensor import Float8Tensor, Int4Tensor, Int8DynActTensor, Int8Tensor, QTensor
from lowbit.quantize import QuantizeReport, quantize_

__version__ = "0.1.0"

__all__ = [
    "quantize_",
    "fuse_projections_",
    "QuantizeReport",
    "QATConfig",
    "use_backend",
    "int4_weight_only",
    "int8_weight_only",
    "int8_dynamic_activation_int8_weight",
    "float8_dynamic_activation_float8_weight",
    "Int4WeightOnlyConfig",
    "Int8WeightOnlyConfig",
    "Int8DynamicActivationInt8WeightConfig",
    "Float8DynamicActivationFloat8WeightConfig",
    "QTensor",
    "Int4Tensor",
    "Int8Tensor",
    "Int8DynActTensor",
    "Float8Tensor",
]


_transformers_hook.register_with_transformers()
