"""Writing a compressed model: the sparse24 checkpoint (the plugin's format, through its one writer
``vllm_sparse24.checkpoint``) and compressed-tensors dense W8A8 ("int-quantized" for int8,
"float-quantized" for fp8; both load in stock vLLM, and store a dense layer as sparse24 does). Both
write into a temporary folder that is renamed into place only when complete."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vllm_sparse24 import checkpoint as ckpt
from vllm_sparse24.quant import INT8, Grid
from vllm_sparse24.schema import SCHEME_ARGS, Sparse24Scheme

from .group import LinearResult
from .model_walk import hf_config_dict

log = logging.getLogger(__name__)


def _float_tensors(model: nn.Module, skip: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name in skip or (tied and name == "lm_head.weight"):
            continue
        out[name] = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous().clone()
    return out


def _write_side_files(folder: Path, model: nn.Module, tokenizer: Any) -> None:
    tokenizer.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def sparse24_tensors(
    model: nn.Module, results: Mapping[str, LinearResult], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """All checkpoint tensors: packed sparse / dense quantized linears (codes int8 or
    float8_e4m3fn, as in the results) + float everything else."""
    skip = {f"{n}.weight" for n in results}
    tensors = _float_tensors(model, skip, dtype)
    for name, r in results.items():
        tensors.update(ckpt.layer_tensors(name, r.q, r.scale, sparse=r.kind == "sparse", mask=r.mask,
                                          group_scale=r.group_scale))
    return tensors


def write_sparse24(
    out: str | os.PathLike,
    model: nn.Module,
    tokenizer: Any,
    results: Mapping[str, LinearResult],
    scheme: Sparse24Scheme,
    report: dict[str, Any],
    dtype: torch.dtype,
    overwrite: bool = False,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """``extra_files``: file name -> contents, written into the folder before it is renamed
    into place (reports and plots of the tool that made the checkpoint)."""
    tensors = sparse24_tensors(model, results, dtype)
    with ckpt.atomic_output_dir(out, overwrite=overwrite) as tmp:
        kinds = ckpt.write_checkpoint(tmp, tensors, hf_config_dict(model, dtype), scheme)
        _write_side_files(tmp, model, tokenizer)
        expected = {n: r.kind for n, r in results.items()}
        if kinds != expected:
            diff = sorted(set(kinds.items()) ^ set(expected.items()))[:4]
            raise ckpt.CheckpointError(f"{out}: written layer kinds disagree with the plan: {diff}")
        (tmp / "compress_report.json").write_text(json.dumps(report, indent=2))
        for fname, data in (extra_files or {}).items():
            (tmp / fname).write_bytes(data)
    log.info("wrote %s", out)
    return Path(out)


def dense_w8a8_quantization_config(ignore: tuple[str, ...], grid: Grid = INT8) -> dict[str, Any]:
    """compressed-tensors "int-quantized": int8 per-channel weights, dynamic per-token int8
    activations (what vLLM's CompressedTensorsW8A8Int8 runs); for fp8 "float-quantized": e4m3
    per-channel weights, dynamic per-token e4m3 activations (CompressedTensorsW8A8Fp8)."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    weights, inputs = SCHEME_ARGS[grid.name]
    cfg = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(
            targets=["Linear"], weights=QuantizationArgs(**weights),
            input_activations=QuantizationArgs(**inputs),
        )},
        format=f"{grid.type}-quantized", quantization_status="compressed", ignore=list(ignore),
    )
    return cfg.model_dump(mode="json", exclude_none=True)


def dense_w8a8_scheme(ignore: tuple[str, ...], grid: Grid = INT8) -> Sparse24Scheme:
    """The sparse24 scheme that reads a dense W8A8 checkpoint's layers as they are stored: every
    linear but ``ignore`` dense on ``grid``."""
    return Sparse24Scheme(ignore=tuple(ignore), dense_layers=("re:.*",), quant=grid.name)


def write_dense_w8a8(
    out: str | os.PathLike,
    model: nn.Module,
    tokenizer: Any,
    results: Mapping[str, LinearResult],
    ignore: tuple[str, ...],
    report: dict[str, Any],
    dtype: torch.dtype,
    overwrite: bool = False,
    grid: Grid = INT8,
) -> Path:
    for name, r in results.items():
        if r.kind != "dense":
            raise ValueError(f"{name}: dense-w8a8 export got a {r.kind} layer")
        if r.q.dtype != grid.dtype:
            raise ValueError(f"{name}: dense-w8a8 {grid.name} export got {r.q.dtype} codes")
    # int- / float-quantized store dense layers exactly as sparse24 does: weight codes + weight_scale
    tensors = sparse24_tensors(model, results, dtype)
    with ckpt.atomic_output_dir(out, overwrite=overwrite) as tmp:
        ckpt.save_safetensors_shards(tensors, tmp)
        ckpt.write_config(tmp, hf_config_dict(model, dtype), dense_w8a8_quantization_config(ignore, grid))
        ckpt.validate_checkpoint(tmp, dense_w8a8_scheme(ignore, grid))  # the layout sparse24 reads too
        _write_side_files(tmp, model, tokenizer)
        (tmp / "compress_report.json").write_text(json.dumps(report, indent=2))
    log.info("wrote %s", out)
    return Path(out)
