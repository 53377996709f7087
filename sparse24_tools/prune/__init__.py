"""2:4 pruning methods, registered by name: one file per method (pure tensor math), one
``register`` line each below. The command line, the driver, ``compress`` and ``compare`` read
``METHODS``; importing this module imports no torch (a method's file is imported on first use).

A method is a function ``prune(weight, hessian, grid, opts, name) -> Pruned``:

* ``weight``: float32 [N, K], the rows of every linear of one group (they share an input);
* ``hessian``: float32 [K, K] = 2 X X^T / n over the group's calibration inputs (per-token
  fake-quantized, as the plugin feeds them), or None without calibration data; a method that
  needs input norms reads its diagonal;
* ``grid``: the scheme's grid (``vllm_sparse24.quant``: int8 or fp8); ``opts``: the
  ``CompressOptions``; ``name``: the layer, for error messages;
* returns the 2:4 codes [N, K] on the grid and the per-row scale [N, 1] (and optionally the label
  the report gives the result, e.g. "sparsegpt-joint").

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
    codes: Any  # torch.Tensor [N, K] of the grid's dtype, 2:4
    scale: Any  # torch.Tensor float32 [N, 1]
    label: str | None = None  # what the report calls the result (default: the method's name)


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
