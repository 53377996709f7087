"""CUDA kernels for Hopper (sm90): the CUTLASS 2:4 GEMM library (csrc/, built ahead of time by
``python -m vllm_sparse24.build``) and dense W8A8 through vLLM's ``cutlass_scaled_mm``.

Importing this package touches no GPU and loads no library; lib.py loads libsparse24 on first use.
"""
