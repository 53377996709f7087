"""Portable W8A8 path (CPU, or any device): the reference the GPU kernels are tested against.

One float32 computation for both grids (``vllm_sparse24.quant``): the activations are quantized
per token on the layer's grid (int8 or e4m3), and the codes are multiplied in a float32 GEMM
against the weight codes held in float32, then scaled by both scales.

* int8: every product (|q| <= 127) is exact and the sum is exact up to 2^24, i.e. K <= 1040 terms
  at full range; beyond that the float32 rounding (~6e-8 relative) is far below the int8 error.
* fp8 (e4m3): every code is exact in float32 and so is every product of two (3-bit mantissas);
  the sum rounds like any float32 sum (~6e-8 relative per term, far below the e4m3 error).

Why not an int8 GEMM here: on the AVX2-only CPU of our CI, vLLM's oneDNN int8 kernel
returned ~14% relative error (likely int16 saturation in vpmaddubsw without VNNI) and
``torch._int_mm`` ran 30x slower than the float32 GEMM (docs/kernels-history.md, "CPU path").
"""

from __future__ import annotations

import torch

from ..quant import GRIDS, quantize_per_token
from .base import LinearLayer, W8A8LinearKernel


@torch.library.custom_op("sparse24::torch_w8a8_linear", mutates_args=())
def torch_w8a8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, grid: str
) -> torch.Tensor:
    """x [M, K]; weight: the codes as float32 [N, K]; weight_scale float32 [N]; grid "int8" / "fp8"."""
    xq, xs = quantize_per_token(x, GRIDS[grid])
    acc = torch.nn.functional.linear(xq.to(torch.float32), weight)
    out = acc * xs * weight_scale
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)


@torch_w8a8_linear.register_fake
def _(x, weight, weight_scale, bias, grid):
    return x.new_empty((x.shape[0], weight.shape[0]))


class TorchW8A8Kernel(W8A8LinearKernel):
    name = "torch"
    backend = "torch"
    reference = True

    @classmethod
    def is_supported(cls, device: torch.device) -> tuple[bool, str | None]:
        return True, None

    @classmethod
    def can_implement(cls, layer: LinearLayer) -> tuple[bool, str | None]:
        return True, None

    def prepare(self, weight: torch.Tensor, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        if weight.dtype != self.grid.dtype:
            raise ValueError(f"{self.layer_name}: expected {self.grid.dtype} weight codes ({self.grid.name}), "
                             f"got {weight.dtype}")
        return {
            "weight_int": weight.to(torch.float32),
            "weight_scale": weight_scale.reshape(-1).to(torch.float32),
        }

    def apply(self, tensors, x, bias):
        shape = x.shape
        out = torch.ops.sparse24.torch_w8a8_linear(
            x.reshape(-1, shape[-1]), tensors["weight_int"], tensors["weight_scale"], bias, self.grid.name
        )
        return out.reshape(*shape[:-1], self.n)
