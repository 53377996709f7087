"""Compress one group of linears that share an input: dispatch to a pruning algorithm, then
int8 or fp8 (the ``grid``). Pure tensor math (no model walking); the rows of the group are pruned together, which is
exact for row-separable algorithms (all three are) and shares one Hessian inverse."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .prune import magnitude_24, sparsegpt_24, wanda_24
from .quantize import (
    INT8,
    Grid,
    channel_scale,
    dequantize,
    quantize_weight_per_channel,
    quantize_with_scale,
)
from .stats import relative_output_error, relative_weight_error

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class LinearResult:
    """One compressed linear: codes (int8 or float8_e4m3fn) + scale, and its reconstruction errors."""

    name: str
    kind: str  # "sparse" | "dense"
    method: str
    q: torch.Tensor  # codes [N, K]: int8 or float8_e4m3fn (the grid's dtype)
    scale: torch.Tensor  # float32 [N, 1]
    # relative output errors on the calibration inputs (relative weight errors without calibration):
    # "before" is magnitude 2:4 + round-to-nearest (sparse) / round-to-nearest (dense), on the same grid
    err_before: float
    err_after: float
    seconds: float
    # sparse only: the kept positions to write (bool [N, K]); None = the non-zeros of q, padded
    # (sparse24_tools.recover passes the input checkpoint's mask so that it is kept bit for bit)
    mask: torch.Tensor | None = None

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.q, self.scale)

    def report(self) -> dict:
        return {
            "kind": self.kind, "method": self.method, "shape": list(self.q.shape),
            "rel_error_before": self.err_before, "rel_error_after": self.err_after,
            "seconds": round(self.seconds, 4),
        }


def compress_group(
    weights: Sequence[tuple[str, torch.Tensor]],
    hessian: torch.Tensor | None,
    *,
    kind: str,
    method: str,
    joint: bool = True,
    dampening: float = 0.01,
    block_size: int = 128,
    grid: Grid = INT8,
) -> list[LinearResult]:
    """Compress linears [N_i, K] sharing input statistics ``hessian`` [K, K] (= 2XX^T/n).

    kind "sparse": 2:4 by ``method`` then per-channel quantization on ``grid`` (int8 or fp8;
    joint SparseGPT: the grid inside the OBS loop, scale = absmax / qmax of a first SparseGPT pass
    without the grid). kind "dense": per-channel quantization only.
    Errors are ||WX - W'X|| / ||WX|| on the calibration inputs; "before" is the naive
    baseline (magnitude 2:4 + round-to-nearest on the grid) so the gain of the method is visible.
    ``hessian=None`` (no calibration data; magnitude and dense only): the errors are relative
    weight errors ||W - W'|| / ||W||.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if kind not in ("sparse", "dense"):
        raise ValueError(f"kind must be 'sparse' or 'dense', got {kind!r}")
    names = [n for n, _ in weights]
    if hessian is None and kind == "sparse" and method != "magnitude":
        raise ValueError(f"{names[0]}: {method} needs input statistics (calibration data); only magnitude runs without")
    t0 = time.perf_counter()
    label = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} fused)"
    dev = weights[0][1].device if hessian is None else hessian.device
    w = torch.cat([t.detach().to(dev, torch.float32) for _, t in weights], 0)
    h = None if hessian is None else hessian.float()
    naive_q, naive_s = quantize_weight_per_channel(w if kind == "dense" else magnitude_24(w, label), grid)
    if kind == "dense":
        q, s, used = naive_q, naive_s, f"{grid.name}-rtn"
    elif method == "magnitude":
        q, s, used = naive_q, naive_s, "magnitude"
    elif method == "wanda":
        q, s = quantize_weight_per_channel(wanda_24(w, torch.diagonal(h), label), grid)
        used = "wanda"
    else:
        if joint:
            # scale fixed up front from a first SparseGPT pass without the grid: the OBS updates
            # grow some weights past the dense row's absmax, which a dense-absmax scale would clip
            # (measured: clipping makes joint slightly worse than prune-then-quantize)
            s = channel_scale(sparsegpt_24(w, h, dampening=dampening, block_size=block_size, name=label), grid)
            pruned = sparsegpt_24(w, h, dampening=dampening, block_size=block_size, scale=s, grid=grid, name=label)
            q = quantize_with_scale(pruned, s, grid)
            used = "sparsegpt-joint"
        else:
            pruned = sparsegpt_24(w, h, dampening=dampening, block_size=block_size, name=label)
            q, s = quantize_weight_per_channel(pruned, grid)
            used = "sparsegpt"
    seconds = time.perf_counter() - t0
    naive = dequantize(naive_q, naive_s)
    final = dequantize(q, s)

    def error(ref: torch.Tensor, new: torch.Tensor) -> float:
        return relative_weight_error(ref, new) if h is None else relative_output_error(ref, new, h)

    out: list[LinearResult] = []
    row = 0
    for name, t in weights:
        n = t.shape[0]
        sl = slice(row, row + n)
        row += n
        ref = w[sl]
        out.append(LinearResult(
            name=name, kind=kind, method=used, q=q[sl].cpu(), scale=s[sl].cpu(),
            err_before=error(ref, naive[sl]),
            err_after=error(ref, final[sl]),
            seconds=seconds * n / w.shape[0],
        ))
    return out
