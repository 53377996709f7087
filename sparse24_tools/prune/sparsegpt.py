"""SparseGPT 2:4 (Frantar & Alistarh 2023), optionally joint with int8 or fp8 weight quantization.

H = 2XX^T/n (from :class:`sparse24_tools.stats.HessianAccumulator`), dampened by ``dampening`` times
the mean diagonal; U = upper Cholesky factor of H^-1. Columns are visited in blocks of
``block_size`` with lazy batch updates: inside a block every column's error is spread over the
remaining columns of the block at once, and the accumulated block error is applied to all later
columns with one matmul. At the first column of each group of 4, the 2 weights with the smallest
w^2 / U_jj^2 (OBS saliency, on the already-updated weights) are dropped.

Joint mode (``scale`` given): each kept weight is rounded to its row's grid (``grid``: int8
``scale * {-127..127}``, or fp8 ``scale * e4m3`` values in [-448, 448]) before its error is
propagated, so the OBS update compensates the pruning and the quantization error together
(GPTQ + SparseGPT). The scale is fixed up front by the caller (``prune`` uses absmax / qmax of the rows after a
first SparseGPT pass without the grid, because the OBS updates grow weights past the dense
absmax); weights that the updates push beyond the grid's end are clamped, and the clamp error is
compensated like any other.
On int8 (255 levels) the gain over prune-then-round is within noise; on coarser grids it is
clear (see tests/test_tools_prune.py).

w4a8 (``grid`` an ``Int4GroupGrid``): the channel scale comes from the first pass as above
(absmax / 126), and at the first column of every group of 128 that group's integer scale g is
chosen on its current (already updated) weights, least squared error on the two-level grid, with the
2 largest |w| of every 4 standing in for the mask the loop has not chosen yet; every kept weight
then rounds to ``s * g * int4`` and its error is propagated. With block_size a multiple or a divisor
of 128 (the default 128) a group's weights have all earlier updates when its g is chosen; otherwise
the columns past the block lack the block's own updates at that moment (g is then chosen on a
slightly stale view; the rounding itself is exact).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from vllm_sparse24.format import GROUP, KEEP
from vllm_sparse24.quant import GROUP_SIZE, Int4GroupGrid, group_count
from vllm_sparse24.sparsity import PruneError, check_prunable, keep_top2_of_4

from ..quantize import INT8, Grid, channel_scale, quantize_with_scale
from . import Pruned, round_to_nearest

if TYPE_CHECKING:
    from ..compress_options import CompressOptions


def prune(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid | Int4GroupGrid, opts: CompressOptions,
          name: str) -> Pruned:
    """``opts.dampening`` and ``opts.block_size`` as below; ``opts.joint``: the grid inside the OBS
    loop, with the scale of a first pass without it (the OBS updates grow some weights past the
    dense row's absmax, which a dense-absmax scale would clip: measured, clipping makes joint
    slightly worse than prune-then-quantize); else prune, then round to nearest."""
    kw = {"dampening": opts.dampening, "block_size": opts.block_size, "name": name}
    if not opts.joint:
        return round_to_nearest(sparsegpt_24(weight, hessian, **kw), grid, "sparsegpt")
    first = sparsegpt_24(weight, hessian, **kw)
    if isinstance(grid, Int4GroupGrid):
        scale = grid.scale(first.abs().amax(dim=1, keepdim=True))
        del first
        int4 = _Int4Columns(grid, scale, weight.shape[1])
        pruned = sparsegpt_24(weight, hessian, scale=scale, grid=int4, **kw)
        group_scale = int4.group_scale.cpu()
        return Pruned(grid.codes(pruned, scale, int4.group_scale), scale, "sparsegpt-joint", group_scale)
    scale = channel_scale(first, grid)
    pruned = sparsegpt_24(weight, hessian, scale=scale, grid=grid, **kw)
    return Pruned(quantize_with_scale(pruned, scale, grid), scale, "sparsegpt-joint")


class _Int4Columns:
    """The w4a8 grid inside the OBS loop: a group's scale g is chosen at its first column
    (``start_group``, on the group's current weights), then each kept weight of the group rounds to
    ``s * g * int4`` (``round``)."""

    def __init__(self, grid: Int4GroupGrid, scale: torch.Tensor, k: int) -> None:
        self.grid, self.scale = grid, scale.float()
        self.group_scale = torch.ones(scale.shape[0], group_count(k), dtype=torch.uint8, device=scale.device)

    def start_group(self, group: int, current: torch.Tensor) -> None:
        """``current`` [N, <= 128]: the group's weights now; the mask is not chosen yet, so the 2
        largest |w| of every 4 stand in for it."""
        likely_kept = current * keep_top2_of_4(current.abs())
        self.group_scale[:, group] = self.grid.group_scales(likely_kept, self.scale)[:, 0]

    def round(self, column: torch.Tensor, index: int) -> torch.Tensor:
        g = self.group_scale[:, index // GROUP_SIZE]
        return self.grid.round(column, self.scale[:, 0], g)


def _inverse_cholesky(h: torch.Tensor, dampening: float, name: str) -> torch.Tensor:
    k = h.shape[0]
    damp = dampening * torch.mean(torch.diagonal(h))
    if not torch.isfinite(damp):
        raise PruneError(f"{name}: the Hessian has non-finite entries (overflow in calibration?)")
    h = h + (damp if damp > 0 else 1e-6) * torch.eye(k, dtype=h.dtype, device=h.device)
    for attempt in range(6):
        try:
            l_factor = torch.linalg.cholesky(h)
            hinv = torch.cholesky_inverse(l_factor)
            return torch.linalg.cholesky(hinv, upper=True)
        except torch.linalg.LinAlgError:
            # not positive definite in float32: add more dampening and retry
            h = h + (10**attempt) * max(float(damp), 1e-6) * torch.eye(k, dtype=h.dtype, device=h.device)
    raise PruneError(f"{name}: Hessian is not positive definite even after extra dampening")


@torch.no_grad()
def sparsegpt_24(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    dampening: float = 0.01,
    block_size: int = 128,
    scale: torch.Tensor | None = None,
    grid: Grid | _Int4Columns = INT8,
    name: str = "weight",
) -> torch.Tensor:
    """2:4-prune ``weight`` [N, K] with OBS updates; returns float32 [N, K] on weight's device.

    ``hessian`` [K, K] = 2XX^T/n. With ``scale`` [N, 1] (joint mode) every non-zero of the
    result lies on ``grid`` (int8: ``scale * {-127..127}``; fp8: ``scale`` times an e4m3 value;
    w4a8, an ``_Int4Columns`` of the same scale: ``scale * g * {-7..7}``, its group scales g chosen
    in the loop).
    """
    check_prunable(weight, name)
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise PruneError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match K={k}")
    if block_size % GROUP or block_size <= 0:
        raise PruneError(f"{name}: block_size={block_size} must be a positive multiple of {GROUP}")
    if scale is not None and scale.shape != (n, 1):
        raise PruneError(f"{name}: scale shape {tuple(scale.shape)}, expected [{n}, 1]")
    w = weight.detach().float().clone()
    h = hessian.detach().float().to(w.device).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = _inverse_cholesky(h, dampening, name)
    del h
    s = None if scale is None else scale.float().to(w.device)

    with _few_threads(w.device):
        _obs_loop(w, u, s, grid, k, block_size)
    return w


@contextmanager
def _few_threads(device: torch.device) -> Iterator[None]:
    """The column loop is thousands of tiny ops: on CPU, threads cost more than they give
    (measured 10x slower with 2 threads on a 2-core VM), so run it single-threaded."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _obs_loop(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor | None, grid: Grid | _Int4Columns, k: int,
              block_size: int) -> None:
    srow = None if s is None else s[:, 0]
    int4 = grid if isinstance(grid, _Int4Columns) and s is not None else None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        keep = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(count):
            if i % GROUP == 0:
                sal = w1[:, i : i + GROUP] ** 2 / (d1[i : i + GROUP] ** 2).unsqueeze(0)
                idx = sal.topk(KEEP, dim=1).indices
                keep[:, i : i + GROUP].scatter_(1, idx, True)
            col = w1[:, i]
            q = torch.where(keep[:, i], col, torch.zeros_like(col))
            if int4 is not None:
                c = i1 + i
                if c % GROUP_SIZE == 0:  # the group's current weights: in this block, then past it
                    end = min(c + GROUP_SIZE, k)
                    int4.start_group(c // GROUP_SIZE, torch.cat((w1[:, i : i + end - c], w[:, i2:end]), dim=1))
                q = int4.round(q, c)
            elif srow is not None:
                q = grid.round(q, srow)
            q1[:, i] = q
            e = (col - q) / u1[i, i]
            w1[:, i:].addcmul_(e.unsqueeze(1), u1[i, i:].unsqueeze(0), value=-1.0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        if i2 < k:
            w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1.0)
