"""Magnitude 2:4: keep the 2 largest |w| of every group of 4 along K.

The implementation lives on the plugin side (``vllm_sparse24.sparsity``), which builds the demo
model with it and must not import this package."""

from vllm_sparse24.sparsity import magnitude_24

__all__ = ["magnitude_24"]
