"""Quantization configs: frozen dataclasses returned by the public factories."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """int4 weights, group-wise asymmetric along K; activations stay bf16/fp16/fp32."""

    group_size: int = 128
    name = "int4_weight_only"

    def __post_init__(self):
        from lowbit.ops.reference import INT4_GROUP_SIZES

        if type(self.group_size) is not int or self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4_weight_only: group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size!r}")


@dataclass(frozen=True)
class Int8WeightOnlyConfig:
    """int8 weights, symmetric per output channel."""

    name = "int8_weight_only"


@dataclass(frozen=True)
class Int8DynamicActivationInt8WeightConfig:
    """W8A8: int8 weights per channel, int8 activations per token at run time."""

    name = "int8_dynamic_activation_int8_weight"


@dataclass(frozen=True)
class Float8DynamicActivationFloat8WeightConfig:
    """e4m3 weights per channel, e4m3 activations per token (fast on CUDA sm_89+)."""

    name = "float8_dynamic_activation_float8_weight"


def int4_weight_only(group_size: int = 128) -> Int4WeightOnlyConfig:
    return Int4WeightOnlyConfig(group_size=group_size)


def int8_weight_only() -> Int8WeightOnlyConfig:
    return Int8WeightOnlyConfig()


def int8_dynamic_activation_int8_weight() -> Int8DynamicActivationInt8WeightConfig:
    return Int8DynamicActivationInt8WeightConfig()


def float8_dynamic_activation_float8_weight() -> Float8DynamicActivationFloat8WeightConfig:
    return Float8DynamicActivationFloat8WeightConfig()


BaseConfig = (
    Int4WeightOnlyConfig
    | Int8WeightOnlyConfig
    | Int8DynamicActivationInt8WeightConfig
    | Float8DynamicActivationFloat8WeightConfig
)
