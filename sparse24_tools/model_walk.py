"""Walking a Hugging Face model by its architecture's adapter (``architectures.py``): its decoder
layers and linears, the inputs of its first layer, loading it (model walking only: no pruning math
here)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vllm_sparse24 import checkpoint as ckpt

from . import inputs
from .architectures import UnsupportedModelError, architecture_of

log = logging.getLogger(__name__)

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder stack (its architecture's adapter says where), every grouped linear checked
    to be an nn.Linear."""
    arch = architecture_of(model.config)
    try:
        layers = model.get_submodule(arch.layers)
    except AttributeError as e:
        raise UnsupportedModelError(f"{type(model).__name__}: no {arch.layers} decoder stack ({arch.name} layout)") from e
    for i, layer in enumerate(layers):
        for group in arch.linear_groups:
            for name in group:
                mod = layer.get_submodule(name) if _has(layer, name) else None
                if not isinstance(mod, nn.Linear):
                    raise UnsupportedModelError(
                        f"{arch.layer_prefix(i)}.{name}: expected an nn.Linear, found {type(mod).__name__}"
                    )
    return layers


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def fused_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """Full names of every group of linears that share one input (vLLM fuses q/k/v, gate/up)."""
    return architecture_of(model.config).fused_groups(len(decoder_layers(model)))


def linear_names(model: nn.Module) -> list[str]:
    return [n for g in fused_groups(model) for n in g]


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model on CPU in eval mode, tokenizer) from a HF folder or a .gguf file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    inputs.model_source(p, "model")
    kwargs: dict[str, Any] = {}
    if p.is_file():
        folder, kwargs["gguf_file"] = str(p.parent), p.name
    else:
        folder = str(p)
        cfg = AutoConfig.from_pretrained(folder)
        architecture_of(cfg)
        if getattr(cfg, "quantization_config", None):
            raise UnsupportedModelError(
                f"{p}: already quantized ({cfg.quantization_config.get('quant_method')}); "
                "compress starts from a dense model"
            )
        if any(p.glob("*.safetensors")):
            # a truncated or corrupt file fails here naming it; transformers' error would not
            ckpt.read_headers(p)
    log.info("loading %s", p)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    architecture_of(model.config)
    tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    model.eval()
    model.config.use_cache = False
    return model, tok


def dequantized_model(folder: Path, config: dict[str, Any], tensors: ckpt.CheckpointTensors) -> nn.Module:
    """The float32 model of a quantized checkpoint: ``config`` (its config.json without the
    quantization_config) holding ``tensors`` with every quantized linear dequantized, in eval mode;
    UnsupportedModelError naming ``folder`` when the tensors do not fit the architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(config)
    model_type = config.pop("model_type", None)
    hf_config = AutoConfig.for_model(model_type, **config)
    architecture_of(hf_config)
    hf_config.use_cache = False
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    state = {k: t.float() for k, t in tensors.other.items()}
    state.update({f"{prefix}.{ckpt.WEIGHT}": q.dequantized() for prefix, q in tensors.linears.items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise UnsupportedModelError(f"{folder}: the checkpoint's tensors do not fit {model_type}: missing "
                                    f"{missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    return model.eval()


def hf_config_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, Any]:
    """config.json contents for a written checkpoint (plain HF, vLLM readable)."""
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)
    if not cfg.get("architectures"):
        cfg["architectures"] = [type(model).__name__]
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and isinstance(rope, dict) and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]  # vLLM reads rope_theta; transformers 5 writes rope_parameters
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    cfg["dtype"] = cfg["torch_dtype"]
    cfg["use_cache"] = True
    return cfg


class _Captured(Exception):
    pass


class _KeywordRecorder(nn.Module):
    """Stands in for a decoder layer for one forward: keeps the keyword arguments the model passes
    it (masks and rotary embeddings may differ by layer type) and passes the hidden states on."""

    def __init__(self, seen: list[dict[str, Any]], last: bool) -> None:
        super().__init__()
        self.seen, self.last = seen, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.seen.append({k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
                         | {"use_cache": False})
        if self.last:  # the final norm and the rest stay on the CPU: stop here
            raise _Captured
        return hidden_states


@torch.no_grad()
def capture_layer0_inputs(
    model: nn.Module, samples: Sequence[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Run the modules before the first decoder layer (on ``device``) for each [1, T] sample and stop
    at decoder layer 0.

    Returns (hidden states [S, T, H] on device, per decoder layer the keyword arguments the model
    passes it, from the first sample: attention mask, position embeddings...). Only the modules
    before the first layer visit the device (the per-layer arguments are taken with every layer
    replaced by a recorder, so no layer runs).
    """
    arch = architecture_of(model.config)
    layers = decoder_layers(model)
    inner = model.get_submodule(arch.layers.rpartition(".")[0])
    moved = [model.get_submodule(n) for n in arch.before_layers if _has(model, n)]
    for m in moved:
        m.to(device)
    hidden: list[torch.Tensor] = []

    def hook(_mod, args, kwargs):
        hidden.append(args[0] if args else kwargs["hidden_states"])
        raise _Captured

    h = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    real = list(layers)
    layer_kwargs: list[dict[str, Any]] = []
    try:
        for ids in samples:
            try:
                inner(input_ids=ids.to(device), use_cache=False)
            except _Captured:
                pass
        h.remove()
        for i in range(len(layers)):
            layers[i] = _KeywordRecorder(layer_kwargs, last=i == len(layers) - 1)
        try:
            inner(input_ids=samples[0].to(device), use_cache=False)
        except _Captured:
            pass
    finally:
        h.remove()
        for i, layer in enumerate(real):
            layers[i] = layer
        for m in moved:
            m.to("cpu")
    return torch.cat(hidden, 0), layer_kwargs


def layer_forward(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
