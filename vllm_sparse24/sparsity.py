"""Magnitude 2:4 selection (pure torch): which two weights of every group of four to keep.

The plugin side owns it because the demo model needs it and the plugin must not import the
offline compressor; the compressor's magnitude method is this function, and its Wanda and
SparseGPT pruners reuse :func:`keep_top2_of_4` and :func:`check_prunable`.
"""

from __future__ import annotations

import torch

from .format import GROUP, KEEP


class PruneError(ValueError):
    """A weight cannot be pruned 2:4 as asked (shape, statistics); the message names it."""


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


def magnitude_24(weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """A 2:4 copy of ``weight`` [N, K] (float32): the 2 largest |w| of every group of 4 along K
    are kept, the other 2 zeroed."""
    check_prunable(weight, name)
    w = weight.float()
    return w * keep_top2_of_4(w.abs())
