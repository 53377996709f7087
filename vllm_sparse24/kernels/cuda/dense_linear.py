"""Dense W8A8 layers (``dense_layers``, ``auto:P``) on Hopper: int8 (or, in the fp8 scheme, e4m3)
resident, vLLM's CUTLASS ``cutlass_scaled_mm`` (per-token x per-channel scales and bias fused), the
same fusable activation quant as the sparse layers. (The kernel's name predates the fp8 scheme.) The op is looked up as ``torch.ops._C.cutlass_scaled_mm``, which vLLM
registers in every worker: no import of vLLM here."""

from __future__ import annotations

import torch

from ..base import W8A8LinearKernel
from ..dispatch import HOPPER
from .act_quant import quantize_activations


def _scaled_mm_op():
    try:
        return torch.ops._C.cutlass_scaled_mm
    except (AttributeError, RuntimeError):
        return None


class VllmCutlassInt8Kernel(W8A8LinearKernel):
    name = "vllm_cutlass_int8"
    act_dtypes = (torch.bfloat16, torch.float16)

    @classmethod
    def is_supported(cls, device: torch.device, sparse: bool) -> tuple[bool, str | None]:
        if sparse:
            return False, "serves dense layers only"
        device = torch.device(device)
        if device.type != "cuda" or torch.cuda.get_device_capability(device) != HOPPER:
            return False, "needs a Hopper (sm90) GPU"
        if _scaled_mm_op() is None:
            return False, "vLLM's CUDA ops (torch.ops._C.cutlass_scaled_mm) are not loaded"
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
