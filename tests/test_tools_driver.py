"""Model-level tests of ``sparse24_tools``: sequential compression of a tiny random Llama, the
written checkpoint, evaluation arithmetic, atomic output and error messages (fast, CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from sparse24_tools.calib import CalibrationError  # noqa: E402
from sparse24_tools.compress import compress  # noqa: E402
from sparse24_tools.compress_options import CompressError, CompressOptions  # noqa: E402
from sparse24_tools.evaluate import load_for_eval  # noqa: E402
from sparse24_tools.model_walk import UnsupportedModelError  # noqa: E402
from vllm_sparse24 import checkpoint as ckpt  # noqa: E402
from vllm_sparse24.format import unpack_24  # noqa: E402

FAST = {"nsamples": 6, "seqlen": 64, "batch_size": 3, "progress": False}
# float64 reference vs float32 model: same tolerance as the plugin's engine tests
LOGPROB_ATOL = 1e-3
_WORDS = ("the sparse model keeps two of every four weights and quantizes each row to int8 while "
          "the quick brown fox jumps over the lazy dog near the river in the old city").split()


def _save_dense(folder: Path, **kw) -> torch.nn.Module:
    import tiny_llama as tl

    model = tl.build_dense(folder, **kw)
    model.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_theta"] = 10000.0
    (folder / "config.json").write_text(json.dumps(cfg))
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    model = _save_dense(root / "dense", hidden=128, intermediate=256, layers=2)
    g = torch.Generator().manual_seed(1)
    words = [_WORDS[i] for i in torch.randint(len(_WORDS), (4000,), generator=g).tolist()]
    calib = root / "calib.txt"
    calib.write_text(" ".join(words))
    return root, model, calib


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def test_sparsegpt_joint_checkpoint_is_valid_24_and_reported(tiny, tmp_path):
    root, _, calib = tiny
    out = tmp_path / "sgj"
    rep = compress(root / "dense", out, CompressOptions(method="sparsegpt", joint=True, calib=calib, **FAST))
    scheme = ckpt.load_scheme(out)
    kinds = ckpt.validate_checkpoint(out, scheme)
    assert len(kinds) == 14 and set(kinds.values()) == {"sparse"}
    headers = ckpt.read_headers(out)
    assert "lm_head.weight" in headers and headers["lm_head.weight"][1] == torch.float32
    from safetensors.torch import load_file

    t = load_file(str(out / "model.safetensors"))
    for prefix in kinds:
        w = unpack_24(t[f"{prefix}.weight_packed"], t[f"{prefix}.weight_bitmask"], name=prefix)  # checks 2:4
        assert w.shape[1] in (128, 256) and t[f"{prefix}.weight_scale"].shape == (w.shape[0], 1)
    for f in ("config.json", "tokenizer.json", "generation_config.json", "compress_report.json"):
        assert (out / f).exists(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 10000.0 and cfg["quantization_config"]["quant_method"] == "sparse24"
    report = json.loads((out / "compress_report.json").read_text())
    assert report["totals"]["linears"] == 14 == len(report["linears"])
    lin = report["linears"]["model.layers.1.mlp.down_proj"]
    assert lin["method"] == "sparsegpt-joint" and lin["seconds"] >= 0
    # SparseGPT must improve on the naive magnitude + RTN baseline, layer by layer on average
    assert rep["totals"]["mean_rel_error_after"] < 0.9 * rep["totals"]["mean_rel_error_before"]
    assert not _leftovers(tmp_path)


def test_eval_model_matches_float64_reference_of_the_checkpoint(tiny, tmp_path):
    import tiny_llama as tl
    from safetensors.torch import load_file

    root, model, calib = tiny
    out = tmp_path / "wanda"
    compress(root / "dense", out, CompressOptions(method="wanda", calib=calib, dense_layers=(r"model\.layers\.1\.mlp\.down_proj",), **FAST))
    t = load_file(str(out / "model.safetensors"))
    dequant = {}
    for prefix, kind in ckpt.validate_checkpoint(out, ckpt.load_scheme(out)).items():
        w = (unpack_24(t[f"{prefix}.weight_packed"], t[f"{prefix}.weight_bitmask"]) if kind == "sparse"
             else t[f"{prefix}.weight"])
        dequant[f"{prefix}.weight"] = w.double() * t[f"{prefix}.weight_scale"].double()
    assert ckpt.load_scheme(out).layer_kind("model.layers.1.mlp.down_proj") == "dense"
    ids = list(range(2, 60))
    ref = tl.reference_logprobs(model, dequant, ids)
    ev, _ = load_for_eval(out)
    with torch.no_grad():
        lp = torch.log_softmax(ev(torch.tensor([ids])).logits[0].double(), -1)[:-1]
    got = lp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    assert (got - ref).abs().max() < LOGPROB_ATOL


def test_auto_dense_layers_pick_whole_fused_groups(tiny, tmp_path):
    root, _, calib = tiny
    out = tmp_path / "auto"
    rep = compress(root / "dense", out, CompressOptions(method="magnitude", calib=calib, dense_layers=("auto:30",), **FAST))
    chosen = rep["auto_dense"]["chosen"]
    assert 0 < len(chosen) <= int(14 * 0.3)
    for i in range(2):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            picked = {f"model.layers.{i}.{'self_attn' if 'proj' in g and g[0] in 'qkv' else 'mlp'}.{g}" in chosen
                      for g in group}
            assert len(picked) == 1, f"layer {i} group {group} split: {chosen}"
    kinds = ckpt.validate_checkpoint(out, ckpt.load_scheme(out))
    assert sorted(n for n, k in kinds.items() if k == "dense") == sorted(chosen)


def test_dense_w8a8_export_is_compressed_tensors_int_quantized(tiny, tmp_path):
    root, _, _ = tiny
    out = tmp_path / "w8a8"
    compress(root / "dense", out, CompressOptions(export="dense-w8a8", progress=False))
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "int-quantized"
    g = q["config_groups"]["group_0"]
    assert g["weights"]["strategy"] == "channel" and g["input_activations"]["strategy"] == "token"
    assert g["input_activations"]["dynamic"] is True and q["ignore"] == ["lm_head"]
    h = ckpt.read_headers(out)
    assert h["model.layers.0.mlp.down_proj.weight"][1:] == (torch.int8, (128, 256))
    assert h["model.layers.0.mlp.down_proj.weight_scale"][1:] == (torch.float32, (128, 1))
    assert h["lm_head.weight"][1] == torch.float32
    load_for_eval(out)


def test_interrupted_run_leaves_no_output(tiny, tmp_path, monkeypatch):
    import sparse24_tools.driver as drv

    root, _, calib = tiny
    real = drv.compress_group
    calls = {"n": 0}

    def failing(*a, **kw):  # dies in the second decoder layer
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("injected")
        return real(*a, **kw)

    monkeypatch.setattr(drv, "compress_group", failing)
    with pytest.raises(KeyboardInterrupt):
        compress(root / "dense", tmp_path / "out", CompressOptions(calib=calib, **FAST))
    monkeypatch.setattr(drv, "compress_group", real)

    def half_written(tensors, folder, **kw):  # dies while writing the checkpoint
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise OSError("disk full (injected)")

    monkeypatch.setattr(ckpt.write, "save_safetensors_shards", half_written)
    with pytest.raises(OSError, match="injected"):
        compress(root / "dense", tmp_path / "out", CompressOptions(calib=calib, **FAST))
    assert not (tmp_path / "out").exists()
    assert not _leftovers(tmp_path)


def test_existing_output_is_refused_before_work(tiny, tmp_path):
    root, _, calib = tiny
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        compress(root / "dense", tmp_path / "out", CompressOptions(calib=calib, **FAST))


def test_clear_errors(tiny, tmp_path):
    root, _, calib = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CalibrationError, match="empty.txt is empty"):
        compress(root / "dense", tmp_path / "a", CompressOptions(calib=empty, **FAST))
    with pytest.raises(CompressError, match=r"fused group model\.layers\.0\.self_attn\.q_proj.*split"):
        compress(root / "dense", tmp_path / "b", CompressOptions(calib=calib, dense_layers=(r".*q_proj",), **FAST))
    with pytest.raises(CompressError, match="auto:P"):
        compress(root / "dense", tmp_path / "c", CompressOptions(calib=calib, dense_layers=("auto:x",), **FAST))
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=64, n_head=2).save_pretrained(gpt2)
    with pytest.raises(UnsupportedModelError, match="model_type='gpt2'.*llama, mistral, qwen2"):
        compress(gpt2, tmp_path / "d", CompressOptions(calib=calib, **FAST))
    assert not _leftovers(tmp_path)


def test_k_not_multiple_of_64_names_the_layers(tmp_path):
    _save_dense(tmp_path / "odd", hidden=96, intermediate=192, layers=1)
    calib = tmp_path / "c.txt"
    calib.write_text("the quick brown fox " * 200)
    with pytest.raises(CompressError, match=r"model\.layers\.0\.self_attn\.q_proj \(K=96\).*--dense-layers"):
        compress(tmp_path / "odd", tmp_path / "out", CompressOptions(calib=calib, **FAST))
    # kept dense, the same model compresses
    compress(tmp_path / "odd", tmp_path / "out", CompressOptions(calib=calib, method="magnitude", dense_layers=(".*",), **FAST))
    assert set(ckpt.validate_checkpoint(tmp_path / "out", ckpt.load_scheme(tmp_path / "out")).values()) == {"dense"}


def test_compress_layer_benchmark_tiny_on_cpu(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from compress_layer import main

    doc = main(["--tiny", "--device", "cpu", "--out", str(tmp_path / "b.json")])
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["seconds_per_layer"] == doc["seconds_per_layer"] > 0
    assert saved["shape"]["hidden_size"] == 256 and 0 < saved["mean_rel_error_after"] < 1


def test_magnitude_without_calibration_runs_no_forward_and_says_so(tiny, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import sparse24_tools.compress as comp
    from sparse24_tools.stats import relative_weight_error

    root, model, calib = tiny
    with_calib = tmp_path / "with"
    rep_c = compress(root / "dense", with_calib, CompressOptions(method="magnitude", calib=calib, **FAST))

    def no_forwards(*a, **kw):
        raise AssertionError("magnitude without --calib must not run calibration forwards")

    monkeypatch.setattr(comp, "token_samples", no_forwards)
    monkeypatch.setattr(comp, "sequential_compress", no_forwards)
    out = tmp_path / "without"
    rep = compress(root / "dense", out, CompressOptions(method="magnitude", progress=False))
    assert rep["calib"] is None and rep["nsamples"] is None and "not measured" in rep["errors"]
    assert "output error" in rep_c["errors"] and rep_c["nsamples"] == FAST["nsamples"]
    # magnitude 2:4 does not depend on the inputs: the same checkpoint either way
    a, b = load_file(str(out / "model.safetensors")), load_file(str(with_calib / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the reported error is the relative weight error of the written int8 2:4 weight
    name = "model.layers.0.self_attn.q_proj"
    w = unpack_24(a[f"{name}.weight_packed"], a[f"{name}.weight_bitmask"]).double() * a[f"{name}.weight_scale"].double()
    dense_w = model.get_submodule(name).weight.detach()
    assert rep["linears"][name]["rel_error_after"] == pytest.approx(relative_weight_error(dense_w, w), rel=1e-5)
    assert 0.3 < rep["linears"][name]["rel_error_after"] < 1


def test_calibration_free_compress_refuses_what_needs_data(tiny, tmp_path):
    root, _, _ = tiny
    with pytest.raises(CompressError, match=r"--method wanda needs calibration data \(norms of each linear.s inputs\): "
                                            r"pass --calib"):
        compress(root / "dense", tmp_path / "a", CompressOptions(method="wanda", progress=False))
    with pytest.raises(CompressError, match="auto:P ranks the linears.*pass --calib"):
        compress(root / "dense", tmp_path / "b", CompressOptions(method="magnitude", dense_layers=("auto:10",), progress=False))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_default_calibration_size_by_device():
    from sparse24_tools.compress_options import calibration_size

    assert calibration_size("cpu") == (32, 512)
    assert calibration_size("cuda:1") == (128, 2048)
    assert calibration_size("cpu", nsamples=4) == (4, 512)


def test_compare_runs_each_option_set_and_merge_keeps_the_order(tiny, tmp_path):
    from sparse24_tools.__main__ import main

    root, _, calib = tiny
    common = ["--text", str(calib), "--eval-seqlen", "64", "--windows", "2", "--device", "cpu"]
    assert main(["compare", "--model", str(root / "dense"), "--work-dir", str(tmp_path / "w"), "--runs", "magnitude",
                 "dense", "--json", str(tmp_path / "a.json"), "--png", str(tmp_path / "a.png"), *common]) == 0
    doc = json.loads((tmp_path / "a.json").read_text())
    rows = {r["run"]: r for r in doc["rows"]}
    assert rows["magnitude"]["sparse_linears"] == 14 and rows["dense"]["perplexity"] < rows["magnitude"]["perplexity"]
    assert doc["compress_options"]["nsamples"] == 32 and doc["compress_options"]["device"] == "cpu"
    assert main(["merge", f"{tmp_path / 'a.json'}:-x", str(tmp_path / "a.json"), "--json", str(tmp_path / "m.json"),
                 "--png", str(tmp_path / "m.png")]) == 0
    assert [r["run"] for r in json.loads((tmp_path / "m.json").read_text())["rows"]] == \
        ["dense", "magnitude", "magnitude-x", "dense-x"]
