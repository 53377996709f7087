"""Magnitude 2:4: keep the 2 largest |w| of every group of 4 along K, then round to nearest on the
grid. No calibration data.

The selection lives on the plugin side (``vllm_sparse24.sparsity``), which builds the demo model
with it and must not import this package."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vllm_sparse24.quant import Grid, Int4GroupGrid
from vllm_sparse24.sparsity import magnitude_24

from . import Pruned, round_to_nearest

if TYPE_CHECKING:
    from ..compress_options import CompressOptions

__all__ = ["magnitude_24", "prune"]


def prune(weight: torch.Tensor, hessian: torch.Tensor | None, grid: Grid | Int4GroupGrid, opts: CompressOptions,
          name: str) -> Pruned:
    return round_to_nearest(magnitude_24(weight, name), grid)
