"""Wanda 2:4 (Sun et al. 2023): score |W_ij| * ||X_j||_2 over calibration tokens, keep the
2 best of every group of 4 along K; no weight update, then round to nearest on the grid."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vllm_sparse24.quant import Grid, Int4GroupGrid
from vllm_sparse24.sparsity import PruneError, check_prunable, keep_top2_of_4

from . import Pruned, round_to_nearest

if TYPE_CHECKING:
    from ..compress_options import CompressOptions


def prune(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid | Int4GroupGrid, opts: CompressOptions, name: str) -> Pruned:
    """The input norms are the Hessian's diagonal (2/n times the sum of x_j^2: any positive multiple works)."""
    return round_to_nearest(wanda_24(weight, torch.diagonal(hessian), name), grid)


def wanda_24(weight: torch.Tensor, input_sq_norm: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """2:4-prune ``weight`` [N, K] given ``input_sq_norm`` [K] = sum over tokens of x_j^2
    (any positive multiple works, e.g. the diagonal of the Hessian 2XX^T/n)."""
    check_prunable(weight, name)
    if input_sq_norm.shape != (weight.shape[1],):
        raise PruneError(
            f"{name}: input statistics have shape {tuple(input_sq_norm.shape)}, expected [{weight.shape[1]}]"
        )
    w = weight.float()
    score = w.abs() * input_sq_norm.float().clamp_min(0).sqrt().to(w.device).unsqueeze(0)
    return w * keep_top2_of_4(score)
