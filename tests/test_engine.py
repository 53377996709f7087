"""The plugin inside a real vLLM engine (CPU, float32): logprobs against a float64 reference."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LOGPROB_ATOL, run_engine

pytestmark = pytest.mark.engine


def _max_diff(result, tiny) -> float:
    got = torch.tensor(result["prompt_logprobs"], dtype=torch.float64)
    assert got.shape == tiny.reference.shape
    return (got - tiny.reference).abs().max().item()


@pytest.fixture(scope="module")
def sparse24_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "sparse24.json"
    # vLLM's default path (engine processes, torch.compile): the other engine tests run eager
    result, _ = run_engine(tiny.sparse24_dir, out, tiny.ids, "--quantization", "sparse24", "--compiled")
    return result


def test_logprobs_match_float64_reference(sparse24_run, tiny):
    assert sparse24_run["quantization"] == "sparse24"
    diff = _max_diff(sparse24_run, tiny)
    print(f"max |logprob - float64 reference| = {diff:.2e}")
    assert diff < LOGPROB_ATOL
    assert len(sparse24_run["completion_ids"]) > 0


@pytest.mark.parametrize("fault", ["unpack", "kernel"])
def test_logprob_check_catches_a_broken_path(tiny, tmp_path, fault):
    result, _ = run_engine(tiny.sparse24_dir, tmp_path / "r.json", tiny.ids, "--break", fault)
    diff = _max_diff(result, tiny)
    print(f"fault={fault}: max |logprob diff| = {diff:.2e}")
    assert diff > LOGPROB_ATOL * 10


def test_legacy_layout_gives_same_logprobs(sparse24_run, tiny, tmp_path):
    # no --quantization: the plugin claims the compressed-tensors sparse-24-bitmask checkpoint
    result, _ = run_engine(tiny.legacy_dir, tmp_path / "legacy.json", tiny.ids)
    assert result["quantization"] == "sparse24"
    a = torch.tensor(result["prompt_logprobs"], dtype=torch.float64)
    b = torch.tensor(sparse24_run["prompt_logprobs"], dtype=torch.float64)
    assert (a - b).abs().max().item() < 1e-5
    assert result["completion_ids"] == sparse24_run["completion_ids"]


def test_flipped_bitmask_bit_fails_the_load(tiny, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "flipped"
    shutil.copytree(tiny.sparse24_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight_bitmask"
    tensors[key][5, 2] ^= 0b1  # row 5, columns 16..19 now keep 1 or 3 values
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    result, proc = run_engine(bad, tmp_path / "r.json", tiny.ids, check=False)
    assert proc.returncode != 0
    # up_proj is fused after gate_proj (intermediate rows) in vLLM's gate_up_proj
    rows = json.loads((tiny.sparse24_dir / "config.json").read_text())["intermediate_size"]
    assert "model.layers.1.mlp.gate_up_proj: bitmask row " + str(rows + 5) in proc.stdout, proc.stdout[-3000:]
    assert "columns 16..19 has" in proc.stdout
