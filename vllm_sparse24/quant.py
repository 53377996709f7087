"""Symmetric int8 quantization as the plugin computes it (pure torch, no vLLM import).

Weights: per output channel, scale = max|w_row| * float32(1/127), q = round(w / scale).
Activations: dynamic per token, scale = max|x_row| * float32(1/127), q = round(x / scale).
Rounding is to nearest, ties to even (torch.round), clamped to [-127, 127].
"""

from __future__ import annotations

import torch

QMAX = 127
# a row of zeros gets this scale instead of 0, so that q = 0 and nothing divides by 0
_MIN_SCALE = 1e-12


def int8_scale(absmax: torch.Tensor) -> torch.Tensor:
    # times the float32 reciprocal rather than / 127: torch divides by a scalar that way on CUDA but
    # not on the CPU, so this form gives the same bits on every device (and in the CUDA kernel)
    return (absmax.float() * (1.0 / QMAX)).clamp_min(_MIN_SCALE)


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes of ``x`` on the grid ``scale * {-127..127}`` (scale broadcasts against x)."""
    return torch.round(x.float() / scale).clamp_(-QMAX, QMAX).to(torch.int8)


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int8 [N, K], scale float32 [N, 1]); zeros stay zeros."""
    scale = int8_scale(w.abs().amax(dim=1, keepdim=True))
    return quantize_with_scale(w, scale), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q int8 [..., K], scale float32 [..., 1])."""
    scale = int8_scale(x.abs().amax(dim=-1, keepdim=True))
    return quantize_with_scale(x, scale), scale


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """What the int8 activation path sees, in x's dtype (for references and evaluation)."""
    q, scale = quantize_per_token(x)
    return (q.float() * scale).to(x.dtype)
