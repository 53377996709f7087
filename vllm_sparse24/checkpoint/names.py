"""The names of a quantized linear's tensors in a checkpoint, by the layer's prefix: the only place
they are spelled (the plugin registers its parameters under them, the reader and the writer use them).

* 2:4 sparse layer: ``{prefix}.weight_packed`` (the kept codes [N, K/2]), ``{prefix}.weight_bitmask``
  (uint8 [N, K/8]) and ``{prefix}.weight_scale`` (float32 [N, 1]);
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

    def suffixes(self) -> set[str]:
        return {self.packed, self.bitmask, SCALE, BIAS} | ({self.shape} if self.shape else set())


SPARSE = SparseNames("weight_packed", "weight_bitmask")
LEGACY_SPARSE = SparseNames("compressed", "bitmask", "shape")
DENSE_SUFFIXES = {WEIGHT, SCALE, BIAS}


class CheckpointError(ValueError):
    """A checkpoint folder does not hold what its quantization_config promises."""


def sparse_names(legacy: bool = False) -> SparseNames:
    return LEGACY_SPARSE if legacy else SPARSE
