"""Symmetric W8A8 quantization as the plugin computes it (pure torch, no vLLM import).

Two grids (:class:`Grid`), one arithmetic:

* ``INT8``: codes are int8 in [-127, 127]; scale = absmax * float32(1/127); q = round(x / scale),
  to nearest, ties to even (torch.round), clamped to [-127, 127].
* ``FP8``: codes are float8_e4m3fn in [-448, 448]; scale = absmax * float32(1/448);
  q = e4m3(x / scale): clamped to [-448, 448], then rounded to the nearest e4m3 value, ties to
  even (torch's float32 -> float8_e4m3fn cast).

Weights: per output channel (one scale per row). Activations: dynamic per token (one scale per
row of the input). A row of zeros gets a tiny scale instead of 0, so that q = 0 and nothing
divides by 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QMAX = 127  # the int8 grid's largest code
FP8_MAX = 448.0  # the largest finite float8_e4m3fn value
# a row of zeros gets this scale instead of 0, so that q = 0 and nothing divides by 0
_MIN_SCALE = 1e-12


@dataclass(frozen=True)
class Grid:
    """A symmetric 8-bit quantization grid: ``scale * codes`` with codes of ``dtype`` in
    [-qmax, qmax]."""

    name: str  # "int8" | "fp8": the value of ``--scheme`` and of the checkpoint's scheme
    dtype: torch.dtype  # dtype of the codes (and of the checkpoint's weight tensors)
    qmax: float
    type: str  # compressed-tensors QuantizationArgs.type: "int" | "float"

    def scale(self, absmax: torch.Tensor) -> torch.Tensor:
        # times the float32 reciprocal rather than / qmax: torch divides by a scalar that way on CUDA
        # but not on the CPU, so this form gives the same bits on every device (and in the CUDA kernel)
        return (absmax.float() * (1.0 / self.qmax)).clamp_min(_MIN_SCALE)

    def codes(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Codes of ``x`` on the grid ``scale * codes`` (scale broadcasts against x)."""
        y = x.float() / scale
        if self.dtype == torch.int8:
            return torch.round(y).clamp_(-self.qmax, self.qmax).to(torch.int8)
        # clamp first: out-of-range casts are NaN on some devices and saturate on others
        return y.clamp_(-self.qmax, self.qmax).to(self.dtype)

    def round(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The nearest grid point, in float32 (``codes(x, scale) * scale``)."""
        return self.codes(x, scale).float() * scale


INT8 = Grid("int8", torch.int8, float(QMAX), "int")
FP8 = Grid("fp8", torch.float8_e4m3fn, FP8_MAX, "float")
GRIDS: dict[str, Grid] = {g.name: g for g in (INT8, FP8)}


def grid_of(name: str) -> Grid:
    """The grid called ``name`` ("int8" or "fp8"); ValueError naming the choices otherwise."""
    try:
        return GRIDS[name]
    except KeyError:
        raise ValueError(f"unknown quantization scheme {name!r}; choose from {sorted(GRIDS)}") from None


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, grid: Grid = INT8) -> torch.Tensor:
    """Codes of ``x`` on the grid ``scale * codes`` (scale broadcasts against x)."""
    return grid.codes(x, scale)


def quantize_weight_per_channel(w: torch.Tensor, grid: Grid = INT8) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (codes [N, K] of grid.dtype, scale float32 [N, 1]); zeros stay zeros."""
    scale = grid.scale(w.abs().amax(dim=1, keepdim=True))
    return grid.codes(w, scale), scale


def quantize_per_token(x: torch.Tensor, grid: Grid = INT8) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (codes [..., K] of grid.dtype, scale float32 [..., 1])."""
    scale = grid.scale(x.abs().amax(dim=-1, keepdim=True))
    return grid.codes(x, scale), scale


def fake_quant_per_token(x: torch.Tensor, grid: Grid = INT8) -> torch.Tensor:
    """What the activation path sees, in x's dtype (for references and evaluation)."""
    q, scale = quantize_per_token(x, grid)
    return (q.float() * scale).to(x.dtype)
