"""Quantization-aware training of 2:4 W8A8 linears with a fixed mask (pure tensor math).

The forward computes exactly what the plugin computes (``vllm_sparse24.quant``), on the
student's grid (int8, or fp8 e4m3): weights ``w * mask`` rounded per output channel to
``scale * codes``, inputs rounded per token with scale = absmax / qmax (127 for int8, 448 for
fp8). The weight scale is max(absmax / qmax, the student's own scale): training starts on exactly
the student's grid (a one-shot method may have chosen a scale above the row's absmax / qmax) and
the grid widens only where a row outgrows it. Rounding passes the gradient straight through
(STE); the mask multiplies the weight, so pruned positions get no gradient and stay 0.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vllm_sparse24.quant import INT8, Grid


class _RoundToGridSTE(torch.autograd.Function):
    """``grid.round(x, scale)`` (the nearest grid point); the gradient passes straight through."""

    @staticmethod
    def forward(ctx, x, scale, grid):  # type: ignore[override]
        return grid.round(x, scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None


def ste_fake_quant_per_token(x: torch.Tensor, grid: Grid = INT8) -> torch.Tensor:
    """Equal in value to ``vllm_sparse24.quant.fake_quant_per_token(x, grid)``; identity gradient."""
    scale = grid.scale(x.detach().abs().amax(dim=-1, keepdim=True))
    return _RoundToGridSTE.apply(x, scale, grid)


def weight_scale(w: torch.Tensor, floor: torch.Tensor | None = None, grid: Grid = INT8) -> torch.Tensor:
    """Per-output-channel scale [N, 1]: absmax / qmax, at least ``floor`` where given."""
    scale = grid.scale(w.detach().abs().amax(dim=1, keepdim=True))
    return scale if floor is None else torch.maximum(scale, floor)


def ste_fake_quant_weight(w: torch.Tensor, floor: torch.Tensor | None = None, grid: Grid = INT8) -> torch.Tensor:
    """``q * scale`` with the scale of :func:`weight_scale` (without ``floor``: the values of
    ``quantize_weight_per_channel(w, grid)``); identity gradient."""
    return _RoundToGridSTE.apply(w, weight_scale(w, floor, grid), grid)


class QATLinear(nn.Linear):
    """A linear layer trained on ``grid`` (int8 or fp8), 2:4 mask fixed (``mask`` None: dense W8A8).

    A subclass of ``nn.Linear`` so that model walking treats it as the layer it replaces.
    ``quant`` False trains in float (weights still masked); ``export()`` gives the codes
    and scales the plugin will run, equal to the weights of the last quantized forward.
    """

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor | None,
                 name: str, scale_floor: torch.Tensor | None = None, grid: Grid = INT8) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: the parameters come from ``weight``
        if mask is not None and tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"{name}: mask {tuple(mask.shape)} does not match weight {tuple(weight.shape)}")
        self.name = name
        self.grid = grid
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        if mask is not None:
            w = w * mask.to(w.dtype)
        self.weight = nn.Parameter(w.clone())
        self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False) if bias is not None else None
        # not persistent: the model's state_dict stays that of a plain HF model
        self.register_buffer("mask", None if mask is None else mask.to(torch.float32), persistent=False)
        floor = None if scale_floor is None else scale_floor.detach().float().reshape(-1, 1)
        if floor is not None and floor.shape[0] != self.out_features:
            raise ValueError(f"{name}: scale {tuple(scale_floor.shape)} does not match {self.out_features} rows")
        self.register_buffer("scale_floor", floor, persistent=False)
        self.quant = True

    def masked_weight(self) -> torch.Tensor:
        return self.weight if self.mask is None else self.weight * self.mask

    def effective_weight(self) -> torch.Tensor:
        w = self.masked_weight()
        return ste_fake_quant_weight(w, self.scale_floor, self.grid) if self.quant else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant:
            x = ste_fake_quant_per_token(x, self.grid)
        return F.linear(x, self.effective_weight(), self.bias)

    @torch.no_grad()
    def reapply_mask(self) -> None:
        if self.mask is not None:
            self.weight.mul_(self.mask)

    @torch.no_grad()
    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [N, K] of the grid's dtype, float32 scales [N, 1]) on CPU."""
        w = self.masked_weight().float()
        scale = weight_scale(w, self.scale_floor, self.grid)
        return self.grid.codes(w, scale).cpu(), scale.cpu()

    def bool_mask(self) -> torch.Tensor | None:
        return None if self.mask is None else self.mask.bool().cpu()

    def extra_repr(self) -> str:
        kind = "dense" if self.mask is None else "2:4"
        return f"{self.in_features}, {self.out_features}, {kind}, {self.grid.name}, quant={self.quant}"
