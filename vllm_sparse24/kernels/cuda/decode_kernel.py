"""Decode GEMM (few tokens) reading cuSPARSELt's compressed 2:4 int8 buffer directly.

y[m, n] = (sum_k xq[m, k] * W[n, k]) * x_scale[m] * w_scale[n] + bias[n]. Each program owns
BLOCK_N output channels x a K slice (split-K). Per BLOCK_K step it loads, for its rows:
  * the kept values, one int16 (two int8) per group of 4 along K (row-major, bytes [0, N*K/2));
  * the metadata nibble of each group (tiled layout, layout.py) from bytes [N*K/2, N*K*5/8);
  * the activations as int32 words (one word = the 4 int8 of one group).
A group decodes to one int32 word holding its 4 dense int8 (v0 << 8*i0 | v1 << 8*i1), and the
dot runs in a permuted K order: for j = 0..3, x[:, 4g + j] . W[n, 4g + j] over the groups g of
the step, so no interleave (join/reshape) of the decoded tile is needed.

Split-K: int32 partial sums go to a shared workspace by atomic add (exact, order-free); the
last program of a tile (tile counter) applies the scales, writes the output and zeroes the
workspace and counter again (no memset, nothing allocated: CUDA-graph safe).

All loop bounds are compile-time (K, K_PER_SPLIT constexpr), and every load is masked to its
K slice, so a pipelined prefetch can never leave the buffer (the previous version, with runtime
loop bounds and unmasked byte loads, faulted under compute-sanitizer on the H100).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import FastLauncher, aligned16


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 2


@triton.jit(do_not_specialize=["M"])
def _decode_kernel(
    x_ptr, xs_ptr, buf_ptr, ws_ptr, bias_ptr, out_ptr, acc_ptr, cnt_ptr, M,
    N: tl.constexpr, K: tl.constexpr, K_PER_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr,
    META_BLOCK_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    G: tl.constexpr = BLOCK_K // 4
    KG: tl.constexpr = K // 4
    TILES_PER_COL: tl.constexpr = META_BLOCK_ROWS // 16
    K_TILES: tl.constexpr = K // 64
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    r16 = rn % 16
    row_off = ((rn // META_BLOCK_ROWS) * (K_TILES * TILES_PER_COL) + (rn % META_BLOCK_ROWS) // 16) * 128 \
        + (r16 % 8) * 16 + r16 // 8
    vals_base = buf_ptr.to(tl.pointer_type(tl.int16))
    meta_base = buf_ptr.to(tl.pointer_type(tl.uint8)) + (N * K // 2)
    x_base = x_ptr.to(tl.pointer_type(tl.int32))
    vals_row = vals_base + rn.to(tl.int64)[:, None] * KG
    meta_row = meta_base + row_off.to(tl.int64)[:, None]
    x_row = x_base + rm.to(tl.int64)[:, None] * KG
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    g_start = pid_k * (K_PER_SPLIT // 4)
    g_end = g_start + K_PER_SPLIT // 4
    for kk in range(0, K_PER_SPLIT // 4, G):
        g = g_start + kk + tl.arange(0, G)
        g_ok = (g < g_end)[None, :]
        p = (g % 16) // 2
        col_off = (g // 16) * (TILES_PER_COL * 128) + (p % 4) * 4 + (p // 4) * 2
        mb = tl.load(meta_row + col_off[None, :], mask=g_ok, other=0).to(tl.int32)
        nib = (mb >> ((g % 2) * 4)[None, :]) & 15
        w = tl.load(vals_row + g[None, :], mask=g_ok, other=0).to(tl.int32)
        v0 = w & 255
        v1 = (w >> 8) & 255
        d = (v0 << ((nib & 3) * 8)) | (v1 << ((nib >> 2) * 8))  # 4 dense int8 of the group
        xw = tl.load(x_row + g[None, :], mask=m_mask[:, None] & g_ok, other=0)
        for j in tl.static_range(4):
            dj = (d >> (8 * j)).to(tl.int8)
            xj = (xw >> (8 * j)).to(tl.int8)
            acc += tl.dot(xj, tl.trans(dj))
    out_offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if SPLIT_K > 1:
        acc_ptrs = acc_ptr + out_offs
        tl.atomic_add(acc_ptrs, acc, mask=m_mask[:, None])
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1)
        if arrived == SPLIT_K - 1:
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


_LAUNCH = FastLauncher(_decode_kernel)


def block_m_for(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def sparse24_decode(
    xq: torch.Tensor, x_scale: torch.Tensor, buf: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out: torch.Tensor, n: int, k: int, cfg: DecodeConfig,
    meta_block_rows: int, acc_ws: torch.Tensor, counters: torch.Tensor,
) -> None:
    """xq int8 [M, K] contiguous (16-byte aligned rows); buf: cuSPARSELt compressed int8
    (values ++ metadata); out [M, N] contiguous. acc_ws int32 [>= M_pad * N] and counters
    int32 [>= N / block_n * M_pad / 16], both all-zero on entry and exit."""
    m = xq.shape[0]
    bm = block_m_for(m)
    has_bias = bias is not None
    grid = (n // cfg.block_n, cfg.split_k, triton.cdiv(m, bm))
    key = (n, k, cfg, meta_block_rows, bm, has_bias, out.dtype, aligned16(out), aligned16(xq))
    _LAUNCH(
        key, grid,
        (xq, x_scale, buf, w_scale, bias if has_bias else w_scale, out, acc_ws, counters, m),
        dict(N=n, K=k, K_PER_SPLIT=k // cfg.split_k, SPLIT_K=cfg.split_k, META_BLOCK_ROWS=meta_block_rows,
             HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k),
        dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        xq.device.index or 0,
    )


def candidate_configs(n: int, k: int, num_sms: int) -> list[DecodeConfig]:
    """Configs worth timing for an [N, K] weight: tiles x split-K >= ~2-4 waves of programs."""
    out = []
    for bn, bk, warps, stages in [(16, 256, 4, 2), (32, 256, 4, 2), (64, 128, 4, 2), (32, 512, 4, 2),
                                  (64, 256, 8, 2)]:
        if n % bn or k % bk:
            continue
        tiles = n // bn
        for waves in (2, 4, 8):
            split = 1
            while tiles * split * 2 <= waves * num_sms and k % (split * 2 * bk) == 0:
                split *= 2
            cfg = DecodeConfig(bn, bk, split, warps, stages)
            if cfg not in out:
                out.append(cfg)
    if not out:
        out.append(DecodeConfig(16, 128, 1, 4, 2))  # K % 128 != 0: the last step is masked
    return out
