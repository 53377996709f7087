"""Compress one group of linears that share an input with the registered pruning method, on the
scheme's grid (int8 or fp8), and measure its errors. Pure tensor math (no model walking); the
rows of the group are pruned together, which is exact for row-separable methods (the registered
ones are) and shares one Hessian inverse."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_sparse24.format import is_24
from vllm_sparse24.quant import Int4GroupGrid, group_count
from vllm_sparse24.sparsity import magnitude_24

from .compress_options import CompressOptions
from .prune import METHODS, Pruned, method_named, round_to_nearest
from .quantize import INT8, Grid, dequantize, quantize_weight_per_channel
from .stats import relative_output_error, relative_weight_error


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
    # w4a8 2:4 only: uint8 [N, ceil(K/128)], q being int4 value x group scale
    group_scale: torch.Tensor | None = None

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
    grid: Grid = INT8,
    opts: CompressOptions | None = None,
    weight_grid: Grid | Int4GroupGrid | None = None,
) -> list[LinearResult]:
    """Compress linears [N_i, K] sharing input statistics ``hessian`` [K, K] (= 2XX^T/n).

    kind "sparse": 2:4 + quantization on ``weight_grid`` (default ``grid``: int8 or fp8 per
    channel; or w4a8's two-level int4 grid) by the pruning method ``opts.method``
    (``sparse24_tools.prune``). kind "dense": per-channel round to nearest on ``grid`` only.
    Errors are ||WX - W'X|| / ||WX|| on the calibration inputs; "before" is the naive
    baseline (magnitude 2:4 + round-to-nearest on the grid) so the gain of the method is visible.
    ``hessian=None`` (no calibration data; methods that need no statistics and dense only): the
    errors are relative weight errors ||W - W'|| / ||W||.
    """
    if kind not in ("sparse", "dense"):
        raise ValueError(f"kind must be 'sparse' or 'dense', got {kind!r}")
    names = [n for n, _ in weights]
    label = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} fused)"
    method = None
    if kind == "sparse":
        if opts is None:
            raise ValueError(f"{label}: a 2:4 group needs the compress options (its pruning method)")
        method = method_named(opts.method)
        if hessian is None and method.needs_calibration:
            raise ValueError(f"{label}: {method.name} needs {method.stats.value} of the inputs (calibration data); "
                             f"the methods without are {[m.name for m in METHODS.values() if not m.needs_calibration]}")
    t0 = time.perf_counter()
    dev = weights[0][1].device if hessian is None else hessian.device
    w = torch.cat([t.detach().to(dev, torch.float32) for _, t in weights], 0)
    h = None if hessian is None else hessian.float()
    wgrid = grid if kind == "dense" or weight_grid is None else weight_grid
    if kind == "dense":
        naive_q, naive_s = quantize_weight_per_channel(w, grid)
    else:
        naive_q, naive_s = round_to_nearest(magnitude_24(w, label), wgrid)[:2]
    group_scale = None
    if method is None:
        q, s, used = naive_q, naive_s, f"{grid.name}-rtn"
    else:
        q, s, used, group_scale = Pruned(*method.function()(w, h, wgrid, opts, label))
        used = used or method.name
        if q.dtype != wgrid.dtype or tuple(q.shape) != tuple(w.shape) or not is_24(q) or tuple(s.shape) != (w.shape[0], 1):
            raise ValueError(f"{label}: pruning method {method.name} returned {q.dtype} codes {tuple(q.shape)} "
                             f"(2:4: {is_24(q)}) and scale {tuple(s.shape)}; expected 2:4 {wgrid.dtype} codes "
                             f"{tuple(w.shape)} and a scale [{w.shape[0]}, 1]")
        int4 = isinstance(wgrid, Int4GroupGrid)
        want_groups = (w.shape[0], group_count(w.shape[1]))
        if int4 != (group_scale is not None) or (int4 and tuple(group_scale.shape) != want_groups):
            raise ValueError(f"{label}: pruning method {method.name} returned group scales "
                             f"{None if group_scale is None else tuple(group_scale.shape)} on the {wgrid.name} grid; "
                             f"expected {want_groups if int4 else None}")
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
            group_scale=None if group_scale is None else group_scale[sl].cpu(),
        ))
    return out
