"""Per-output-channel symmetric weight quantization, int8 or fp8 (pure torch).

Uses the plugin's own arithmetic (``vllm_sparse24.quant``, no vLLM import): a :class:`Grid` gives
the scale (absmax / 127 for int8, absmax / 448 for fp8 e4m3) and the rounding (int8: half to even,
clamped to [-127, 127]; e4m3: round to nearest e4m3 value, clamped to [-448, 448]).
"""

from __future__ import annotations

import torch

from vllm_sparse24.quant import (
    FP8,
    INT8,
    QMAX,
    Grid,
    grid_of,
    quantize_weight_per_channel,
    quantize_with_scale,
)

__all__ = ["FP8", "INT8", "QMAX", "Grid", "channel_scale", "dequantize", "grid_of", "quantize_with_scale",
           "quantize_weight_per_channel", "round_to_grid"]


def channel_scale(weight: torch.Tensor, grid: Grid = INT8) -> torch.Tensor:
    """float32 [N, 1] scale from each row's absmax."""
    return grid.scale(weight.abs().amax(dim=1, keepdim=True))


def round_to_grid(weight: torch.Tensor, scale: torch.Tensor, grid: Grid = INT8) -> torch.Tensor:
    """The nearest point of the grid ``scale * codes`` (float32, same shape)."""
    return grid.round(weight, scale)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()
