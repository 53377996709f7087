"""Per-output-channel symmetric int8 weight quantization (pure torch).

Uses the plugin's own arithmetic (``vllm_sparse24.quant``, no vLLM import): scale = absmax/127,
round half to even, clamp to [-127, 127].
"""

from __future__ import annotations

import torch

from vllm_sparse24.quant import QMAX, int8_scale, quantize_weight_per_channel, quantize_with_scale

__all__ = ["QMAX", "channel_scale", "dequantize", "quantize_with_scale", "quantize_weight_per_channel", "round_to_grid"]


def channel_scale(weight: torch.Tensor) -> torch.Tensor:
    """float32 [N, 1] scale from each row's absmax."""
    return int8_scale(weight.abs().amax(dim=1, keepdim=True))


def round_to_grid(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The nearest point of the int8 grid ``scale * {-127..127}`` (float, same shape)."""
    return quantize_with_scale(weight, scale).float() * scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()
