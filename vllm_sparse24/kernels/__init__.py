"""W8A8 linear kernels (no vLLM import); which one serves a layer is decided in dispatch.py."""

from __future__ import annotations

from .base import LinearLayer, UnsupportedDeviceError, W8A8LinearKernel
from .dispatch import choose_kernel
from .torch_ref import TorchW8A8Kernel

__all__ = ["LinearLayer", "UnsupportedDeviceError", "W8A8LinearKernel", "TorchW8A8Kernel", "choose_kernel"]
