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
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from vllm_sparse24.format import unpack_24
from vllm_sparse24.quant import FP8, INT8, Grid, fake_quant_per_token
from vllm_sparse24.schema import LM_HEAD, Sparse24ConfigError, Sparse24Scheme

from .lm_head import quantize_tied_lm_head
from .model_walk import check_architecture, load_model

log = logging.getLogger(__name__)


class EvalError(ValueError):
    """The model or text cannot be evaluated (names the file / tensor)."""


def _dequantized_state(folder: Path, grid: Grid) -> tuple[dict[str, torch.Tensor], set[str]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EvalError(f"{folder}: no *.safetensors files")
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        raw.update(load_file(str(f)))
    state: dict[str, torch.Tensor] = {}
    quantized: set[str] = set()
    for key, t in raw.items():
        if key.endswith((".weight_packed", ".weight")) and t.dtype in (torch.int8, torch.float8_e4m3fn) \
                and t.dtype != grid.dtype:
            raise EvalError(f"{folder}: {key} holds {t.dtype} codes, but the quantization_config's scheme is "
                            f"{grid.name} ({grid.dtype}); one checkpoint holds one scheme")
        if key.endswith(".weight_packed"):
            prefix = key[: -len(".weight_packed")]
            for need in ("weight_bitmask", "weight_scale"):
                if f"{prefix}.{need}" not in raw:
                    raise EvalError(f"{folder}: {prefix} has weight_packed but no {need}")
            w = unpack_24(t, raw[f"{prefix}.weight_bitmask"], name=prefix)
            state[f"{prefix}.weight"] = w.float() * raw[f"{prefix}.weight_scale"].float()
            quantized.add(prefix)
        elif key.endswith(".weight") and t.dtype in (torch.int8, torch.float8_e4m3fn):
            prefix = key[: -len(".weight")]
            scale = raw.get(f"{prefix}.weight_scale")
            if scale is None:
                raise EvalError(f"{folder}: {t.dtype} tensor {key} has no {prefix}.weight_scale")
            state[key] = t.float() * scale.float()
            quantized.add(prefix)
        elif key.endswith((".weight_bitmask", ".weight_scale")):
            continue
        else:
            state[key] = t.float()
    return state, quantized


def load_for_eval(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """(float32 model computing like the plugin, tokenizer) for a .gguf, a dense HF folder,
    a sparse24 checkpoint or a compressed-tensors int-quantized checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if p.is_file() or not (p / "config.json").exists():
        if p.is_dir():
            raise EvalError(f"{p}: no config.json")
        return load_model(p, torch.float32)
    cfg_dict = json.loads((p / "config.json").read_text())
    qcfg = cfg_dict.pop("quantization_config", None)
    if not qcfg:
        return load_model(p, torch.float32)
    method = qcfg.get("quant_method")
    grid: Grid
    lm_head_quantized = False
    if method == "compressed-tensors":
        formats = {"int-quantized": INT8, "float-quantized": FP8}
        if qcfg.get("format") not in formats:
            raise EvalError(f"{p}: compressed-tensors format {qcfg.get('format')!r} not supported "
                            f"(one of {sorted(formats)})")
        grid = formats[qcfg["format"]]
    elif method == "sparse24":
        try:
            scheme = Sparse24Scheme.from_dict(qcfg)
            grid, lm_head_quantized = scheme.grid, scheme.quantize_lm_head
        except Sparse24ConfigError as e:
            raise EvalError(f"{p / 'config.json'}: {e}") from e
    else:
        raise EvalError(f"{p}: quant_method {method!r} not supported by offline eval")
    model_type = cfg_dict.pop("model_type", None)
    config = AutoConfig.for_model(model_type, **cfg_dict)
    check_architecture(config)
    config.use_cache = False
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state, quantized = _dequantized_state(p, grid)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise EvalError(f"{p}: checkpoint does not match {model_type}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
        if lm_head_quantized:
            quantized.add(quantize_tied_lm_head(model, grid))
    if lm_head_quantized and LM_HEAD not in quantized:
        raise EvalError(f"{p}: quantization_config.quantize_lm_head is set, but {LM_HEAD}.weight holds no "
                        f"{grid.name} codes")
    for prefix in quantized:
        mod = model.get_submodule(prefix)
        mod.register_forward_pre_hook(lambda _m, a: (fake_quant_per_token(a[0], grid),))
    model.eval()
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
    text = Path(text_file).read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise EvalError(f"{text_file}: empty")
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
