"""Portable W8A8 path (CPU, or any device): the reference the GPU kernels are tested against.

One float32 computation for both grids (``vllm_sparse24.quant``): the activations are quantized
per token on the layer's grid (int8 or e4m3), and the codes are multiplied in a float32 GEMM
against the weight codes held in float32, then scaled by both scales.

* int8: every product (|q| <= 127) is exact and the sum is exact up to 2^24, i.e. K <= 1040 terms
  at full range; beyond that the float32 rounding (~6e-8 relative) is far below the int8 error.
* fp8 (e4m3): every code is exact in float32 and so is every product of two (3-bit mantissas);
  the sum rounds like any float32 sum (~6e-8 relative per term, far below the e4m3 error).

w4a8 (``TorchW4A8Kernel``): the int4 values, bitmask and group scales stay resident as the
checkpoint stores them (~0.39 bytes per weight), and every call expands them to the int8 codes
(int4 value x group scale, exact in float32) and runs the same float32 computation, so a w4a8 layer
gives the same bits as the int8 reference kernel on its int8 codes.

Why not an int8 GEMM here: on the AVX2-only CPU of our CI, vLLM's oneDNN int8 kernel
returned ~14% relative error (likely int16 saturation in vpmaddubsw without VNNI) and
``torch._int_mm`` ran 30x slower than the float32 GEMM (docs/kernels-history.md, "CPU path").
"""

from __future__ import annotations

import torch

from ..format import GROUP, KEEP, unpack_nibbles
from ..quant import GRIDS, GROUP_SIZE, INT8, quantize_per_token
from .base import Int4Weight24, LinearLayer, W8A8LinearKernel


def _w8a8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
          grid: str) -> torch.Tensor:
    xq, xs = quantize_per_token(x, GRIDS[grid])
    acc = torch.nn.functional.linear(xq.to(torch.float32), weight)
    out = acc * xs * weight_scale
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)


@torch.library.custom_op("sparse24::torch_w8a8_linear", mutates_args=())
def torch_w8a8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, grid: str
) -> torch.Tensor:
    """x [M, K]; weight: the codes as float32 [N, K]; weight_scale float32 [N]; grid "int8" / "fp8"."""
    return _w8a8(x, weight, weight_scale, bias, grid)


@torch_w8a8_linear.register_fake
def _(x, weight, weight_scale, bias, grid):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _kept_positions() -> torch.Tensor:
    """int64 [16, 2]: for a bitmask nibble with 2 bits set, the positions (0..3) of its kept pair,
    ascending; other nibbles (refused at load) map to (0, 1)."""
    table = torch.tensor([[0, 1]] * 16, dtype=torch.int64)
    for nibble in range(16):
        bits = [p for p in range(GROUP) if nibble >> p & 1]
        if len(bits) == KEEP:
            table[nibble] = torch.tensor(bits)
    return table


_KEPT_POSITIONS = _kept_positions()


def int4_weight_as_float(values: torch.Tensor, bitmask: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
    """The int8 codes (int4 value x group scale) of a w4a8 2:4 weight as float32 [N, K], dense (the
    packed values [N, K/4], bitmask [N, K/8] and group scales [N, ceil(K/128)] of docs/format.md)."""
    n, groups_of_4 = values.shape
    kept = unpack_nibbles(values).to(torch.float32)  # [N, K/2]
    # a group of 128 columns keeps 64 values
    g = group_scale.to(torch.float32).repeat_interleave(GROUP_SIZE // GROUP * KEEP, dim=1)[:, : kept.shape[1]]
    nibbles = torch.stack((bitmask & 0xF, bitmask >> 4), dim=-1).reshape(n, groups_of_4).to(torch.int64)
    positions = _KEPT_POSITIONS.to(values.device)[nibbles]  # [N, K/4, 2]
    dense = torch.zeros(n, groups_of_4, GROUP, dtype=torch.float32, device=values.device)
    dense.scatter_(2, positions, (kept * g).reshape(n, groups_of_4, KEEP))
    return dense.reshape(n, groups_of_4 * GROUP)


@torch.library.custom_op("sparse24::torch_w4a8_linear", mutates_args=())
def torch_w4a8_linear(
    x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, group_scale: torch.Tensor,
    weight_scale: torch.Tensor, bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K]; a w4a8 2:4 weight as stored (``int4_weight_as_float``); weight_scale float32 [N]."""
    return _w8a8(x, int4_weight_as_float(values, bitmask, group_scale), weight_scale, bias, INT8.name)


@torch_w4a8_linear.register_fake
def _(x, values, bitmask, group_scale, weight_scale, bias):
    return x.new_empty((x.shape[0], values.shape[0]))


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


class TorchW4A8Kernel(W8A8LinearKernel):
    """The reference kernel of w4a8 2:4 layers: the int4 values stay resident as stored, expanded
    to int8 codes at every call (see the module docstring)."""

    name = "torch_w4a8"
    backend = "torch"
    reference = True
    int4_resident = True

    @classmethod
    def is_supported(cls, device: torch.device) -> tuple[bool, str | None]:
        return True, None

    @classmethod
    def can_implement(cls, layer: LinearLayer) -> tuple[bool, str | None]:
        if not layer.int4:
            return False, "serves w4a8 2:4 layers only"
        return True, None

    def prepare(self, weight: torch.Tensor, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        raise ValueError(f"{self.layer_name}: {self.name} keeps int4 values resident (prepare_int4), not int8 codes")

    def prepare_int4(self, weight: Int4Weight24, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        want = (self.n, self.k // 4)
        if weight.values.dtype != torch.uint8 or tuple(weight.values.shape) != want:
            raise ValueError(f"{self.layer_name}: expected uint8 int4 values {list(want)}, got "
                             f"{weight.values.dtype} {list(weight.values.shape)}")
        return {
            "values": weight.values.contiguous(),
            "bitmask": weight.bitmask.contiguous(),
            "group_scale": weight.group_scale.contiguous(),
            "weight_scale": weight_scale.reshape(-1).to(torch.float32),
        }

    def apply(self, tensors, x, bias):
        shape = x.shape
        out = torch.ops.sparse24.torch_w4a8_linear(
            x.reshape(-1, shape[-1]), tensors["values"], tensors["bitmask"], tensors["group_scale"],
            tensors["weight_scale"], bias,
        )
        return out.reshape(*shape[:-1], self.n)
