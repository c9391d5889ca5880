"""Int4Tensor: int4 weight-only, group-wise asymmetric along K (W4A16)."""

from __future__ import annotations

import os

import torch

from lowbit.ops import cpu
from lowbit.ops import reference as ref
from lowbit.ops.backend import resolve
from lowbit.qtensor.base import QTensor, finite_qparams, float_weight, not_a_view, weight_matrix

# Packings that keep each row's bytes in that row (the Triton kernel reads both; row
# slices are views): name -> (pack codes [N, K], unpack qdata [N, K // 2]).
ROW_PACKINGS = {"plain": (ref.int4_pack, ref.int4_unpack), "mma": (ref.int4_mma_pack, ref.int4_mma_unpack)}
# Every packing the Triton kernel reads: the row packings and "tiled" (each 16-row x 128-k tile one
# 1 KB run; whole tiles only; row slices at multiples of 16 rows are views, others copies)
TRITON_PACKINGS = {**ROW_PACKINGS, "tiled": (ref.int4_tiled_pack, ref.int4_tiled_unpack)}


class Int4Tensor(QTensor):
    """Two 4-bit codes per byte, one (scale, zero) pair per group of K.

    Fields: ``qdata`` uint8 [N, K // 2]; ``scale``, ``zero`` [N, K // group_size]
    in the weight's dtype. ``packing`` names the byte order of ``qdata``:
    ``"plain"`` (the reference layout, used in checkpoints and FSDP shards),
    ``"mma"`` (``reference.int4_mma_pack``: the CUDA kernel's fast decode order,
    opted into with ``LOWBIT_INT4_CUDA_PACKING=mma``, see ``cuda_packing``), ``"tiled"``
    (``reference.int4_tiled_pack``: each 16-row x 128-k tile one 1 KB run; N % 16 == 0 and
    K % 128 == 0; what CUDA weights of whole tiles get by default) or one of
    ``lowbit.ops.cpu.INT4_CPU_LAYOUTS`` (what the CPU kernel reads on this
    machine; chosen automatically for CPU weights of N % 16 == 0, the kernel's rule; any even N
    packs, and other N run the reference). "plain" and "mma" keep each
    row's bytes in that row, so row slices are views; "tiled" keeps each 16 rows' bytes in
    those rows, so slices at multiples of 16 rows are views.
    """

    tensor_fields = ("qdata", "scale", "zero")
    attr_fields = ("group_size", "packing")

    def __init__(self, qdata, scale, zero, *, shape, dtype, group_size: int, packing: str):
        matrix = weight_matrix(shape, qdata.shape[0])  # (also for the flattened view)
        if packing == "tiled" and not ref.int4_tiled_fits(*matrix):
            raise ValueError(
                f"Int4Tensor {tuple(shape)}: the 'tiled' packing needs whole 16-row x 128-k tiles "
                "(N % 16 == 0, K % 128 == 0)"
            )
        _check_cpu_rows(matrix, packing)
        if packing in cpu.INT4_CPU_LAYOUTS and not cpu.is_interleaved(scale, zero):
            # the CPU kernel reads (scale, zero) interleaved as [G, N, 2]: keep them so
            scale, zero = cpu.interleave_scale_zero(scale, zero)
        super().__init__(qdata, scale, zero, shape=shape, dtype=dtype, group_size=group_size, packing=packing)

    @classmethod
    @torch.no_grad()
    def from_float(cls, w: torch.Tensor, group_size: int = 128, packing: str = "auto") -> Int4Tensor:
        w = float_weight(cls, w)
        if group_size not in ref.INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {ref.INT4_GROUP_SIZES}, got {group_size}")
        n, k = w.shape
        if k % group_size:
            raise ValueError(f"int4 group_size {group_size} does not divide in_features K={k}")
        scale, zero = ref.int4_choose_qparams(w, group_size, w.dtype)
        finite_qparams(cls, w, scale, zero)
        q = ref.int4_quantize(w, scale, zero, group_size)
        plain = cls(ref.int4_pack(q), scale, zero, shape=w.shape, dtype=w.dtype, group_size=group_size, packing="plain")
        return plain.repack(_best_packing(plain.device, n, k, group_size) if packing == "auto" else packing)

    def check_fields(self) -> None:
        n, k = self._matrix
        g = self.group_size
        if type(g) is not int or g not in ref.INT4_GROUP_SIZES or k % g:
            self._field_error("group_size", repr(g), f"one of {ref.INT4_GROUP_SIZES} dividing K={k}")
        if self.packing not in TRITON_PACKINGS and self.packing not in cpu.INT4_CPU_LAYOUTS:
            self._field_error("packing", repr(self.packing), f"one of {[*TRITON_PACKINGS, *cpu.INT4_CPU_LAYOUTS]}")
        if self.qdata.dtype != torch.uint8:
            self._field_error("qdata", self.qdata.dtype, torch.uint8)
        if tuple(self.qdata.shape) != (n, k // 2):  # every packing: N rows of K / 2 bytes
            self._field_error("qdata", tuple(self.qdata.shape), (n, k // 2))
        for name, t in (("scale", self.scale), ("zero", self.zero)):
            if tuple(t.shape) != (n, k // g) or not t.dtype.is_floating_point:
                self._field_error(name, f"{t.dtype} {tuple(t.shape)}", f"floats {(n, k // g)} (N x K / group_size)")

    # ------------------------------------------------------------------ packing
    def codes(self) -> torch.Tensor:
        """Unpacked codes [N, K] in [0, 15], whatever the packing."""
        if self.packing in TRITON_PACKINGS:
            return TRITON_PACKINGS[self.packing][1](self.qdata)
        return cpu.int4_cpu_unpack(self.qdata, self.packing)

    def repack(self, packing: str) -> Int4Tensor:
        if packing == self.packing:
            return self
        if packing not in TRITON_PACKINGS and packing not in cpu.INT4_CPU_LAYOUTS:
            raise ValueError(
                f"unknown int4 packing {packing!r}; expected 'plain', 'mma', 'tiled' or one of "
                f"{list(cpu.INT4_CPU_LAYOUTS)}"
            )
        _check_cpu_rows(self._matrix, packing)  # before packing, which fails at odd N
        q = self.codes()
        qdata = TRITON_PACKINGS[packing][0](q) if packing in TRITON_PACKINGS else cpu.int4_cpu_pack(q, packing)
        return Int4Tensor(
            qdata,
            self.scale,
            self.zero,
            shape=self.shape,
            dtype=self.dtype,
            group_size=self.group_size,
            packing=packing,
        )

    def to_device(self, device) -> Int4Tensor:
        plain = self.repack("plain")
        moved = plain._rebuild(lambda t: t.to(device))
        return moved.repack(_best_packing(moved.device, *self._matrix, self.group_size))

    def loaded(self) -> Int4Tensor:
        # a pickle from another machine (an AVX-512 layout on an AVX2 host, "plain" from a GPU)
        # would run the reference path on every call: repack once, as a device move does
        if self.device.type not in ("cpu", "cuda"):
            return self
        return self.repack(_best_packing(self.device, *self._matrix, self.group_size))

    def quantize_like(self, w: torch.Tensor) -> Int4Tensor:
        return Int4Tensor.from_float(w.to(self.device, self.dtype), group_size=self.group_size, packing=self.packing)

    def convert_like(self, other: QTensor) -> Int4Tensor:
        return other.to_device(self.device).repack(self.packing)

    # ------------------------------------------------------------------ numerics
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        plain = ref.int4_pack(self.codes()) if self.packing != "plain" else self.qdata
        w = ref.int4_dequantize(plain, self.scale, self.zero, self.group_size, dtype or self.dtype)
        return w.reshape(self.shape)  # (the flattened bookkeeping view FSDP makes: its own shape)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        backend = resolve(x.device)
        # (the kernel takes N % 16 == 0 only, cpu.int4_cpu_supported: else "Unsupported n block size")
        if backend == "cpu" and self.packing == cpu.int4_cpu_layout() and self._size[0] % 16 == 0:
            return cpu.int4_mm(x, self.qdata, self.scale, self.zero, self.group_size)
        if backend == "triton":
            from lowbit.ops.triton import int4 as triton_int4

            w = self if self.packing in TRITON_PACKINGS else self.repack("mma")
            return triton_int4.int4_mm(x, w.qdata, w.scale, w.zero, self.group_size, w.packing)
        return ref.int4_linear(x, self.repack("plain").qdata, self.scale, self.zero, self.group_size)

    def linear_swiglu(self, x: torch.Tensor) -> torch.Tensor:
        if resolve(x.device) == "triton":  # one launch at M <= 8
            from lowbit.ops.triton._int4_gemv import int4_mm_swiglu

            w = self if self.packing in TRITON_PACKINGS else self.repack("mma")
            return int4_mm_swiglu(x, w.qdata, w.scale, w.zero, self.group_size, w.packing)
        return ref.swiglu(self.linear(x))

    def swiglu_max_tokens(self) -> int:
        if self.packing not in ("plain", "tiled") or resolve(self._device) != "triton":
            return 0
        from lowbit.ops.triton._int4_gemv import swiglu_fits, swiglu_max_m

        n, k = self._size
        fits = swiglu_fits(1, n, k, self.packing, self.dtype, self.scale.dtype, self._device)
        return swiglu_max_m() if fits else 0

    def linear_add_rmsnorm(self, x, residual, norm_weight, eps):
        if resolve(x.device) == "triton":  # one launch at M <= NORM_MAX_M (2)
            from lowbit.ops.triton._int4_gemv import int4_mm_add_rmsnorm

            w = self if self.packing in TRITON_PACKINGS else self.repack("mma")
            return int4_mm_add_rmsnorm(
                x, w.qdata, w.scale, w.zero, self.group_size, residual, norm_weight, eps, w.packing
            )
        return ref.add_rmsnorm(self.linear(x), residual, norm_weight, eps)

    def add_rmsnorm_max_tokens(self) -> int:
        if self.packing not in ("plain", "tiled") or resolve(self._device) != "triton":
            return 0
        from lowbit.ops.triton._int4_gemv import add_rmsnorm_fits, norm_max_m

        n, k = self._size
        fits = add_rmsnorm_fits(1, n, k, self.packing, self.dtype, self.scale.dtype, self._device)
        return norm_max_m() if fits else 0

    # ------------------------------------------------------------------ slicing
    def slice_rows(self, start: int, end: int) -> Int4Tensor:
        if self.packing in ROW_PACKINGS:  # a view, as for a plain tensor (FSDP writes shards through narrow().copy_())
            return QTensor.slice_rows(self, start, end)
        if self.packing == "tiled" and start % 16 == 0 and end % 16 == 0:
            return QTensor.slice_rows(self, start, end)  # whole 16-row tile rows: qdata rows [start, end), a view
        # a copy, every field of it (scale and zero too: a write into it must never reach the parent)
        out = QTensor.slice_rows(self.repack("plain"), start, end)._rebuild(torch.clone)
        out = out.repack(_best_packing(out.device, end - start, self.shape[1], self.group_size))
        return not_a_view(out, f"rows of the {self.packing!r} packing are repacked into a copy")

    def slice_cols(self, start: int, end: int) -> Int4Tensor:
        g = self.group_size
        if start % g or (end % g and end != self.shape[1]) or (end - start) % g:
            raise NotImplementedError(
                f"Int4Tensor: columns [{start}, {end}) do not fall on group boundaries (group_size={g})"
            )
        fields = [self.repack("plain").qdata[:, start // 2 : end // 2]]
        fields += [self.scale[:, start // g : end // g], self.zero[:, start // g : end // g]]
        target = _best_packing(self.device, self.shape[0], end - start, g)
        copy = self.packing != "plain" or target != "plain"
        if copy:  # every field copied, so that a write into the slice never reaches the parent
            fields = [f.clone() for f in fields]
        out = Int4Tensor(*fields, shape=(self.shape[0], end - start), dtype=self.dtype, group_size=g, packing="plain")
        if not copy:
            return out
        return not_a_view(out.repack(target), f"columns of the {self.packing!r} packing are repacked into a copy")


def _check_cpu_rows(shape, packing: str) -> None:
    if packing in cpu.INT4_CPU_LAYOUTS and shape[0] % 2:  # (blocks of rows, the tail in row pairs)
        raise ValueError(
            f"Int4Tensor {tuple(shape)}: the {packing!r} packing needs an even N (its rows are packed "
            f"in pairs), got N={shape[0]}; use 'plain'"
        )


def _best_packing(device: torch.device, n: int, k: int, group_size: int) -> str:
    if device.type == "cpu" and cpu.int4_cpu_supported(n, k, group_size):
        return cpu.int4_cpu_layout()
    if device.type == "cuda":
        name = cuda_packing()
        return "plain" if name == "tiled" and not ref.int4_tiled_fits(n, k) else name  # (partial tiles: plain)
    return "plain"


def cuda_packing() -> str:
    """The packing CUDA int4 weights get: ``LOWBIT_INT4_CUDA_PACKING``, "tiled" by default
    (weights that are not whole 16-row x 128-k tiles get "plain", see ``_best_packing``).

    "tiled" makes the M <= 8 GEMV's loads contiguous. On the H100 against "plain" in the same
    run (bench/results/h100-kernels-int4-tiled-s18.md), on the three large Llama-8B shapes:
    +3-9% at M = 1, +2-9% at M = 8, +0-3% at M = 32, +0-5% at M = 128 to 2048. On 4096 x 1024
    (the k / v projections) it was level in session 17 and 1-7% slower in a later session 18
    run (h100-kernels-int4-small-m-s18.md). "mma" is faster than "plain" for M <= 32 (decode) and slower for
    64 <= M < 256 (bench/results/h100-aot39-int4.md), and only Triton >= 3.8 compiles its word
    path well: an opt-in."""
    name = os.environ.get("LOWBIT_INT4_CUDA_PACKING", "tiled")
    if name not in TRITON_PACKINGS:
        raise ValueError(f"LOWBIT_INT4_CUDA_PACKING must be 'plain', 'mma' or 'tiled', got {name!r}")
    return name
