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
import weakref

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
    """The layout this machine's aten int4 CPU kernel reads, or None if unknown/absent. (Under
    torch.compile Dynamo runs it once with its fake tensors on: the probe runs on real ones.)"""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return _probe_int4_cpu_layout()


def _probe_int4_cpu_layout() -> str | None:
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


# id(scale tensor) -> (weak reference to it, its [G, N, 2] operand); see _scales_and_zeros. (A
# dict by id with a weakref check: torch's WeakIdKeyDictionary.get costs 3.5 us, this 0.3 us.)
_SZ_CACHE: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def _scales_and_zeros(
    scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype, *, check: bool = False
) -> torch.Tensor | None:
    """The kernel's ``scales_and_zeros`` operand: (scale, zero) interleaved as [G, N, 2] in
    ``dtype``. With ``check``, None where the cast would lose them (``qparams_cast_ok``).

    When the fields already are that operand's views (``interleave_scale_zero``) in ``dtype``,
    the operand is a view too, kept per ``scale`` tensor object (weakly, detached, so it holds
    neither the object nor a cycle): an eager call then skips the checks and the ``as_strided``
    (16.7 -> ~4.6 us per call on the CI CPU; a weight's fields lose their ``_base`` when
    ``nn.Parameter`` detaches them). A hit is checked against both fields' addresses, shape and
    strides."""
    entry = _SZ_CACHE.get(id(scale))
    cached = entry[1] if entry is not None and entry[0]() is scale else None
    if (
        cached is not None
        and cached.dtype == dtype
        and cached.data_ptr() == scale.data_ptr()
        and zero.data_ptr() == scale.data_ptr() + cached.element_size()
        and scale.shape == zero.shape == (cached.shape[1], cached.shape[0])
        and scale.stride() == zero.stride() == (2, 2 * cached.shape[1])
    ):
        return cached
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
        if sz.dtype == dtype:  # the fields' own buffer: remember it (see above)
            sz = sz.detach()
            key = id(scale)
            _SZ_CACHE[key] = (weakref.ref(scale, lambda _, key=key: _SZ_CACHE.pop(key, None)), sz)
            return sz
    else:
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1)
    out = sz.to(dtype).contiguous()
    if check and sz.dtype != dtype and not qparams_cast_ok(out, sz):
        return None
    return out


def qparams_cast_ok(cast: torch.Tensor, stored: torch.Tensor) -> bool:
    """Whether aten's kernel may take the stored quantization parameters as ``cast``, their
    cast to the activation dtype: int8 scales [N], or int4's interleaved [G, N, 2]
    (scale, zero) pairs.

    aten's packed kernels take them in x's dtype. A scale cast to a normal number is
    rounded by at most half an ulp, the size of the reference's own rounding of the
    dequantized weight to x's dtype (measured on random shapes: 1.0-1.6x the reference's
    error against float64). Two cases lose more, and run the fp32 kernel on the stored
    values instead:

    * a scale below x's smallest normal (fp16: 6.1e-5, weights of magnitude ~1e-4 and
      less) keeps fewer bits as a subnormal: 20x the reference's error;
    * an int4 group on the ``SCALE_EPS`` floor spans fewer than 16 steps, so
      ``(q - 8) * scale + zero`` cancels to values far below ``zero``, whose rounding then
      dominates (16x at weights of 1e-7 in bf16): those zeros must cast exactly.

    A scale the cast leaves unchanged is fine too (an all-zero row's 2^-20 scale is an
    exact fp16 subnormal). A NaN scale gives the reference's NaNs on either kernel. Cast
    qparams whose codes could decode past x's dtype (|qparams| beyond max / 9 for int4
    pairs, max / 127 for int8 scales: fp32 weights near a 16-bit max, e.g. under autocast)
    run the fp32 kernel: the cast's rounding took an end code to inf where the stored
    qparams decode finite (session 28).

    Runs on every call, O(N * K / group_size) against the product's O(M * N * K): against
    aten's 4096 x 4096 bf16 product at M = 1 on a 2-core AVX2 CPU, 4 us (0.3-0.6%) for
    int8, 24 us (1-2%) for int4 at group 128 and 40-50 us (2-3%) at group 32; the cast
    it follows cost as much or more. A cache cannot live here: ``QTensor.copy_`` writes
    the fields under ``__torch_dispatch__``, which moves no version counter of theirs.
    """
    # decoded values past x's dtype: the cast's rounding (fp32 weights near a 16-bit max, under
    # autocast) can take an end code to inf where the stored qparams decode finite; |(q - 8) s + z|
    # <= 9 max|.| (int4 pairs), |q s| <= 127 max|s| (int8): beyond, the fp32 kernel
    if not float(cast.abs().amax()) * (9.0 if cast.dim() == 3 else 127.0) < torch.finfo(cast.dtype).max:
        return False
    lo = _min_scale(cast)
    tiny = torch.finfo(cast.dtype).smallest_normal
    if not lo >= tiny:  # rare: look at each scale (a NaN fails both tests)
        s_cast, s_stored = (cast, stored) if cast.dim() == 1 else (cast[..., 0], stored[..., 0])
        if not bool(((s_cast.abs() >= tiny) | (s_cast.to(stored.dtype) == s_stored)).all()):
            return False
    if cast.dim() == 3 and lo <= ref.SCALE_EPS:
        floor = stored[..., 0] <= ref.SCALE_EPS
        return torch.equal(cast[..., 1][floor].to(stored.dtype), stored[..., 1][floor])
    return True


def _min_scale(cast: torch.Tensor) -> float:
    """The smallest scale in ``cast``: [N] scales or contiguous [G, N, 2] (scale, zero) pairs.

    A reduction over every other element is ~50x slower than over contiguous memory (1.9
    ms for 4096 x 32 pairs), so 16-bit pairs are read as rows of ``width`` int16 bit
    patterns whose even columns hold only scales: the column-wise minimum is one
    contiguous pass. Non-negative floats order like their bits; a negative scale's bits
    are negative, and come back as a negative float (a NaN's are large, and skipped: it
    gives the same NaNs either way)."""
    if cast.dim() == 1:
        return float(cast.amin())
    if cast.element_size() == 2:
        bits = cast.view(torch.int16).view(-1)
        for width in (256, 128, 64):  # narrower rows take a slow path (20x at 32)
            if bits.numel() % width == 0:
                return float(bits.view(-1, width).amin(0)[0::2].amin().view(cast.dtype))
    return float(cast[..., 0].contiguous().amin())


@kernel_op("int4_mm_cpu", fake=linear_out_fake)
def int4_mm(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x [M, K] @ W.T with W in the machine's CPU int4 layout (see ``int4_cpu_layout``).

    The kernel takes (scale, zero) in x's dtype; where that cast would lose them
    (``qparams_cast_ok``) it runs in fp32 on the stored values and rounds the output once."""
    if x.dtype != torch.float32:
        sz = _scales_and_zeros(scale, zero, x.dtype, check=True)
        if sz is not None:
            return aten._weight_int4pack_mm_for_cpu(x, qdata, group_size, sz)
    sz = _scales_and_zeros(scale, zero, torch.float32)
    return aten._weight_int4pack_mm_for_cpu(x.float(), qdata, group_size, sz).to(x.dtype)


# ---------------------------------------------------------------------------- int8
@kernel_op("int8_mm_cpu", fake=linear_out_fake)
def int8_mm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A16: x [M, K] @ (qdata * scale).T.

    The kernel takes the scale in x's dtype; x runs in fp32 (one rounding of the output)
    where that cast would lose a scale (``qparams_cast_ok``) or the bf16 kernel cannot
    take K (``int8pack_ok``). qdata is made contiguous (a column slice is a strided view),
    a no-op otherwise."""
    qdata = qdata.contiguous()
    if x.dtype != torch.float32 and int8pack_ok(x.dtype, x.shape[-1]):
        s = scale.to(x.dtype)
        if scale.dtype == x.dtype or qparams_cast_ok(s, scale):
            return aten._weight_int8pack_mm(x, qdata, s)
    return aten._weight_int8pack_mm(x.float(), qdata, scale.float()).to(x.dtype)


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

    The product of the codes: fp32 activations: ``torch._int_mm`` (exact int32
    accumulation) for K % 32 == 0 (on torch 2.11 with AVX-512 it returned garbage at
    K = 1, ``bench/cpu_kernel_probe.py``), else the fp32 int8-weight kernel on the exact
    codes with unit scales. bf16 activations: the int8 codes are exact in bf16, so the
    product runs through the int8-weight kernel with bf16 operands and unit scales (fp32
    accumulation inside, the sum rounded once to bf16); on CPUs without VNNI that is
    10-15x faster than ``_int_mm``, and the rounding is the size of the final cast to
    bf16. fp16 activations take the fp32 kernel: through bf16 their error was 11x the
    reference's. The rescale is the reference's: ``acc * x_scale * w_scale`` in float64,
    cast once (in fp32, ``acc * w_scale`` overflowed for weights of ~1e36 whose outputs
    are finite). qdata is made contiguous (a column slice is a strided view).
    """
    qdata = qdata.contiguous()
    k_ok = _k_vector_ok(x.shape[-1])
    if x.dtype == torch.float32 and k_ok:
        xq, xs = ref.int8_quantize_rows(x)
        acc = torch._int_mm(xq, qdata.t())
    else:
        codes, xs = int8_rows_as_float(x)
        if x.dtype == torch.bfloat16 and k_ok:
            acc = aten._weight_int8pack_mm(codes.to(torch.bfloat16), qdata, _ones(qdata.shape[0], torch.bfloat16))
        else:  # the fp32 kernel on the same exact codes (no bf16 operand rounding)
            acc = aten._weight_int8pack_mm(codes, qdata, _ones(qdata.shape[0], torch.float32))
    y = acc.double()  # in place: one [M, N] float64 temporary
    return y.mul_(xs.double().unsqueeze(-1)).mul_(scale.double()).to(x.dtype)


@functools.lru_cache(maxsize=64)
def _ones(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Unit scales for the int8pack kernel (read only; one per N and dtype, not per call)."""
    return torch.ones(n, dtype=dtype)


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
