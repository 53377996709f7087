"""W8A8 linear kernels, chosen at load time by device and layer kind (no vLLM import)."""

from __future__ import annotations

import os

import torch

from .base import UnsupportedDeviceError, W8A8LinearKernel
from .torch_ref import TorchW8A8Kernel

__all__ = ["UnsupportedDeviceError", "W8A8LinearKernel", "TorchW8A8Kernel", "choose_kernel"]

MIN_CUDA_CAPABILITY = (8, 0)


def _candidates() -> list[type[W8A8LinearKernel]]:
    kernels: list[type[W8A8LinearKernel]] = []
    try:  # the CUDA kernels need triton / cuSPARSELt; absent on CPU-only installs
        from .cuda import CUDA_KERNELS

        kernels += CUDA_KERNELS
    except ImportError:
        pass
    return [*kernels, TorchW8A8Kernel]


def choose_kernel(
    device: torch.device, sparse: bool, layer_name: str = "", act_dtype: torch.dtype | None = None
) -> type[W8A8LinearKernel]:
    """First kernel that supports the device and the model dtype; ``VLLM_SPARSE24_KERNEL=<name>``
    forces one."""
    device = torch.device(device)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CUDA_CAPABILITY:
            raise UnsupportedDeviceError(
                f"{layer_name}: sparse24 needs an NVIDIA GPU of compute capability "
                f">= {MIN_CUDA_CAPABILITY[0]}.{MIN_CUDA_CAPABILITY[1]} (Ampere or newer); "
                f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}"
            )
    forced = os.environ.get("VLLM_SPARSE24_KERNEL")
    reasons = []
    for cls in _candidates():
        if forced and cls.name != forced:
            continue
        ok, why = cls.is_supported(device, sparse)
        if ok and act_dtype is not None and cls.act_dtypes is not None and act_dtype not in cls.act_dtypes:
            ok, why = False, f"runs {[str(d) for d in cls.act_dtypes]}, the model is {act_dtype}"
        if ok:
            return cls
        reasons.append(f"{cls.name}: {why}")
    raise UnsupportedDeviceError(
        f"{layer_name}: no sparse24 kernel for device {device}"
        + (f" (VLLM_SPARSE24_KERNEL={forced})" if forced else "")
        + ("; " + "; ".join(reasons) if reasons else "")
    )
