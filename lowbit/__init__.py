"""lowbit: low-bit quantized weights for PyTorch models."""

from lowbit import distributed  # noqa: F401  (FSDP2 hooks on the QTensor classes)
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
from lowbit.ops.backend import use_backend
from lowbit.qat import QATConfig
from lowbit.qtensor import Float8Tensor, Int4Tensor, Int8DynActTensor, Int8Tensor, QTensor
from lowbit.quantize import QuantizeReport, quantize_

__version__ = "0.1.0"

__all__ = [
    "quantize_",
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


def _register_with_transformers() -> None:
    """Make ``quant_method="lowbit"`` known to Transformers (``lowbit.hf``) on ``import lowbit``.

    Importing Transformers' quantizer registry takes seconds, so ``import lowbit``
    does not do it: ``lowbit.hf`` is imported now if the registry already is, else
    right after the registry's own import (``from_pretrained`` triggers it).
    """
    import importlib.abc
    import importlib.util
    import sys

    registry = "transformers.quantizers"
    if registry in sys.modules:
        import lowbit.hf  # noqa: F401

        return
    if importlib.util.find_spec("transformers") is None:
        return

    class _AfterRegistryImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != registry:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                import lowbit.hf  # noqa: F401

            spec.loader.exec_module = exec_then_register
            return spec

    sys.meta_path.insert(0, _AfterRegistryImport())


_register_with_transformers()
