"""Per-token dynamic int8 quantization in one Triton kernel (one program per token).

Same definition as vllm_sparse24.quant.quantize_per_token: scale = max(absmax / 127, 1e-12),
q = round-half-even(x / scale) clamped to +-127, with IEEE fp32 division.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FastLauncher, aligned16

QMAX = 127.0
MIN_SCALE = 1e-12
MAX_BLOCK = 8192


@triton.jit
def _rint(x):
    # round half to even for |x| < 2^22 (fp32 add rounds to nearest even)
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _quant_per_token_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q,
                            BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = cols < K
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=0)
        scale = tl.maximum(tl.math.div_rn(absmax, 127.0), 1e-12)
        q = _rint(tl.math.div_rn(x, scale))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_row + cols, q.to(tl.int8), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            mask = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(x))
        absmax = tl.max(acc, axis=0)
        scale = tl.maximum(tl.math.div_rn(absmax, 127.0), 1e-12)
        for k0 in range(0, K, BLOCK):
            mask = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            q = _rint(tl.math.div_rn(x, scale))
            q = tl.minimum(tl.maximum(q, -127.0), 127.0)
            tl.store(q_row + k0 + cols, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, scale)


_LAUNCH = FastLauncher(_quant_per_token_kernel)


def quantize_per_token_into(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """x [M, K] (unit stride in K) -> q[:M] int8 (rows >= M untouched), scale [M] float32."""
    m, k = x.shape
    if m == 0:
        return
    block = min(triton.next_power_of_2(k), MAX_BLOCK)
    sx, sq = x.stride(0), q.stride(0)
    _LAUNCH((k, sx, sq, x.dtype, aligned16(x), aligned16(q)), (m, 1, 1),
            (x, q, scale, k, sx, sq), dict(BLOCK=block, ONE_PASS=k <= block),
            dict(num_warps=8 if block >= 4096 else 4), x.device.index or 0)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    s = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    quantize_per_token_into(x, q, s)
    return q, s
