"""Symmetric W8A8 quantization as the plugin computes it (pure torch, no vLLM import).

Two 8-bit grids (:class:`Grid`), one arithmetic:

* ``INT8``: codes are int8 in [-127, 127]; scale = absmax * float32(1/127); q = round(x / scale),
  to nearest, ties to even (torch.round), clamped to [-127, 127].
* ``FP8``: codes are float8_e4m3fn in [-448, 448]; scale = absmax * float32(1/448);
  q = e4m3(x / scale): clamped to [-448, 448], then rounded to the nearest e4m3 value, ties to
  even (torch's float32 -> float8_e4m3fn cast).

Weights: per output channel (one scale per row). Activations: dynamic per token (one scale per
row of the input). A row of zeros gets a tiny scale instead of 0, so that q = 0 and nothing
divides by 0.

The w4a8 scheme (:class:`Int4GroupGrid`) stores 2:4 weights as int4 values with two-level scales
(QServe's progressive group quantization): per output channel a float32 scale s, per group of 128
along K an integer group scale g in [1, 18]. The int8 code of a weight is int4 value x g (exact
integer arithmetic, |int4 x g| <= 7 x 18 = 126), so the GEMM stays the int8 grid's (int8 weights
and activations, epilogue s x token scale).
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
# the 8-bit grids by name: the dtype of the GEMM's operands
GRIDS: dict[str, Grid] = {g.name: g for g in (INT8, FP8)}

INT4_MAX = 7  # int4 values are symmetric, in [-7, 7] (the nibble 0x8, -8, is not used)
GROUP_SIZE = 128  # columns along K per group scale: one metadata block of the 2:4 GPU layout
# the largest group scale: int4 value x group scale must stay an int8 code (7 x 18 = 126 <= 127)
GROUP_SCALE_MAX = QMAX // INT4_MAX


def group_count(k: int) -> int:
    """Group scales per row of a weight with K input features (the last group may be partial)."""
    return -(-k // GROUP_SIZE)


def expand_group_scale(group_scale: torch.Tensor, k: int) -> torch.Tensor:
    """[N, ceil(K/128)] -> [N, K]: every column's group scale (same dtype)."""
    return group_scale.repeat_interleave(GROUP_SIZE, dim=1)[:, :k]


@dataclass(frozen=True)
class Int4GroupGrid:
    """The w4a8 weight grid: ``weight = s * g * v`` with s float32 per row, g an integer in
    [1, 18] per row and group of 128 columns, v an int4 value in [-7, 7]; the int8 code ``g * v``
    lies on the int8 grid ``s * codes``, which the GEMM and the activations use (``act``).

    Rounding: ``v = round_half_even(w / (s * g))`` clamped to [-7, 7], with ``s * g`` a float32
    product. The channel scale is absmax(row) / 126 (the row's largest weight needs g = 18), and
    each group takes the g of least squared error (``group_scales``)."""

    name: str = "w4a8"
    act: Grid = INT8  # the activations' grid and the GEMM's: int8 codes g * v, scale s

    @property
    def dtype(self) -> torch.dtype:
        return self.act.dtype  # of the codes g * v

    def scale(self, absmax: torch.Tensor) -> torch.Tensor:
        """float32 channel scale s: absmax * float32(1/126) (as ``Grid.scale``, the same bits on every device)."""
        return (absmax.float() * (1.0 / (INT4_MAX * GROUP_SCALE_MAX))).clamp_min(_MIN_SCALE)

    def _unclamped(self, w: torch.Tensor, scale: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
        step = scale.float() * group_scale.float()
        return torch.round(w.float() / step)

    def values(self, w: torch.Tensor, scale: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
        """int4 values (as int8 in [-7, 7]) of ``w`` on the grid; ``scale`` and ``group_scale``
        broadcast against w (e.g. [N, 1] and the expanded [N, K], or one column's [N] each)."""
        return self._unclamped(w, scale, group_scale).clamp_(-INT4_MAX, INT4_MAX).to(torch.int8)

    def in_range(self, w: torch.Tensor, scale: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
        """bool, True where ``w`` rounds to a value in [-7, 7] without the clamp: where the grid point
        follows w (a straight-through gradient passes there and nowhere else)."""
        return self._unclamped(w, scale, group_scale).abs() <= INT4_MAX

    def round(self, w: torch.Tensor, scale: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
        """The nearest grid point in float32, computed as the plugin dequantizes: (g * v) * s."""
        g = group_scale.float()
        return (self.values(w, scale, g).float() * g) * scale.float()

    def group_scales(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """uint8 [N, ceil(K/128)]: per row and group of ``w`` [N, K] the g in [1, 18] whose grid
        rounds the group with the least squared error (ties: the smaller g; an all-zero group: 1)."""
        n, k = w.shape
        groups = group_count(k)
        padded = torch.zeros(n, groups * GROUP_SIZE, dtype=torch.float32, device=w.device)
        padded[:, :k] = w.float()
        wg = padded.reshape(n, groups, GROUP_SIZE)
        s = scale.float().reshape(n, 1, 1)
        best_err = torch.full((n, groups), float("inf"), device=w.device)
        best = torch.ones(n, groups, dtype=torch.uint8, device=w.device)
        for g in range(1, GROUP_SCALE_MAX + 1):
            gt = torch.tensor(float(g), device=w.device)
            err = ((wg - self.round(wg, s, gt)) ** 2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[better] = g
        return best

    def codes(self, w: torch.Tensor, scale: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
        """int8 codes g * v [N, K] of ``w`` [N, K] with ``scale`` [N, 1], ``group_scale`` [N, G]."""
        g = expand_group_scale(group_scale, w.shape[1]).to(torch.int16)
        return (self.values(w, scale, g).to(torch.int16) * g).to(torch.int8)

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Round to nearest: w [N, K] -> (int8 codes g * v [N, K], scale float32 [N, 1],
        group scales uint8 [N, ceil(K/128)]); zeros stay zeros."""
        scale = self.scale(w.abs().amax(dim=1, keepdim=True))
        group_scale = self.group_scales(w, scale)
        return self.codes(w, scale, group_scale), scale, group_scale


W4A8 = Int4GroupGrid()
# scheme name -> the grid of its activations, its dense layers and its GEMM codes
SCHEME_GRIDS: dict[str, Grid] = {**GRIDS, W4A8.name: W4A8.act}
# scheme name -> the grid of its 2:4 layers' weights (w4a8: the two-level int4 grid)
WEIGHT_GRIDS: dict[str, Grid | Int4GroupGrid] = {**GRIDS, W4A8.name: W4A8}


def grid_of(name: str) -> Grid:
    """The 8-bit grid of scheme ``name`` ("int8", "fp8", or "w4a8": int8): its activations', dense
    layers' and GEMM's; ValueError naming the choices otherwise."""
    try:
        return SCHEME_GRIDS[name]
    except KeyError:
        raise ValueError(f"unknown quantization scheme {name!r}; choose from {sorted(SCHEME_GRIDS)}") from None


def weight_grid_of(name: str) -> Grid | Int4GroupGrid:
    """The grid of scheme ``name``'s 2:4 weights: the 8-bit grid, or w4a8's two-level int4 grid."""
    grid_of(name)  # the error naming the choices
    return WEIGHT_GRIDS[name]


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
