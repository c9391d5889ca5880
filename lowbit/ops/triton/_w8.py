"""Kernels shared by the 8-bit-weight launchers (``int8.py``, ``fp8.py``).

Shapes and math::

    x   [M, K]  float activations (W8A16) or row-quantized int8 / e4m3fn (W8A8)
    w   [N, K]  int8 or float8_e4m3fn
    ws  [N]     per-output-channel weight scale
    xs  [M]     per-row activation scale (W8A8 only)
    y   [M, N] = (x @ w.T) * ws[None, :] (* xs[:, None])     in ``out_dtype``

The product is accumulated in int32 for int8 x int8 (exact), else in fp32;
the scales are applied once in the epilogue (``x @ (q * s).T == (x @ q.T) * s``).
``_gemv_kernel`` serves M <= GEMV_MAX_M with FMAs; W8A16 with bf16 / fp16 x on CUDA from
DEQUANT_MIN_M dequantizes DEQUANT_ROWS weight rows at a time for cuBLAS
(``_utils.chunked_dequant_mm``); W8A8 in TMA_DTYPES (fp8) from TMA_MIN_M on sm_90+ runs the
persistent ``_gemm_tma_kernel``; ``_gemm_kernel`` does the rest with ``tl.dot``. For M <= 128 the K loop can be split across programs (autotuned with the
tile): each split stores its raw partial sums (int32 bits for int8 x int8, else fp32)
into its own slice of a workspace and counts itself in on the output tile's counter;
the last split adds the slices in a fixed order (exact for int32), applies the
scales and stores y: one launch, deterministic, as in ``int4.py``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lowbit.ops.reference import FP8_DTYPE
from lowbit.ops.triton import _utils
from lowbit.ops.triton._utils import (
    AUTOTUNE,
    INTERPRET,
    MAX_WORKSPACE,
    TUNE_CACHE,
    cfg,
    configs,
    dequant_key,
    dequant_lane,
    dot_acc,
    grouped_tile,
    is_sm90_or_newer,
    launch,
    m_bucket,
    num_sms,
    pdl_args,
    pdl_start,
    pdl_trigger,
    plan_key,
    planned_dequant_mm,
    split_k_buffers,
    split_k_reduce,
    tune_bench,
)

GEMV_MAX_M = 1
# W8A16 from this M on: dequantize once per call, then cuBLAS (bench/KERNEL_NOTES.md). M=256
# stays on the GEMM: in two H100 runs it beat dequantize + cuBLAS on all three shapes (0.55 vs
# 0.51x, 0.74-0.76 vs 0.40-0.41x, 0.51-0.57 vs 0.48-0.53x of bf16); from M=320 it mostly loses
# (bench/results/h100-kernels-s13-mid-m.md).
DEQUANT_MIN_M = 257
# ... DEQUANT_ROWS weight rows at a time (int4.py measured 4096 best on H100).
DEQUANT_ROWS = 4096
# W8A8 from this M on: the persistent TMA GEMM (sm_90+, K a multiple of 16 for TMA's strides),
# for these weight dtypes (int8 ties the autotuned pointer GEMM, bench/KERNEL_NOTES.md).
TMA_MIN_M = 256
TMA_DTYPES = (FP8_DTYPE,)
# W8A16 GEMV int8 -> fp32: "tuned" lets the autotuner pick per shape between I2F (a quarter
# of the FMA rate on sm_90) and a byte permute + subtract on the ALU pipes (each wins on
# some shapes, bench/KERNEL_NOTES.md); "alu" / "i2f" force one. The interpreter runs I2F.
GEMV_CVT = "tuned"
_CVT_MODES = {"tuned": 0, "alu": 1, "i2f": 2}
# W8A16 "swapped" GEMM tiles (y.T = w @ x.T: the converted weight tile is the MMA's register
# A operand, no shared-memory round trip; int4.GEMM_SWAP has the details): "tuned" (default,
# the autotuner chooses from M bucket 64), "on", "off". H100: 4096^2 M=128 0.74x vs 0.62x of
# bf16 with them, the other shapes about even (bench/results/h100-kernels-s8-swap-w8a16.md).
GEMM_SWAP = "tuned"
_SWAP_MODES = {"off": 0, "tuned": 1, "on": 2}
# The GEMM's programmatic dependent launch mode (int4.GEMM_PDL lists them; the GEMV and the
# activation quantizer always use mode 1). Mode 1: +2-14% at M=8 (session 10).
GEMM_PDL = 1

# byte b of $4 (int8 q) -> fp32 bits 0x4B0000uu with uu = q + 128 (flip the sign bit), i.e.
# 2**23 + q + 128; minus 2**23 + 128 it is q, exactly. Four weights per 32-bit register.
_I8_TO_F32_PTX = tl.constexpr(
    "{ .reg .b32 t; xor.b32 t, $4, 0x80808080;\n"
    + "\n".join(f"prmt.b32 ${i}, t, 0x4B000000, 0x754{i}; sub.f32 ${i}, ${i}, 0f4B000080;" for i in range(4))
    + "}"
)


@triton.jit
def _i8_to_f32(q):
    """int8 -> fp32 on the ALU pipes (PRMT + FADD per weight) instead of I2F."""
    return tl.inline_asm_elementwise(_I8_TO_F32_PTX, "=r,=r,=r,=r,r", [q], dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _rescale(acc, ws, xs):
    """W8A8's ``acc * ws * xs`` in fp32 (the spec multiplies in float64): the scales' product
    first, since ``acc * ws`` alone overflows for weights near 1e36 where y does not; where that
    product overflows, ``(acc * ws) * xs`` (an fp8 sum below 1 can keep it finite); and 0 where
    acc is 0 and the product overflowed (y is then 0), NaN scales staying NaN."""
    s = ws * xs
    # (an fp8 sum can be below 1: where the scales' product overflows, the other order may not)
    y = tl.where(tl.abs(s) == float("inf"), (acc * ws) * xs, acc * s)
    return tl.where((acc == 0) & (s == s), 0.0, y)


def _gemv_prune(configs_, named_args, **kwargs):
    """The ALU int8 conversion only for W8A16 (int8 weight, float x) on the GPU, as GEMV_CVT
    allows; one config when autotuning is off."""
    a = {**named_args, **kwargs}
    mode = a["CVT_MODE"]
    alu_ok = not INTERPRET and not a["A_SCALED"] and mode != _CVT_MODES["i2f"]
    out = [c for c in configs_ if alu_ok or not c.kwargs["ALU_CVT"]]
    if alu_ok and mode == _CVT_MODES["alu"]:
        out = [c for c in out if c.kwargs["ALU_CVT"]]
    return out if AUTOTUNE else out[:1]


# (BLOCK_N, BLOCK_K, warps, stages)
_GEMV_TILES = [
    (2, 1024, 4, 2),
    (2, 2048, 4, 2),
    (4, 1024, 4, 2),
    (4, 2048, 8, 2),
    (8, 512, 4, 2),
    (8, 512, 4, 3),
    (8, 1024, 8, 2),
    (16, 256, 4, 2),
    (16, 512, 8, 2),
    (32, 256, 8, 2),
]


@triton.autotune(
    configs=[
        cfg(BLOCK_N=bn, BLOCK_K=bk, ALU_CVT=alu, num_warps=w, num_stages=s)
        for bn, bk, w, s in (_GEMV_TILES if AUTOTUNE else [(4, 128, 4, 1)])
        for alu in (False, True)
    ],
    key=["m_bucket", "N", "K", "A_SCALED", "CVT_MODE"],
    prune_configs_by={"early_config_prune": _gemv_prune},
    **TUNE_CACHE,
    do_bench=tune_bench,
)
@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, ws_ptr, xs_ptr, y_ptr,
    M, N, K, m_bucket, CVT_MODE,
    stride_xm, stride_ym,
    A_SCALED: tl.constexpr, INT_ACC: tl.constexpr, FP8: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ALU_CVT: tl.constexpr, PDL: tl.constexpr = 0,
):  # fmt: skip
    # CVT_MODE (GEMV_CVT) only keys the autotuner; ALU_CVT: the ALU int8 -> fp32 (``_i8_to_f32``)
    # (configs timed by _utils.tune_bench since session 15; Triton's disk cache of autotune picks
    # is keyed on this source, so the note also drops picks made with Triton's memset timing)
    pdl_start(PDL)
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn[:, None] < N
    acc_t: tl.constexpr = tl.int32 if INT_ACC else tl.float32
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=acc_t)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + rk < K
        w = tl.load(w_ptr + rn[:, None] * K + (k0 + rk)[None, :], mask=n_ok & k_ok[None, :], other=0)
        x = tl.load(x_ptr + m * stride_xm + k0 + rk, mask=k_ok, other=0)
        if FP8:
            w = w.to(tl.float8e4nv, bitcast=True)
            x = x.to(tl.float8e4nv, bitcast=True)
        if ALU_CVT:
            acc += _i8_to_f32(w) * x.to(acc_t)[None, :]
        else:
            acc += w.to(acc_t) * x.to(acc_t)[None, :]
    y = tl.sum(acc, axis=1).to(tl.float32)
    ws = tl.load(ws_ptr + rn, mask=rn < N, other=0).to(tl.float32)
    if A_SCALED:
        y = _rescale(y, ws, tl.load(xs_ptr + m))
    else:
        y = y * ws
    tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


def _prune(configs_, named_args, **kwargs):
    """BLOCK_M by M bucket; splits only for M <= 128, >= 2 K tiles per split and a
    workspace of at most MAX_WORKSPACE bytes; swapped tiles only for W8A16 as SWAP_MODE
    says (``GEMM_SWAP``), from M bucket 64 and with BLOCK_M <= the bucket."""
    a = {**named_args, **kwargs}
    mb, k, n = a["m_bucket"], a["K"], a["N"]
    swap_mode = _SWAP_MODES["off"] if a.get("A_SCALED") else a.get("SWAP_MODE", _SWAP_MODES["off"])
    out = []
    for c in configs_:
        bm, bk, split = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.kwargs.get("SPLIT_K", 1)
        if split > 1 and (mb > 128 or k // (split * bk) < 2 or split * mb * n * 4 > MAX_WORKSPACE):
            continue
        if c.kwargs.get("SWAP", False):
            if swap_mode != _SWAP_MODES["off"] and mb >= 64 and bm <= mb:
                out.append(c)
        elif swap_mode == _SWAP_MODES["on"] and mb >= 64:
            continue
        elif bm <= max(16, mb) if mb <= 64 else bm >= 64:
            out.append(c)
    return out or [c for c in configs_ if c.kwargs.get("SPLIT_K", 1) == 1 and not c.kwargs.get("SWAP")][:1]


def _gemm_configs():
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, splits); small M wants split-K so that
    ~2 waves of programs stream the weight (4096 x 4096 at M = 128 is 32-128 tiles)."""
    tiles = [
        (16, 64, 128, 4, 4, (1, 2, 4, 8)),
        (16, 128, 128, 4, 4, (1, 4, 8)),
        (16, 64, 256, 4, 3, (1, 4)),
        (32, 64, 128, 4, 4, (1, 2, 4)),
        (32, 128, 128, 4, 3, (1, 4)),
        (64, 64, 128, 4, 3, (1, 2, 4)),
        (64, 128, 128, 4, 3, (1, 2, 4)),
        (128, 128, 64, 8, 4, (1, 2)),
        (128, 128, 128, 8, 3, (1, 2)),
        (128, 256, 64, 8, 3, (1,)),
        (128, 256, 128, 8, 3, (1,)),
        (256, 128, 128, 8, 3, (1,)),
        (64, 256, 128, 4, 3, (1,)),
        (128, 256, 128, 8, 4, (1,)),
        (256, 128, 128, 8, 4, (1,)),
        (128, 128, 256, 8, 3, (1,)),
    ]
    # swapped (W8A16, GEMM_SWAP): BLOCK_N is the wgmma M (64 per warpgroup), BLOCK_M its N.
    # Kept: the tiles whose wgmmas ptxas does not serialize on Triton 3.6
    # (bench/offline_sass.py --kernel w8: every split > 1 and BLOCK_K 128 from BLOCK_N 128 are)
    swapped = [
        (64, 64, 128, 4, 4, (1,)),
        (64, 64, 64, 4, 4, (1,)),
        (64, 128, 64, 8, 4, (1,)),
        (128, 128, 64, 8, 4, (1,)),
        (256, 128, 64, 8, 3, (1,)),
    ]
    return [
        cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SPLIT_K=sp, SWAP=swap, num_warps=w, num_stages=st)
        for group, swap in ((tiles, False), (swapped, True))
        for bm, bn, bk, w, st, splits in group
        for sp in splits
    ]


_GEMM_CONFIGS = _gemm_configs()


@triton.autotune(
    configs=configs(_GEMM_CONFIGS, cfg(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)),
    key=["m_bucket", "N", "K", "A_SCALED", "SWAP_MODE"],
    **TUNE_CACHE,
    prune_configs_by={"early_config_prune": _prune},
    do_bench=tune_bench,
)
@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, ws_ptr, xs_ptr, y_ptr, part_ptr, cnt_ptr,
    M, N, K, m_bucket,
    stride_xm, stride_ym, SWAP_MODE,
    A_SCALED: tl.constexpr, INT_ACC: tl.constexpr, FP8: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP: tl.constexpr, PDL: tl.constexpr = 0,
):  # fmt: skip
    pdl_start(PDL)
    # SWAP (W8A16 only): acc is the tile of y.T = w @ x.T, the converted weight tile the
    # dot's register A operand and x.T (k-major) its B; SWAP_MODE only keys the autotuner.
    # (configs timed by _utils.tune_bench since session 15: see _gemv_kernel)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm[:, None] < M
    n_ok = rn[:, None] < N
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn[:, None] * K + rk[None, :]
    acc_t: tl.constexpr = tl.int32 if (INT_ACC and not DOT_F32) else tl.float32
    if SWAP:
        xt_ptrs = x_ptr + rm[None, :] * stride_xm + rk[:, None]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=acc_t)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_t)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        k_ok = (k0 + rk)[None, :] < K
        if SWAP:
            w = tl.load(w_ptrs + k0, mask=n_ok & k_ok, other=0)
            xt = tl.load(xt_ptrs + k0, mask=(rm[None, :] < M) & ((k0 + rk)[:, None] < K), other=0)
            if not DOT_F32:  # (the interpreter turns int8 -> bf16 -> fp32 into NaN; dot_acc widens)
                w = w.to(xt.dtype)
            acc = dot_acc(w, xt, acc, DOT_F32)
        elif FP8 and not DOT_F32:  # GPU: load as e4m3 so both wgmma operands come from shared memory
            # (a register bitcast of the bytes made Triton store them back there every K step:
            # 2-16 STS per iteration, offline SASS on 3.6; M=64 1.49x vs 1.24x and 1.33x vs 1.23x
            # of bf16 on H100, bench/results/h100-kernels-s8-fp8-loads.md; the interpreter
            # cannot load fp8, so it keeps the bytes and the bitcast below)
            x = tl.load(x_ptrs.to(tl.pointer_type(tl.float8e4nv)) + k0, mask=m_ok & k_ok, other=0.0)
            w = tl.load(w_ptrs.to(tl.pointer_type(tl.float8e4nv)) + k0, mask=n_ok & k_ok, other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=acc_t)
        else:
            x = tl.load(x_ptrs + k0, mask=m_ok & k_ok, other=0)
            w = tl.load(w_ptrs + k0, mask=n_ok & k_ok, other=0)
            if FP8:
                x = x.to(tl.float8e4nv, bitcast=True)
                w = w.to(tl.float8e4nv, bitcast=True)
            if A_SCALED and not DOT_F32:
                acc = tl.dot(x, tl.trans(w), acc, out_dtype=acc_t)
            else:
                if not DOT_F32:
                    w = w.to(x.dtype)
                acc = dot_acc(x, tl.trans(w), acc, DOT_F32)
    pdl_trigger(PDL, 3)
    if SWAP:  # rows of the tile are columns of y (not tl.trans(acc), see int4._gemm_kernel)
        mask = (rn[:, None] < N) & (rm[None, :] < M)
        offs = rn[:, None] + rm[None, :] * N
    else:
        mask = m_ok & (rn[None, :] < N)
        offs = rm[:, None] * N + rn[None, :]
    if SPLIT_K > 1:  # raw sums (int32 for W8A8: exact); only the split that finishes the tile stores it
        acc, last = split_k_reduce(acc, part_ptr, cnt_ptr + pid, pid_k, offs, mask, M * N, SPLIT_K)
        if last == 0:  # another split finishes this tile
            return
    if SWAP:
        y = acc.to(tl.float32) * tl.load(ws_ptr + rn, mask=rn < N, other=0).to(tl.float32)[:, None]
        tl.store(y_ptr + rn[:, None] + rm[None, :] * stride_ym, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        ws = tl.load(ws_ptr + rn, mask=rn < N, other=0).to(tl.float32)[None, :]
        if A_SCALED:
            y = _rescale(acc.to(tl.float32), ws, tl.load(xs_ptr + rm, mask=rm < M, other=0)[:, None])
        else:
            y = acc.to(tl.float32) * ws
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_tma_kernel(
    x_desc, w_desc, ws_ptr, xs_ptr, y_ptr,
    M, N, K, stride_ym,
    INT_ACC: tl.constexpr, DOT_F32: tl.constexpr, NUM_PROGS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """W8A8 for large M: NUM_PROGS persistent programs walk the output tiles (grouped along
    M for L2 reuse); x and w tiles arrive by TMA (zero-filled past M, N, K) and feed wgmma
    from shared memory. int8 accumulates in exact int32, fp8 as Triton does on sm_90 (each
    wgmma in the tensor core's reduced precision; exact promotion cost 25-35%,
    bench/KERNEL_NOTES.md)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    acc_t: tl.constexpr = tl.int32 if (INT_ACC and not DOT_F32) else tl.float32
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGS, flatten=True):
        pid_m, pid_n = grouped_tile(tile, num_m, num_n, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_t)
        for ki in range(k_tiles):
            x = x_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            if DOT_F32:
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
            else:
                acc = tl.dot(x, tl.trans(w), acc, out_dtype=acc_t)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ws = tl.load(ws_ptr + rn, mask=rn < N, other=0).to(tl.float32)[None, :]
        y = _rescale(acc.to(tl.float32), ws, tl.load(xs_ptr + rm, mask=rm < M, other=0)[:, None])
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, w_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """w_hat [N, K] = q * s[:, None] in w's dtype."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    q = tl.load(q_ptr + rn[:, None] * K + rk[None, :], mask=mask, other=0)
    s = tl.load(s_ptr + rn, mask=rn < N, other=0).to(tl.float32)
    tl.store(
        w_ptr + rn[:, None] * K + rk[None, :], (q.to(tl.float32) * s[:, None]).to(w_ptr.dtype.element_ty), mask=mask
    )


def tma_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """Tile and launch shape of ``_gemm_tma_kernel``: 128x256 tiles once they fill every SM,
    else 128x128 (bench/results/h100-w8-large-m.md)."""
    if INTERPRET:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
    if triton.cdiv(m, 128) * triton.cdiv(n, 256) >= num_sms(device):
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)


def use_tma(x: torch.Tensor, w: torch.Tensor) -> bool:
    """W8A8 in TMA_DTYPES with M >= TMA_MIN_M on sm_90+ (or the interpreter) and TMA-legal strides."""
    m, k = x.shape
    if (
        w.dtype not in TMA_DTYPES
        or m < TMA_MIN_M
        or k == 0
        or w.shape[0] == 0
        or k % 16
        or x.data_ptr() % 16
        or w.data_ptr() % 16
    ):
        return False
    return INTERPRET or is_sm90_or_newer(x.device)


def _tma_mm(x, w, ws, xs, out_dtype: torch.dtype) -> torch.Tensor:
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = x.shape
    n = w.shape[0]
    c = tma_config(m, n, k, x.device)
    bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    y = torch.empty(m, n, device=x.device, dtype=out_dtype)
    progs = min(num_sms(x.device), triton.cdiv(m, bm) * triton.cdiv(n, bn))
    _gemm_tma_kernel[(progs,)](
        TensorDescriptor(x, [m, k], [k, 1], [bm, bk]), TensorDescriptor(w, [n, k], [k, 1], [bn, bk]),
        ws, xs, y, m, n, k, y.stride(0), INT_ACC=x.dtype == torch.int8, DOT_F32=INTERPRET, NUM_PROGS=progs, **c,
    )  # fmt: skip
    return y


def _split_k(m: int, n: int, k: int, sms: int) -> int:
    """The split for the fixed config (autotuning off): ~2 waves of programs at small M."""
    if m > 64:
        return 1
    tiles = triton.cdiv(n, 64)
    split = 1
    while tiles * split < 2 * sms and k // (split * 256) >= 2:
        split *= 2
    while split > 1 and split * m * n * 4 > MAX_WORKSPACE:
        split //= 2
    return split


@functools.lru_cache(maxsize=1024)
def _max_split(mb: int, n: int, k: int, a_scaled: bool, swap_mode: int) -> int:
    """The largest SPLIT_K among the configs the autotuner may try for this call."""
    space = _prune(_GEMM_CONFIGS, dict(m_bucket=mb, K=k, N=n, A_SCALED=a_scaled, SWAP_MODE=swap_mode))
    return max(c.kwargs["SPLIT_K"] for c in space)


def _plan_key(x, w, ws) -> tuple:
    """W8A16's launch-plan key (``_utils.LaunchPlan``): the arguments and every switch the
    branches of ``w8_mm`` read (in fixed-config mode the split too, a per-call choice)."""
    m, k = x.shape
    split = 0 if AUTOTUNE else _split_k(m, w.shape[0], k, num_sms(x.device))
    return plan_key(x, (w, ws), GEMV_MAX_M, DEQUANT_MIN_M, GEMV_CVT, GEMM_SWAP, GEMM_PDL, split)


def _dequantizes(x) -> bool:
    """W8A16 takes the dequantize path for this CUDA x (see the module doc)."""
    return x.shape[0] >= DEQUANT_MIN_M and x.dtype != torch.float32


def w8a16_lane(x, w, ws):
    """W8A16 (``int8.int8_mm``) through a kept plan for these arguments, or None (``_utils.launcher``)."""
    if x.dim() != 2 or w.dim() != 2:  # (the key reads both shapes: bad ones get the checks' messages)
        return None
    if _dequantizes(x):
        return dequant_lane(_PLANS, x, w.shape[0], dequant_key(x, (w, ws), DEQUANT_ROWS))
    plan = _PLANS.get(_plan_key(x, w, ws))
    return None if plan is None else plan.run(x, w.shape[0], w.shape[0])


def w8_mm(x, w, ws, xs, out_dtype: torch.dtype, record: list | None = None) -> torch.Tensor:
    """``(x @ w.T) * ws (* xs[:, None])`` -> [M, N] out_dtype; xs is None for W8A16. ``record``
    (W8A8): a list the GEMV / GEMM launch is appended to (``_utils.launch``); nothing for the TMA GEMM."""
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or ws.shape != (n,):
        raise ValueError(f"8-bit mm: x {tuple(x.shape)}, weight {tuple(w.shape)}, scale {tuple(ws.shape)}")
    if m == 0:
        return torch.empty(0, n, device=x.device, dtype=out_dtype)
    x, w, ws = x.contiguous(), w.contiguous(), ws.contiguous()
    a_scaled = xs is not None
    # W8A16 (out_dtype is x's): a kept launch plan for these arguments (``w8a16_lane`` finds it
    # before the launcher's checks; here for keyword calls)
    key = _plan_key(x, w, ws) if _utils.PLANS and x.is_cuda and not a_scaled and out_dtype == x.dtype else None
    plan = _PLANS.get(key) if key is not None else None
    if plan is not None:
        return plan.run(x, n, n)
    if a_scaled and use_tma(x, w):
        return _tma_mm(x, w, ws, xs, out_dtype)
    fp8 = w.dtype == FP8_DTYPE
    if fp8:  # fp8 travels as bytes: masked loads need a zero ``other``, which fp8 types refuse
        x, w = x.view(torch.uint8), w.view(torch.uint8)
    xs_arg = xs if a_scaled else ws
    int_acc = x.dtype == torch.int8
    mb = m_bucket(m)
    if not a_scaled and (x.is_cuda or INTERPRET) and _dequantizes(x):

        def fill(n0, r, buf):
            grid, args = (triton.cdiv(r, 16), triton.cdiv(k, 256)), (w[n0:], ws[n0:], buf, r, k)
            kw = dict(BLOCK_N=16, BLOCK_K=256)
            return _dequant_kernel, grid, args, kw, _dequant_kernel[grid](*args, **kw)

        key = dequant_key(x, (w, ws), DEQUANT_ROWS) if key is not None else None  # (eagerly: a plan, for the lane)
        return planned_dequant_mm(_PLANS, key, x, n, DEQUANT_ROWS, fill)
    if m <= GEMV_MAX_M:
        y = torch.empty(m, n, device=x.device, dtype=out_dtype)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m)  # noqa: E731
        args = (x, w, ws, xs_arg, y, m, n, k, mb, _CVT_MODES[GEMV_CVT], x.stride(0), y.stride(0))
        kw = dict(A_SCALED=a_scaled, INT_ACC=int_acc, FP8=fp8, **pdl_args(x.device))
        launch(_gemv_kernel, grid, args, kw, _PLANS, key, record)
        return y
    if AUTOTUNE:  # the split is tuned with the tile: room for the largest split it may pick
        fixed = {}
        most = _max_split(mb, n, k, a_scaled, _SWAP_MODES[GEMM_SWAP])
    else:  # one fixed config: the split from the heuristic, swapped (W8A16) when forced
        fixed = {"SPLIT_K": _split_k(m, n, k, num_sms(x.device)), "SWAP": GEMM_SWAP == "on" and not a_scaled}
        most = fixed["SPLIT_K"]
    y = torch.empty(m, n, device=x.device, dtype=out_dtype)
    part, cnt = split_k_buffers(x.device, m, n, most)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    args = (x, w, ws, xs_arg, y, part, cnt, m, n, k, mb, x.stride(0), y.stride(0), _SWAP_MODES[GEMM_SWAP])
    kw = dict(A_SCALED=a_scaled, INT_ACC=int_acc, FP8=fp8, DOT_F32=INTERPRET, **fixed, **pdl_args(x.device, GEMM_PDL))
    launch(_gemm_kernel, grid, args, kw, _PLANS, key, record, most=most)
    if record is not None:
        record.append(most)
    return y


# eager launch plans of W8A16's GEMV and GEMM (``_utils.LaunchPlan``), by ``_plan_key``
_PLANS: dict = {}


# ----------------------------------------------------------------------------- W8A8 eager plans
def dyn_key(x, w, ws, *switches) -> tuple | None:
    """The key of a W8A8 / fp8 launcher's eager plan (``DynPlan``): the arguments and every switch
    the row quantizer and ``w8_mm`` read (the fp8 launcher adds its own); None where no plan is
    made (plans off, not a plain CUDA x, a non-contiguous argument: its copy would be bound)."""
    if not (_utils.PLANS and x.is_cuda and x.dim() == 2 and w.dim() == 2 and ws.dim() == 1):
        return None
    if not (x.is_contiguous() and w.is_contiguous() and ws.is_contiguous()):
        return None
    from lowbit.ops.triton import quant

    split = 0 if AUTOTUNE else _split_k(x.shape[0], w.shape[0], x.shape[1], num_sms(x.device))
    return plan_key(x, (w, ws), GEMV_MAX_M, GEMV_CVT, GEMM_SWAP, GEMM_PDL, TMA_MIN_M, TMA_DTYPES,
                    quant.ONE_PASS_MAX_K, split, *switches)  # fmt: skip


class DynPlan:
    """A W8A8 / fp8 eager linear's launches bound once (``_utils.Bound``): the row quantizer (x, xq,
    xs live), then the GEMV or the GEMM (xq, xs, y and the split-K buffers live), or ``product(xq,
    w, ws, xs, dtype)`` run live (fp8's ``torch._scaled_mm``). Without it an eager call pays
    Triton's launch path twice (117-250 us of host time per linear on the H100 host in session 25;
    43.5-72.5 with plans, session 29).
    ``run(x, w, ws)``: the output, from the weight the key pinned."""

    __slots__ = ("quant", "mm", "most", "qdtype", "product")
    # the live arguments' positions: quant._kernel's x, xq, xs; _gemv_kernel's / _gemm_kernel's x
    # (xq), xs, y (and the GEMM's split-K workspace and counters)
    QUANT_LIVE, GEMV_LIVE, GEMM_LIVE = (0, 1, 2), (0, 3, 4), (0, 3, 4, 5, 6)

    def __init__(self, record: list, qdtype: torch.dtype, product=None):
        self.quant, self.qdtype, self.product = _utils.Bound(record[0], self.QUANT_LIVE), qdtype, product
        self.most = record[2] if len(record) > 2 else 0
        self.mm = None if product else _utils.Bound(record[1], self.GEMM_LIVE if self.most else self.GEMV_LIVE)

    def run(self, x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        m, k = x.shape
        n = w.shape[0]
        xq = torch.empty(m, k, device=x.device, dtype=self.qdtype)
        xs = torch.empty(m, device=x.device, dtype=torch.float32)
        stream = _utils.current_raw_stream(x.get_device())
        self.quant(x.data_ptr(), xq.data_ptr(), xs.data_ptr(), stream=stream)
        if self.product is not None:
            return self.product(xq, w, ws, xs, x.dtype)
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
        if self.most:
            part, cnt = split_k_buffers(x.device, m, n, self.most, stream)
            self.mm(xq.data_ptr(), xs.data_ptr(), y.data_ptr(), part.data_ptr(), cnt.data_ptr(), stream=stream)
        else:
            self.mm(xq.data_ptr(), xs.data_ptr(), y.data_ptr(), stream=stream)
        return y


def keep_dyn_plan(plans: dict, key, record, x, w, ws, y, qdtype, product=None) -> None:
    """After a W8A8 / fp8 launcher computed ``y`` with ``record``ed launches: keep a ``DynPlan`` for
    ``key`` (not inside a capture, nor where the product was not recorded: the TMA GEMM). While
    plans are new it runs once more and must give ``y`` bitwise, else plans turn off."""
    if key is None or not _utils.PLANS or torch.cuda.is_current_stream_capturing():
        return
    if not record or (product is None and len(record) < 2):
        return
    plan = DynPlan(record, qdtype, product)
    kind = "dyn-product" if product else "dyn-gemm" if plan.most else "dyn-gemv"
    if _utils.checking(kind):
        xq, xs = record[0][2][1:3]  # (the recorded activations poisoned: a plan that read them would differ)
        xq.view(torch.uint8).fill_(0x7F)
        xs.fill_(float("nan"))
        if not _utils.same_bits(y, plan.run(x, w, ws), kind):
            return
    _utils.keep(plans, key, plan)


_DYN_PLANS: dict = {}  # W8A8 / fp8 eager plans (``DynPlan``), by ``dyn_key``


def dyn_lane(x, w, ws, key) -> torch.Tensor | None:
    """A W8A8 / fp8 launcher's lane: its call through the ``DynPlan`` kept for ``key``, or None."""
    plan = _DYN_PLANS.get(key)
    return None if plan is None else plan.run(x, w, ws)


def dyn_mm(x, w, ws, qdtype: torch.dtype, key, product=None) -> torch.Tensor:
    """A W8A8 / fp8 launcher's body (x with rows): x's rows quantized to qdtype, then ``product(xq,
    w, ws, xs, dtype)`` if given, else ``w8_mm``; through the plan kept for ``key`` (a keyword call:
    the lane did not look), else with the launches recorded and kept as one (``key`` None: no plan)."""
    from lowbit.ops.triton.quant import quantize_rows

    plan = _DYN_PLANS.get(key) if key is not None else None
    if plan is not None:
        return plan.run(x, w, ws)
    record = [] if key is not None else None
    xq, xs = quantize_rows(x, qdtype, record)
    y = product(xq, w, ws, xs, x.dtype) if product else w8_mm(xq, w, ws, xs, x.dtype, record)
    keep_dyn_plan(_DYN_PLANS, key, record, x, w, ws, y, qdtype, product)
    return y
