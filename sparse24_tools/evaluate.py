"""Perplexity with transformers that matches what the plugin computes.

Quantized checkpoints (sparse24, or compressed-tensors int-quantized / float-quantized from
``--export dense-w8a8``) are dequantized (codes * scale, int8 or e4m3 codes) into a float model and
the inputs of the quantized linears are fake-quantized per token on the checkpoint's grid
(``vllm_sparse24.quant.fake_quant_per_token``: int8 with scale absmax / 127, or e4m3 with scale
absmax / 448).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vllm_sparse24 import checkpoint as ckpt
from vllm_sparse24.quant import FP8, INT8, fake_quant_per_token
from vllm_sparse24.schema import LM_HEAD, Sparse24ConfigError, Sparse24Scheme

from . import inputs
from .export import dense_w8a8_scheme
from .lm_head import is_tied, quantize_tied_lm_head
from .model_walk import dequantized_model, load_model

log = logging.getLogger(__name__)


class EvalError(ValueError):
    """The model or text cannot be evaluated (names the file / tensor)."""


def _scheme(folder: Path, qcfg: dict[str, Any]) -> Sparse24Scheme:
    """How the layers of a quantized checkpoint are stored: sparse24 (or its legacy llm-compressor
    layout), or every linear dense W8A8 (compressed-tensors int- / float-quantized)."""
    method = qcfg.get("quant_method")
    try:
        if Sparse24Scheme.is_legacy_config(qcfg):
            return Sparse24Scheme.from_compressed_tensors(qcfg)
        if method == "sparse24":
            return Sparse24Scheme.from_dict(qcfg)
    except Sparse24ConfigError as e:
        raise EvalError(f"{folder / 'config.json'}: {e}") from e
    if method == "compressed-tensors":
        formats = {"int-quantized": INT8, "float-quantized": FP8}
        if qcfg.get("format") not in formats:
            raise EvalError(f"{folder}: compressed-tensors format {qcfg.get('format')!r} not supported "
                            f"(one of {sorted(formats)})")
        return dense_w8a8_scheme(tuple(qcfg.get("ignore", ())), formats[qcfg["format"]])
    raise EvalError(f"{folder}: quant_method {method!r} not supported by vllm-sparse24 eval")


def load_for_eval(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """(float32 model computing like the plugin, tokenizer) for a .gguf, a dense HF folder,
    a sparse24 checkpoint or a compressed-tensors int-quantized checkpoint."""
    from transformers import AutoTokenizer

    p = Path(path)
    inputs.model_source(p, "--model")
    if p.is_file():
        return load_model(p, torch.float32)
    cfg_dict = json.loads((p / "config.json").read_text())
    qcfg = cfg_dict.pop("quantization_config", None)
    if not qcfg:
        return load_model(p, torch.float32)
    scheme = _scheme(p, qcfg)
    grid = scheme.grid
    try:
        tensors = ckpt.read_checkpoint(p, scheme)
    except ckpt.CheckpointError as e:
        raise EvalError(f"{p}: {e}") from e
    model = dequantized_model(p, cfg_dict, tensors)
    quantized = set(tensors.linears)
    if scheme.quantize_lm_head and is_tied(model):
        quantized.add(quantize_tied_lm_head(model, grid))
    if scheme.quantize_lm_head and LM_HEAD not in quantized:
        raise EvalError(f"{p}: quantization_config.quantize_lm_head is set, but {LM_HEAD}.{ckpt.WEIGHT} holds no "
                        f"{grid.name} codes")
    for prefix in quantized:
        mod = model.get_submodule(prefix)
        mod.register_forward_pre_hook(lambda _m, a: (fake_quant_per_token(a[0], grid),))
    tok = AutoTokenizer.from_pretrained(str(p))
    log.info("%s: %d quantized linears dequantized, activations fake-quantized per token (%s)", p,
             len(quantized), grid.name)
    return model, tok


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer: Any, text_file: str | os.PathLike, seqlen: int = 512,
    windows: int = 64, batch_size: int = 4, progress: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """exp(mean NLL) over the first ``windows`` non-overlapping windows of ``seqlen`` tokens
    (``device``: where the token windows go; the model must be there already)."""
    text = inputs.text_file(text_file, "--text")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    avail = ids.numel() // seqlen
    if avail == 0:
        raise EvalError(f"{text_file}: {ids.numel()} tokens, fewer than one window of {seqlen}")
    n = min(windows, avail)
    if n < windows:
        log.warning("%s has only %d windows of %d tokens", text_file, n, seqlen)
    data = ids[: n * seqlen].reshape(n, seqlen)
    nll, count = 0.0, 0
    for b in tqdm(range(0, n, batch_size), desc="eval", disable=not progress):
        x = data[b : b + batch_size]
        if device is not None:
            x = x.to(device)
        logits = model(input_ids=x).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll -= float(lp.gather(-1, x[:, 1:, None]).sum())
        count += x[:, 1:].numel()
    return {"perplexity": math.exp(nll / count), "windows": n, "seqlen": seqlen, "tokens": count}
