"""The numerical specification of every lowbit format, in plain PyTorch.

Every fast path (CPU packed kernels, Triton kernels) must compute the same
function as the code here; the tests compare each of them against it. The code
favours clarity over speed and runs on any device.

Conventions
-----------
A linear weight ``w`` has shape ``[N, K]`` (out_features, in_features) and
``F.linear(x, w)`` computes ``x @ w.T``.

int4 weight-only (``Int4Tensor``), group-wise asymmetric along K::

    groups of ``group_size`` consecutive values of a row share (scale, zero)
    scale = max((max - min) / 15, SCALE_EPS)        in fp32, stored in the qparam dtype rounding up
    zero  = min + 8 * scale                          the value that q = 8 decodes to
    q     = clamp(round((w - zero) / scale) + 8, 0, 15)   using the *stored* scale/zero
    w_hat = (q - 8) * scale + zero                  in fp32, then cast to the compute dtype
    qdata[n, j] = q[n, 2j] | q[n, 2j + 1] << 4      uint8, shape [N, K // 2]

int8 weight-only (``Int8Tensor``), symmetric per output channel::

    scale = max(amax(|w[n, :]|) / 127, SCALE_EPS)   stored rounding up
    q     = clamp(round(w / scale), -127, 127)      int8, shape [N, K]
    w_hat = q * scale

W8A8 (``Int8DynActTensor``): the int8 weight above, activations quantized per
row (token) at run time with the same symmetric rule, the product accumulated
exactly in integers, then rescaled: ``y = (xq @ wq.T) * x_scale * w_scale``.

FP8 W8A8 (``Float8Tensor``): e4m3fn weight with a per-row fp32 scale
``amax / 448``; activations the same per row at run time; the product of the
fp8 values accumulated in fp32 or better, then rescaled.

Scales are floored at ``SCALE_EPS`` (a power of two, exact in fp16/bf16/fp32)
so an all-zero row or group dequantizes to exact zeros, never NaN.

A row holding a NaN or an infinity has no scale: its symmetric scale is NaN and its
codes are 0. Weights never get there (``quantize_`` rejects non-finite weights); an
activation row (token) that does makes its W8A8 / fp8 output row all NaN, as a NaN
input makes a NaN output in ``F.linear``, where a finite scale would quietly clamp it.

Near the top of the range: a weight's codes always decode to finite values of its
dtype. Where the rules above would decode a code past the range (as computed here:
fp32 steps, one cast; or rounded once from the exact value, as a kernel's fused
multiply-add does), e.g. a group spanning most of fp32's or bf16's range (``hi - lo``
overflows fp32) or fp16 values near 65504 (the rounded-up scale decodes the top code
past 65504), the weight scale is capped: int4 at the largest value with
``15 * scale <= 2 * max`` and ``8 * scale <= max(fp32)``, int8 at the largest with
``127 * scale <= max`` and fp8 at ``448 * scale <= max`` (max of the weight's dtype,
each rounded down into the qparam dtype); the int4 zero is kept in
``[8 * scale - max, max - 7 * scale]``, and moved one ulp toward zero where its
rounding still takes an end code past the range. Values beyond the capped range clamp
to the end codes (at most one step of error). Every other group and row keeps the
rules' qparams, bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCALE_EPS = 2.0**-20
INT4_GROUP_SIZES = (32, 64, 128, 256)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _div(a: torch.Tensor, c: float) -> torch.Tensor:
    """``a / c`` rounded the same on every device.

    CUDA divides by a Python scalar as a multiplication by its reciprocal, which
    rounds differently from the CPU's true division; a tensor divisor is an IEEE
    division everywhere, so CPU- and GPU-quantized weights are bit-identical.
    """
    return a / torch.full((), c, dtype=a.dtype, device=a.device)


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (fp32) cast to ``dtype`` never below its fp32 value.

    A stored scale that rounded down would push the extreme values of a group
    out of the code range (clamping error beyond half a step); rounding up costs
    at most one ulp of step size.
    """
    info = torch.finfo(dtype)
    bumped = x * (1.0 + 2.0 * info.eps) + info.smallest_normal * info.eps
    return torch.where(x.to(dtype).float() >= x, x, bumped).to(dtype)


def _at_most(v: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value not above ``v`` (> 0)."""
    t = torch.tensor(v, dtype=torch.float64).to(dtype)
    return (torch.nextafter(t, torch.zeros_like(t)) if t.item() > v else t).item()


# Per qparam dtype, the largest scale whose codes decode to finite values, every fp32 step of
# the decoding finite: int4 15 s <= 2 max and 8 s <= fp32's max (|q - 8| <= 8); int8 127 s and
# fp8 448 s <= max of the dtype the codes decode into (the choosers' ``fit``)
_F32_MAX = torch.finfo(torch.float32).max
_INT4_SCALE_CAP = {dt: _at_most(min(2 * torch.finfo(dt).max / 15, _F32_MAX / 8), dt) for dt in ACTIVATION_DTYPES}
_INT8_SCALE_CAP = {
    (fit, dt): _at_most(torch.finfo(fit).max / 127, dt) for fit in ACTIVATION_DTYPES for dt in ACTIVATION_DTYPES
}
_FP8_SCALE_CAP = {fit: _at_most(torch.finfo(fit).max / FP8_MAX, torch.float32) for fit in ACTIVATION_DTYPES}
# the least magnitude that rounds to inf in each dtype: max plus half its ulp (max's last bit is odd)
_OVERFLOW = {
    dt: 2.0 ** math.ceil(math.log2(torch.finfo(dt).max)) * (1 - torch.finfo(dt).eps / 4) for dt in ACTIVATION_DTYPES
}


def _decodes_finite(ends, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Whether ``c * scale + zero`` (zero None: 0) is finite in ``dtype`` for each ``c`` in ``ends``
    (the extreme codes), both as the reference computes it (fp32 product, fp32 sum, one cast) and
    rounded once from the exact value (a kernel's fused multiply-add)."""
    z32 = zero.float() if zero is not None else 0.0
    z64 = zero.double() if zero is not None else 0.0
    ok = torch.ones(scale.shape, dtype=torch.bool, device=scale.device)
    for c in ends:
        ok &= torch.isfinite((c * scale.float() + z32).to(dtype))
        ok &= (c * scale.double() + z64).abs() < _OVERFLOW[dtype]
    return ok


def _toward_zero(t: torch.Tensor) -> torch.Tensor:
    """One ulp toward zero (t finite and not zero)."""
    bits = torch.int32 if t.dtype == torch.float32 else torch.int16
    return (t.view(bits) - 1).view(t.dtype)


# --------------------------------------------------------------------------- int4
def int4_choose_qparams(w: torch.Tensor, group_size: int, qparam_dtype: torch.dtype):
    """Per-group (scale, zero) of ``w`` [N, K]; both [N, K // group_size].

    The plain formulas, except for groups whose codes they would decode past the dtype's range
    (module doc, "near the top of the range"): there the scale is capped (``_INT4_SCALE_CAP``)
    and the zero kept inside the range, so that every code decodes to a finite value, every fp32
    step of the decoding finite too."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)
    lo = wg.amin(dim=-1)
    hi = wg.amax(dim=-1)
    # (hi - lo) / 15 by halves: hi - lo overflows fp32 for groups spanning most of its range
    amax = torch.maximum(hi.abs(), lo.abs())
    step = nan_scale_if_nonfinite(_div(hi * 0.5 - lo * 0.5, 7.5).clamp_min(SCALE_EPS), amax)
    scale = _round_up(step, qparam_dtype)
    zero = (lo + 8.0 * scale.float()).to(qparam_dtype)
    ends = (-8.0, 7.0)
    over = ~_decodes_finite(ends, scale, zero, qparam_dtype) & torch.isfinite(step)  # (NaN scales stay)
    capped = scale.clamp_max(_INT4_SCALE_CAP[qparam_dtype])
    s64, top = capped.double(), torch.finfo(qparam_dtype).max
    fit = torch.minimum(torch.maximum(lo.double() + 8.0 * s64, 8.0 * s64 - top), top - 7.0 * s64).to(qparam_dtype)
    for _ in range(2):  # the zero's rounding can still take an end code past the range: toward zero
        fit = torch.where(_decodes_finite(ends, capped, fit, qparam_dtype), fit, _toward_zero(fit))
    return torch.where(over, capped, scale), torch.where(over, fit, zero)


def int4_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int):
    """Unpacked int4 codes in [0, 15] as uint8, shape [N, K]."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)
    q = torch.round((wg - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)) + 8.0
    return q.clamp_(0, 15).to(torch.uint8).reshape(n, k)


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in [0, 15] -> [N, K // 2] uint8, even k in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def int4_unpack(qdata: torch.Tensor) -> torch.Tensor:
    """[N, K // 2] uint8 -> [N, K] uint8 codes in [0, 15]."""
    lo = qdata & 0x0F
    hi = qdata >> 4
    return torch.stack([lo, hi], dim=-1).reshape(qdata.shape[0], qdata.shape[1] * 2)


def _mma_view(t: torch.Tensor, n: int) -> torch.Tensor:
    # k = 32 ch + 16 c + 8 b + 2 t + a  ->  axes (n, ch, c, b, t, a)
    return t.reshape(n, t.shape[1] // 32, 2, 2, 4, 2)  # (not -1: ambiguous for N = 0)


def int4_mma_pack(q: torch.Tensor) -> torch.Tensor:
    """[N, K] codes (K % 32 == 0) -> [N, K // 2] uint8 in the ``"mma"`` byte order.

    The order the CUDA kernel reads (``Int4Tensor`` packing ``"mma"``): in each run of
    32 k, write ``k = 16 c + 8 b + 2 t + a`` (a, b, c in {0, 1}, t in 0..3); the code
    sits in byte ``4 t + 2 c + a`` of the run's 16 bytes, in the low nibble for b = 0
    and the high one for b = 1. So one little-endian 32-bit word t holds exactly the k
    that thread t of a quad feeds into two m16n8k16 mma steps (k = 2t, 2t + 1, 2t + 8,
    2t + 9 and the same + 16), already paired as the bf16x2 registers the mma takes.
    """
    n, k = q.shape
    if k % 32:
        raise ValueError(f"int4 'mma' packing needs K % 32 == 0, got K={k}")
    v = _mma_view(q.to(torch.uint8), n).permute(0, 1, 4, 2, 5, 3)  # n, ch, t, c, a, b
    return (v[..., 0] | (v[..., 1] << 4)).reshape(n, k // 2)


def int4_mma_unpack(qdata: torch.Tensor) -> torch.Tensor:
    """Inverse of ``int4_mma_pack``: [N, K // 2] uint8 -> [N, K] codes."""
    n, kh = qdata.shape
    v = qdata.reshape(n, kh // 16, 4, 2, 2)  # n, ch, t, c, a
    v = torch.stack([v & 0x0F, v >> 4], dim=-1)  # n, ch, t, c, a, b
    return v.permute(0, 1, 3, 5, 2, 4).reshape(n, kh * 2)


def int4_tiled_fits(n: int, k: int) -> bool:
    """Whether an [N, K] weight is whole 16-row x 128-k tiles, which ``"tiled"`` needs."""
    return n % 16 == 0 and k % 128 == 0


def int4_tiled_pack(q: torch.Tensor) -> torch.Tensor:
    """[N, K] codes (N % 16 == 0, K % 128 == 0) -> [N, K // 2] uint8 in the ``"tiled"`` order.

    The bytes of ``int4_pack`` (even k in the low nibble) regrouped so that each tile of 16
    rows x 128 k is one contiguous 1 KB run: tile (i, j) (rows 16 i .., k 128 j ..) starts at
    byte (i K / 128 + j) * 1024 and holds its 16 rows' 64 bytes one after the other. A GEMV
    warp reading 16 rows of one 128-k block then reads 1 KB in one place. Row slices stay
    whole tiles only at multiples of 16 rows."""
    n, k = q.shape
    if not int4_tiled_fits(n, k):
        raise ValueError(f"int4 'tiled' packing needs N % 16 == 0 and K % 128 == 0, got N={n}, K={k}")
    # plain rows as (tile row, row in tile, block, byte) -> (tile row, block, row in tile, byte)
    return int4_pack(q).reshape(n // 16, 16, k // 128, 64).transpose(1, 2).reshape(n, k // 2)


def int4_tiled_unpack(qdata: torch.Tensor) -> torch.Tensor:
    """Inverse of ``int4_tiled_pack``: [N, K // 2] uint8 -> [N, K] codes."""
    n, kh = qdata.shape
    return int4_unpack(qdata.reshape(n // 16, kh // 64, 16, 64).transpose(1, 2).reshape(n, kh))


def int4_dequantize(qdata, scale, zero, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    q = int4_unpack(qdata).float()
    n, k = q.shape
    qg = q.reshape(n, k // group_size, group_size)
    w = (qg - 8.0) * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return w.reshape(n, k).to(dtype)


def int4_linear(x, qdata, scale, zero, group_size: int, bias=None):
    return F.linear(x, int4_dequantize(qdata, scale, zero, group_size, x.dtype), bias)


# --------------------------------------------------------------------------- the MLP's product
def swiglu(y: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a [..., 2 I] projection output whose first I columns are the gate
    (Llama's MLP), in fp32 from y's values, rounded once to y's dtype: what the unfused
    ``act_fn(gate_proj(x)) * up_proj(x)`` gives under torch.compile (Inductor fuses the two
    pointwise ops; eager rounds silu(gate) to the dtype before the product)."""
    if y.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dimension must be even (gate and up halves), got {tuple(y.shape)}")
    gate, up = y.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(y.dtype)


# --------------------------------------------------------------------------- residual add + RMSNorm
def check_add_rmsnorm_operands(name: str, out_shape: tuple, residual, norm_weight, dtype) -> None:
    """The launchers' checks of ``add_rmsnorm``'s operands for an output of ``out_shape`` in
    ``dtype``: residual of that shape, norm_weight [N], both of that dtype."""
    n = out_shape[-1]
    if residual.shape != out_shape or norm_weight.shape != (n,):
        raise ValueError(
            f"{name}: residual {tuple(residual.shape)} and norm_weight {tuple(norm_weight.shape)} do not fit the "
            f"output {tuple(out_shape)} (want residual {tuple(out_shape)}, norm_weight ({n},))"
        )
    if residual.dtype != dtype or norm_weight.dtype != dtype:
        raise TypeError(
            f"{name}: residual {residual.dtype} and norm_weight {norm_weight.dtype} must be x's dtype {dtype}"
        )


def add_rmsnorm(y: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """A pre-norm decoder layer's step after a linear: ``h = residual + y`` rounded to y's dtype,
    then Llama's RMSNorm of h, ``weight * (h * rsqrt(mean(h^2) + eps))`` with the normalised row
    rounded to h's dtype before the product and the product rounded once (weight of h's dtype).
    y, residual [..., N]; weight [N]. Returns (h, normed), both [..., N] in y's dtype: what the
    unfused ``hidden = residual + linear(x); norm(hidden)`` gives (the mean's summation order
    aside)."""
    if residual.shape != y.shape or weight.shape != y.shape[-1:]:
        raise ValueError(
            f"add_rmsnorm: y {tuple(y.shape)}, residual {tuple(residual.shape)} and weight "
            f"{tuple(weight.shape)} do not match (want residual like y, weight [{y.shape[-1]}])"
        )
    h = (y.float() + residual.float()).to(y.dtype)
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return h, (weight.float() * normed.to(h.dtype).float()).to(h.dtype)


# --------------------------------------------------------------------------- int8
def int8_choose_qparams(w: torch.Tensor, qparam_dtype: torch.dtype, fit: torch.dtype | None = None) -> torch.Tensor:
    """Symmetric scale per row of ``w`` [N, K] (or per token of an activation). ``fit``: the
    dtype the codes decode into (a weight's own), whose range caps the scale (127 s <= its
    max, rounded down in the qparam dtype), so rows near the top of it decode to finite values;
    the cap is inactive elsewhere. Activations (the W8A8 kernels' own quantizer) take none."""
    amax = w.float().abs().amax(dim=-1)
    scale = _round_up(nan_scale_if_nonfinite(_div(amax, 127.0).clamp_min(SCALE_EPS), amax), qparam_dtype)
    if fit is None:
        return scale
    over = ~_decodes_finite((127.0,), scale, None, fit) & torch.isfinite(scale)
    return torch.where(over, scale.clamp_max(_INT8_SCALE_CAP[fit, qparam_dtype]), scale)


def nan_scale_if_nonfinite(scale: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """NaN for rows whose amax is NaN or infinite (see the module docstring)."""
    return torch.where(torch.isfinite(amax), scale, torch.nan)


def int8_quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = torch.round(w.float() / scale.float().unsqueeze(-1))
    return q.clamp_(-127, 127).nan_to_num_(0.0).to(torch.int8)  # NaN: rows without a scale


def int8_dequantize(qdata, scale, dtype: torch.dtype) -> torch.Tensor:
    return (qdata.float() * scale.float().unsqueeze(-1)).to(dtype)


def int8_weight_only_linear(x, qdata, scale, bias=None):
    return F.linear(x, int8_dequantize(qdata, scale, x.dtype), bias)


def int8_quantize_rows(x: torch.Tensor):
    """Per-row (token) dynamic quantization of an activation [..., K]."""
    scale = int8_choose_qparams(x, torch.float32)
    return int8_quantize(x, scale), scale


def int8_dynamic_linear(x, qdata, scale, bias=None):
    """W8A8: exact integer accumulation (float64 holds every partial sum exactly)."""
    xq, xs = int8_quantize_rows(x)
    acc = xq.double() @ qdata.double().T
    y = acc * xs.double().unsqueeze(-1) * scale.double()
    y = y.to(x.dtype)
    return y if bias is None else y + bias


# --------------------------------------------------------------------------- fp8
def fp8_choose_qparams(w: torch.Tensor, fit: torch.dtype | None = None) -> torch.Tensor:
    """fp32 scale per row (token); ``fit`` as ``int8_choose_qparams``' (448 s <= its max)."""
    amax = w.float().abs().amax(dim=-1)
    scale = nan_scale_if_nonfinite(_div(amax, FP8_MAX).clamp_min(SCALE_EPS), amax)
    if fit is None:
        return scale
    over = ~_decodes_finite((FP8_MAX,), scale, None, fit) & torch.isfinite(scale)
    return torch.where(over, scale.clamp_max(_FP8_SCALE_CAP[fit]), scale)


def fp8_quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    v = (w.float() / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX)
    return v.nan_to_num_(0.0).to(FP8_DTYPE)  # NaN: rows without a scale


def fp8_dequantize(qdata, scale, dtype: torch.dtype) -> torch.Tensor:
    return (qdata.float() * scale.float().unsqueeze(-1)).to(dtype)


def fp8_quantize_rows(x: torch.Tensor):
    scale = fp8_choose_qparams(x)
    return fp8_quantize(x, scale), scale


def fp8_dynamic_linear(x, qdata, scale, bias=None):
    xq, xs = fp8_quantize_rows(x)
    acc = xq.double() @ qdata.double().T
    y = (acc * xs.double().unsqueeze(-1) * scale.double()).to(x.dtype)
    return y if bias is None else y + bias


# --------------------------------------------------------------------------- quality
def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal to quantization-noise ratio in dB, computed in float64."""
    ref = ref.detach().double()
    noise = (ref - out.detach().double()).norm()
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(ref.norm() / noise))
