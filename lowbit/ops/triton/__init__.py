"""Fused Triton kernels for CUDA (and CPU under ``TRITON_INTERPRET=1``).

One launcher per file: ``int4.int4_mm``, ``int8.int8_mm`` / ``int8.int8_dyn_mm``,
``fp8.fp8_dyn_mm``; ``quant.quantize_rows`` is the per-token activation quantizer
shared by the W8A8 paths. Importing a submodule registers its ``lowbit::*`` op.
"""
