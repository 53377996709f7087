"""2:4 pruning methods, registered by name: one file per method (pure tensor math), one
``register`` line each below. The command line, the driver, ``compress`` and ``compare`` read
``METHODS``; importing this module imports no torch (a method's file is imported on first use).

A method is a function ``prune(weight, hessian, grid, opts, name) -> Pruned``:

* ``weight``: float32 [N, K], the rows of every linear of one group (they share an input);
* ``hessian``: float32 [K, K] = 2 X X^T / n over the group's calibration inputs (per-token
  fake-quantized, as the plugin feeds them), or None without calibration data; a method that
  needs input norms reads its diagonal;
* ``grid``: the grid of the scheme's 2:4 weights (``vllm_sparse24.quant``: the int8 or fp8
  ``Grid``, or w4a8's two-level ``Int4GroupGrid``); ``opts``: the ``CompressOptions``; ``name``:
  the layer, for error messages;
* returns the 2:4 codes [N, K] of the grid's dtype and the per-row scale [N, 1] (and optionally
  the label the report gives the result, e.g. "sparsegpt-joint"); on the w4a8 grid also the group
  scales uint8 [N, ceil(K/128)], the codes being int4 value x group scale. ``round_to_nearest``
  rounds a pruned float weight on any of the grids.

Each method declares the input statistics it needs (``Stats``): one that needs any needs
calibration data.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple


class Stats(str, Enum):
    NONE = "none"
    INPUT_NORMS = "norms"
    HESSIAN = "Hessian"


class Pruned(NamedTuple):
    codes: Any  # torch.Tensor [N, K] of the grid's dtype, 2:4 (w4a8: int8, int4 value x group scale)
    scale: Any  # torch.Tensor float32 [N, 1]
    label: str | None = None  # what the report calls the result (default: the method's name)
    group_scale: Any = None  # w4a8 only: torch.Tensor uint8 [N, ceil(K/128)]


def round_to_nearest(weight: Any, grid: Any, label: str | None = None) -> Pruned:
    """A pruned float weight [N, K] rounded to nearest on ``grid``: per channel on an 8-bit grid, or
    with the w4a8 grid's channel and group scales (``Int4GroupGrid.quantize``)."""
    from vllm_sparse24.quant import Int4GroupGrid, quantize_weight_per_channel

    if isinstance(grid, Int4GroupGrid):
        codes, scale, group_scale = grid.quantize(weight)
        return Pruned(codes, scale, label, group_scale)
    return Pruned(*quantize_weight_per_channel(weight, grid), label)


@dataclass(frozen=True)
class PruningMethod:
    name: str
    stats: Stats  # what the method reads from the calibration inputs
    help: str  # one line for ``--help``
    run: str | Callable[..., Pruned]  # the function, or "module:function" imported on first use

    @property
    def needs_calibration(self) -> bool:
        return self.stats is not Stats.NONE

    def function(self) -> Callable[..., Pruned]:
        if callable(self.run):
            return self.run
        module, _, attr = self.run.partition(":")
        return getattr(importlib.import_module(module), attr)


METHODS: dict[str, PruningMethod] = {}


def register(method: PruningMethod) -> PruningMethod:
    if method.name in METHODS:
        raise ValueError(f"pruning method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def method_named(name: str) -> PruningMethod:
    """The registered method ``name``; ValueError naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; choose from {list(METHODS)}") from None


register(PruningMethod("magnitude", Stats.NONE, "keep the 2 largest |w| of every 4",
                       "sparse24_tools.prune.magnitude:prune"))
register(PruningMethod("wanda", Stats.INPUT_NORMS, "keep the 2 largest |w| * ||x|| of every 4 (Wanda)",
                       "sparse24_tools.prune.wanda:prune"))
register(PruningMethod("sparsegpt", Stats.HESSIAN, "OBS pruning with weight updates (SparseGPT); --joint "
                       "rounds to the grid inside the loop", "sparse24_tools.prune.sparsegpt:prune"))
