"""Write the compressed-tensors 2:4 test checkpoints in tests/data/ct/ with compressed-tensors' own
compressors, the way llm-compressor saves its 2:4 models (the published Sparse-Llama-3.1-8B-2of4
family, see docs/format.md).

The ``sparse-24-bitmask`` and ``marlin-24`` compressors were removed in compressed-tensors 0.15,
so this runs in its own environment with the last release that has them (torch and transformers
come from the project's environment; the project's compressed-tensors is newer):

    python3 -m venv /tmp/ct-0.14
    .venv/bin/python -c 'import site; print(site.getsitepackages()[0])' \
        > "$(/tmp/ct-0.14/bin/python -c 'import site; print(site.getsitepackages()[0])')/project.pth"
    /tmp/ct-0.14/bin/pip install --no-deps compressed-tensors==0.14.0.1 loguru
    PYTHONPATH=$PWD /tmp/ct-0.14/bin/python tests/data/make_ct_checkpoints.py

Output (deterministic for a given torch): ``tests/data/ct/base.safetensors`` holds the tensors the
compressors pass through unchanged (embeddings, norms; the same in every variant), and one folder
per variant holds ``config.json`` (``quantization_config`` as compressed-tensors writes it) and
``linears.safetensors`` (what the compressors wrote for the decoder layers). The tests assemble a
model folder from the two files plus a tokenizer (tests/ct_checkpoints.py).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import compressed_tensors
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.config import SparsityCompressionConfig
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from vllm_sparse24.sparsity import magnitude_24

OUT = Path(__file__).parent / "ct"
# the tokenizer the tests build (vllm_sparse24.tiny.build_tokenizer) has this many tokens
VOCAB = 384
TARGETS = ["Linear"]
IGNORE = ["lm_head"]


def _args(type_: str, strategy: str, dynamic: bool = False, num_bits: int = 8, **extra) -> dict:
    return {"num_bits": num_bits, "type": type_, "symmetric": True, "strategy": strategy, "dynamic": dynamic, **extra}


# name -> (sparsity format, quantization format or None, weights args, input_activations args)
VARIANTS = {
    # unquantized 2:4, zeros in place (Sparse-Llama-3.1-8B-2of4 and its fine-tunes)
    "dense-2of4": ("dense", None, None, None),
    # unquantized 2:4, values + bitmask
    "bitmask-2of4": ("sparse-24-bitmask", None, None, None),
    # FP8-dynamic: e4m3 channel-wise weights, dynamic per-token e4m3 activations
    "fp8-dynamic-2of4": ("dense", "float-quantized", _args("float", "channel"), _args("float", "token", True)),
    "fp8-dynamic-2of4-bitmask": (
        "sparse-24-bitmask", "float-quantized", _args("float", "channel"), _args("float", "token", True)),
    # quantized.w8a8: int8 weights (channel- or tensor-wise scale), dynamic per-token int8 activations
    "w8a8-2of4": ("sparse-24-bitmask", "int-quantized", _args("int", "channel"), _args("int", "token", True)),
    "w8a8-2of4-tensor": ("sparse-24-bitmask", "int-quantized", _args("int", "tensor"), _args("int", "token", True)),
    # quantized.w4a16: 4-bit channel-wise weights for the Marlin 2:4 kernel, 16-bit activations
    "w4a16-2of4": ("dense", "marlin-24", _args("int", "channel", num_bits=4), None),
}


def tiny_model() -> LlamaForCausalLM:
    """One decoder layer of 64 x 128 (K a multiple of 64 for every linear), bf16, weights
    pruned 2:4 by magnitude: small enough to vendor every variant."""
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=True, rope_theta=10000.0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else 0.08)
                if "embed" not in name:
                    p.copy_(magnitude_24(p, name))
    return model.to(torch.bfloat16)


def _set_weight_scales(model: torch.nn.Module) -> None:
    """What llm-compressor's min-max observer sets: compressed-tensors' calculate_qparams of the
    weight's range, per output channel or per tensor."""
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        w = module.weight.float()
        if scheme.weights.strategy == "tensor":
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        elif scheme.weights.strategy == "group":
            g = scheme.weights.group_size
            lo = w.reshape(w.shape[0], -1, g).amin(-1)
            hi = w.reshape(w.shape[0], -1, g).amax(-1)
        else:
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        scale, _ = calculate_qparams(lo, hi, scheme.weights)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))


def write_variant(name: str, base: dict[str, torch.Tensor]) -> None:
    sparsity_format, quant_format, weights, inputs = VARIANTS[name]
    model = tiny_model()
    if quant_format is not None:
        scheme = QuantizationScheme(
            targets=TARGETS, weights=QuantizationArgs.model_validate(weights),
            input_activations=QuantizationArgs.model_validate(inputs) if inputs else None,
        )
        apply_quantization_config(
            model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=IGNORE)
        )
        _set_weight_scales(model)
    sparsity = SparsityCompressionConfig.load_from_registry(
        sparsity_format, targets=TARGETS, ignore=IGNORE, sparsity_structure="2:4", global_sparsity=0.5,
    )
    compressor = ModelCompressor.from_pretrained_model(
        model, sparsity_config_or_format=sparsity, quantization_format=quant_format
    )
    state = compressor.compress(model)
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.config.save_pretrained(tmp)
        compressor.update_config(tmp)
        cfg = json.loads((Path(tmp) / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    linears = {}
    for key, t in state.items():
        if key.startswith("model.layers.") and "layernorm" not in key:
            linears[key] = t.contiguous()
        else:  # passed through unchanged: must be the same tensor in every variant
            if not torch.equal(t, base[key]):
                raise AssertionError(f"{name}: {key} differs from the base tensors")
    save_file(linears, str(out / "linears.safetensors"), metadata={"format": "pt"})
    print(f"{name}: {len(linears)} tensors, {(out / 'linears.safetensors').stat().st_size} bytes")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    model = tiny_model()
    base = {k: v.contiguous() for k, v in model.state_dict().items()
            if not (k.startswith("model.layers.") and "layernorm" not in k) and k != "lm_head.weight"}
    save_file(base, str(OUT / "base.safetensors"), metadata={"format": "pt"})
    for name in VARIANTS:
        write_variant(name, base | {"lm_head.weight": model.lm_head.weight})
    (OUT / "VERSION").write_text(f"compressed-tensors {compressed_tensors.__version__}, torch {torch.__version__}\n")


if __name__ == "__main__":
    main()
