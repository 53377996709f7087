"""The tiny test model (built by vllm_sparse24.tiny), its legacy compressed-tensors layout and
its float64 reference forward (test-only builders)."""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_sparse24 import checkpoint as ckpt
from vllm_sparse24.quant import INT8, Grid, fake_quant_per_token
from vllm_sparse24.tiny import (  # noqa: F401  (re-exported for the tests)
    LINEARS,
    build_dense,
    build_tokenizer,
    compress_state,
    copy_tokenizer,
    hf_config,
)
from vllm_sparse24.tiny import write_checkpoint as write_sparse24

# sparse24 tensor suffix -> the legacy llm-compressor name of the same tensor
_LEGACY_NAMES = {ckpt.SPARSE.packed: ckpt.LEGACY_SPARSE.packed, ckpt.SPARSE.bitmask: ckpt.LEGACY_SPARSE.bitmask}


def legacy_quantization_config() -> dict:
    """quantization_config of an llm-compressor sparse-24-bitmask + int8 W8A8 checkpoint."""
    args_w = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
    args_a = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args_w, "input_activations": args_a}},
        "ignore": ["lm_head"],
        "sparsity_config": {
            "format": "sparse-24-bitmask", "sparsity_structure": "2:4",
            "targets": ["Linear"], "ignore": ["lm_head"], "global_sparsity": 0.5,
        },
    }


def legacy_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sparse24 tensors renamed to the legacy layout (+ the dense ``shape`` of each layer)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        prefix, suffix = name.rsplit(".", 1)
        out[f"{prefix}.{_LEGACY_NAMES.get(suffix, suffix)}"] = t
        if suffix == ckpt.SPARSE.packed:
            out[f"{prefix}.{ckpt.LEGACY_SPARSE.shape}"] = torch.tensor([t.shape[0], t.shape[1] * 2], dtype=torch.int64).reshape(2, 1)
    return out


def write_checkpoint(model, dense_dir: Path, out: Path, legacy: bool = False) -> dict[str, torch.Tensor]:
    """The sparse24 checkpoint of ``model`` (vllm_sparse24.tiny), or with ``legacy`` the same
    weights in the llm-compressor layout; returns the dequantized weights."""
    if not legacy:
        return write_sparse24(model, dense_dir, out)
    tensors, dequant = compress_state(model)
    out.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(dense_dir, out)
    ckpt.write_config(out, hf_config(model), legacy_quantization_config())
    ckpt.save_safetensors_shards(legacy_tensors(tensors), out)
    return dequant


@torch.no_grad()
def reference_logprobs(model, dequant: dict[str, torch.Tensor], token_ids: list[int],
                       grid: Grid = INT8) -> torch.Tensor:
    """float64 forward with the dequantized weights and per-token fake-quantized linear inputs
    (on ``grid``: int8 or fp8); returns log p(token_i | tokens_<i) for i >= 1. A quantized lm_head
    is one more entry of ``dequant`` (its own parameter: a tied embedding stays as it is)."""
    import copy

    ref = copy.deepcopy(model).double()
    for name, w in dequant.items():
        prefix, _, attr = name.rpartition(".")
        setattr(ref.get_submodule(prefix), attr, torch.nn.Parameter(w.double(), requires_grad=False))
    hooks = []
    for name, mod in ref.named_modules():
        if name.rsplit(".", 1)[-1] in LINEARS or f"{name}.weight" in dequant:
            hooks.append(mod.register_forward_pre_hook(lambda m, args: (fake_quant_per_token(args[0], grid),)))
    ids = torch.tensor([token_ids])
    logits = ref(ids).logits[0].double()
    for h in hooks:
        h.remove()
    lp = torch.log_softmax(logits, dim=-1)
    return lp[:-1].gather(1, ids[0, 1:, None]).squeeze(1)
