"""The names of a quantized linear's tensors in a checkpoint, by the layer's prefix: the only place
they are spelled (the plugin registers its parameters under them, the reader and the writer use them).

* 2:4 sparse layer: ``{prefix}.weight_packed`` (the kept codes [N, K/2]), ``{prefix}.weight_bitmask``
  (uint8 [N, K/8]) and ``{prefix}.weight_scale`` (float32 [N, 1]);
* w4a8 2:4 layer: ``{prefix}.weight_packed`` (the kept int4 values, two to a byte: uint8
  [N, K/4]), ``{prefix}.weight_bitmask``, ``{prefix}.weight_scale`` and
  ``{prefix}.weight_group_scale`` (uint8 [N, ceil(K/128)]);
* dense W8A8 layer: ``{prefix}.weight`` (codes [N, K]) and ``{prefix}.weight_scale``;
* legacy llm-compressor ``sparse-24-bitmask`` checkpoints (read only): ``compressed``, ``bitmask``,
  ``shape`` (the dense [N, K]) and ``weight_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE = "weight_scale"
WEIGHT = "weight"  # a dense quantized layer's codes, or an unquantized layer's float weight
BIAS = "bias"
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # a weight_scale's dtypes the plugin reads


@dataclass(frozen=True)
class SparseNames:
    """Suffixes of a 2:4 layer's tensors in one checkpoint layout."""

    packed: str
    bitmask: str
    shape: str | None = None  # legacy only: the dense [N, K]
    group_scale: str | None = None  # w4a8 only: the uint8 scale per row and group of 128 along K

    def suffixes(self) -> set[str]:
        return {self.packed, self.bitmask, SCALE, BIAS} | {s for s in (self.shape, self.group_scale) if s}


SPARSE = SparseNames("weight_packed", "weight_bitmask")
SPARSE_INT4 = SparseNames("weight_packed", "weight_bitmask", group_scale="weight_group_scale")
LEGACY_SPARSE = SparseNames("compressed", "bitmask", "shape")
DENSE_SUFFIXES = {WEIGHT, SCALE, BIAS}


class CheckpointError(ValueError):
    """A checkpoint folder does not hold what its quantization_config promises."""


def sparse_names(legacy: bool = False, int4: bool = False) -> SparseNames:
    """The 2:4 tensor names of a layout: sparse24 8-bit, sparse24 w4a8 (``int4``), or legacy."""
    return LEGACY_SPARSE if legacy else SPARSE_INT4 if int4 else SPARSE
