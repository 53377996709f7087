"""Sparse24 checkpoint folders, owned here (pure: safetensors + json, no vLLM): the tensor names
(``names.py``), the header checks the plugin runs before loading (``validate.py``), the one reader
(``read.py``) and the one writer (``write.py``). docs/format.md describes the format."""

from ..fsutil import atomic_output_dir
from .names import (
    LEGACY_SPARSE,
    SCALE,
    SCALE_DTYPES,
    SPARSE,
    SPARSE_INT4,
    WEIGHT,
    CheckpointError,
    SparseNames,
    sparse_names,
)
from .read import CheckpointTensors, QuantizedLinear, load_scheme, read_checkpoint
from .validate import read_headers, validate_checkpoint
from .write import layer_tensors, save_safetensors_shards, write_checkpoint, write_config

__all__ = [
    "LEGACY_SPARSE", "SCALE", "SCALE_DTYPES", "SPARSE", "SPARSE_INT4", "WEIGHT", "CheckpointError", "CheckpointTensors", "QuantizedLinear",
    "SparseNames", "atomic_output_dir", "layer_tensors", "load_scheme", "read_checkpoint", "read_headers",
    "save_safetensors_shards", "sparse_names", "validate_checkpoint", "write_checkpoint", "write_config",
]
