"""The one reader of checkpoint folders: the scheme of ``config.json``, and every tensor back, each
quantized linear as codes + scale (+ its 2:4 mask) after the folder passed the header checks.
(The plugin reads the tensors through vLLM's loader, into parameters named by ``names.py``.)"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..format import (
    Sparse24FormatError,
    check_group_scale,
    int4_to_int8,
    unpack_24_with_mask,
    unpack_int4_24,
)
from ..schema import LayerKind, Sparse24ConfigError, Sparse24Scheme
from .names import SCALE, WEIGHT, CheckpointError, sparse_names
from .validate import validate_checkpoint


@dataclass
class QuantizedLinear:
    kind: LayerKind  # "sparse" or "dense"
    # [N, K] of the scheme's 8-bit dtype; 0 outside the mask of a 2:4 layer (w4a8: int4 value x group scale)
    codes: torch.Tensor
    scale: torch.Tensor  # float32 [N, 1]
    mask: torch.Tensor | None = None  # 2:4 layers: bool [N, K] as the bitmask stores it
    group_scale: torch.Tensor | None = None  # w4a8 2:4 layers: uint8 [N, ceil(K/128)]

    def dequantized(self) -> torch.Tensor:
        """float32 [N, K]: what the plugin multiplies the activations with."""
        return self.codes.float() * self.scale


@dataclass
class CheckpointTensors:
    scheme: Sparse24Scheme
    linears: dict[str, QuantizedLinear]  # by layer prefix
    other: dict[str, torch.Tensor]  # every other tensor by name (embeddings, norms, biases, lm_head)


def load_scheme(folder: str | os.PathLike) -> Sparse24Scheme:
    """The scheme of a checkpoint folder's config.json; CheckpointError naming the file otherwise."""
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e})") from e
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON; RecursionError: nested too deep
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(cfg).__name__}")
    q = cfg.get("quantization_config")
    if q is None:
        raise CheckpointError(f"{path}: no quantization_config (not a sparse24 checkpoint)")
    try:
        if Sparse24Scheme.is_legacy_config(q):
            return Sparse24Scheme.from_compressed_tensors(q)
        return Sparse24Scheme.from_dict(q)
    except Sparse24ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e


def read_checkpoint(folder: str | os.PathLike, scheme: Sparse24Scheme | None = None) -> CheckpointTensors:
    """Every tensor of ``folder`` (on the CPU), checked first by :func:`validate_checkpoint` against
    ``scheme`` (default: the one its config.json gives); a corrupt bitmask is a CheckpointError
    naming the file and the tensor."""
    folder = Path(folder)
    scheme = load_scheme(folder) if scheme is None else scheme
    if scheme.layout == "dense" or not scheme.quantized or scheme.weight_strategy != "channel":
        # the plugin serves these (it quantizes or packs them at load); the offline tools read
        # quantized values + bitmask with per-channel scales only
        raise CheckpointError(
            f"{folder}: a compressed-tensors checkpoint with {'float' if not scheme.quantized else 'quantized'} "
            f"weights stored {scheme.layout} ({scheme.weight_strategy}-wise scale) is served by the plugin but "
            "not read by the offline tools"
        )
    kinds = validate_checkpoint(folder, scheme)
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}  # tensor -> its file (shards may split a layer)
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
                where[key] = f.name
    names = sparse_names(scheme.layout == "bitmask", scheme.int4)
    linears: dict[str, QuantizedLinear] = {}
    for prefix, kind in sorted(kinds.items()):
        scale = tensors.pop(f"{prefix}.{SCALE}").float().reshape(-1, 1)
        if kind == "dense":
            linears[prefix] = QuantizedLinear("dense", tensors.pop(f"{prefix}.{WEIGHT}"), scale)
            continue
        mask_key, packed_key = f"{prefix}.{names.bitmask}", f"{prefix}.{names.packed}"
        group_scale = None
        try:
            if names.group_scale:
                values, mask = unpack_int4_24(tensors.pop(packed_key), tensors.pop(mask_key),
                                              name=f"{folder / where[packed_key]}: {packed_key} + {names.bitmask}")
                group_key = f"{prefix}.{names.group_scale}"
                group_scale = tensors.pop(group_key)
                check_group_scale(group_scale, *values.shape, name=f"{folder / where[group_key]}: {group_key}")
                codes = int4_to_int8(values, group_scale)
            else:
                codes, mask = unpack_24_with_mask(tensors.pop(packed_key), tensors.pop(mask_key),
                                                  name=f"{folder / where[mask_key]}: {mask_key}")
        except Sparse24FormatError as e:
            raise CheckpointError(str(e)) from e
        if names.shape:
            tensors.pop(f"{prefix}.{names.shape}")
        linears[prefix] = QuantizedLinear("sparse", codes, scale, mask, group_scale)
    return CheckpointTensors(scheme, linears, tensors)
