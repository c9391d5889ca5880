"""W4A16: ``y = x @ w_hat.T`` for a group-wise asymmetric int4 weight (Triton).

Shapes and math (the spec is ``lowbit.ops.reference.int4_linear``)::

    x      [M, K]              bf16 / fp16 / fp32 activations
    qdata  [N, K // 2] uint8   q[n, 2j] in the low nibble of qdata[n, j], q[n, 2j+1] in the high one
    scale  [N, K // gs]        weight dtype; zero likewise
    w_hat[n, k] = (q[n, k] - 8) * scale[n, k // gs] + zero[n, k // gs]     (fp32, cast to x.dtype)
    y      [M, N] = x @ w_hat.T   accumulated in fp32, returned in x.dtype

Two kernels, picked by M:

* ``_gemv_kernel`` (M <= GEMV_MAX_M, decode): memory bound. Each program owns
  BLOCK_N output rows and streams their packed bytes once with FMAs; the group
  algebra ``sum_k x_k w_k = s * sum_k x_k q_k + (z - 8 s) * sum_k x_k`` keeps the
  per-weight work at two FMAs per nibble.
* ``_gemm_kernel`` (larger M): tensor-core GEMM; the weight tile is unpacked
  and dequantized in registers inside the main loop (exactly the reference's
  fp32 formula, cast to x.dtype) and fed to ``tl.dot``. For small M the K loop
  is split across programs (fp32 atomics into a zeroed buffer) so that enough
  programs stream the weight.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lowbit.compile import kernel_op, linear_out_fake
from lowbit.ops.triton._utils import INTERPRET, cfg, configs, m_bucket

GEMV_MAX_M = 1


# ----------------------------------------------------------------------------- GEMV
@triton.autotune(
    configs=configs(
        [
            cfg(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
            for bn, bk, w, s in [
                (4, 512, 4, 2),
                (8, 256, 4, 2),
                (8, 512, 4, 2),
                (8, 512, 8, 2),
                (16, 256, 4, 2),
                (16, 256, 8, 2),
                (16, 512, 8, 2),
                (32, 256, 8, 1),
            ]
        ],
        cfg(BLOCK_N=4, BLOCK_K=256, num_warps=4, num_stages=1),
    ),
    key=["m_bucket", "N", "K", "GS"],
)
@triton.jit
def _gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, m_bucket,
    stride_xm, stride_ym,
    GS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # The tile is [rows, groups, bytes-of-a-group]; BLOCK_K is a multiple of GS
    # and K of GS, so a group is either wholly in range or wholly masked.
    NG: tl.constexpr = BLOCK_K // GS
    HG: tl.constexpr = GS // 2
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n3 = rn[:, None, None]
    g3 = tl.arange(0, NG)[None, :, None]
    j3 = tl.arange(0, HG)[None, None, :]
    n_ok = n3 < N
    kh = K // 2
    ng = K // GS
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros([BLOCK_N, NG, HG], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        grp = k0 // GS + g3
        g_ok = grp < ng
        byte = k0 // 2 + g3 * HG + j3
        qb = tl.load(q_ptr + n3 * kh + byte, mask=n_ok & g_ok, other=0)
        s = tl.load(s_ptr + n3 * ng + grp, mask=n_ok & g_ok, other=0).to(tl.float32)
        z = tl.load(z_ptr + n3 * ng + grp, mask=n_ok & g_ok, other=0).to(tl.float32)
        xe = tl.load(x_row + 2 * byte, mask=g_ok, other=0).to(tl.float32)
        xo = tl.load(x_row + 2 * byte + 1, mask=g_ok, other=0).to(tl.float32)
        lo = (qb & 15).to(tl.float32)
        hi = (qb >> 4).to(tl.float32)
        acc += s * (lo * xe + hi * xo) + (z - 8.0 * s) * (xe + xo)
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


# ----------------------------------------------------------------------------- GEMM
def _prune(configs_, named_args, **kwargs):
    a = {**named_args, **kwargs}
    gs, mb = a["GS"], a["m_bucket"]
    out = [
        c
        for c in configs_
        if c.kwargs["BLOCK_K"] <= gs and (c.kwargs["BLOCK_M"] <= max(16, mb) if mb <= 64 else c.kwargs["BLOCK_M"] >= 64)
    ]
    return out or configs_[:1]


@triton.autotune(
    configs=configs(
        [
            cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [
                # small M: memory bound, many programs, deep pipelines
                (16, 64, 128, 4, 4),
                (16, 128, 128, 4, 4),
                (16, 64, 64, 4, 5),
                (32, 64, 128, 4, 4),
                (32, 128, 128, 4, 3),
                (64, 64, 128, 4, 3),
                (64, 128, 128, 4, 3),
                # large M: compute bound
                (64, 256, 64, 8, 3),
                (128, 128, 64, 8, 3),
                (128, 128, 128, 8, 3),
                (128, 256, 64, 8, 3),
                (128, 128, 64, 4, 4),
            ]
        ],
        cfg(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1),
    ),
    key=["m_bucket", "N", "K", "GS", "SPLIT_K"],
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["y_ptr"],
)
@triton.jit
def _gemm_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, m_bucket,
    stride_xm, stride_ym,
    GS: tl.constexpr, SPLIT_K: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # BLOCK_K divides GS (pruned), and GS divides K: no K masks, one group per tile.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row-blocks share each weight tile while it is in L2
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rkh = tl.arange(0, BLOCK_K // 2)
    m_ok = rm[:, None] < M
    n_ok = rn < N
    kh = K // 2
    ng = K // GS
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    q_ptrs = q_ptr + rn[:, None] * kh + rkh[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        x = tl.load(x_ptrs + k0, mask=m_ok, other=0.0)
        qb = tl.load(q_ptrs + k0 // 2, mask=n_ok[:, None], other=0)
        s = tl.load(s_ptr + rn * ng + k0 // GS, mask=n_ok, other=0).to(tl.float32)
        z = tl.load(z_ptr + rn * ng + k0 // GS, mask=n_ok, other=0).to(tl.float32)
        q = tl.join(qb & 15, qb >> 4).reshape(BLOCK_N, BLOCK_K)  # even k = low nibble
        w = ((q.to(tl.float32) - 8.0) * s[:, None] + z[:, None]).to(x_ptr.dtype.element_ty)
        if DOT_F32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    mask = m_ok & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


# ----------------------------------------------------------------------------- launcher
@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so CPU tests exercise the split-K path


def _split_k(m: int, n: int, k: int, group_size: int, sms: int) -> int:
    """Split K for small M so the weight is streamed by >= ~2 waves of programs."""
    if m > 64:
        return 1
    tiles = triton.cdiv(n, 64)
    split = 1
    while tiles * split < 2 * sms and k // (2 * split * min(group_size, 128)) >= 2:
        split *= 2
    return split


@kernel_op("int4_mm_triton", fake=linear_out_fake)
def int4_mm(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``x [M, K] @ dequant(qdata, scale, zero).T -> [M, N]`` in x.dtype (see module doc)."""
    m, k = x.shape
    n = qdata.shape[0]
    if k != qdata.shape[1] * 2 or k % group_size or scale.shape != (n, k // group_size):
        raise ValueError(
            f"int4_mm: x {tuple(x.shape)}, qdata {tuple(qdata.shape)}, scale "
            f"{tuple(scale.shape)} do not match group_size {group_size}"
        )
    if m == 0:
        return x.new_empty(0, n)
    x = x.contiguous()
    qdata, scale, zero = qdata.contiguous(), scale.contiguous(), zero.contiguous()
    mb = m_bucket(m)
    if m <= GEMV_MAX_M:
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m)  # noqa: E731
        _gemv_kernel[grid](x, qdata, scale, zero, y, m, n, k, mb, x.stride(0), y.stride(0), GS=group_size)
        return y
    split = _split_k(m, n, k, group_size, _num_sms(x.device))
    if split > 1:
        y = torch.zeros(m, n, device=x.device, dtype=torch.float32)
    else:
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
    _gemm_kernel[grid](
        x, qdata, scale, zero, y, m, n, k, mb, x.stride(0), y.stride(0),
        GS=group_size, SPLIT_K=split, DOT_F32=INTERPRET,
    )  # fmt: skip
    return y if split == 1 else y.to(x.dtype)
