"""``--quantize-lm-head``: the output projection as a dense W8A8 layer on the scheme's grid,
rounded to nearest per output channel like the compressor's other dense layers. A model with
tied embeddings writes no lm_head tensor (the embedding stays float for the gather): the plugin
and the offline evaluation quantize a copy of the tied weight for the logits."""

from __future__ import annotations

from typing import Any

from torch import nn

from vllm_sparse24.quant import Grid
from vllm_sparse24.schema import LM_HEAD, Sparse24Scheme

from .group import LinearResult, compress_group
from .quantize import dequantize, quantize_weight_per_channel


def is_tied(model: nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def without_lm_head(ignore: tuple[str, ...]) -> tuple[str, ...]:
    """``ignore`` less the lm_head entry (the default), which a quantized lm_head contradicts."""
    return tuple(p for p in ignore if p != LM_HEAD)


def quantized_lm_head(model: nn.Module, scheme: Sparse24Scheme, report: dict[str, Any]) -> dict[str, LinearResult]:
    """{"lm_head": its dense result} to write with the other layers, or {} when the scheme leaves
    lm_head float or the model ties it to the embedding; records what was done in ``report``."""
    if not scheme.quantize_lm_head:
        return {}
    (result,) = compress_group([(LM_HEAD, model.get_submodule(LM_HEAD).weight)], None, kind="dense",
                               grid=scheme.grid)
    tied = is_tied(model)
    report[LM_HEAD] = result.report() | {
        "tied": tied,
        "stored": "not stored: the plugin quantizes the tied embedding at load, the same way" if tied
        else f"{scheme.grid.name} codes + weight_scale",
    }
    return {} if tied else {LM_HEAD: result}


def quantize_tied_lm_head(model: nn.Module, grid: Grid) -> str:
    """Give a tied lm_head its own weight, the embedding rounded on ``grid`` per row, as the plugin
    does at load (the embedding keeps its float weight); returns the layer name."""
    head = model.get_submodule(LM_HEAD)
    q, scale = quantize_weight_per_channel(head.weight.detach(), grid)
    head.weight = nn.Parameter(dequantize(q, scale), requires_grad=False)
    return LM_HEAD
