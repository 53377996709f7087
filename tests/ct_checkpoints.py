"""The compressed-tensors 2:4 test checkpoints (tests/data/ct/, written by compressed-tensors' own
compressors, see tests/data/make_ct_checkpoints.py): a model folder per variant, and the float64
reference weights of what each one holds, decoded with compressed-tensors' functions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from compressed_tensors.utils import unpack_bitmasks
from safetensors.torch import load_file

from vllm_sparse24.quant import GRIDS, quantize_weight_per_channel
from vllm_sparse24.tiny import build_tokenizer

DATA = Path(__file__).parent / "data" / "ct"
VARIANTS = sorted(p.name for p in DATA.iterdir() if p.is_dir())
INDEX = "model.safetensors.index.json"


def assemble(variant: str, out: Path, with_config: bool = True) -> Path:
    """A model folder as the Hub has them: config.json, two shards (the variant's linears and the
    shared embeddings / norms) and model.safetensors.index.json, plus a tokenizer. Without
    ``with_config`` the config.json has no quantization_config (a plain checkpoint)."""
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    cfg = json.loads((DATA / variant / "config.json").read_text())
    if not with_config:
        cfg.pop("quantization_config")
    cfg["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    shards = {"model-00001-of-00002.safetensors": DATA / variant / "linears.safetensors",
              "model-00002-of-00002.safetensors": DATA / "base.safetensors"}
    weight_map = {}
    for name, src in shards.items():
        shutil.copy(src, out / name)
        weight_map.update(dict.fromkeys(load_file(src), name))
    total = sum(t.numel() * t.element_size() for src in shards.values() for t in load_file(src).values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def reference_weights(folder: Path, load_grid: str = "int8") -> dict[str, torch.Tensor]:
    """HF weight name -> the float64 weight the plugin serves for each linear: codes * scale as
    stored (quantized checkpoints), or the float weight quantized per channel on ``load_grid``
    (unquantized ones). Bitmask layers are decoded with compressed-tensors' unpack_bitmasks."""
    q = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    tensors = {}
    for f in folder.glob("*.safetensors"):
        tensors.update(load_file(f))
    out = {}
    prefixes = {k.rsplit(".", 1)[0] for k in tensors if k.endswith((".compressed", ".weight"))}
    for prefix in sorted(p for p in prefixes if p.startswith("model.layers.") and "layernorm" not in p):
        if f"{prefix}.compressed" in tensors:
            values, bitmask = tensors[f"{prefix}.compressed"], tensors[f"{prefix}.bitmask"]
            shape = tensors[f"{prefix}.shape"].flatten().tolist()
            mask = unpack_bitmasks(bitmask, shape)
            w = torch.zeros(shape, dtype=torch.float64)
            w[mask] = values.flatten().to(torch.float64)
            codes = w
        else:
            codes = tensors[f"{prefix}.weight"].to(torch.float64)
        if q.get("config_groups"):
            out[f"{prefix}.weight"] = codes * tensors[f"{prefix}.weight_scale"].to(torch.float64)
        else:
            c, s = quantize_weight_per_channel(codes.float(), GRIDS[load_grid])
            out[f"{prefix}.weight"] = c.double() * s.double()
    return out


def reference_model(folder: Path):
    """The HF model of ``folder`` (float64) with its embeddings and norms; the linears are set by
    tiny_llama.reference_logprobs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).double()
    base = load_file(DATA / "base.safetensors")
    state = model.state_dict()
    for k, v in base.items():
        state[k].copy_(v.double())
    return model
