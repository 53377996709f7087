"""The published 2:4 models' formats (compressed-tensors, written by its own compressors: see
tests/data/make_ct_checkpoints.py) through vLLM on the CPU: logprobs against a float64 reference of
the same weights, and the refusals, each naming what is wrong."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LOGPROB_ATOL, run_engine
from ct_checkpoints import DATA, INDEX, assemble, reference_model, reference_weights
from safetensors.torch import load_file, save_file
from tiny_llama import reference_logprobs

from vllm_sparse24.checkpoint import CheckpointError, load_scheme, read_headers, validate_checkpoint
from vllm_sparse24.quant import GRIDS
from vllm_sparse24.schema import Sparse24ConfigError, Sparse24Scheme

PROMPT = "the quick brown fox jumps over the lazy dog in the city of paris, the capital"
# variant -> (layout, scheme, quantized in the checkpoint, weight strategy)
EXPECTED = {
    "dense-2of4": ("dense", "int8", False, "channel"),
    "bitmask-2of4": ("bitmask", "int8", False, "channel"),
    "fp8-dynamic-2of4": ("dense", "fp8", True, "channel"),
    "fp8-dynamic-2of4-bitmask": ("bitmask", "fp8", True, "channel"),
    "w8a8-2of4": ("bitmask", "int8", True, "channel"),
    "w8a8-2of4-tensor": ("bitmask", "int8", True, "tensor"),
}
LOAD_SCHEME_ENV = "VLLM_SPARSE24_LOAD_SCHEME"


def _ids(folder) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(PROMPT).input_ids


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_each_variant_reads_as_the_scheme_it_is(variant, tmp_path):
    folder = assemble(variant, tmp_path / variant)
    scheme = load_scheme(folder)
    assert (scheme.layout, scheme.quant, scheme.quantized, scheme.weight_strategy) == EXPECTED[variant]
    kinds = validate_checkpoint(folder, scheme)
    assert set(kinds.values()) == {"sparse"} and len(kinds) == 7


def test_w4a16_marlin24_is_refused_naming_the_format(tmp_path):
    folder = assemble("w4a16-2of4", tmp_path / "w4a16")
    with pytest.raises(CheckpointError, match=r"format='marlin-24' \(4-bit weights .*no W4A16 scheme"):
        load_scheme(folder)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda g: g["input_activations"].update(strategy="tensor", dynamic=False),
         r"group_0.input_activations'\]: strategy='tensor'"),
        (lambda g: g["weights"].update(strategy="group", group_size=32), r"group_0.weights'\]: strategy='group'"),
        (lambda g: g["weights"].update(num_bits=4), r"group_0.weights'\]: num_bits=4"),
        (lambda g: g["input_activations"].update(type="int"), "mixes schemes|input_activations'\\]: type='int'"),
    ],
)
def test_unsupported_quantization_is_refused_by_field(edit, match):
    q = json.loads((DATA / "fp8-dynamic-2of4" / "config.json").read_text())["quantization_config"]
    edit(q["config_groups"]["group_0"])
    with pytest.raises(Sparse24ConfigError, match=match):
        Sparse24Scheme.from_compressed_tensors(q)


def test_other_sparsity_formats_are_refused():
    q = json.loads((DATA / "bitmask-2of4" / "config.json").read_text())["quantization_config"]
    q["sparsity_config"]["format"] = "sparse-bitmask"
    with pytest.raises(Sparse24ConfigError, match="sparsity_config.format='sparse-bitmask' is not supported"):
        Sparse24Scheme.from_compressed_tensors(q)


# -- sharded checkpoints: the index is consulted --------------------------------------------------
def test_missing_shard_is_named(tmp_path):
    folder = assemble("w8a8-2of4", tmp_path / "m")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard model-00002-of-00002.safetensors is missing .*model.embed_tokens"):
        read_headers(folder)


def test_index_pointing_at_the_wrong_shard_is_named(tmp_path):
    folder = assemble("w8a8-2of4", tmp_path / "m")
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"puts tensor 'model.norm.weight' in model-00001-of-00002.safetensors, "
                                              r"but it is in model-00002-of-00002.safetensors"):
        read_headers(folder)


Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize(
    "variant,edit,match",
    [
        ("w8a8-2of4", lambda t: t.update({f"{DOWN}.compressed": t[f"{DOWN}.compressed"][:, :32].contiguous(),
                                          f"{DOWN}.bitmask": t[f"{DOWN}.bitmask"][:, :8].contiguous()}),
         rf"model-00001-of-00002.safetensors: tensor '{DOWN}.compressed' has shape \[64, 32\], expected \[64, 64\] "
         rf"\({DOWN} is \[N, K\] = \[64, 128\] by config.json\)"),
        ("fp8-dynamic-2of4", lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"].to(torch.bfloat16)}),
         rf"model-00001-of-00002.safetensors: tensor '{Q}.weight' has dtype torch.bfloat16, expected torch.float8_e4m3fn"),
        ("w8a8-2of4-tensor", lambda t: t.update({f"{Q}.weight_scale": torch.ones(64, 1, dtype=torch.bfloat16)}),
         rf"tensor '{Q}.weight_scale' has shape \[64, 1\], expected \[1\]"),
        ("dense-2of4", lambda t: t.update({f"{Q}.weight_scale": torch.ones(64, 1)}),
         "the quantization_config says the weights are not quantized, but the layer has a scale"),
    ],
)
def test_wrong_tensor_is_named_before_loading(variant, edit, match, tmp_path):
    folder = assemble(variant, tmp_path / "m")
    shard = folder / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"].update(dict.fromkeys(tensors, shard.name))
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=match):
        validate_checkpoint(folder, load_scheme(folder))


# -- through vLLM -----------------------------------------------------------------------------------
ENGINE_CASES = {  # case -> (variant, keep quantization_config, scheme quantized at load)
    **{v: (v, True, "int8") for v in EXPECTED},
    # a plain bf16 checkpoint (as Sparse-Llama-3.1-8B-2of4) served with --quantization sparse24, fp8 at load
    "plain-fp8-at-load": ("dense-2of4", False, "fp8"),
}


@pytest.mark.engine
@pytest.mark.parametrize("case", sorted(ENGINE_CASES))
def test_logprobs_match_float64_reference(case, tmp_path):
    variant, with_config, load_grid = ENGINE_CASES[case]
    folder = assemble(variant, tmp_path / case, with_config=with_config)
    ids = _ids(folder)
    scheme = load_scheme(folder) if with_config else Sparse24Scheme.unquantized_24(load_grid)
    ref = reference_logprobs(reference_model(folder), reference_weights(folder, load_grid), ids, GRIDS[scheme.quant])
    result, _ = run_engine(folder, tmp_path / "r.json", ids, "--quantization", "sparse24",
                           env={LOAD_SCHEME_ENV: load_grid})
    assert result["quantization"] == "sparse24"
    diff = (torch.tensor(result["prompt_logprobs"], dtype=torch.float64) - ref).abs().max().item()
    print(f"{case}: max |logprob - float64 reference| = {diff:.2e}")
    assert diff < LOGPROB_ATOL


@pytest.mark.engine
def test_checkpoint_not_24_where_it_says_so_is_refused_naming_the_layer(tmp_path):
    folder = assemble("dense-2of4", tmp_path / "not24")
    shard = folder / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    w = tensors["model.layers.0.mlp.up_proj.weight"]
    row = w[7].clone()
    row[:4] = torch.tensor([0.5, -0.25, 0.125, 0.75])  # 4 non-zeros in columns 0..3 of row 7
    w[7] = row
    save_file(tensors, str(shard), metadata={"format": "pt"})
    result, proc = run_engine(folder, tmp_path / "r.json", _ids(folder), check=False)
    assert proc.returncode != 0 and result is None
    assert ("model.layers.0.mlp.up_proj: not 2:4 sparse: row 7, columns 0..3 hold 4 non-zeros"
            in proc.stdout), proc.stdout[-3000:]
