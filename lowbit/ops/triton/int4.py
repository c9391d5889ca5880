"""W4A16: ``y = x @ w_hat.T`` for a group-wise asymmetric int4 weight (Triton).

Shapes and math (the spec is ``lowbit.ops.reference.int4_linear``)::

    x      [M, K]              bf16 / fp16 / fp32 activations
    qdata  [N, K // 2] uint8   two codes per byte, in one of three byte orders (``packing``):
                               "plain": q[n, 2j] in the low nibble of qdata[n, j], q[n, 2j+1] high
                               "tiled": "plain" bytes, each 16-row x 128-k tile one 1 KB run
                               (``reference.int4_tiled_pack``; the default for CUDA weights of whole tiles)
                               "mma": ``reference.int4_mma_pack`` (opt-in for CUDA weights)
    scale  [N, K // gs]        weight dtype; zero likewise
    w_hat[n, k] = (q[n, k] - 8) * scale[n, k // gs] + zero[n, k // gs]     (fp32, cast to x.dtype)
    y      [M, N] = x @ w_hat.T   accumulated in fp32, returned in x.dtype

Two paths, picked by M:

* ``_gemm_kernel`` (M < DEQUANT_MIN_M, and fp32 x with "plain" or "tiled" codes at any M):
  tensor-core GEMM; the weight tile is unpacked and dequantized in registers inside
  the main loop. On the GPU (bf16 / fp16 activations with qparams of the same dtype)
  inline PTX turns 4 code bytes into 8 weights (prmt + lop3 with a magic exponent,
  then two packed fma: about 2 instructions per weight, single rounding of
  ``(q - 8) * s + z`` to x.dtype); elsewhere the reference's fp32 formula.
  For M <= 8 its autotune space also holds GEMV configs (``GEMV`` warps), which run
  ``_int4_gemv.gemv_tile`` instead: the weight as the A operand of mma.sync in inline
  PTX, no shared memory (PTX path, "plain" or "tiled" codes; emulated on the interpreter).
  "mma" codes, M bucket < 64, i.e. M <= 32 (``_dequant_words``): each int32 word
  unpacks into exactly the bf16x2 registers one thread feeds to the m16n8k16 mma, in
  k order, so one full-depth dot takes x straight from ldmatrix (Triton >= 3.8,
  offline SASS, 16x64x128 tile: 213 instructions per main-loop iteration against 248,
  64 registers against 95; Triton 3.6 / 3.7 stage the tile through shared memory and
  are slower than "plain").
  "plain" codes (``_dequant_tile``): even k live in the low nibbles, so x is split
  into even/odd columns and two half-depth dots run. "mma" codes from M bucket 64
  (M >= 33; wgmma tiles) take this byte path too, with x's columns reordered once per call
  (``_pair_order``) so that byte j's nibbles meet their k. "tiled" codes are the same bytes,
  each K tile (BLOCK_K <= 128) read from its row's 64-byte piece of the tile's run.
  Scale and zero (16-bit, an even number of groups) are read as int32 words of two groups
  (``SZ_WORDS``); tiles with BLOCK_K == group size then run two K tiles per loop iteration,
  each taking a fixed half of the word. Otherwise one 2-byte value per tile.
  For small M the K loop can be split across programs: each split stores its fp32
  partial sums into its own slice of a workspace and counts itself in on a per-tile
  counter; the last split of a tile adds the slices in a fixed order and stores y
  (one launch, deterministic). The split is autotuned with the tile.
* ``_dequant_kernel`` + cuBLAS (M >= DEQUANT_MIN_M, CUDA, bf16/fp16; and fp32 x
  with "mma" codes at any M): w_hat is written DEQUANT_ROWS rows at a time into one
  buffer and each chunk runs as a plain GEMM into its columns of y.

Numerics: the reference rounds the fp32 ``(q - 8) * s + z`` to x.dtype; the PTX
path rounds the exact value once (fma), so a weight can differ by one ulp of
x.dtype where the fp32 result sat exactly on a rounding midpoint.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from lowbit.compile import kernel_op, linear_out_fake
from lowbit.ops.reference import INT4_GROUP_SIZES
from lowbit.ops.triton import _utils
from lowbit.ops.triton._int4_gemv import GEMV_CONFIGS, check_int4_args, gemv_tile
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
    launch,
    launcher,
    m_bucket,
    num_sms,
    pdl_args,
    pdl_start,
    pdl_trigger,
    plan_key,
    planned_dequant_mm,
    round_to,
    split_k_buffers,
    split_k_reduce,
    tune_bench,
)

# From this M on the weight is dequantized to x.dtype once per call and cuBLAS runs
# the GEMM: 4 extra bytes per weight cost less than Triton's in-loop dequant loses
# to cuBLAS at these sizes (bench/KERNEL_NOTES.md). M bucket 256 (M = 129..256) stays on the
# GEMM: at M=256 it beat dequantize + cuBLAS on 4096 x 14336 and 14336 x 4096 in three H100
# runs (0.54-0.65x vs 0.43x, 0.53-0.58x vs 0.51-0.56x of bf16) and lost 2-6% on 4096^2; from
# M=320 (bucket 512 tiles) it loses on every shape (bench/results/h100-kernels-s13-mid-m.md).
DEQUANT_MIN_M = 257
# The dequantize path works on this many weight rows at a time: a smaller buffer than
# the whole w_hat, and 3-4% faster at M=2048 on N=14336 (H100, bench/int4_explore.py
# --variants chunked: 0.915x vs 0.88x of bf16).
DEQUANT_ROWS = 4096
# "Swapped" GEMM tiles compute y.T = w_hat @ x.T, so the dequantized weight tile is the MMA's
# A operand and stays in registers (Hopper wgmma takes A from registers, B only from shared
# memory); the plain tiles rebuild it in shared memory every K step as the B operand.
# Offline SASS (Triton 3.6, sm_90, 128 x 256 x 64 tile): HGMMA.64x256x16 with A in
# registers, no shared-memory store in the main loop, 231 instructions per K step.
# "tuned" (default): the autotuner chooses among plain and swapped tiles from M bucket 64;
# "on": swapped only; "off": plain only. H100 (bench/results/h100-kernels-s8*.md): swapped
# alone win at 14336 x 4096 M=64 (1.08x vs 0.85x of bf16) and lose elsewhere (4096 x 14336
# M=64 0.97x vs 1.28x); "tuned" takes the better per shape. At M=2048 they beat the plain
# fused tiles but not dequantize + cuBLAS (0.55-0.59x vs 0.87-0.90x).
GEMM_SWAP = "tuned"
_SWAP_MODES = {"off": 0, "tuned": 1, "on": 2}
# Programmatic dependent launch for the GEMM (``_utils.pdl_start``): 0 plain launches; 1 wait,
# then let the next kernel launch at once (as the 8-bit kernels do); 2 (shipped) wait, and the
# next kernel launches as this one's CTAs exit; 3 wait, trigger after the main loop. H100, two
# runs, same tuned configs (bench/results/h100-kernels-s11-int4-pdl.md): mode 1 loses 23-29% on
# 4096^2 M=1/8 and 14336 x 4096 M=8 in both; modes 2 and 3 gain ~1.5-2% on the M <= 8 rows
# (mode 2 >= mode 0 on 11 of 12, mode 3 more spread, -8% once), within the run-to-run noise of
# one row (~5%); the Llama-3-8B decode step moved 199.3 -> 200.8 tok/s.
GEMM_PDL = 2
# The GEMM reads 16-bit scale and zero as int32 words (two groups per word, ``qparam_words``)
# and, with BLOCK_K == group size, runs two K tiles per main-loop iteration so that each tile
# takes a fixed half of the word. Triton's cp.async pipeline carries 4-byte loads with the codes
# but not 2-byte ones, which every iteration then waited on (offline SASS, Triton 3.6: the LDGs'
# results used in the same iteration). A half chosen by the loop variable put the dequantized
# tile through shared memory (offline SASS), hence the pairs. H100, same run
# (bench/results/h100-kernels-s12-int4-words.md): M=1 1.59 / 1.81 / 1.85 -> 1.96 / 2.23 / 2.56x of
# bf16 (4096^2 / 4096 x 14336 / 14336 x 4096; torchao 1.93 / 2.17 / 2.28), M=32 1.13 / 1.54 /
# 1.24 -> 1.35 / 1.83 / 1.87. False: 2-byte loads (A/B runs; odd G and fp32 qparams take them too).
SZ_WORDS = True
# M bucket <= GEMV_MAX_M (M <= 8): the autotuner also tries ``_int4_gemv.gemv_tile`` (mma.sync in
# inline PTX, the weight as the A operand, no shared memory), bf16 / fp16 x with "plain" codes and
# qparams of x's dtype. 0 turns it off (an explore switch of bench/kernels.py; LOWBIT_INT4_GEMV=0
# for a whole process, e.g. an end-to-end A/B).
GEMV_MAX_M = 8 if os.environ.get("LOWBIT_INT4_GEMV", "1") != "0" else 0


# ----------------------------------------------------------------------------- dequant (PTX)
def _unpack_ptx(magic: str, one: str, neg: str, ty: str) -> str:
    """PTX for 4 code bytes ($4) -> lo ($0, $1) and hi ($2, $3) weights, 2 per register.

    prmt spreads bytes 0,1 (2,3) into the two 16-bit lanes; lop3 keeps one nibble per
    lane and ORs in ``magic`` (bf16 0x4300 = 128, fp16 0x6400 = 1024), giving
    magic + q exactly; fma(v, 1, ``neg``) gives q - 8 exactly and fma(q - 8, s, z)
    the weight, rounded once. s is $5, $6 and z is $7, $8 (lanes match the bytes).
    """
    lanes = "\n".join(
        f"lop3.b32 v{i}, {src}, 0x000F000F, {magic}, 0xEA; fma.rn.{ty} v{i}, v{i}, one, c;"
        for i, src in enumerate(("t0", "t1", "h0", "h1"))
    )
    return f"""{{
    .reg .b32 t0, t1, h0, h1, v0, v1, v2, v3, zr, one, c;
    mov.b32 zr, 0; mov.b32 one, {one}; mov.b32 c, {neg};
    prmt.b32 t0, $4, zr, 0x4140; prmt.b32 t1, $4, zr, 0x4342;
    shr.u32 h0, t0, 4; shr.u32 h1, t1, 4;
    {lanes}
    fma.rn.{ty} $0, v0, $5, $7; fma.rn.{ty} $1, v1, $6, $8;
    fma.rn.{ty} $2, v2, $5, $7; fma.rn.{ty} $3, v3, $6, $8;
    }}"""


_PTX_BF16 = tl.constexpr(_unpack_ptx("0x43004300", "0x3F803F80", "0xC308C308", "bf16x2"))  # -136
_PTX_F16 = tl.constexpr(_unpack_ptx("0x64006400", "0x3C003C00", "0xE408E408", "f16x2"))  # -1032
_PTX_REGS = tl.constexpr("=r,=r,=r,=r,r,r,r,r,r")  # 4 outputs; code bytes, s and z


def _unpack_word_ptx(magic: str, one: str, neg: str, ty: str) -> str:
    """PTX for one ``"mma"``-packed 32-bit word ($8) -> its 8 weights ($0..$7, 16-bit each).

    Same arithmetic as ``_unpack_ptx`` (s is $9, z is $10, one value each). Output
    4 c + 2 b + a is the weight at k = 16 c + 8 b + 2 t + a of the word's 32-k run (see
    ``reference.int4_mma_pack``): bytes 0, 1 hold c = 0, bytes 2, 3 c = 1, the low
    nibbles b = 0 and the high ones b = 1, so each bf16x2 result is one mma register.
    """
    lanes = "\n".join(
        f"lop3.b32 v{i}, {src}, 0x000F000F, {magic}, 0xEA; fma.rn.{ty} v{i}, v{i}, one, c;"
        f" fma.rn.{ty} v{i}, v{i}, s2, z2; mov.b32 {{${2 * i}, ${2 * i + 1}}}, v{i};"
        for i, src in enumerate(("t0", "h0", "t1", "h1"))
    )
    return f"""{{
    .reg .b32 t0, t1, h0, h1, v0, v1, v2, v3, zr, one, c, s2, z2;
    mov.b32 zr, 0; mov.b32 one, {one}; mov.b32 c, {neg};
    mov.b32 s2, {{$9, $9}}; mov.b32 z2, {{$10, $10}};
    prmt.b32 t0, $8, zr, 0x4140; prmt.b32 t1, $8, zr, 0x4342;
    shr.u32 h0, t0, 4; shr.u32 h1, t1, 4;
    {lanes}
    }}"""


_PTX_WORD_BF16 = tl.constexpr(_unpack_word_ptx("0x43004300", "0x3F803F80", "0xC308C308", "bf16x2"))
_PTX_WORD_F16 = tl.constexpr(_unpack_word_ptx("0x64006400", "0x3C003C00", "0xE408E408", "f16x2"))
_PTX_WORD_REGS = tl.constexpr("=h,=h,=h,=h,=h,=h,=h,=h,r,h,h")  # 8 weights; code word, s and z


@triton.jit
def _dequant_tile(qb, s, z, dtype: tl.constexpr, ASM: tl.constexpr):
    """qb [R, C] uint8 codes, s / z [R, 1] -> (lo, hi) [R, C] weights in ``dtype``.

    lo[:, j] is k = 2j (low nibble), hi[:, j] is k = 2j + 1. ASM: the PTX unpack
    (GPU, s / z already in ``dtype``); otherwise the reference's fp32 formula.
    """
    if ASM:
        sb = tl.broadcast_to(s, qb.shape)
        zb = tl.broadcast_to(z, qb.shape)
        if dtype == tl.bfloat16:
            lo, hi = tl.inline_asm_elementwise(
                _PTX_BF16, _PTX_REGS, [qb, sb, zb], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4
            )
        else:
            lo, hi = tl.inline_asm_elementwise(
                _PTX_F16, _PTX_REGS, [qb, sb, zb], dtype=(tl.float16, tl.float16), is_pure=True, pack=4
            )
    else:
        sf = s.to(tl.float32)
        zf = z.to(tl.float32)
        lo = (((qb & 15).to(tl.float32) - 8.0) * sf + zf).to(dtype)
        hi = (((qb >> 4).to(tl.float32) - 8.0) * sf + zf).to(dtype)
    return lo, hi


@triton.jit
def _dequant_words(qw, s, z, dtype: tl.constexpr, ASM: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """qw [R, C // 8] int32 words in the ``"mma"`` order, s / z [R, 1] -> [R, C] weights in
    ``dtype``, k in natural order (C % 32 == 0). ASM: the PTX unpack (s / z in ``dtype``)."""
    if ASM:
        sb = tl.broadcast_to(s, qw.shape)
        zb = tl.broadcast_to(z, qw.shape)
        if dtype == tl.bfloat16:
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                _PTX_WORD_BF16, _PTX_WORD_REGS, [qw, sb, zb], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1
            )
        else:
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                _PTX_WORD_F16, _PTX_WORD_REGS, [qw, sb, zb], dtype=(tl.float16,) * 8, is_pure=True, pack=1
            )
    else:  # the reference's fp32 formula; nibble 4 c + 2 b + a sits at bit 8 (2 c + a) + 4 b
        sf = s.to(tl.float32)
        zf = z.to(tl.float32)
        w0 = ((((qw >> 0) & 15).to(tl.float32) - 8.0) * sf + zf).to(dtype)
        w1 = ((((qw >> 8) & 15).to(tl.float32) - 8.0) * sf + zf).to(dtype)
        w2 = ((((qw >> 4) & 15).to(tl.float32) - 8.0) * sf + zf).to(dtype)
        w3 = ((((qw >> 12) & 15).to(tl.float32) - 8.0) * sf + zf).to(dtype)
        w4 = ((((qw >> 16) & 15).to(tl.float32) - 8.0) * sf + zf).to(dtype)
        w5 = ((((qw >> 24) & 15).to(tl.float32) - 8.0) * sf + zf).to(dtype)
        w6 = ((((qw >> 20) & 15).to(tl.float32) - 8.0) * sf + zf).to(dtype)
        w7 = ((((qw >> 28) & 15).to(tl.float32) - 8.0) * sf + zf).to(dtype)
    # output 4 c + 2 b + a of word (ch, t) is k = 32 ch + 16 c + 8 b + 2 t + a; the joins and
    # the permute only rename registers on Triton >= 3.8 (3.6 / 3.7 go through shared memory)
    c0 = tl.join(tl.join(w0, w1), tl.join(w2, w3))  # [R, C // 8, a, b]
    c1 = tl.join(tl.join(w4, w5), tl.join(w6, w7))
    w = tl.reshape(tl.join(c0, c1), [R, C // 32, 4, 2, 2, 2])  # r, ch, t, a, b, c
    return tl.reshape(tl.permute(w, [0, 1, 5, 4, 2, 3]), [R, C])


# ----------------------------------------------------------------------------- GEMM
def _prune(configs_, named_args, **kwargs):
    """The configs that fit this call: BLOCK_K is cut to the group size (one scale per
    tile), splits only for M <= 128 with >= 2 K tiles per split and a workspace of at
    most MAX_WORKSPACE bytes, BLOCK_M by M bucket; swapped tiles as SWAP_MODE says
    (``GEMM_SWAP``), from M bucket 64 and with BLOCK_M <= the bucket; GEMV configs for M
    bucket <= min(GEMV_MAX, 8) on the PTX path (or the interpreter) with "plain" or "tiled" codes and
    16-bit x, two 128-k blocks per split at least."""
    a = {**named_args, **kwargs}
    gs, mb, k, n = a["GS"], a["m_bucket"], a["K"], a["N"]
    swap_mode = a.get("SWAP_MODE", _SWAP_MODES["off"])
    out, seen = [], set()
    # the GEMV tile: M <= 8, the PTX path (or its emulation on the interpreter), not "mma" codes
    # (the tile computes 8 tokens: never above 8, whatever GEMV_MAX says)
    gemv_ok = (
        mb <= min(a.get("GEMV_MAX", GEMV_MAX_M), 8) and not a.get("MMA", False) and (a.get("ASM", False) or INTERPRET)
    )
    if "x_ptr" in a:  # (launches; the tests and tools prune without tensors)
        gemv_ok = gemv_ok and a["x_ptr"].dtype in (torch.bfloat16, torch.float16)
    for c in configs_:
        if c.kwargs.get("GEMV", 0):  # (BLOCK_K is nominal: each lane reads 32-k runs of one group)
            split = c.kwargs["SPLIT_K"]
            if gemv_ok and k // (128 * split) >= 2 and split * mb * n * 4 <= MAX_WORKSPACE:
                out.append(triton.Config({**c.kwargs, "BLOCK_K": min(128, gs)}, num_warps=c.num_warps, num_stages=1))
            continue
        meta = {**c.kwargs, "BLOCK_K": min(c.kwargs["BLOCK_K"], gs)}
        bm, bk, split = meta["BLOCK_M"], meta["BLOCK_K"], meta.get("SPLIT_K", 1)
        if split > 1 and (mb > 128 or k // (split * bk) < 2 or split * mb * n * 4 > MAX_WORKSPACE):
            continue
        if meta.get("SWAP", False):
            if swap_mode == _SWAP_MODES["off"] or mb < 64 or bm > mb:
                continue
        elif swap_mode == _SWAP_MODES["on"] and mb >= 64:
            continue
        elif not ((bm <= max(16, mb) and 2 * bm > min(mb, 64)) if mb <= 64 else bm >= 64):
            continue
        # qparam words with BLOCK_K == GS: the kernel's loop body holds two K tiles, so each
        # pipeline stage does too; half the stages (rounded up, at least 2) keep the bytes in
        # flight and the shared memory near the 2-byte configs' (one stage more for odd counts)
        stages = pair_stages(c.num_stages) if a.get("SZ") and bk == gs else c.num_stages
        key = (tuple(sorted(meta.items())), c.num_warps, stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(meta, num_warps=c.num_warps, num_stages=stages))
    if not out:  # unreachable with the list below (every bucket has a split-1 tile); stay valid anyway
        out = [cfg(BLOCK_M=16, BLOCK_N=32, BLOCK_K=min(32, gs), SPLIT_K=1, SWAP=False, num_warps=4, num_stages=2)]
    return out


def pair_stages(num_stages: int) -> int:
    """A config's pipeline stages when its loop body holds two K tiles (qparam words)."""
    return max(2, (num_stages + 1) // 2)


def _gemm_configs():
    """The tiles and splits that won somewhere in bench/int4_explore.py (H100), and no
    more: every config is a separate compile on first use of a shape. Small M wants
    split-K so that ~2 waves of programs stream the weight; the split is tuned with
    the tile. (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, splits)."""
    small = [
        (16, 32, 128, 2, 6, (1, 4)),
        (16, 64, 128, 4, 6, (1, 2, 8)),
        (16, 128, 128, 8, 4, (2, 4, 8)),
        (16, 32, 128, 4, 4, (4,)),
        (32, 64, 128, 4, 6, (1, 4)),
        (32, 128, 128, 8, 4, (1, 8)),
        (64, 32, 128, 4, 8, (1, 2)),
        (64, 64, 128, 4, 8, (1,)),
        (128, 64, 128, 4, 3, (1, 4)),
        (64, 64, 128, 4, 4, (1,)),
        (128, 128, 64, 8, 3, (1,)),
    ]
    large = [(64, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4)]
    # swapped (GEMM_SWAP): BLOCK_N is the wgmma M (64 per warpgroup of 4 warps), BLOCK_M its N.
    # Kept: the tiles whose wgmmas ptxas does not serialize on Triton 3.6
    # (bench/offline_sass.py; 3.9 serializes none of these)
    swapped = [
        (64, 64, 128, 4, 4, (1, 2, 4)),
        (64, 128, 64, 8, 4, (1,)),
        (128, 128, 64, 8, 4, (1,)),
        (128, 64, 128, 4, 4, (1,)),
        (256, 128, 64, 8, 3, (1,)),
    ]
    # GEMV tiles (warps W, splits, blocks per iteration): ``_int4_gemv.GEMV_CONFIGS``
    out = [
        triton.Config(
            dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, SPLIT_K=sp, SWAP=False, GEMV=w, UNROLL=u, ADJ=int(u == 2)),
            num_warps=w,
            num_stages=1,
        )  # fmt: skip
        for w, sp, u in GEMV_CONFIGS
    ]
    for tiles, swap in ((small, False), ([(*t, (1,)) for t in large], False), (swapped, True)):
        for bm, bn, bk, w, st, splits in tiles:
            for split in splits:
                meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, SWAP=swap)
                # no pre_hook anywhere: Triton's autotune disk cache skips kernels whose configs have one
                out.append(triton.Config(meta, num_warps=w, num_stages=st))
    return out


_GEMM_CONFIGS = _gemm_configs()


@triton.jit
def _k_tile(
    acc, k0, s, z, x_ptrs, q_ptrs, m_ok, n_ok,
    ASM: tl.constexpr, DOT_F32: tl.constexpr, MMA: tl.constexpr, SWAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILED: tl.constexpr = 0,
):  # fmt: skip
    """acc + the K tile at k0 (scale s and zero z [BLOCK_N, 1]): the main loop's body. x_ptrs
    points at x [BLOCK_M, BLOCK_K], or at x.T [BLOCK_K, BLOCK_M] for SWAP. TILED: "tiled" codes,
    q_ptrs at each row's bytes in its 16-row tile; the K tile (BLOCK_K <= 128, k0 % BLOCK_K == 0)
    lies in one 128-k block, whose run starts 1 KB per block further."""
    if TILED:
        kb = k0 // 2 + (k0 // 128) * 960
    else:
        kb = k0 // 2
    if SWAP:
        qb = tl.load(q_ptrs + kb, mask=n_ok[:, None], other=0)
        xt = tl.load(x_ptrs + k0, mask=m_ok[None, :], other=0.0)
        lo, hi = _dequant_tile(qb, s, z, xt.dtype, ASM)
        w = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])  # k order: byte j holds k = 2j, 2j + 1
        acc = dot_acc(w, xt, acc, DOT_F32)
    else:  # the plain tiles, as before SWAP existed
        x = tl.load(x_ptrs + k0, mask=m_ok[:, None], other=0.0)
        if MMA:
            qw = tl.load(q_ptrs + k0 // 8, mask=n_ok[:, None], other=0)
            w = _dequant_words(qw, s, z, x.dtype, ASM, BLOCK_N, BLOCK_K)
            acc = dot_acc(x, tl.trans(w), acc, DOT_F32)
        else:
            qb = tl.load(q_ptrs + kb, mask=n_ok[:, None], other=0)
            xe, xo = tl.split(tl.reshape(x, [BLOCK_M, BLOCK_K // 2, 2]))
            lo, hi = _dequant_tile(qb, s, z, x.dtype, ASM)
            acc = dot_acc(xe, tl.trans(lo), acc, DOT_F32)
            acc = dot_acc(xo, tl.trans(hi), acc, DOT_F32)
    return acc


@triton.autotune(
    configs=configs(_GEMM_CONFIGS, cfg(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)),
    # ASM: qparam words hide the qparams' dtype from the key, and a GEMV pick needs the PTX path
    key=["m_bucket", "N", "K", "GS", "MMA", "SWAP_MODE", "SZ", "GEMV_MAX", "ASM", "TILED"],
    **TUNE_CACHE,
    prune_configs_by={"early_config_prune": _prune},
    do_bench=tune_bench,
)
@triton.jit
def _gemm_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, m_bucket,
    stride_xm, stride_ym, stride_q, stride_s, SWAP_MODE,
    GS: tl.constexpr, ASM: tl.constexpr, DOT_F32: tl.constexpr, MMA: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr,
    SZ: tl.constexpr, QDT: tl.constexpr, PDL: tl.constexpr = 0, GEMV: tl.constexpr = 0, UNROLL: tl.constexpr = 1,
    ADJ: tl.constexpr = 0, TILED: tl.constexpr = 0, GEMV_MAX=0,
):  # fmt: skip
    # (GEMM tiles) BLOCK_K divides GS (pruned), and GS divides K: no K masks, one group per tile.
    # SPLIT_K > 1: programs along axis 1 take every SPLIT_K-th K tile (pair of K tiles with SZ
    # and BLOCK_K == GS) and store their fp32 partial sums into ws[pid_k] ([SPLIT_K, M, N]);
    # the last one to finish a tile
    # (an int32 counter per output tile in cnt, zero at launch) reduces them.
    # SWAP (MMA false): y.T = w_hat @ x.T, the nibbles joined back into k order so that one
    # full-depth dot takes the dequantized tile as its register A operand and x.T (loaded
    # k-major, straight into shared memory) as B; SWAP_MODE only keys the autotuner.
    # (configs are timed by _utils.clean_l2_bench since session 14: Triton's disk cache of autotune
    # picks is keyed on this source, so editing it also drops picks made with the older timing)
    pdl_start(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if GEMV:  # M <= 8: GEMV warps (``_int4_gemv``); BLOCK_N is 16, one program along M
        if SZ:  # 16-bit scale / zero, one by one (new names: the GEMM below keeps the words)
            s16, z16, stride_s16 = s_ptr.to(tl.pointer_type(QDT)), z_ptr.to(tl.pointer_type(QDT)), stride_s * 2
        else:
            s16, z16, stride_s16 = s_ptr, z_ptr, stride_s
        gemv_tile(
            x_ptr, q_ptr, s16, z16, y_ptr, ws_ptr, cnt_ptr, pid_n, pid_k, M, N, K, stride_xm, stride_ym, stride_q,
            stride_s16, GS, ASM, SPLIT_K, GEMV, UNROLL, PDL, ADJ, TILED,
        )  # fmt: skip
        return
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    # MMA: "mma" codes read as int32 words, unpacked straight into the mma.sync operand
    # registers in k order (one full-depth dot, x from ldmatrix; the launcher uses it for
    # BLOCK_M < 64). Otherwise bytes: low / high nibbles are two halves of k, x is split
    # the same way and two half-depth dots run.
    if MMA:
        q_ptrs = (
            q_ptr.to(tl.pointer_type(tl.int32)) + rn[:, None] * (stride_q // 4) + tl.arange(0, BLOCK_K // 8)[None, :]
        )
    elif TILED:  # "tiled" codes (byte path): row rn's 64 bytes of each block's 1 KB run
        tl.static_assert(BLOCK_K <= 128)
        q_ptrs = q_ptr + ((rn // 16) * 16 * stride_q + (rn % 16) * 64)[:, None] + tl.arange(0, BLOCK_K // 2)[None, :]
    else:
        q_ptrs = q_ptr + rn[:, None] * stride_q + tl.arange(0, BLOCK_K // 2)[None, :]
    if SWAP:  # acc is the tile of y.T; x.T is loaded k-major
        x_ptrs = x_ptr + rm[None, :] * stride_xm + tl.arange(0, BLOCK_K)[:, None]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        x_ptrs = x_ptr + rm[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SZ and BLOCK_K == GS:  # two K tiles per iteration: one word holds both tiles' qparams
        for k0 in range(pid_k * 2 * BLOCK_K, K, 2 * BLOCK_K * SPLIT_K):
            k0 = tl.multiple_of(k0, 2 * BLOCK_K)  # lets the code loads vectorize
            sw = tl.load(s_ptr + rn * stride_s + k0 // (2 * GS), mask=n_ok, other=0)
            zw = tl.load(z_ptr + rn * stride_s + k0 // (2 * GS), mask=n_ok, other=0)
            s = (sw & 0xFFFF).to(tl.uint16).to(QDT, bitcast=True)[:, None]
            z = (zw & 0xFFFF).to(tl.uint16).to(QDT, bitcast=True)[:, None]
            acc = _k_tile(
                acc, k0, s, z, x_ptrs, q_ptrs, m_ok, n_ok, ASM, DOT_F32, MMA, SWAP, BLOCK_M, BLOCK_N, BLOCK_K, TILED
            )
            s = ((sw >> 16) & 0xFFFF).to(tl.uint16).to(QDT, bitcast=True)[:, None]
            z = ((zw >> 16) & 0xFFFF).to(tl.uint16).to(QDT, bitcast=True)[:, None]
            acc = _k_tile(
                acc, k0 + BLOCK_K, s, z, x_ptrs, q_ptrs, m_ok, n_ok,
                ASM, DOT_F32, MMA, SWAP, BLOCK_M, BLOCK_N, BLOCK_K, TILED,
            )  # fmt: skip
    else:
        if SZ:  # words, but BLOCK_K < GS: read the 16-bit values one by one
            s_ptr = s_ptr.to(tl.pointer_type(QDT))
            z_ptr = z_ptr.to(tl.pointer_type(QDT))
            stride_s = stride_s * 2
        for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            k0 = tl.multiple_of(k0, BLOCK_K)  # lets the code loads vectorize
            # 2-byte loads are too narrow for the cp.async pipeline: each iteration waits for them
            s = tl.load(s_ptr + rn * stride_s + k0 // GS, mask=n_ok, other=0)[:, None]
            z = tl.load(z_ptr + rn * stride_s + k0 // GS, mask=n_ok, other=0)[:, None]
            acc = _k_tile(
                acc, k0, s, z, x_ptrs, q_ptrs, m_ok, n_ok, ASM, DOT_F32, MMA, SWAP, BLOCK_M, BLOCK_N, BLOCK_K, TILED
            )
    pdl_trigger(PDL, 3)
    # (not tl.trans(acc): ptxas then serializes the wgmmas, "non wgmma instructions defining
    # accumulator registers", offline on Triton 3.6)
    if SWAP:  # rows of the tile are columns of y
        mask = n_ok[:, None] & m_ok[None, :]
        offs = rn[:, None] + rm[None, :] * N
        y_ptrs = y_ptr + rn[:, None] + rm[None, :] * stride_ym
    else:
        mask = m_ok[:, None] & n_ok[None, :]
        offs = rm[:, None] * N + rn[None, :]
        y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    if SPLIT_K > 1:  # only the split that finishes the tile goes on
        tile = cnt_ptr + pid_m * tl.num_programs(0) + pid_n
        acc, last = split_k_reduce(acc, ws_ptr, tile, pid_k, offs, mask, M * N, SPLIT_K)
        if last == 0:  # another split finishes this tile
            return
    tl.store(y_ptrs, round_to(acc, y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- dequant
@triton.jit
def _dequant_kernel(q_ptr, s_ptr, z_ptr, w_ptr, N, K, GS: tl.constexpr, MMA: tl.constexpr, BLOCK_N: tl.constexpr,
                    TILED: tl.constexpr = 0):  # fmt: skip
    """w_hat [N, K] in w's dtype, one group (GS columns) of BLOCK_N rows per program (TILED:
    "tiled" codes)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    grp = tl.program_id(1)
    ng = K // GS
    n_ok = rn[:, None] < N
    s = tl.load(s_ptr + rn * ng + grp, mask=rn < N, other=0)[:, None]
    z = tl.load(z_ptr + rn * ng + grp, mask=rn < N, other=0)[:, None]
    if MMA:
        rj = tl.arange(0, GS // 8)
        qw_ptr = q_ptr.to(tl.pointer_type(tl.int32))
        qw = tl.load(qw_ptr + rn[:, None] * (K // 8) + grp * (GS // 8) + rj[None, :], mask=n_ok, other=0)
        w = _dequant_words(qw, s, z, w_ptr.dtype.element_ty, False, BLOCK_N, GS)
    else:
        rj = tl.arange(0, GS // 2)
        if TILED:  # byte b of row rn: its 16-row tile's run of block b // 64, row rn % 16
            b = grp * (GS // 2) + rj[None, :]
            q_off = ((rn // 16) * 16 * (K // 2) + (rn % 16) * 64)[:, None] + b + (b // 64) * 960
        else:
            q_off = rn[:, None] * (K // 2) + grp * (GS // 2) + rj[None, :]
        qb = tl.load(q_ptr + q_off, mask=n_ok, other=0)
        q = tl.join(qb & 15, qb >> 4).reshape(BLOCK_N, GS)
        w = ((q.to(tl.float32) - 8.0) * s.to(tl.float32) + z.to(tl.float32)).to(w_ptr.dtype.element_ty)
    tl.store(w_ptr + rn[:, None] * K + grp * GS + tl.arange(0, GS)[None, :], w, mask=n_ok)


# ----------------------------------------------------------------------------- launcher
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def qparam_words(t: torch.Tensor) -> torch.Tensor | None:
    """A 16-bit [N, G] scale or zero tensor as int32 words [N, G // 2] (groups 2j, 2j + 1 in the
    low, high half), a view, when its rows are contiguous and start on 4-byte boundaries with G
    even; else None (the GEMM then loads the 16-bit values one by one)."""
    n, g = t.shape
    # (every stride is checked, a size-1 row's too: view(int32) requires it)
    if t.element_size() != 2 or g % 2 or t.stride(1) != 1 or t.storage_offset() % 2 or t.stride(0) % 2:
        return None
    return t.view(torch.int32)


def _split_k(m: int, n: int, k: int, group_size: int, sms: int) -> int:
    """Split K for small M so the weight is streamed by >= ~2 waves of programs."""
    if m > 64:
        return 1
    tiles = triton.cdiv(n, 64)
    split = 1
    while tiles * split < 2 * sms and k // (2 * split * min(group_size, 128)) >= 2:
        split *= 2
    while split > 1 and split * m * n * 4 > MAX_WORKSPACE:
        split //= 2
    return split


def _pair_order(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] with its columns reordered so that the byte path reads "mma" codes right:
    column 2 j + b holds the k of byte j's nibble b, i.e. column 32 ch + 8 t + 4 c + 2 a + b
    holds k = 32 ch + 16 c + 8 b + 2 t + a (``reference.int4_mma_pack``). One copy of x."""
    m, k = x.shape
    return x.view(m, k // 32, 2, 2, 4, 2).permute(0, 1, 4, 2, 5, 3).reshape(m, k)


@functools.lru_cache(maxsize=1024)
def _max_split(mb: int, n: int, k: int, group_size: int, swap_mode: int) -> int:
    """The largest SPLIT_K among the configs the autotuner may try for this call."""
    space = _prune(_GEMM_CONFIGS, dict(GS=group_size, m_bucket=mb, K=k, N=n, SWAP_MODE=swap_mode, ASM=True))
    return max(c.kwargs["SPLIT_K"] for c in space)


def _plan_key(x, qdata, scale, zero, group_size: int, packing: str) -> tuple:
    """The GEMM's launch-plan key: the arguments and every switch its branches read (in fixed-config
    mode the split too, a per-call choice)."""
    split = 0 if AUTOTUNE else _split_k(x.shape[0], qdata.shape[0], x.shape[1], group_size, num_sms(x.device))
    switches = (group_size, packing, GEMM_SWAP, GEMV_MAX_M, SZ_WORDS, GEMM_PDL, DEQUANT_MIN_M, split)
    return plan_key(x, (qdata, scale, zero), *switches)


def _dequantizes(x, packing: str) -> bool:
    """``int4_mm`` takes the dequantize path for this CUDA x with rows (see the module doc)."""
    fp32 = x.dtype == torch.float32
    return x.shape[0] >= DEQUANT_MIN_M and not fp32 or packing == "mma" and fp32 and x.shape[0] > 0


def _dequant_key(x, qdata, scale, zero, group_size: int, packing: str) -> tuple:
    return dequant_key(x, (qdata, scale, zero), group_size, packing, DEQUANT_ROWS)


def _lane(x, qdata, scale, zero, group_size, packing="plain"):
    """``int4_mm`` through a kept plan for these arguments, or None (``_utils.launcher``)."""
    if x.dim() != 2 or qdata.dim() != 2 or group_size not in INT4_GROUP_SIZES:  # (the fixed config's key
        return None  # computes with these: bad ones get the checks' messages)
    n = qdata.shape[0]
    if _dequantizes(x, packing):
        return dequant_lane(_PLANS, x, n, _dequant_key(x, qdata, scale, zero, group_size, packing))
    plan = _PLANS.get(_plan_key(x, qdata, scale, zero, group_size, packing))
    return None if plan is None else plan.run(x, n, n)


@kernel_op("int4_mm_triton", fake=linear_out_fake)
@launcher("int4_mm", (torch.uint8,), lane=_lane)
def int4_mm(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    packing: str = "plain",
) -> torch.Tensor:
    """``x [M, K] @ dequant(qdata, scale, zero).T -> [M, N]`` in x.dtype (see module doc).

    ``packing``: the byte order of qdata, ``"plain"`` (``reference.int4_pack``),
    ``"mma"`` (``reference.int4_mma_pack``) or ``"tiled"`` (``reference.int4_tiled_pack``, N % 16 ==
    0 and K % 128 == 0; the GEMV reads each 16-row x 128-k tile as one 1 KB run; what CUDA
    weights of whole tiles get by default), see ``cuda_packing``.
    """
    m, k = x.shape
    n = qdata.shape[0]
    check_int4_args("int4_mm", x, qdata, scale, zero, group_size, packing)
    tiled = packing == "tiled"
    if m == 0:
        return x.new_empty(0, n)
    x = x.contiguous()
    qdata = qdata.contiguous()
    mma = packing == "mma"  # the kernels read these bytes as int32 words (K % 32 == 0)
    mb = m_bucket(m)
    if (x.is_cuda or INTERPRET) and _dequantizes(x, packing):
        scale, zero = scale.contiguous(), zero.contiguous()
        # eagerly a plan of the chunks' launches (``_utils.DequantPlan``; the lane runs it next time)
        key = _dequant_key(x, qdata, scale, zero, group_size, packing) if _utils.PLANS and x.is_cuda else None

        # fp32 x with "mma" codes comes here at any M: the GEMM's fp32 (FMA) dot needs the
        # words' registers rearranged and spills (offline SASS: 255 registers + stack)
        def fill(n0, r, buf):
            grid, args = (triton.cdiv(r, 32), k // group_size), (qdata[n0:], scale[n0:], zero[n0:], buf, r, k)
            kw = dict(GS=group_size, MMA=mma, BLOCK_N=32, TILED=tiled)
            # (chunks start at multiples of rows: whole 16-row tiles for "tiled")
            return _dequant_kernel, grid, args, kw, _dequant_kernel[grid](*args, **kw)

        rows = max(16, DEQUANT_ROWS - DEQUANT_ROWS % 16) if tiled else DEQUANT_ROWS  # "tiled": whole tiles
        return planned_dequant_mm(_PLANS, key, x, n, rows, fill)
    key = _plan_key(x, qdata, scale, zero, group_size, packing) if _utils.PLANS and x.is_cuda else None
    plan = _PLANS.get(key) if key is not None else None
    if plan is not None:  # (its key pins the branches below: the qparam words, no copies)
        return plan.run(x, n, n)
    asm = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and scale.dtype == zero.dtype == x.dtype
    sw, zw = (qparam_words(scale), qparam_words(zero)) if SZ_WORDS and scale.dtype == zero.dtype else (None, None)
    use_words = sw is not None and zw is not None and sw.stride() == zw.stride()
    if use_words:
        s_arg, z_arg, stride_s = sw, zw, sw.stride(0)
    else:
        scale, zero = scale.contiguous(), zero.contiguous()
        s_arg, z_arg, stride_s = scale, zero, scale.stride(0)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    # "mma" codes: the word path for mma.sync tiles; wgmma tiles (BLOCK_M >= 64, every tile
    # _prune keeps from M bucket 64 on) measured faster on the byte path with x reordered
    words = mma and mb < 64
    if AUTOTUNE:  # the split is tuned with the tile: room for the largest split it may pick
        fixed = {}
        most = _max_split(mb, n, k, group_size, _SWAP_MODES[GEMM_SWAP])
    else:  # one fixed config: the split from the heuristic, swapped when forced (byte path only)
        fixed = {"SPLIT_K": _split_k(m, n, k, group_size, num_sms(x.device)), "SWAP": GEMM_SWAP == "on" and not words}
        most = fixed["SPLIT_K"]
    ws, cnt = split_k_buffers(x.device, m, n, most)
    plain_x = True
    if mb <= GEMV_MAX_M and (x.data_ptr() % 16 or qdata.data_ptr() % 16):
        # the GEMV tile reads x and the codes as 16-byte vectors (a contiguous view may start
        # anywhere; a misaligned vector load faults the CUDA context): aligned copies
        x, qdata = (t.clone() if t.data_ptr() % 16 else t for t in (x, qdata))
        plain_x = False
    if mma and not words:
        x, plain_x = _pair_order(x), False
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
    args = (x, qdata, s_arg, z_arg, y, ws, cnt, m, n, k, mb, x.stride(0), y.stride(0), qdata.stride(0), stride_s,
            _SWAP_MODES[GEMM_SWAP])  # fmt: skip
    kw = dict(GS=group_size, ASM=asm and not INTERPRET, DOT_F32=INTERPRET, MMA=words, SZ=use_words,
              QDT=_TL_DTYPES[scale.dtype] if use_words else None, **fixed, **pdl_args(x.device, GEMM_PDL),
              TILED=tiled, GEMV_MAX=GEMV_MAX_M)  # fmt: skip
    planned = key is not None and use_words and plain_x  # (a plan's call takes the words and x as they come)
    launch(_gemm_kernel, grid, args, kw, _PLANS, key if planned else None, most=most)
    return y


# eager launch plans of _gemm_kernel (``_utils.LaunchPlan``), by ``_utils.plan_key``
_PLANS: dict = {}
