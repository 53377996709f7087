"""Which kernel serves a layer: a priority list per platform, fastest first, and the first kernel
that can implement the layer (``can_implement``) and runs on this machine (``is_supported``) wins.
Which GEMM config serves which token count inside the CUDA 2:4 kernel is data of its own
(``cuda/gemm_table.py``).

* CUDA: ``CutlassSparse24Kernel`` (2:4 layers, the sparse24 library: Hopper, bf16 / fp16 models,
  the scheme's GEMM configs), ``CutlassScaledMMKernel`` (dense W8A8 layers: vLLM's
  cutlass_scaled_mm), then the float32 references (``TorchW4A8Kernel`` for w4a8 2:4 layers,
  ``TorchW8A8Kernel`` for any other) for layers no CUDA kernel computes (float32 models, fp8 in
  fp16 models), with a warning that it is slow. A w4a8 2:4 layer on the CUDA 2:4 kernel keeps its
  int4 values resident (``int4_resident``: ~0.39 bytes per weight, logged per layer shape at load):
  the decode GEMM's int4 variant streams them at few tokens, and above its threshold they are
  unpacked into one shared int8 scratch per device for the int8 GEMM table
  (``gemm_table.GEMM_INPUT``).
* Any other device (CPU): ``TorchW4A8Kernel`` (w4a8 2:4 layers: the int4 values stay resident),
  then ``TorchW8A8Kernel``.

A CUDA kernel that can implement a layer but does not run on this machine (another GPU
generation, the library not built) is an error naming the reason, not a silent fall back to the
reference kernel. ``VLLM_SPARSE24_KERNEL`` (read once per process) restricts the choice to one
backend: ``cutlass`` (both CUDA kernels, each for its kind of layer) or ``torch`` (the reference
kernel on any device, e.g. to check a GPU other than Hopper).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from .base import LinearLayer, UnsupportedDeviceError, W8A8LinearKernel
from .cuda.dense_linear import CutlassScaledMMKernel
from .cuda.sparse24_linear import CutlassSparse24Kernel
from .torch_ref import TorchW4A8Kernel, TorchW8A8Kernel

log = logging.getLogger(__name__)
KERNEL_ENV = "VLLM_SPARSE24_KERNEL"

# device type -> kernels, fastest first; devices not listed run the reference kernel
KERNELS: dict[str, tuple[type[W8A8LinearKernel], ...]] = {
    "cuda": (CutlassSparse24Kernel, CutlassScaledMMKernel, TorchW4A8Kernel, TorchW8A8Kernel),
}
PORTABLE: tuple[type[W8A8LinearKernel], ...] = (TorchW4A8Kernel, TorchW8A8Kernel)
BACKENDS = tuple(sorted({k.backend for kernels in (*KERNELS.values(), PORTABLE) for k in kernels}))


@functools.cache
def kernel_override() -> str | None:
    """The backend ``VLLM_SPARSE24_KERNEL`` names (None when unset), read once per process."""
    raw = os.environ.get(KERNEL_ENV, "").strip()
    if not raw:
        return None
    if raw not in BACKENDS:
        raise UnsupportedDeviceError(f"{KERNEL_ENV}={raw!r} names no sparse24 kernel; choose one of {list(BACKENDS)}")
    return raw


def choose_kernel(layer: LinearLayer) -> type[W8A8LinearKernel]:
    """The kernel class for one layer; UnsupportedDeviceError naming the layer and the reasons."""
    device = torch.device(layer.device)
    forced = kernel_override()
    kernels = KERNELS.get(device.type, PORTABLE)
    if forced is not None:
        kernels = tuple(k for k in kernels if k.backend == forced)
        if not kernels:
            raise UnsupportedDeviceError(f"{layer.name}: {KERNEL_ENV}={forced} has no kernel for {device.type} "
                                         "devices; unset it or choose torch")
    refused: list[str] = []
    for kernel in kernels:
        ok, why = kernel.can_implement(layer)
        if not ok:
            refused.append(f"{kernel.name} {why}")
            continue
        ok, why = kernel.is_supported(device)
        if not ok:
            hint = "" if kernel.reference else (f". {KERNEL_ENV}=torch runs the float32 reference kernel instead "
                                                "(correct, slow)")
            raise UnsupportedDeviceError(f"{layer.name}: {why}{hint}")
        if kernel.reference and device.type == "cuda":
            _warn_slow(f"{KERNEL_ENV}={forced}" if forced else "; ".join(refused))
        if layer.int4 and not kernel.int4_resident:
            _say_unpacked(kernel.name)
        return kernel
    chosen = f" ({KERNEL_ENV}={forced})" if forced else ""
    raise UnsupportedDeviceError(f"{layer.name}: no sparse24 kernel{chosen} runs this "
                                 f"{'2:4' if layer.sparse else 'dense'} layer: {'; '.join(refused)}")


@functools.cache
def _say_unpacked(kernel: str) -> None:
    """Said once per kernel that takes int8 codes: w4a8 2:4 layers run there unpacked at load."""
    log.warning("sparse24: w4a8 2:4 layers run on %s unpacked into int8 codes at load (int4 value x group scale: "
                "the same products, more bytes per weight resident than the ~0.39 of the int4 values)", kernel)


@functools.cache
def _warn_slow(why: str) -> None:
    """Said once per reason: the reference kernel is correct on a GPU but far slower."""
    log.warning("sparse24: %s; running the float32 reference kernel on the GPU (correct, slow: weights "
                "held in float32, no 2:4 speed-up)", why)
