"""Input statistics of a linear layer and reconstruction error (pure torch)."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Running H = 2/n * sum_t x_t x_t^T over the n tokens seen (float32, [K, K])."""

    def __init__(self, k: int, device: torch.device | str = "cpu") -> None:
        self.h = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        t = x.shape[0]
        if t == 0:
            return
        self.h.mul_(self.n / (self.n + t))
        self.n += t
        self.h.addmm_(x.t(), x, alpha=2.0 / self.n)

    @property
    def diag(self) -> torch.Tensor:
        return torch.diagonal(self.h)


def relative_output_error(w_ref: torch.Tensor, w_new: torch.Tensor, h: torch.Tensor) -> float:
    """||W X - W' X||_F / ||W X||_F from H = 2XX^T/n (no activations needed)."""
    w_ref = w_ref.float()
    d = w_new.float() - w_ref
    num = torch.einsum("nk,kl,nl->", d, h, d)
    den = torch.einsum("nk,kl,nl->", w_ref, h, w_ref)
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return float((num.clamp_min(0) / den).sqrt())


def relative_weight_error(w_ref: torch.Tensor, w_new: torch.Tensor) -> float:
    """||W - W'||_F / ||W||_F: the error measure when there is no calibration data (it equals
    :func:`relative_output_error` with H = I, without forming the K x K identity)."""
    w_ref = w_ref.float()
    den = w_ref.norm()
    num = (w_new.float() - w_ref).norm()
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return float(num / den)
