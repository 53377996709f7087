"""The small interface between the linear method and a W8A8 GEMM implementation.

The linear method validates and unpacks the checkpoint tensors once (dense codes [N, K] of the
checkpoint's grid, int8 or float8_e4m3fn, + per-channel scale); a kernel turns them into its
resident form (``prepare``) and runs ``y = dequant(quant_per_token(x) @ W^T) + bias`` (``apply``),
activations quantized per token on the same grid. Which kernel serves a layer is chosen in
dispatch.py from what each kernel says about itself: ``is_supported`` (this machine) and
``can_implement`` (this layer). Kernels import no vLLM.

A w4a8 2:4 layer (int4 values x uint8 group scale, ``LinearLayer.int4``) reaches a kernel in one of
two forms: a kernel with ``int4_resident`` gets the checked checkpoint tensors (``prepare_int4``)
and keeps int4 values resident, as they are or in a layout of its own; any other takes its int8
codes (int4 value x group scale, exact) through ``prepare`` like an int8 layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from ..quant import INT8, Grid


class UnsupportedDeviceError(RuntimeError):
    """The device (GPU generation, dtype) cannot run sparse24."""


@dataclass(frozen=True)
class LinearLayer:
    """One quantized linear layer as a kernel sees it."""

    name: str
    n: int  # output features (per tensor-parallel rank)
    k: int  # input features (per tensor-parallel rank)
    sparse: bool  # 2:4 sparse, or dense W8A8
    act_dtype: torch.dtype  # the model dtype: activations in, output out
    grid: Grid = INT8  # the checkpoint's scheme: int8 or fp8 codes (w4a8: int8)
    device: torch.device = torch.device("cpu")
    int4: bool = False  # a w4a8 2:4 layer: int4 values with group scales in the checkpoint


class Int4Weight24(NamedTuple):
    """A w4a8 2:4 weight as the checkpoint stores it (docs/format.md), checked at load."""

    values: torch.Tensor  # uint8 [N, K/4]: the kept int4 values, two per byte (low nibble first)
    bitmask: torch.Tensor  # uint8 [N, K/8]: the kept positions, little bit order
    group_scale: torch.Tensor  # uint8 [N, ceil(K/128)]: int8 code = int4 value x group scale


class W8A8LinearKernel(ABC):
    name: ClassVar[str]
    # the value of VLLM_SPARSE24_KERNEL that selects this kernel
    backend: ClassVar[str]
    # True for the float32 reference: correct everywhere, far slower than the CUDA kernels on a GPU
    reference: ClassVar[bool] = False
    # True: keeps a w4a8 layer's int4 values resident (prepare_int4); False: takes its int8 codes (prepare)
    int4_resident: ClassVar[bool] = False

    def __init__(self, layer: LinearLayer) -> None:
        self.layer = layer
        self.n, self.k, self.grid, self.act_dtype = layer.n, layer.k, layer.grid, layer.act_dtype
        self.layer_name = layer.name

    @classmethod
    @abstractmethod
    def is_supported(cls, device: torch.device) -> tuple[bool, str | None]:
        """Whether this machine runs the kernel (GPU generation, compiled library): (ok, reason)."""

    @classmethod
    @abstractmethod
    def can_implement(cls, layer: LinearLayer) -> tuple[bool, str | None]:
        """Whether the kernel computes this layer (sparse or dense, dtypes, scheme): (ok, reason)."""

    @abstractmethod
    def prepare(self, weight: torch.Tensor, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """weight: codes [N, K] of ``self.grid`` (2:4 when sparse), weight_scale: float32 [N, 1] ->
        the tensors to keep resident (the caller frees the inputs)."""

    def prepare_int4(self, weight: Int4Weight24, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """A w4a8 2:4 weight (kernels with ``int4_resident``) -> the tensors to keep resident."""
        raise NotImplementedError(f"{self.name} takes int8 codes, not int4 values")

    @abstractmethod
    def apply(
        self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x [..., K] in the model dtype -> [..., N] in the model dtype."""
