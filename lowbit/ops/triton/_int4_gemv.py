"""The int4 GEMM's M <= 8 tile: mma.sync in inline PTX with the weight as the A operand.

``int4._gemm_kernel`` runs this body for its ``GEMV`` configs (the autotuner picks them or the
tensor-core tiles per shape). Each warp owns 16 weight rows, the mma's M; the tokens are its N
(8: M = 1 .. 8 are the same mma work, though M = 8 measured ~15% slower on 4096 x 14336; an
untested guess is x traffic). Lane (g, c) of a warp (g = lane // 4, c = lane % 4) takes, for
each 128-k block, the k run [32 c, 32 c + 32) of rows g and g + 8 ("plain" code bytes: one
16-byte load per row) and x of token g (64 bytes). An mma sums over its 16 k slots, so the k
order of the A and B fragments only has to agree: the lane's own k pairs fill its slots in load
order (slot pair 2c / 2c + 8 of step s takes byte 2 (s % 2) / 2 (s % 2) + 1 of word s // 2), and
neither operand goes through shared memory, ldmatrix or a split of x. The W warps of a CTA take
every W-th block of the same 16 rows (with UNROLL 2 and ADJ, the shipped configs: every W-th
pair of adjacent blocks) and are summed at the end; SPLIT_K CTAs per row tile reduce in-kernel
like the GEMM's splits.

Offline SASS (Triton 3.6, sm_90): 178-199 instructions per 64 weights per lane (2.8-3.1 per
weight; the tensor-core tiles 3.6), 48-72 registers, no shared memory in the loop. On the
interpreter (no PTX) ``_mma_emulated`` computes the same lane-by-lane products with tensor ops, so
the CPU tests check the fragment bookkeeping; the PTX itself runs only on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.compile import kernel_op, linear_out_fake
from lowbit.ops.reference import (
    INT4_GROUP_SIZES,
    add_rmsnorm,
    check_add_rmsnorm_operands,
    int4_tiled_fits,
    swiglu,
)
from lowbit.ops.triton import _utils
from lowbit.ops.triton._utils import (
    INTERPRET,
    TUNE_CACHE,
    cfg,
    configs,
    launch,
    launcher,
    m_bucket,
    pdl_args,
    pdl_start,
    pdl_trigger,
    plan_key,
    round_to,
    split_k_buffers,
    split_k_reduce,
    tile_counters,
    tune_bench,
)

# The tile's configs (warps W, splits, blocks per iteration), in int4._gemm_kernel's space and
# _glu_kernel's: the best of bench/gemv_mma_probe.py per Llama-3-8B shape (H100; 4096 x 14336 W4
# split 1, 14336 x 4096 W4 split 4, 4096^2 W1 split 8); a warp's two blocks adjacent (ADJ: whole
# 128-byte lines of each row; 0.2-2.2% faster on the H100 at each shape's best config in one run
# of bench/gemv_load_probe.py, session 17; a few other configs 1-2.4% slower); W2 split 8 from
# session 18's sweep of 40 configs on the "tiled" packing (bench/gemv_mma_probe.py --packing tiled
# --cfgs all): the best GEMV on 14336 x 4096 (M = 1 15.56 us against 16.82 for the best listed
# before; M = 8 17.55 against 18.43) and 4096 x 1024 (5.09 against 5.45; M = 8 5.38 against 5.66)
GEMV_CONFIGS = [(4, 1, 2), (4, 2, 2), (4, 4, 1), (2, 4, 2), (1, 8, 2), (2, 2, 2), (8, 1, 2), (2, 8, 2)]


def _word_mma_ptx(magic: str, one: str, neg: str, ty: str) -> str:
    """Two mma.sync m16n8k16 steps on one code word per row: $4 (row g), $5 (row g + 8); scale
    and zero of the two rows $6 $7 / $8 $9 (16-bit); x words $10..$13 (two per step); the
    accumulators come in as $14..$17 and leave as $0..$3.

    Byte j of a word holds the k pair (2 j, 2 j + 1): prmt puts its low nibble in lane 0 and
    (from the word shifted by 4) its high nibble in lane 1, lop3 keeps them under ``magic`` (bf16
    0x4300 = 128, fp16 0x6400 = 1024), then fma(v, 1, neg) = q - 8 and fma(q - 8, s, z), the
    weight rounded once, as ``int4._unpack_ptx`` does."""
    unpack = []
    for row, (src, hs, s2, z2) in enumerate((("$4", "hg", "sg2", "zg2"), ("$5", "h8", "s82", "z82"))):
        for j, sel in enumerate(("0x4400", "0x5511", "0x6622", "0x7733")):
            p = f"p{row}{j}"
            unpack.append(
                f"prmt.b32 {p}, {src}, {hs}, {sel}; lop3.b32 {p}, {p}, 0x000F000F, {magic}, 0xEA;"
                f" fma.rn.{ty}x2 {p}, {p}, one, c; fma.rn.{ty}x2 {p}, {p}, {s2}, {z2};"
            )
    body = "\n".join(unpack)
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32"
    return f"""{{
    .reg .b32 hg, h8, one, c, sg2, zg2, s82, z82, p00, p01, p02, p03, p10, p11, p12, p13;
    .reg .f32 d0, d1, d2, d3;
    mov.b32 one, {one}; mov.b32 c, {neg};
    mov.b32 sg2, {{$6, $6}}; mov.b32 zg2, {{$7, $7}}; mov.b32 s82, {{$8, $8}}; mov.b32 z82, {{$9, $9}};
    shr.u32 hg, $4, 4; shr.u32 h8, $5, 4;
    {body}
    {mma} {{d0, d1, d2, d3}}, {{p00, p10, p01, p11}}, {{$10, $11}}, {{$14, $15, $16, $17}};
    {mma} {{$0, $1, $2, $3}}, {{p02, p12, p03, p13}}, {{$12, $13}}, {{d0, d1, d2, d3}};
    }}"""


_MMA_BF16 = tl.constexpr(_word_mma_ptx("0x43004300", "0x3F803F80", "0xC308C308", "bf16"))  # -136
_MMA_F16 = tl.constexpr(_word_mma_ptx("0x64006400", "0x3C003C00", "0xE408E408", "f16"))  # -1032
_MMA_REGS = tl.constexpr("=f,=f,=f,=f,r,r,h,h,h,h,r,r,r,r,f,f,f,f")


@triton.jit
def _cols4(t):
    """[R, 4] -> its four columns, each [R] (in-thread: a lane holds its whole row)."""
    a, b = tl.split(tl.reshape(t, [t.shape[0], 2, 2]))
    a0, a2 = tl.split(a)
    a1, a3 = tl.split(b)
    return a0, a1, a2, a3


@triton.jit
def _load_block(qw_ptr, xw_ptr, s_ptr, z_ptr, blk, warp, xg, c, rg, okg, ok8, K, stride_xw, stride_qw, stride_s,
                GS: tl.constexpr, TILED: tl.constexpr = 0):  # fmt: skip
    """The lane's operands of 128-k block ``blk + warp``: code words of rows g and g + 8 ([R, 4]
    each), x words of token xg ([R, 4] x 4) and the two rows' scale and zero. TILED: "tiled"
    codes (``reference.int4_tiled_pack``: the block's 16 rows are one 1 KB run, 16 words a row)."""
    j4 = tl.arange(0, 4)
    kk = (blk + warp) * 128 + 32 * c  # the lane's 32-k run (K % 32 == 0: all in or all out)
    kok = kk < K
    if TILED:  # rows g, g + 8 of the tile: words 16 g and 16 g + 128 of its run
        qg_ptrs = qw_ptr + ((rg // 16) * 16 * stride_qw + (rg % 16) * 16 + (kk // 128) * 256 + 4 * c)[:, None]
        qg_ptrs += j4[None, :]
        row8 = 128
    else:
        qg_ptrs = qw_ptr + (rg * stride_qw + kk // 8)[:, None] + j4[None, :]
        row8 = 8 * stride_qw
    q_g = tl.load(qg_ptrs, mask=(okg & kok)[:, None], other=0)
    q_8 = tl.load(qg_ptrs + row8, mask=(ok8 & kok)[:, None], other=0)
    xrow = xw_ptr + (xg * stride_xw + kk // 2)[:, None] + j4[None, :]
    x0 = tl.load(xrow, mask=kok[:, None], other=0)
    x1 = tl.load(xrow + 4, mask=kok[:, None], other=0)
    x2 = tl.load(xrow + 8, mask=kok[:, None], other=0)
    x3 = tl.load(xrow + 12, mask=kok[:, None], other=0)
    grp = kk // GS  # GS >= 32: one group per run
    sg = tl.load(s_ptr + rg * stride_s + grp, mask=okg & kok, other=0)
    zg = tl.load(z_ptr + rg * stride_s + grp, mask=okg & kok, other=0)
    s8 = tl.load(s_ptr + (rg + 8) * stride_s + grp, mask=ok8 & kok, other=0)
    z8 = tl.load(z_ptr + (rg + 8) * stride_s + grp, mask=ok8 & kok, other=0)
    return q_g, q_8, x0, x1, x2, x3, sg, zg, s8, z8


@triton.jit
def _lane_values(word, s, z, dtype: tl.constexpr, W: tl.constexpr):
    """[W * 32] code words -> [W, 8, 4, 8] fp32 weights (the 8 of each lane, rounded to dtype)
    by the reference's formula; the order (byte, nibble) is the one ``_lane_x`` uses."""
    wv = tl.reshape(word, [W, 8, 4])
    sf = tl.reshape(s.to(tl.float32), [W, 8, 4])
    zf = tl.reshape(z.to(tl.float32), [W, 8, 4])
    b0 = tl.join(wv & 15, (wv >> 4) & 15)
    b1 = tl.join((wv >> 8) & 15, (wv >> 12) & 15)
    b2 = tl.join((wv >> 16) & 15, (wv >> 20) & 15)
    b3 = tl.join((wv >> 24) & 15, (wv >> 28) & 15)
    q = tl.reshape(tl.join(tl.join(b0, b1), tl.join(b2, b3)), [W, 8, 4, 8])
    w = (q.to(tl.float32) - 8.0) * sf[:, :, :, None] + zf[:, :, :, None]
    return w.to(dtype).to(tl.float32)


@triton.jit
def _word_halves(xw, dtype: tl.constexpr, W: tl.constexpr):
    """[W * 32] words of two 16-bit x values -> [W, 8, 4, 2] fp32 (low half first)."""
    halves = tl.join(xw & 0xFFFF, (xw >> 16) & 0xFFFF)
    return tl.reshape(halves, [W, 8, 4, 2]).to(tl.uint16).to(dtype, bitcast=True).to(tl.float32)


@triton.jit
def _lane_x(x0, x1, x2, x3, dtype: tl.constexpr, W: tl.constexpr):
    """A lane's four x words (two 16-bit values each, k pairs of bytes 0..3) -> [W, 8, 4, 8] fp32."""
    b0 = _word_halves(x0, dtype, W)
    b1 = _word_halves(x1, dtype, W)
    b2 = _word_halves(x2, dtype, W)
    b3 = _word_halves(x3, dtype, W)
    return tl.reshape(tl.join(tl.join(b0, b1), tl.join(b2, b3)), [W, 8, 4, 8])


@triton.jit
def _mma_emulated(a0, a1, a2, a3, wg, w8, sg, zg, s8, z8, x0, x1, x2, x3, dtype: tl.constexpr, W: tl.constexpr):
    """What the PTX's two mma steps leave in each lane, from tensor ops (the interpreter): lane
    (g, c)'s accumulators are rows g / g + 8 x tokens 2c, 2c + 1, and the mma pairs weight k pairs
    of lane (g, c') with the x of lane (token, c') slot by slot."""
    xv = _lane_x(x0, x1, x2, x3, dtype, W)  # [W, 8 tokens, 4 c, 8]
    dg = tl.sum(tl.sum(_lane_values(wg, sg, zg, dtype, W)[:, :, None, :, :] * xv[:, None, :, :, :], axis=4), axis=3)
    d8 = tl.sum(tl.sum(_lane_values(w8, s8, z8, dtype, W)[:, :, None, :, :] * xv[:, None, :, :, :], axis=4), axis=3)
    eg, og = tl.split(tl.reshape(dg, [W, 8, 4, 2]))  # [W, g, c]: tokens 2c, 2c + 1
    e8, o8 = tl.split(tl.reshape(d8, [W, 8, 4, 2]))
    a0 += tl.reshape(eg, [W * 32])
    a1 += tl.reshape(og, [W * 32])
    a2 += tl.reshape(e8, [W * 32])
    a3 += tl.reshape(o8, [W * 32])
    return a0, a1, a2, a3


@triton.jit
def _mma_block(a0, a1, a2, a3, q_g, q_8, x0, x1, x2, x3, sg, zg, s8, z8, dtype: tl.constexpr, ASM: tl.constexpr,
               W: tl.constexpr):  # fmt: skip
    """The accumulators + one 128-k block (x in ``dtype``): 8 mma.sync steps, two per code word."""
    wg0, wg1, wg2, wg3 = _cols4(q_g)
    w80, w81, w82, w83 = _cols4(q_8)
    for i in tl.static_range(4):
        if i == 0:
            wg, w8, xi = wg0, w80, x0
        elif i == 1:
            wg, w8, xi = wg1, w81, x1
        elif i == 2:
            wg, w8, xi = wg2, w82, x2
        else:
            wg, w8, xi = wg3, w83, x3
        xa, xb, xc, xd = _cols4(xi)
        args = [wg, w8, sg, zg, s8, z8, xa, xb, xc, xd, a0, a1, a2, a3]
        if not ASM:
            a0, a1, a2, a3 = _mma_emulated(a0, a1, a2, a3, wg, w8, sg, zg, s8, z8, xa, xb, xc, xd, dtype, W)
        elif dtype == tl.float16:
            a0, a1, a2, a3 = tl.inline_asm_elementwise(
                _MMA_F16, _MMA_REGS, args, dtype=(tl.float32,) * 4, is_pure=True, pack=1
            )
        else:
            a0, a1, a2, a3 = tl.inline_asm_elementwise(
                _MMA_BF16, _MMA_REGS, args, dtype=(tl.float32,) * 4, is_pure=True, pack=1
            )
    return a0, a1, a2, a3


@triton.jit
def lanes(pid_n, M, N, W: tl.constexpr, GLU: tl.constexpr = 0, NH=0):
    """Each of the CTA's lanes: the warp's index among the W warps of its row tile, g = lane //
    4, c = lane % 4, its row g of row tile pid_n, whether rows g and g + 8 exist, and the token
    whose x it brings (g; tokens >= M repeat the last one: their columns of the result are not
    stored, and an mma's columns do not mix). GLU: 2 W warps, the first W on row tile pid_n of
    the gate half (rows < NH), the others on the same tile of the up half (rows NH + ...)."""
    e = tl.arange(0, W * (1 + GLU) * 32)
    g = (e % 32) // 4
    if GLU:
        up = (e // 32) // W
        rl = pid_n * 16 + g  # the row within its half
        return (e // 32) % W, g, e % 4, rl + up * NH, rl < NH, rl + 8 < NH, tl.minimum(g, M - 1)
    rg = pid_n * 16 + g
    return e // 32, g, e % 4, rg, rg < N, rg + 8 < N, tl.minimum(g, M - 1)


@triton.jit
def gemv_tile(
    x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, pid_n, pid_k, M, N, K, stride_xm, stride_ym, stride_q,
    stride_s, GS: tl.constexpr, ASM: tl.constexpr, SPLIT_K: tl.constexpr, W: tl.constexpr, UNROLL: tl.constexpr,
    PDL: tl.constexpr, ADJ: tl.constexpr = 0, TILED: tl.constexpr = 0, GLU: tl.constexpr = 0, NH=0,
    NORM: tl.constexpr = 0, r_ptr=None, stride_rm=0, nw_ptr=None, n_ptr=None, stride_nm=0, eps=0.0,
    NP: tl.constexpr = 1,
):  # fmt: skip
    """y[:M, 16 pid_n : 16 pid_n + 16] (M <= 8) for split ``pid_k``; x bf16 / fp16 with K % 32 == 0,
    "plain" codes, scale / zero through 16-bit pointers, x and the codes 16-byte aligned. W = the
    CTA's warps; UNROLL (1 or 2) blocks per warp per iteration, their loads issued before either's
    math: blocks ``step`` apart (each warp's rows then span 64 bytes per block), or with ADJ
    adjacent (128 contiguous bytes of each row per warp: whole cache lines); PDL: the kernel's
    mode (3 triggers after the main loop); TILED: "tiled" codes (N % 16 == 0, K % 128 == 0).
    GLU: the weight is [gate; up] (N = 2 NH rows), the CTA has 2 W warps on row tile pid_n of
    each half, and y [M, NH] gets ``silu(gate) * up`` (both rounded to x's dtype first, as the
    unfused linear's output would be; ``reference.swiglu``). NORM: y gets ``residual + x @ W.T``
    (residual [M, N] at r_ptr) and n_ptr ``rmsnorm(y) * weight`` (``reference.add_rmsnorm``; see
    ``_norm_rows``)."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    WT: tl.constexpr = W * (1 + GLU)
    warp, g, c, rg, okg, ok8, xg = lanes(pid_n, M, N, W, GLU, NH)
    qw_ptr = q_ptr.to(tl.pointer_type(tl.int32))
    xw_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    stride_qw = stride_q // 4
    stride_xw = stride_xm // 2
    a0 = tl.zeros([WT * 32], dtype=tl.float32)
    a1 = tl.zeros([WT * 32], dtype=tl.float32)
    a2 = tl.zeros([WT * 32], dtype=tl.float32)
    a3 = tl.zeros([WT * 32], dtype=tl.float32)
    step = W * SPLIT_K
    # the (split, warp, iteration) -> block maps take every block once: it + warp and it + warp +
    # step, or with ADJ it + UNROLL warp and the one after it (_load_block adds the warp)
    if ADJ:
        start = pid_k * W * UNROLL
    else:
        start = pid_k * W
    for it in range(start, tl.cdiv(K, 128), step * UNROLL):
        if ADJ:
            blk = it + warp * (UNROLL - 1)
            nxt = blk + 1
        else:
            blk = it
            nxt = it + step
        q_g, q_8, x0, x1, x2, x3, sg, zg, s8, z8 = _load_block(
            qw_ptr, xw_ptr, s_ptr, z_ptr, blk, warp, xg, c, rg, okg, ok8, K, stride_xw, stride_qw, stride_s, GS,
            TILED,
        )  # fmt: skip
        if UNROLL == 2:
            n_g, n_8, y0, y1, y2, y3, tg, ug, t8, u8 = _load_block(
                qw_ptr, xw_ptr, s_ptr, z_ptr, nxt, warp, xg, c, rg, okg, ok8, K, stride_xw, stride_qw,
                stride_s, GS, TILED,
            )  # fmt: skip
        a0, a1, a2, a3 = _mma_block(a0, a1, a2, a3, q_g, q_8, x0, x1, x2, x3, sg, zg, s8, z8, DT, ASM, WT)
        if UNROLL == 2:
            a0, a1, a2, a3 = _mma_block(a0, a1, a2, a3, n_g, n_8, y0, y1, y2, y3, tg, ug, t8, u8, DT, ASM, WT)
    pdl_trigger(PDL, 3)
    # lane (g, c) holds rows g, g + 8 x tokens 2c, 2c + 1; the warps' sums are added
    acc = tl.join(tl.join(a0, a1), tl.join(a2, a3))  # [WT * 32, token, row]
    ln = tl.arange(0, 32)
    row = pid_n * 16 + (ln // 4)[:, None, None] + 8 * tl.arange(0, 2)[None, None, :]
    tok = 2 * (ln % 4)[:, None, None] + tl.arange(0, 2)[None, :, None]
    if GLU:  # [half, lane, token, row]: the halves' partial sums side by side, rows of the stack
        acc = tl.sum(tl.reshape(acc, [2, W, 32, 2, 2]), axis=1)
        mask = ((row < NH) & (tok < M))[None, :, :, :] & (tl.arange(0, 2) < 2)[:, None, None, None]
        full = row[None, :, :, :] + NH * tl.arange(0, 2)[:, None, None, None]
        if SPLIT_K > 1:
            acc, last = split_k_reduce(acc, ws_ptr, cnt_ptr + pid_n, pid_k, tok[None] * N + full, mask, M * N, SPLIT_K)
            if last == 0:
                return
        gate, up = tl.split(tl.permute(acc, (1, 2, 3, 0)))  # each [lane, token, row]
        gate = round_to(gate, DT).to(tl.float32)
        up = round_to(up, DT).to(tl.float32)
        out = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(y_ptr + tok * stride_ym + row, round_to(out, DT), mask=(row < NH) & (tok < M))
    else:  # (an else, not a return above: the compiler would still build this branch's shapes)
        acc = tl.sum(tl.reshape(acc, [W, 32, 2, 2]), axis=0)
        mask = (row < N) & (tok < M)
        if SPLIT_K > 1:
            acc, last = split_k_reduce(acc, ws_ptr, cnt_ptr + pid_n, pid_k, tok * N + row, mask, M * N, SPLIT_K)
            if last == 0:
                return
        if NORM:  # the linear's output rounded, plus the residual, rounded (two bf16 / fp16 ops unfused)
            res = tl.load(r_ptr + tok * stride_rm + row, mask=mask, other=0.0).to(tl.float32)
            acc = round_to(round_to(acc, DT).to(tl.float32) + res, DT)
        tl.store(y_ptr + tok * stride_ym + row, round_to(acc, y_ptr.dtype.element_ty), mask=mask)
        if NORM:
            _norm_rows(y_ptr, nw_ptr, n_ptr, cnt_ptr + tl.num_programs(0), tl.num_programs(0), M, N, stride_ym,
                       stride_nm, eps, DT, NP)  # fmt: skip


@triton.jit
def _norm_rows(h_ptr, nw_ptr, n_ptr, done_ptr, tiles, M, N, stride_hm, stride_nm, eps, DT: tl.constexpr,
               NP: tl.constexpr):  # fmt: skip
    """After a row tile's h is stored: the CTA that stores the last of the ``tiles`` row tiles
    (an int32 counter at done_ptr, zero at launch and put back to zero) normalises every row of h
    [M, N] into n: ``weight * (h * rsqrt(mean(h^2) + eps))``, the normalised value rounded to DT
    before the product (``reference.add_rmsnorm``). A whole row at once (NP = N's next power of
    two; at most 64 values per thread in the tuned configs, ``_norm_prune``; the one fixed config
    of the interpreter and LOWBIT_TRITON_AUTOTUNE=0 has one warp: more, correct but slower), h
    read back from L2 (.cg: the other CTAs' stores) with the weight's load beside it, so a row
    costs one L2 round trip."""
    tl.debug_barrier()  # every thread's h is stored before the release below
    if tl.atomic_add(done_ptr, 1, sem="acq_rel", scope="gpu") == tiles - 1:
        cols = tl.arange(0, NP)
        ok = cols < N
        w = tl.load(nw_ptr + cols, mask=ok, other=0.0)
        for t in range(M):
            h = tl.load(h_ptr + t * stride_hm + cols, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
            r = tl.math.rsqrt(tl.sum(h * h, axis=0) / N + eps)
            out = w.to(tl.float32) * round_to(h * r, DT).to(tl.float32)
            tl.store(n_ptr + t * stride_nm + cols, round_to(out, DT), mask=ok)
        tl.atomic_xchg(done_ptr, 0, sem="relaxed", scope="gpu")


# ----------------------------------------------------------------------------- gate / up + SwiGLU
# Llama's MLP at M <= 8: one launch computes silu(x @ W_gate.T) * (x @ W_up.T) from the stacked
# [gate; up] weight (``lowbit.fuse_projections_``), where the unfused step runs the stacked GEMV
# and then a pointwise kernel; each CTA has the GEMV's W warps on a row tile of the gate half and
# W on the same tile of the up half, so the product is formed in its epilogue.
# (W warps per half, splits, blocks per iteration): on the H100 (bench/glu_probe.py, session 21)
# 2 warps per half without a split was the best on Llama-3-8B's 4096 x 28672 at M = 1 (25.55 us,
# against 27.08 for the stacked GEMV alone and 28.5 with the product's kernel after it) and M = 8
# (27.6 against 31.3 / 33.6); the rest cover smaller MLPs, where splits fill the GPU
GLU_SHAPES = [(2, 1, 2), (2, 1, 1), (1, 2, 2), (4, 1, 2), (1, 4, 2), (2, 2, 2), (2, 4, 2), (1, 8, 2)]
_GLU_CONFIGS = [
    triton.Config(dict(SPLIT_K=sp, W=w, UNROLL=u, ADJ=int(u == 2)), num_warps=2 * w, num_stages=1)
    for w, sp, u in GLU_SHAPES
]


@triton.autotune(
    configs=configs(_GLU_CONFIGS, cfg(SPLIT_K=2, W=1, UNROLL=2, ADJ=1, num_warps=2, num_stages=1)),
    key=["m_bucket", "N", "K", "GS", "TILED", "ASM"],
    **TUNE_CACHE,
    do_bench=tune_bench,
)
@triton.jit
def _glu_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, NH, m_bucket, stride_xm, stride_ym, stride_q,
    stride_s, GS: tl.constexpr, ASM: tl.constexpr, TILED: tl.constexpr, SPLIT_K: tl.constexpr, W: tl.constexpr,
    UNROLL: tl.constexpr, ADJ: tl.constexpr, PDL: tl.constexpr = 0,
):  # fmt: skip
    pdl_start(PDL)
    gemv_tile(
        x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, tl.program_id(0), tl.program_id(1), M, N, K, stride_xm,
        stride_ym, stride_q, stride_s, GS, ASM, SPLIT_K, W, UNROLL, PDL, ADJ, TILED, 1, NH,
    )  # fmt: skip


def check_int4_args(name: str, x, qdata, scale, zero, group_size: int, packing: str) -> None:
    """The int4 launchers' checks of what the kernels cannot see: group size, shapes, packing."""
    k, n = x.shape[1], qdata.shape[0]
    if group_size not in INT4_GROUP_SIZES:  # the tiles assume a power of two >= 32
        raise ValueError(f"{name}: group_size {group_size} is not supported; use one of {INT4_GROUP_SIZES}")
    if k != qdata.shape[1] * 2 or k % group_size or scale.shape != (n, k // group_size) or zero.shape != scale.shape:
        raise ValueError(
            f"{name}: x {tuple(x.shape)}, qdata {tuple(qdata.shape)}, scale {tuple(scale.shape)}, zero "
            f"{tuple(zero.shape)} do not match group_size {group_size} (scale and zero must be [N, K // group_size])"
        )
    if packing not in ("plain", "mma", "tiled"):
        raise ValueError(f"{name}: packing must be 'plain', 'mma' or 'tiled', got {packing!r}")
    if packing == "tiled" and not int4_tiled_fits(n, k):
        raise ValueError(f"{name}: 'tiled' codes need N % 16 == 0 and K % 128 == 0, got N={n}, K={k}")


def _swiglu_fake(x: torch.Tensor, qdata: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return linear_out_fake(x, qdata)[:, : qdata.shape[0] // 2].clone()


def swiglu_max_m() -> int:
    """The most tokens the fused tile serves: 8 (its mma's N), 0 with the GEMV tile off."""
    from lowbit.ops.triton.int4 import GEMV_MAX_M

    return min(8, GEMV_MAX_M)


def swiglu_fits(m: int, n: int, k: int, packing: str, x_dtype, qparam_dtype, device: torch.device) -> bool:
    """Whether ``int4_mm_swiglu`` runs the fused tile (else it composes ``int4_mm`` and
    ``reference.swiglu``): M <= 8, 16-bit x with qparams of its dtype on a GPU (or the
    interpreter), "plain" codes or "tiled" ones whose up half starts on a 16-row tile, K % 32 == 0."""
    return _tile_fits(m, swiglu_max_m(), k, x_dtype, qparam_dtype, device) and (
        packing == "plain" or packing == "tiled" and (n // 2) % 16 == 0
    )


def _tile_fits(m: int, max_m: int, k: int, x_dtype, qparam_dtype, device: torch.device) -> bool:
    """What the fused GEMV tiles (``_glu_kernel``, ``_norm_kernel``) need of every call: 1 <= M <=
    max_m, 16-bit x with qparams of its dtype, a GPU (or the interpreter), K % 32 == 0."""
    return (
        1 <= m <= max_m
        and (device.type == "cuda" or INTERPRET)
        and x_dtype in (torch.bfloat16, torch.float16)
        and qparam_dtype == x_dtype
        and k % 32 == 0
    )


def _glu_key(x, qdata, scale, zero, group_size: int, packing: str) -> tuple:
    """The GLU tile's launch-plan key: the arguments and the switches ``swiglu_fits`` and the
    launch read."""
    from lowbit.ops.triton.int4 import GEMM_PDL, GEMV_MAX_M

    return plan_key(x, (qdata, scale, zero), group_size, packing, GEMM_PDL, GEMV_MAX_M)


def _glu_lane(x, qdata, scale, zero, group_size, packing="plain"):
    """``int4_mm_swiglu`` through a kept plan for these arguments, or None (``_utils.launcher``)."""
    plan = _GLU_PLANS.get(_glu_key(x, qdata, scale, zero, group_size, packing))
    return None if plan is None else plan.run(x, qdata.shape[0] // 2, qdata.shape[0])


@kernel_op("int4_mm_swiglu_triton", fake=_swiglu_fake)
@launcher("int4_mm_swiglu", (torch.uint8,), lane=_glu_lane)
def int4_mm_swiglu(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    packing: str = "plain",
) -> torch.Tensor:
    """``reference.swiglu(x @ dequant(qdata, scale, zero).T)``: the weight's rows are [gate; up]
    (N = 2 I), the result [M, I] in x.dtype. One launch where ``swiglu_fits``, else ``int4_mm``
    and the reference's product (the same numbers either way up to a few ulp: the GEMM's summation
    order and the epilogue's exp)."""
    from lowbit.ops.triton.int4 import GEMM_PDL, int4_mm

    m, k = x.shape
    n = qdata.shape[0]
    if n % 2:
        raise ValueError(f"int4_mm_swiglu: the weight has {n} rows; want an even number ([gate; up] halves)")
    check_int4_args("int4_mm_swiglu", x, qdata, scale, zero, group_size, packing)
    if not swiglu_fits(m, n, k, packing, x.dtype, scale.dtype, x.device) or zero.dtype != scale.dtype:
        return swiglu(int4_mm(x, qdata, scale, zero, group_size, packing))
    key = _glu_key(x, qdata, scale, zero, group_size, packing) if _utils.PLANS and x.is_cuda else None
    plan = _GLU_PLANS.get(key) if key is not None else None
    if plan is not None:  # (its key pins what the launch below would copy: nothing)
        return plan.run(x, n // 2, n)
    x, qdata, copied = _aligned(x, qdata)
    plain = not copied and scale.is_contiguous() and zero.is_contiguous()
    scale, zero = scale.contiguous(), zero.contiguous()
    most = max(c.kwargs["SPLIT_K"] for c in _glu_kernel.configs)
    nh = n // 2
    y = torch.empty(m, nh, device=x.device, dtype=x.dtype)
    ws, cnt = split_k_buffers(x.device, m, n, most)
    grid = lambda meta: (triton.cdiv(nh, 16), meta["SPLIT_K"])  # noqa: E731
    args = (x, qdata, scale, zero, y, ws, cnt, m, n, k, nh, m_bucket(m), x.stride(0), y.stride(0), qdata.stride(0),
            scale.stride(0))  # fmt: skip
    kw = dict(GS=group_size, ASM=x.is_cuda and not INTERPRET, TILED=int(packing == "tiled"),
              **pdl_args(x.device, GEMM_PDL))  # fmt: skip
    launch(_glu_kernel, grid, args, kw, _GLU_PLANS, key if plain else None, most=most)
    return y


def _aligned(x: torch.Tensor, qdata: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(x, qdata, whether either was copied): contiguous and 16-byte aligned, copied where not (the
    fused tiles read x and the codes as 16-byte vectors)."""
    ok = [t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (x, qdata)]
    x, qdata = (t if good else t.clone(memory_format=torch.contiguous_format) for t, good in zip((x, qdata), ok))
    return x, qdata, not all(ok)


_GLU_PLANS: dict = {}  # eager launch plans of _glu_kernel (``_utils.LaunchPlan``)


# ----------------------------------------------------------------------------- + residual, RMSNorm
# A pre-norm decoder layer at M <= NORM_MAX_M: the linear before a residual add (o_proj, down_proj) adds
# the residual in its epilogue and normalises the sum for the next linear (``_norm_rows``: the
# CTA that finishes the last row tile), where the unfused step runs Inductor's add + RMSNorm
# kernel between the two GEMVs. Configs: the GEMV's (``GEMV_CONFIGS``).
def _norm_prune(configs_, named_args, **kwargs):
    """Two 128-k blocks per split at least (as the GEMV's configs in ``int4._prune``), and warps
    enough that the last CTA holds a row in at most 64 values per thread (``_norm_rows``)."""
    a = {**named_args, **kwargs}
    out = [c for c in configs_ if a["K"] // (128 * c.kwargs["SPLIT_K"]) >= 2 and 64 * 32 * c.kwargs["W"] >= a["NP"]]
    return out or [max(configs_, key=lambda c: (c.kwargs["W"], -c.kwargs["SPLIT_K"]))]


_NORM_CONFIGS = [
    triton.Config(dict(SPLIT_K=sp, W=w, UNROLL=u, ADJ=int(u == 2)), num_warps=w, num_stages=1)
    for w, sp, u in GEMV_CONFIGS
]


@triton.autotune(
    configs=configs(_NORM_CONFIGS, cfg(SPLIT_K=2, W=1, UNROLL=2, ADJ=1, num_warps=1, num_stages=1)),
    key=["m_bucket", "N", "K", "GS", "TILED", "ASM"],
    **TUNE_CACHE,
    prune_configs_by={"early_config_prune": _norm_prune},
    do_bench=tune_bench,
)
@triton.jit
def _norm_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, r_ptr, nw_ptr, n_ptr, M, N, K, m_bucket, stride_xm, stride_ym,
    stride_q, stride_s, stride_rm, stride_nm, eps, GS: tl.constexpr, ASM: tl.constexpr, TILED: tl.constexpr,
    NP: tl.constexpr, SPLIT_K: tl.constexpr, W: tl.constexpr, UNROLL: tl.constexpr, ADJ: tl.constexpr,
    PDL: tl.constexpr = 0,
):  # fmt: skip
    pdl_start(PDL)
    gemv_tile(
        x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, tl.program_id(0), tl.program_id(1), M, N, K, stride_xm,
        stride_ym, stride_q, stride_s, GS, ASM, SPLIT_K, W, UNROLL, PDL, ADJ, TILED, 0, 0,
        1, r_ptr, stride_rm, nw_ptr, n_ptr, stride_nm, eps, NP,
    )  # fmt: skip


# the longest row the last CTA normalises (64 values per thread of 8 warps)
NORM_MAX_N = 16384
# the most tokens the fused launch takes: the last CTA normalises one row after another, and on
# the H100 (bench/norm_probe.py, session 23) the launch beat the GEMV plus Inductor's add + RMSNorm
# kernel by 1.1-1.2 us at M = 1 and 0.3-0.5 at M = 2 on Llama-3-8B's o_proj / down_proj, and lost
# 0.9-1.3 us at M = 4, 3.5-4.2 at M = 8
NORM_MAX_M = 2


def norm_max_m() -> int:
    """The most tokens the fused norm tile serves: NORM_MAX_M, 0 with the GEMV tile off."""
    return min(NORM_MAX_M, swiglu_max_m())


def add_rmsnorm_fits(m: int, n: int, k: int, packing: str, x_dtype, qparam_dtype, device: torch.device) -> bool:
    """Whether ``int4_mm_add_rmsnorm`` runs the fused tile: as ``swiglu_fits`` (16-bit x with
    qparams of its dtype, a GPU or the interpreter, "plain" or "tiled" codes, K % 32 == 0), M <=
    NORM_MAX_M and N <= NORM_MAX_N."""
    return (
        _tile_fits(m, norm_max_m(), k, x_dtype, qparam_dtype, device)
        and packing in ("plain", "tiled")
        and n <= NORM_MAX_N
    )


def _add_rmsnorm_fake(x: torch.Tensor, qdata: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_out_fake(x, qdata), linear_out_fake(x, qdata)


@kernel_op("int4_mm_add_rmsnorm_triton", fake=_add_rmsnorm_fake)
def int4_mm_add_rmsnorm(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    packing: str = "plain",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.add_rmsnorm(x @ dequant(qdata, scale, zero).T, residual, norm_weight, eps)``:
    (h, normed), each [M, N] in x.dtype; residual [M, N] and norm_weight [N] of x's dtype. One
    launch where ``add_rmsnorm_fits``, else ``int4_mm`` and the reference (the same numbers up to
    the GEMM's and the mean's summation orders)."""
    from lowbit.ops.triton.int4 import int4_mm

    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"int4_mm_add_rmsnorm: x must be a 2-D floating tensor [M, K], got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    n = qdata.shape[0]
    check_add_rmsnorm_operands("int4_mm_add_rmsnorm", (m, n), residual, norm_weight, x.dtype)
    if not add_rmsnorm_fits(m, n, k, packing, x.dtype, scale.dtype, x.device) or zero.dtype != scale.dtype:
        return add_rmsnorm(int4_mm(x, qdata, scale, zero, group_size, packing), residual, norm_weight, eps)
    return _add_rmsnorm_tile(x, qdata, scale, zero, group_size, residual, norm_weight, eps, packing)


@launcher("int4_mm_add_rmsnorm", (torch.uint8,))
def _add_rmsnorm_tile(x, qdata, scale, zero, group_size, residual, norm_weight, eps, packing):
    """The fused launch (M <= 8: the launcher never splits x)."""
    from lowbit.ops.triton.int4 import GEMM_PDL

    m, k = x.shape
    n = qdata.shape[0]
    check_int4_args("int4_mm_add_rmsnorm", x, qdata, scale, zero, group_size, packing)
    x, qdata, _ = _aligned(x, qdata)
    scale, zero, residual, norm_weight = (t.contiguous() for t in (scale, zero, residual, norm_weight))
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    normed = torch.empty(m, n, device=x.device, dtype=x.dtype)
    most = max(c.kwargs["SPLIT_K"] for c in _norm_kernel.configs)
    ws = split_k_buffers(x.device, m, n, most)[0]
    cnt = tile_counters(x.device, triton.cdiv(n, 16) + 1)  # + the count of finished row tiles
    _norm_kernel[lambda meta: (triton.cdiv(n, 16), meta["SPLIT_K"])](
        x, qdata, scale, zero, y, ws, cnt, residual, norm_weight, normed, m, n, k, m_bucket(m), x.stride(0),
        y.stride(0), qdata.stride(0), scale.stride(0), residual.stride(0), normed.stride(0), eps, GS=group_size,
        ASM=x.is_cuda and not INTERPRET, TILED=int(packing == "tiled"), NP=triton.next_power_of_2(n),
        **pdl_args(x.device, GEMM_PDL),
    )  # fmt: skip
    return y, normed
