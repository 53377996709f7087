"""The one writer of checkpoint folders: the tensors of one quantized linear (``layer_tensors``),
and a folder of them with its config.json, checked as the plugin will check it (``write_checkpoint``).
Callers write into a temporary folder renamed into place (``fsutil.atomic_output_dir``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..format import (
    Sparse24FormatError,
    check_24,
    check_group_scale,
    mask_24,
    pack_24,
    pack_24_with_mask,
    pack_int4_24,
)
from ..quant import expand_group_scale
from ..schema import Sparse24Scheme
from .names import SCALE, SPARSE, SPARSE_INT4, WEIGHT
from .validate import validate_checkpoint


def layer_tensors(prefix: str, codes: torch.Tensor, scale: torch.Tensor, *, sparse: bool,
                  mask: torch.Tensor | None = None,
                  group_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear from its codes [N, K] (int8 or float8_e4m3fn)
    and scale [N, 1]. A 2:4 layer is packed on the codes' device, with ``mask`` as its bitmask bit
    for bit when given (kept zeros stay kept), else with its non-zeros padded to 2 of every 4.
    ``group_scale`` (uint8 [N, ceil(K/128)]): a w4a8 2:4 layer, whose int8 codes must each be an
    int4 value times its group's scale; it is stored as the int4 values and the group scales."""
    if sparse and group_scale is not None:
        out = _int4_tensors(prefix, codes, group_scale, mask)
    elif sparse:
        values, bitmask = pack_24(codes, name=prefix) if mask is None else pack_24_with_mask(codes, mask, name=prefix)
        out = {f"{prefix}.{SPARSE.packed}": values, f"{prefix}.{SPARSE.bitmask}": bitmask}
    elif mask is not None or group_scale is not None:
        raise ValueError(f"{prefix}: a dense layer has no 2:4 mask or group scales")
    else:
        out = {f"{prefix}.{WEIGHT}": codes.contiguous()}
    out[f"{prefix}.{SCALE}"] = scale.float().reshape(-1, 1).contiguous()
    return out


def _int4_tensors(prefix: str, codes: torch.Tensor, group_scale: torch.Tensor,
                  mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """w4a8: int8 codes [N, K] = int4 value x group scale -> packed int4 values, bitmask, group scales."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise Sparse24FormatError(f"{prefix}: w4a8 codes must be 2-D int8 (int4 value x group scale), got "
                                  f"{codes.dtype} {list(codes.shape)}")
    n, k = codes.shape
    check_group_scale(group_scale, n, k, f"{prefix}.{SPARSE_INT4.group_scale}")
    g = expand_group_scale(group_scale.to(codes.device), k).to(torch.int16)
    wide = codes.to(torch.int16)
    off = wide % g != 0
    if bool(off.any()):
        r, c = (int(v) for v in off.nonzero()[0])
        raise Sparse24FormatError(f"{prefix}: code {int(wide[r, c])} at row {r}, column {c} is not a multiple of its "
                                  f"group scale {int(g[r, c])} (w4a8 codes are int4 value x group scale)")
    if mask is None:
        check_24(codes, prefix)
        mask = mask_24(codes)
    values, bitmask = pack_int4_24((wide // g).to(torch.int8), mask, name=prefix)
    return {f"{prefix}.{SPARSE_INT4.packed}": values, f"{prefix}.{SPARSE_INT4.bitmask}": bitmask,
            f"{prefix}.{SPARSE_INT4.group_scale}": group_scale.to(torch.uint8).contiguous()}


def save_safetensors_shards(
    tensors: Mapping[str, torch.Tensor], folder: Path, max_shard_bytes: int = 2 << 30
) -> None:
    """Write tensors as model[-0000x-of-0000y].safetensors (+ index when sharded)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def write_config(folder: Path, config: Mapping[str, Any], quantization_config: Mapping[str, Any]) -> None:
    """config.json: the model's Hugging Face config with ``quantization_config`` set."""
    config = dict(config)
    config["quantization_config"] = dict(quantization_config)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def write_checkpoint(folder: Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                     scheme: Sparse24Scheme) -> dict[str, str]:
    """Write a sparse24 checkpoint (tensors, config.json with the scheme) into ``folder`` and check it
    as the plugin will; returns its layers' kinds (prefix -> "sparse" | "dense")."""
    save_safetensors_shards(tensors, folder)
    write_config(folder, config, scheme.to_dict())
    return validate_checkpoint(folder, scheme)
