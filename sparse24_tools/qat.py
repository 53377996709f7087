"""Quantization-aware training of 2:4 W8A8 / W4A8 linears with a fixed mask (pure tensor math).

The forward computes exactly what the plugin computes (``vllm_sparse24.quant``), on the
student's grid (int8, or fp8 e4m3): weights ``w * mask`` rounded per output channel to
``scale * codes``, inputs rounded per token with scale = absmax / qmax (127 for int8, 448 for
fp8). The weight scale is max(absmax / qmax, the student's own scale): training starts on exactly
the student's grid (a one-shot method may have chosen a scale above the row's absmax / qmax) and
the grid widens only where a row outgrows it. Rounding passes the gradient straight through
(STE); the mask multiplies the weight, so pruned positions get no gradient and stay 0.

A w4a8 student's 2:4 linears train on the two-level int4 grid (``quant.Int4GroupGrid``): weight =
s x g x v, v in [-7, 7], with the channel scale s and the group scales g those of the student,
frozen. Why frozen rather than re-chosen (e.g. least-squares group scales of the trained weight)
when the output is written: the forward must be the written checkpoint, so a scale chosen at the
end would either be evaluated without having been trained on or would have to be re-chosen at
every step (18 candidate roundings of every weight, and a grid that jumps under the weights that
learned it); the one-shot scales were chosen jointly with the rounding (SparseGPT-joint picks each
group's g on its updated weights), so they fit the kept weights the training starts from; and a
row-wide s that widened like the 8-bit grids' would coarsen every group of the row at once. So
training chooses each kept weight's int4 value on a fixed grid. The gradient passes straight
through where the rounding lies inside [-7, 7] and is 0 where the clamp holds the value (the
weight no longer moves the output there; as PyTorch's fake-quantize modules do).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vllm_sparse24.format import check_group_scale
from vllm_sparse24.quant import INT8, W4A8, Grid, expand_group_scale


class _RoundToGridSTE(torch.autograd.Function):
    """``grid.round(x, scale)`` (the nearest grid point); the gradient passes straight through."""

    @staticmethod
    def forward(ctx, x, scale, grid):  # type: ignore[override]
        return grid.round(x, scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None


class _RoundToInt4GridSTE(torch.autograd.Function):
    """``W4A8.round(w, scale, group_scale)``; the gradient passes where the rounding is inside
    [-7, 7] (``W4A8.in_range``) and is 0 where the clamp holds the value."""

    @staticmethod
    def forward(ctx, w, scale, group_scale):  # type: ignore[override]
        ctx.save_for_backward(W4A8.in_range(w, scale, group_scale))
        return W4A8.round(w, scale, group_scale).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def ste_fake_quant_int4_weight(w: torch.Tensor, scale: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
    """w [N, K] on the w4a8 grid with channel scale [N, 1] and group scales [N, ceil(K/128)]
    (integers 1..18, any dtype): the values of ``W4A8.codes(w, scale, group_scale) * scale``;
    gradient straight through inside the clamp range, 0 outside."""
    g = expand_group_scale(group_scale, w.shape[1]).float()
    return _RoundToInt4GridSTE.apply(w, scale.float(), g)


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
    With ``group_scale`` (uint8 [N, ceil(K/128)]) a w4a8 2:4 layer: weights on the int4 grid
    s x g x v with s = ``scale_floor`` and g = ``group_scale`` both frozen, inputs on ``grid`` (int8).

    A subclass of ``nn.Linear`` so that model walking treats it as the layer it replaces.
    ``quant`` False trains in float (weights still masked); ``export()`` gives the codes
    and scales the plugin will run (``export_group_scale()`` the group scales), equal to the
    weights of the last quantized forward.
    """

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor | None,
                 name: str, scale_floor: torch.Tensor | None = None, grid: Grid = INT8,
                 group_scale: torch.Tensor | None = None) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: the parameters come from ``weight``
        if mask is not None and tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"{name}: mask {tuple(mask.shape)} does not match weight {tuple(weight.shape)}")
        if group_scale is not None:
            if mask is None or scale_floor is None:
                raise ValueError(f"{name}: w4a8 group scales need the layer's 2:4 mask and its channel scale")
            if grid != W4A8.act:
                raise ValueError(f"{name}: w4a8 layers take {W4A8.act.name} inputs, got grid {grid.name}")
            check_group_scale(group_scale, *weight.shape, name=f"{name}: group scales")
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
        # w4a8: the frozen group scales (uint8, expanded to the columns in each forward)
        self.register_buffer("group_scale", None if group_scale is None else group_scale.to(torch.uint8).clone(),
                             persistent=False)
        self.quant = True

    def masked_weight(self) -> torch.Tensor:
        return self.weight if self.mask is None else self.weight * self.mask

    def effective_weight(self) -> torch.Tensor:
        w = self.masked_weight()
        if not self.quant:
            return w
        if self.group_scale is not None:
            return ste_fake_quant_int4_weight(w, self.scale_floor, self.group_scale)
        return ste_fake_quant_weight(w, self.scale_floor, self.grid)

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
        """(codes [N, K] of the grid's dtype, float32 scales [N, 1]) on CPU; w4a8: the int8 codes
        int4 value x group scale and the frozen channel scale."""
        w = self.masked_weight().float()
        if self.group_scale is not None:
            return W4A8.codes(w, self.scale_floor, self.group_scale).cpu(), self.scale_floor.cpu()
        scale = weight_scale(w, self.scale_floor, self.grid)
        return self.grid.codes(w, scale).cpu(), scale.cpu()

    def export_group_scale(self) -> torch.Tensor | None:
        """w4a8: the group scales (uint8 [N, ceil(K/128)], those of the student) on CPU; else None."""
        return None if self.group_scale is None else self.group_scale.cpu()

    def bool_mask(self) -> torch.Tensor | None:
        return None if self.mask is None else self.mask.bool().cpu()

    def extra_repr(self) -> str:
        kind = "dense" if self.mask is None else "2:4"
        grid = W4A8.name if self.group_scale is not None else self.grid.name
        return f"{self.in_features}, {self.out_features}, {kind}, {grid}, quant={self.quant}"
