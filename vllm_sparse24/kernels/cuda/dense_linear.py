"""Dense W8A8 layers (``dense_layers``, ``auto:P``) on Hopper: int8 (or, in the fp8 scheme, e4m3)
resident, vLLM's CUTLASS ``cutlass_scaled_mm`` (per-token x per-channel scales and bias fused), the
same fusable activation quant as the sparse layers. The op is looked up as
``torch.ops._C.cutlass_scaled_mm``, which vLLM registers in every worker: no import of vLLM here."""

from __future__ import annotations

import torch

from ..base import LinearLayer, W8A8LinearKernel
from .act_quant import quantize_activations
from .device import MODEL_DTYPES, hopper


def _scaled_mm_op():
    try:
        return torch.ops._C.cutlass_scaled_mm
    except (AttributeError, RuntimeError):
        return None


class CutlassScaledMMKernel(W8A8LinearKernel):
    name = "cutlass_scaled_mm"
    backend = "cutlass"

    @classmethod
    def is_supported(cls, device: torch.device) -> tuple[bool, str | None]:
        ok, why = hopper(device)
        if not ok:
            return False, f"sparse24's dense-layer kernel is {why}"
        if _scaled_mm_op() is None:
            return False, "vLLM's CUDA ops (torch.ops._C.cutlass_scaled_mm) are not loaded"
        return True, None

    @classmethod
    def can_implement(cls, layer: LinearLayer) -> tuple[bool, str | None]:
        if layer.sparse:
            return False, "serves dense layers only"
        if layer.act_dtype not in MODEL_DTYPES:
            return False, f"runs bfloat16 and float16 models, the model is {layer.act_dtype}"
        return True, None

    def prepare(self, weight: torch.Tensor, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        if weight.dtype != self.grid.dtype or tuple(weight.shape) != (self.n, self.k):
            raise ValueError(f"{self.layer_name}: expected {self.grid.dtype} weight [{self.n}, {self.k}] "
                             f"({self.grid.name} scheme), got {weight.dtype} {tuple(weight.shape)}")
        if self.n % 16 or self.k % 16:
            raise ValueError(f"{self.layer_name}: vLLM's cutlass_scaled_mm needs N and K multiples of 16, "
                             f"got [{self.n}, {self.k}]")
        self._op = _scaled_mm_op()
        # [N, K] row-major is the [K, N] column-major operand cutlass_scaled_mm takes as b
        return {"weight": weight.contiguous(),
                "weight_scale": weight_scale.reshape(-1, 1).to(device=weight.device, dtype=torch.float32).contiguous()}

    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        xq, xs = quantize_activations(x.reshape(-1, self.k), self.grid)
        out = torch.empty(xq.shape[0], self.n, dtype=x.dtype, device=x.device)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        self._op(out, xq, tensors["weight"].t(), xs, tensors["weight_scale"], bias)
        return out.reshape(*shape[:-1], self.n)
