"""Dynamic per-token activation quant (int8 or e4m3) for the CUDA kernels, written so torch.compile
can fuse it.

Under torch.compile the quant is the plain torch ops of vllm_sparse24/quant.py (amax, scale, round,
clamp, cast), visible to Inductor, which fuses them into the RMSNorm / SiLU-mul kernel before the
GEMM, as it does for vLLM's own fp8 path; the GEMM is an opaque custom op after them. Eager int8
calls take one CUDA kernel of libsparse24 instead, bit-identical to the torch ops. The library has
no e4m3 quant kernel: eager fp8 calls run the same plain torch ops (a few elementwise kernels;
vLLM serves with torch.compile and CUDA graphs, where they are fused).
"""

from __future__ import annotations

import torch

from ...quant import INT8, Grid, quantize_per_token
from . import lib

_DTYPES = {torch.bfloat16: lib.BF16, torch.float16: lib.F16}


def quantize_activations(x: torch.Tensor, grid: Grid = INT8) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] bf16/fp16 -> (codes [M, K] of grid.dtype, contiguous; float32 scale [M, 1])."""
    if torch.compiler.is_compiling() or grid.dtype != torch.int8:
        return quantize_per_token(x, grid)
    return quantize_per_token_cuda(x)


def quantize_per_token_cuda(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager kernel (rows may be strided; K must have unit stride)."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    rc = lib.lib().s24_quant_int8(_DTYPES[x.dtype], x.data_ptr(), x.stride(0), m, k, q.data_ptr(),
                                  scale.data_ptr(), torch.cuda.current_stream(x.device).cuda_stream)
    if rc:
        lib.check(rc, "per-token quant")
    return q, scale
