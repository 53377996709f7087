"""CUDA kernels (Triton + cuSPARSELt). Importing needs triton; a missing triton raises
ImportError (the caller falls back to the torch kernel). Nothing here touches the GPU or
loads cuSPARSELt at import time, so CPU-only machines with triton installed import it fine."""

from __future__ import annotations

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as e:  # a broken triton install must not take the plugin down
    raise ImportError(f"sparse24 CUDA kernels need triton: {e}") from e

from .linear import Sparse24CudaKernel

CUDA_KERNELS = [Sparse24CudaKernel]

__all__ = ["CUDA_KERNELS", "Sparse24CudaKernel"]
