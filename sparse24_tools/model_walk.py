"""Which models and linears the offline tools handle, and how to reach them (model walking
only: no pruning math here)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vllm_sparse24 import checkpoint as ckpt

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# in block order; each inner tuple shares one input (and vLLM fuses it into one layer)
LINEAR_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


class UnsupportedModelError(ValueError):
    """The model's architecture or layout is not one the offline tools handle."""


def check_architecture(config: Any) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = getattr(config, "architectures", None)
        raise UnsupportedModelError(
            f"unsupported architecture model_type={model_type!r} (architectures={archs}); "
            f"offline compression supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    check_architecture(model.config)
    try:
        layers = model.model.layers
    except AttributeError as e:
        raise UnsupportedModelError(f"{type(model).__name__}: no model.layers decoder stack") from e
    for i, layer in enumerate(layers):
        for group in LINEAR_GROUPS:
            for name in group:
                mod = layer.get_submodule(name) if _has(layer, name) else None
                if not isinstance(mod, nn.Linear):
                    raise UnsupportedModelError(
                        f"model.layers.{i}.{name}: expected an nn.Linear, found {type(mod).__name__}"
                    )
    return layers


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def linear_names(num_layers: int) -> list[str]:
    return [f"model.layers.{i}.{n}" for i in range(num_layers) for g in LINEAR_GROUPS for n in g]


def fused_groups(num_layers: int) -> list[tuple[str, ...]]:
    """Full HF names of every group of linears that share one input (vLLM fuses q/k/v, gate/up)."""
    return [tuple(f"model.layers.{i}.{n}" for n in g) for i in range(num_layers) for g in LINEAR_GROUPS]


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model on CPU in eval mode, tokenizer) from a HF folder or a .gguf file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model {p} does not exist (expected a HF folder or a .gguf file)")
    kwargs: dict[str, Any] = {}
    if p.is_file():
        if p.suffix != ".gguf":
            raise UnsupportedModelError(f"{p}: a model file must be .gguf; otherwise pass a HF folder")
        folder, kwargs["gguf_file"] = str(p.parent), p.name
    else:
        folder = str(p)
        cfg = AutoConfig.from_pretrained(folder)
        check_architecture(cfg)
        if getattr(cfg, "quantization_config", None):
            raise UnsupportedModelError(
                f"{p}: already quantized ({cfg.quantization_config.get('quant_method')}); "
                "compress starts from a dense model"
            )
    log.info("loading %s", p)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    check_architecture(model.config)
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
    check_architecture(hf_config)
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


@torch.no_grad()
def capture_layer0_inputs(
    model: nn.Module, samples: Sequence[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run embeddings (on ``device``) for each [1, T] sample and stop at decoder layer 0.

    Returns (hidden states [S, T, H] on device, the layer's keyword arguments captured from the
    first sample: position embeddings, attention mask...). Only the embedding and rotary modules
    visit the device.
    """
    layers = decoder_layers(model)
    inner = model.model
    moved = [m for m in (inner.embed_tokens, getattr(inner, "rotary_emb", None)) if m is not None]
    for m in moved:
        m.to(device)
    hidden: list[torch.Tensor] = []
    kw: dict[str, Any] = {}

    def hook(_mod, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        hidden.append(hs)
        if not kw:
            kw.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    h = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in samples:
            try:
                inner(input_ids=ids.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        h.remove()
        for m in moved:
            m.to("cpu")
    kw["use_cache"] = False
    kw.pop("past_key_values", None)
    kw.pop("past_key_value", None)
    return torch.cat(hidden, 0), kw


def layer_forward(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
