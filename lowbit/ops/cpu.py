"""CPU execution through PyTorch's packed CPU kernels.

* int4: ``aten._weight_int4pack_mm_for_cpu`` (the CPU tinygemm). It reads the
  weight in a blocked layout that depends on the vector ISA PyTorch dispatches
  to (AVX-512: blocks of 64 rows, AVX2: 32, otherwise row pairs), so the
  layout is detected once by packing a probe with aten and comparing it with
  the candidates below. Packing in pure torch (rather than calling aten's
  converter, ~20x slower than a matmul) lets us unpack exactly as well.
* int8 weight-only: ``aten._weight_int8pack_mm``. Its bf16 kernel has no K tail: K
  not a multiple of the vector width reads past the rows (wrong results at M = 1, a
  segfault at M > 1; K % 8 != 0 on AVX2 with torch 2.13, K = 8, 24, ... too on AVX-512
  with torch 2.11, ``bench/cpu_kernel_probe.py``), so bf16 activations run it only for
  K % 32 == 0 and otherwise take the fp32 kernel and round once at the end.
* W8A8: ``torch._int_mm`` (int8 x int8 -> int32) after per-token quantization.

Each entry point is an opaque custom op (``lowbit.compile.kernel_op``). The
numerics are those of ``lowbit.ops.reference``; only the summation order differs.
"""

from __future__ import annotations

import functools

import torch

from lowbit.compile import kernel_op, linear_out_fake
from lowbit.ops import reference as ref

aten = torch.ops.aten


# ---------------------------------------------------------------------------- int4 layout
def _pack_pairs(q: torch.Tensor) -> torch.Tensor:  # [B, nb, K] -> [B, K, nb/2]
    return (q[:, 0::2] | (q[:, 1::2] << 4)).transpose(1, 2)


def _unpack_pairs(p: torch.Tensor) -> torch.Tensor:  # [B, K, nb/2] -> [B, nb, K]
    p = p.transpose(1, 2)
    return torch.stack([p & 0xF, p >> 4], dim=2).reshape(p.shape[0], p.shape[1] * 2, p.shape[2])


def _pack_half_split(q: torch.Tensor) -> torch.Tensor:  # AVX2 block of 32: row d | row d+16
    h = q.shape[1] // 2
    return (q[:, :h] | (q[:, h:] << 4)).transpose(1, 2)


def _unpack_half_split(p: torch.Tensor) -> torch.Tensor:
    p = p.transpose(1, 2)
    return torch.cat([p & 0xF, p >> 4], dim=1)


def _pack_lanes(q: torch.Tensor) -> torch.Tensor:  # AVX-512 block of 64: lanes (0,2) and (1,3)
    a = q[:, 0:16] | (q[:, 32:48] << 4)
    b = q[:, 16:32] | (q[:, 48:64] << 4)
    return torch.cat([a, b], dim=1).transpose(1, 2)


def _unpack_lanes(p: torch.Tensor) -> torch.Tensor:
    p = p.transpose(1, 2)
    a, b = p[:, :16], p[:, 16:]
    return torch.cat([a & 0xF, b & 0xF, a >> 4, b >> 4], dim=1)


# name -> (block rows, pack full block, unpack full block); tails always use row pairs
INT4_CPU_LAYOUTS = {
    "cpu_avx512": (64, _pack_lanes, _unpack_lanes),
    "cpu_avx2": (32, _pack_half_split, _unpack_half_split),
    "cpu_scalar": (32, _pack_pairs, _unpack_pairs),
}


def int4_cpu_pack(q: torch.Tensor, layout: str) -> torch.Tensor:
    """Unpacked codes [N, K] (uint8) -> CPU tinygemm bytes, viewed as [N, K // 2]."""
    block, pack_full, _ = INT4_CPU_LAYOUTS[layout]
    n, k = q.shape
    if n == 0:
        return q.new_empty(0, k // 2)
    full = n // block * block
    parts = []
    if full:
        parts.append(pack_full(q[:full].reshape(-1, block, k)).reshape(-1))
    if full < n:
        parts.append(_pack_pairs(q[full:].unsqueeze(0)).reshape(-1))
    return torch.cat(parts).reshape(n, k // 2)


def int4_cpu_unpack(packed: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of ``int4_cpu_pack``: [N, K // 2] bytes -> codes [N, K]."""
    block, _, unpack_full = INT4_CPU_LAYOUTS[layout]
    n, k = packed.shape[0], packed.shape[1] * 2
    if n == 0:
        return packed.new_empty(0, k)
    full = n // block * block
    flat = packed.reshape(-1)
    parts = []
    if full:
        parts.append(unpack_full(flat[: full * k // 2].reshape(-1, k, block // 2)).reshape(full, k))
    if full < n:
        parts.append(_unpack_pairs(flat[full * k // 2 :].reshape(1, k, (n - full) // 2)).reshape(n - full, k))
    return torch.cat(parts)


@torch.compiler.assume_constant_result
@functools.cache
def int4_cpu_layout() -> str | None:
    """The layout this machine's aten int4 CPU kernel reads, or None if unknown/absent."""
    if not hasattr(aten, "_convert_weight_to_int4pack_for_cpu"):
        return None
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (80, 64), dtype=torch.int32, generator=gen)
    try:
        expected = aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except RuntimeError:
        return None
    for name in INT4_CPU_LAYOUTS:
        if torch.equal(int4_cpu_pack(q.to(torch.uint8), name), expected.view(torch.uint8).reshape(80, 32)):
            return name
    return None


def int4_cpu_supported(n: int, k: int, group_size: int) -> bool:
    return int4_cpu_layout() is not None and n % 16 == 0 and k % group_size == 0


def interleave_scale_zero(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) [N, G] as views into one [G, N, 2] buffer, the kernel's operand."""
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return sz[..., 0].t(), sz[..., 1].t()


def is_interleaved(scale: torch.Tensor, zero: torch.Tensor) -> bool:
    n, g = scale.shape

    def ok(t):  # the stride of a size-1 dim is arbitrary
        return t.stride(0) == 2 and (g == 1 or t.stride(1) == 2 * n)

    return ok(scale) and ok(zero) and zero.storage_offset() == scale.storage_offset() + 1


def _scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n, g = scale.shape
    base = scale._base
    if (  # the usual case, cheapest to confirm: the views interleave_scale_zero made of its buffer
        base is not None
        and zero._base is base
        and base.dtype == dtype
        and base.shape == (g, n, 2)
        and base.is_contiguous()
        and scale.storage_offset() == base.storage_offset()
        and is_interleaved(scale, zero)
    ):
        return base
    if is_interleaved(scale, zero) and scale.untyped_storage().data_ptr() == zero.untyped_storage().data_ptr():
        sz = torch.as_strided(scale, (g, n, 2), (2 * n, 2, 1), scale.storage_offset())
    else:
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1)
    return sz.to(dtype).contiguous()


@kernel_op("int4_mm_cpu", fake=linear_out_fake)
def int4_mm(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x [M, K] @ W.T with W in the machine's CPU int4 layout (see ``int4_cpu_layout``)."""
    return aten._weight_int4pack_mm_for_cpu(x, qdata, group_size, _scales_and_zeros(scale, zero, x.dtype))


# ---------------------------------------------------------------------------- int8
@kernel_op("int8_mm_cpu", fake=linear_out_fake)
def int8_mm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A16: x [M, K] @ (qdata * scale).T."""
    if not int8pack_ok(x.dtype, x.shape[-1]):
        return aten._weight_int8pack_mm(x.float(), qdata, scale.float()).to(x.dtype)
    return aten._weight_int8pack_mm(x, qdata, scale.to(x.dtype))


def int8pack_ok(dtype: torch.dtype, k: int) -> bool:
    """Whether ``aten._weight_int8pack_mm`` computes [M, K] activations of ``dtype`` correctly:
    its bf16 kernel needs K to be a multiple of the vector width (module docstring); fp16
    and fp32 take any K."""
    return dtype != torch.bfloat16 or _k_vector_ok(k)


def _k_vector_ok(k: int) -> bool:
    """K a multiple of 32: covers the AVX2 and AVX-512 widths of aten's bf16 int8 kernel,
    and ``torch._int_mm`` (garbage at K = 1 on torch 2.11 with AVX-512)."""
    return k % 32 == 0


@kernel_op("int8_dyn_mm_cpu", fake=linear_out_fake)
def int8_dyn_mm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8: per-token int8 activations, then rescale.

    fp32 activations: ``torch._int_mm`` (exact int32 accumulation) for K % 32 == 0 (on
    torch 2.11 with AVX-512 it returned garbage at K = 1, ``bench/cpu_kernel_probe.py``),
    else the fp32 int8-weight kernel on the exact codes. bf16 activations: the int8
    codes are exact in bf16, so the product runs through the int8-weight kernel with
    bf16 operands (fp32 accumulation inside); on CPUs without VNNI that is 10-15x
    faster than ``_int_mm``. Its extra roundings (the scale and the weight-scaled
    product to bf16) are the size of the final cast to bf16. fp16 activations take
    the fp32 kernel: through bf16 their error was 11x the reference's.
    """
    k_ok = _k_vector_ok(x.shape[-1])
    if x.dtype == torch.float32 and k_ok:
        xq, xs = ref.int8_quantize_rows(x)
        y = torch._int_mm(xq, qdata.t()).float() * scale.float()
    else:
        codes, xs = int8_rows_as_float(x)
        if x.dtype == torch.bfloat16 and k_ok:
            y = aten._weight_int8pack_mm(codes.to(torch.bfloat16), qdata, scale.to(torch.bfloat16)).float()
        else:  # the fp32 kernel on the same exact codes (fp32 scale, no bf16 operand rounding)
            y = aten._weight_int8pack_mm(codes, qdata, scale.float())
    return (y * xs.unsqueeze(-1)).to(x.dtype)


_QMAX = torch.tensor(127.0)  # a tensor divisor: IEEE division, as ``reference._div``


def int8_rows_as_float(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.int8_quantize_rows(x)`` with the codes left as fp32 integers.

    The same operations in the same order (the fp32 scale needs no rounding up),
    with x converted once and no int8 round trip: eager CPU pays ~3-5 us per op.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    xs = ref.nan_scale_if_nonfinite((amax / _QMAX).clamp_min(ref.SCALE_EPS), amax)
    return torch.round(xf / xs.unsqueeze(-1)).clamp_(-127, 127).nan_to_num_(0.0), xs
