"""Magnitude 2:4: keep the 2 largest |w| of every group of 4 along K."""

from __future__ import annotations

import torch

from .common import check_prunable, keep_top2_of_4


def magnitude_24(weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Return a 2:4 copy of ``weight`` [N, K] (float32) with the smaller half of each group zeroed."""
    check_prunable(weight, name)
    w = weight.float()
    return w * keep_top2_of_4(w.abs())
