"""Helpers shared by the 2:4 pruning algorithms (pure torch)."""

from __future__ import annotations

import torch

GROUP = 4
KEEP = 2


class PruneError(ValueError):
    """A weight cannot be pruned 2:4 as asked (shape, statistics)."""


def check_prunable(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise :class:`PruneError` naming the tensor unless it is 2-D with K a multiple of 8.

    Groups of 4 along K need K % 4 == 0; the sparse24 bitmask stores whole bytes, so K % 8 == 0.
    """
    if weight.dim() != 2:
        raise PruneError(f"{name}: expected a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    k = weight.shape[1]
    if k % 8:
        raise PruneError(
            f"{name}: input dimension K={k} is not a multiple of 8; 2:4 needs groups of 4 along K "
            "and the sparse24 bitmask whole bytes (keep this layer dense with --dense-layers)"
        )


def keep_top2_of_4(scores: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask [N, K]: the 2 highest scores of every group of 4 along K."""
    n, k = scores.shape
    g = scores.reshape(n, k // GROUP, GROUP)
    idx = g.topk(KEEP, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(n, k)
