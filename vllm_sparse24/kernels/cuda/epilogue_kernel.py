"""Prefill epilogue: out[m, n] = D[m, n] * x_scale[m] + bias[n] (one pass over the output).

cuSPARSELt applies the per-channel weight scale as its alpha vector; it has no per-column
(per-token) scale for int8, so the token scale and bias are applied here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FastLauncher, aligned16

BLOCK_M = 8
BLOCK_N = 512


@triton.jit(do_not_specialize=["M"])
def _token_scale_bias_kernel(d_ptr, xs_ptr, bias_ptr, out_ptr, M, N,
                             HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    y = d * xs[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


_LAUNCH = FastLauncher(_token_scale_bias_kernel)


def token_scale_bias(d: torch.Tensor, x_scale: torch.Tensor, bias: torch.Tensor | None,
                     out: torch.Tensor) -> None:
    """d [>=M, N] (first M rows used), x_scale [M], out [M, N] (may be d itself: in place)."""
    m, n = out.shape
    if m == 0:
        return
    has_bias = bias is not None
    grid = ((m + BLOCK_M - 1) // BLOCK_M, (n + BLOCK_N - 1) // BLOCK_N, 1)
    key = (n, has_bias, bias.dtype if has_bias else None, out.dtype, aligned16(d), aligned16(out))
    _LAUNCH(key, grid, (d, x_scale, bias if has_bias else x_scale, out, m, n),
            dict(HAS_BIAS=has_bias, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N), dict(num_warps=4), out.device.index or 0)
