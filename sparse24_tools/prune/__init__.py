"""2:4 pruning algorithms: pure functions of a weight matrix (and its input statistics)."""

from vllm_sparse24.sparsity import PruneError, check_prunable, keep_top2_of_4

from .magnitude import magnitude_24
from .sparsegpt import sparsegpt_24
from .wanda import wanda_24

__all__ = ["PruneError", "check_prunable", "keep_top2_of_4", "magnitude_24", "sparsegpt_24", "wanda_24"]
