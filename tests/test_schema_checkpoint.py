"""quantization_config parsing and checkpoint header checks: each bad input names what is wrong."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_sparse24 import checkpoint as ckpt
from vllm_sparse24.checkpoint import (
    CheckpointError,
    atomic_output_dir,
    load_scheme,
    validate_checkpoint,
)
from vllm_sparse24.schema import Sparse24ConfigError, Sparse24Scheme


def test_round_trip_and_layer_kinds():
    s = Sparse24Scheme(ignore=("lm_head",), dense_layers=("re:.*down_proj$", "model.layers.0.self_attn.o_proj"))
    again = Sparse24Scheme.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s
    assert s.layer_kind("lm_head") == "unquantized"
    assert s.layer_kind("model.layers.3.mlp.down_proj") == "dense"
    assert s.layer_kind("model.layers.0.self_attn.o_proj") == "dense"
    assert s.layer_kind("model.layers.1.self_attn.o_proj") == "sparse"


@pytest.mark.parametrize(
    "change,match",
    [
        ({"colour": "red"}, r"unknown keys \['colour'\]"),
        ({"format_version": 2}, "format_version=2 is not supported"),
        ({"sparsity_structure": "4:8"}, "only '2:4'"),
        ({"weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}}, "weights.*num_bits=4"),
        ({"input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}},
         "input_activations.*strategy='tensor'"),
        ({"weights": {"num_bits": "eight"}}, "not valid QuantizationArgs"),
        ({"ignore": "lm_head"}, "ignore must be a list"),
    ],
)
def test_config_errors(change, match):
    cfg = Sparse24Scheme().to_dict() | change
    with pytest.raises(Sparse24ConfigError, match=match):
        Sparse24Scheme.from_dict(cfg)


def test_legacy_config():
    from tiny_llama import legacy_quantization_config

    cfg = legacy_quantization_config()
    assert Sparse24Scheme.is_legacy_config(cfg)
    s = Sparse24Scheme.from_compressed_tensors(cfg)
    assert s.legacy and s.layer_kind("model.layers.0.mlp.up_proj") == "sparse"
    assert s.layer_kind("lm_head") == "unquantized"
    cfg["sparsity_config"]["ignore"] = ["re:.*down_proj"]
    assert Sparse24Scheme.from_compressed_tensors(cfg).layer_kind("model.layers.0.mlp.down_proj") == "dense"
    cfg["config_groups"]["group_0"]["input_activations"] |= {"strategy": "tensor", "dynamic": False}
    with pytest.raises(Sparse24ConfigError, match="group_0.input_activations.*strategy='tensor'"):
        Sparse24Scheme.from_compressed_tensors(cfg)


def _edit(tiny, tmp_path, fn):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny.sparse24_dir, out)
    tensors = load_file(out / "model.safetensors")
    fn(tensors)
    save_file(tensors, str(out / "model.safetensors"))
    return out


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda t: t.pop(f"{Q}.weight_scale"), rf"missing tensor '{Q}.weight_scale'"),
        (lambda t: t.pop(f"{Q}.weight_bitmask"), rf"missing tensor '{Q}.weight_bitmask'"),
        (lambda t: t.__setitem__(f"{Q}.weight_packed", t[f"{Q}.weight_packed"].float()),
         rf"'{Q}.weight_packed' has dtype torch.float32, expected torch.int8"),
        (lambda t: t.__setitem__(f"{Q}.weight_bitmask", t[f"{Q}.weight_bitmask"][:, :-1].contiguous()),
         rf"'{Q}.weight_bitmask' has shape \[256, 31\], expected \[256, 32\]"),
        (lambda t: t.__setitem__(f"{Q}.weight_scale", t[f"{Q}.weight_scale"][:-1].contiguous()),
         rf"'{Q}.weight_scale' has shape \[255, 1\], expected \[256, 1\]"),
        (lambda t: t.__setitem__(f"{Q}.weight_zero_point", torch.zeros(256, 1, dtype=torch.int8)),
         rf"unexpected tensor '{Q}.weight_zero_point'"),
        (lambda t: t.__setitem__(f"{Q}.weight", torch.zeros(256, 256, dtype=torch.int8)),
         "has both sparse tensors and a dense"),
        (lambda t: [t.__setitem__(f"{Q}.weight_packed", t[f"{Q}.weight_packed"][:, :100].contiguous()),
                    t.__setitem__(f"{Q}.weight_bitmask", t[f"{Q}.weight_bitmask"][:, :25].contiguous())],
         rf"{Q}: K=200 is not a multiple of 64"),
    ],
)
def test_checkpoint_errors_name_the_tensor(tiny, tmp_path, edit, match):
    out = _edit(tiny, tmp_path, edit)
    with pytest.raises(CheckpointError, match=match):
        validate_checkpoint(out, load_scheme(out))


def test_checkpoint_ok_and_kind_mismatch(tiny, tmp_path):
    kinds = validate_checkpoint(tiny.sparse24_dir, load_scheme(tiny.sparse24_dir))
    assert len(kinds) == 2 * 7 and set(kinds.values()) == {"sparse"}
    with pytest.raises(CheckpointError, match=f"{Q}: has sparse tensors .* makes it dense"):
        validate_checkpoint(tiny.sparse24_dir, Sparse24Scheme(dense_layers=(Q,)))


def test_corrupt_file_and_bad_config(tiny, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny.sparse24_dir, out)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors header"):
        validate_checkpoint(out, load_scheme(out))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 7
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: quantization_config.format_version=7"):
        load_scheme(out)


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_output_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").exists() and len(list(tmp_path.iterdir())) == 1


def test_the_reader_reads_both_layouts_alike(tiny):
    """One reader: the native and the legacy llm-compressor layout of the same weights give the same
    codes, masks and scales, and the weights the tiny model was built from."""
    native, legacy = ckpt.read_checkpoint(tiny.sparse24_dir), ckpt.read_checkpoint(tiny.legacy_dir)
    assert legacy.scheme.legacy and not native.scheme.legacy
    assert native.linears.keys() == legacy.linears.keys() and len(native.linears) == 14
    assert native.other.keys() == legacy.other.keys() and "model.embed_tokens.weight" in native.other
    for prefix, q in native.linears.items():
        old = legacy.linears[prefix]
        assert q.kind == old.kind == "sparse"
        assert torch.equal(q.codes, old.codes) and torch.equal(q.mask, old.mask) and torch.equal(q.scale, old.scale)
        assert int(q.mask.sum()) * 2 == q.mask.numel()
        assert torch.allclose(q.dequantized().double(), tiny.dequant[f"{prefix}.weight"], rtol=1e-6, atol=0)


def test_tensor_names_are_spelled_in_one_place():
    root = Path(__file__).resolve().parents[1]
    spelled = sorted(str(p.relative_to(root)) for folder in ("vllm_sparse24", "sparse24_tools", "benchmarks")
                     for p in (root / folder).rglob("*.py") if re.search(r"weight_packed|weight_bitmask", p.read_text()))
    assert spelled == ["vllm_sparse24/checkpoint/names.py"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_output_dir_gives_the_umask_modes(tmp_path, umask):
    """What is renamed into place has the modes the umask gives, not the temporary folder's 0700
    nor the 0600 that safetensors writes (a server running as another user must read it)."""
    old = os.umask(umask)
    try:
        with atomic_output_dir(tmp_path / "model") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "run.sh").write_text("")
            (tmp / "sub" / "run.sh").chmod(0o700)
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [tmp_path / "model", *(tmp_path / "model").rglob("*")]}
    assert modes == {"model": 0o777 & ~umask, "model/model.safetensors": 0o666 & ~umask,
                     "model/sub": 0o777 & ~umask, "model/sub/run.sh": 0o777 & ~umask}
