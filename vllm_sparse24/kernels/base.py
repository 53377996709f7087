"""The small interface between the linear method and a W8A8 GEMM implementation.

The linear method validates and unpacks the checkpoint tensors once (dense codes [N, K] of the
checkpoint's grid, int8 or float8_e4m3fn, + per-channel scale); a kernel turns them into its
resident form (``prepare``) and runs ``y = dequant(quant_per_token(x) @ W^T) + bias`` (``apply``),
activations quantized per token on the same grid. Kernels import no vLLM.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..quant import INT8, Grid


class UnsupportedDeviceError(RuntimeError):
    """The device (GPU generation, dtype) cannot run sparse24."""


class W8A8LinearKernel(ABC):
    name: ClassVar[str]
    # model (activation) dtypes the kernel runs; None = any
    act_dtypes: ClassVar[tuple[torch.dtype, ...] | None] = None

    def __init__(self, n: int, k: int, sparse: bool, layer_name: str, act_dtype: torch.dtype | None = None,
                 grid: Grid = INT8) -> None:
        self.n, self.k, self.sparse, self.layer_name, self.act_dtype = n, k, sparse, layer_name, act_dtype
        self.grid = grid

    @classmethod
    @abstractmethod
    def is_supported(cls, device: torch.device, sparse: bool) -> tuple[bool, str | None]:
        """(ok, reason it is not)."""

    @abstractmethod
    def prepare(self, weight: torch.Tensor, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """weight: codes [N, K] of ``self.grid`` (2:4 when sparse), weight_scale: float32 [N, 1] ->
        the tensors to keep resident (the caller frees the inputs)."""

    @abstractmethod
    def apply(
        self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x [..., K] in the model dtype -> [..., N] in the model dtype."""
