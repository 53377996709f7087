"""Decode GEMM (few tokens) reading cuSPARSELt's compressed 2:4 int8 buffer directly.

y[m, n] = (sum_k xq[m, k] * W[n, k]) * x_scale[m] * w_scale[n] + bias[n], with W decoded on
the fly from the values (int16 pairs) and the tiled metadata (layout.py). Each program owns
BLOCK_N output channels x a K slice; with SPLIT_K > 1 the int32 partial sums go to a shared
workspace by atomic add (exact, so the result does not depend on order) and the last program
of each tile applies the scales, writes the output and zeroes the workspace and its counter
again (no memset, nothing allocated: CUDA-graph safe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _decode_kernel(
    x_ptr, xs_ptr, vals_ptr, meta_ptr, ws_ptr, bias_ptr, out_ptr, acc_ptr, cnt_ptr,
    M, N, K, k_per_split, split_k, meta_block_rows,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    G: tl.constexpr = BLOCK_K // 4
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    # metadata: 16x64 tiles of 128 bytes, row tiles fastest inside blocks of meta_block_rows
    tiles_per_col = meta_block_rows // 16
    k_tiles = K // 64
    r16 = rn % 16
    row_off = ((rn // meta_block_rows) * (k_tiles * tiles_per_col) + (rn % meta_block_rows) // 16) * 128 \
        + (r16 % 8) * 16 + r16 // 8
    vals_row = vals_ptr + rn.to(tl.int64)[:, None] * (K // 4)
    meta_row = meta_ptr + row_off.to(tl.int64)[:, None]
    x_row = x_ptr + rm.to(tl.int64)[:, None] * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        g = k0 // 4 + tl.arange(0, G)
        p = (g % 16) // 2
        col_off = (g // 16) * (tiles_per_col * 128) + (p % 4) * 4 + (p // 4) * 2
        mb = tl.load(meta_row + col_off[None, :]).to(tl.int32)
        nib = (mb >> ((g % 2) * 4)[None, :]) & 15
        i0 = nib & 3
        i1 = nib >> 2
        w = tl.load(vals_row + g[None, :]).to(tl.int32)
        v0 = (w << 24) >> 24
        v1 = w >> 8
        d0 = tl.where(i0 == 0, v0, 0) + tl.where(i1 == 0, v1, 0)
        d1 = tl.where(i0 == 1, v0, 0) + tl.where(i1 == 1, v1, 0)
        d2 = tl.where(i0 == 2, v0, 0) + tl.where(i1 == 2, v1, 0)
        d3 = tl.where(i0 == 3, v0, 0) + tl.where(i1 == 3, v1, 0)
        dense = tl.join(tl.join(d0, d1), tl.join(d2, d3))  # [BN, G, 2, 2]
        dense = tl.reshape(dense.to(tl.int8), (BLOCK_N, BLOCK_K))
        xk = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_row + xk[None, :], mask=m_mask[:, None], other=0)
        acc += tl.dot(xt, tl.trans(dense))
    out_offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if SPLIT:
        acc_ptrs = acc_ptr + out_offs
        tl.atomic_add(acc_ptrs, acc, mask=m_mask[:, None])
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1)
        if arrived == split_k - 1:
            total = tl.atomic_xchg(acc_ptrs, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32),
                                   mask=m_mask[:, None])
            y = total.to(tl.float32) * tl.load(xs_ptr + rm, mask=m_mask, other=0.0)[:, None]
            y = y * tl.load(ws_ptr + rn)[None, :]
            if HAS_BIAS:
                y += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
            tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])
            tl.atomic_xchg(cnt_ptr + tile, 0)
    else:
        y = acc.to(tl.float32) * tl.load(xs_ptr + rm, mask=m_mask, other=0.0)[:, None]
        y = y * tl.load(ws_ptr + rn)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


def block_m_for(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def sparse24_decode(
    xq: torch.Tensor, x_scale: torch.Tensor, buf: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out: torch.Tensor, n: int, k: int, cfg: DecodeConfig,
    meta_block_rows: int, acc_ws: torch.Tensor, counters: torch.Tensor,
) -> None:
    """xq int8 [M, K]; buf: cuSPARSELt compressed int8 (values ++ metadata); out [M, N].
    acc_ws int32 [>= M_pad * N] and counters int32 [>= tiles], both all-zero on entry and exit."""
    m = xq.shape[0]
    bm = block_m_for(m)
    nvals = n * k // 2
    vals = buf[:nvals].view(torch.int16)
    meta = buf[nvals:].view(torch.uint8)
    grid = (n // cfg.block_n, cfg.split_k, triton.cdiv(m, bm))
    _decode_kernel[grid](
        xq, x_scale, vals, meta, w_scale, bias if bias is not None else w_scale, out, acc_ws, counters,
        m, n, k, k // cfg.split_k, cfg.split_k, meta_block_rows,
        HAS_BIAS=bias is not None, SPLIT=cfg.split_k > 1,
        BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def candidate_configs(n: int, k: int, num_sms: int) -> list[DecodeConfig]:
    """Configs worth timing for an [N, K] weight: tiles x split-K >= ~2-4 waves of programs."""
    out = []
    for bn, bk, warps, stages in [(16, 256, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4),
                                  (32, 512, 4, 3), (16, 512, 4, 3), (64, 256, 8, 3)]:
        if n % bn or k % bk:
            continue
        tiles = n // bn
        for waves in (2, 4):
            split = 1
            while tiles * split * 2 <= waves * num_sms and k % (split * 2 * bk) == 0:
                split *= 2
            cfg = DecodeConfig(bn, bk, split, warps, stages)
            if cfg not in out:
                out.append(cfg)
    if not out:
        out.append(DecodeConfig(16, 64, 1, 4, 4))
    return out
