"""benchmarks/smollm2_reference.py: the SmolLM2 accuracy rule can fail, its limits follow the CPU
measurement, and the reference of a w4a8 checkpoint computes with the format reader's weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2_reference as sr  # noqa: E402
import tiny_llama as tl  # noqa: E402

from sparse24_tools.compress import compress  # noqa: E402
from sparse24_tools.compress_options import CompressOptions  # noqa: E402
from sparse24_tools.evaluate import load_for_eval  # noqa: E402
from vllm_sparse24 import checkpoint as ckpt  # noqa: E402


def test_tolerance_rule_can_fail():
    stats = {"bfloat16": {"mean_abs": 0.2, "p99_abs": 0.84, "ppl_rel": 0.0096, "se_mean_signed": 0.0032, "windows": 32}}
    tol = sr.tolerance_from(stats)["bfloat16"]
    ok = {"mean_abs": 0.21, "p99_abs": 0.9, "mean_signed": -0.01}
    assert sr.passes(ok, tol)[0]
    # what a layout bug in one layer of SmolLM2 did (reference "sensitivity" entries)
    assert not sr.passes({"mean_abs": 0.64, "p99_abs": 2.8, "mean_signed": -0.205}, tol)[0]
    assert sr.passes({"mean_abs": 0.2, "p99_abs": 0.8, "mean_signed": -0.05}, tol)[1] == \
        {"mean_abs": True, "p99_abs": True, "ppl_rel": False}
    assert sr.tolerance_for(tol, 8)["ppl_rel"] > tol["ppl_rel"] == sr.tolerance_for(tol, 32)["ppl_rel"]


def test_reference_of_a_w4a8_checkpoint_uses_the_format_reader(tmp_path, monkeypatch):
    """A w4a8 checkpoint: the float64 reference computes with the reader's weights (int4 value x
    group scale x channel scale, checked against the stored bytes in test_w4a8.py) and says so."""
    dense, out = tmp_path / "dense", tmp_path / "w4a8"
    tl.build_dense(dense, hidden=128, intermediate=256, layers=2).save_pretrained(dense)
    compress(dense, out, CompressOptions(method="magnitude", scheme="w4a8", progress=False))
    text = tmp_path / "text.txt"
    text.write_text("the sparse model keeps two of every four weights and the quick brown fox " * 40)
    # the tiny model's layers stand in for SmolLM2's
    monkeypatch.setattr(sr, "SENSITIVITY", (("model.layers.1.mlp.down_proj", "shift"),
                                            ("model.layers.0.self_attn.q_proj", 1.10)))
    ref_json = tmp_path / "ref.json"
    assert sr.main([str(out), "--text", str(text), "--windows", "2", "--seqlen", "32", "--json", str(ref_json)]) == 0
    ref = json.loads(ref_json.read_text())
    assert ref["checkpoint"]["scheme"] == "w4a8" and ref["checkpoint"]["compress_report"]["scheme"] == "w4a8"
    assert "int4 value x its group's integer scale" in ref["reference"]

    read = ckpt.read_checkpoint(out)
    model, tok = load_for_eval(out)
    sparse = [p for p, q in read.linears.items() if q.kind == "sparse"]
    assert len(sparse) == 14 and all(read.linears[p].group_scale is not None for p in sparse)
    for prefix, q in read.linears.items():
        assert torch.equal(model.get_submodule(prefix).weight.data, q.dequantized()), prefix
    model.double()
    with torch.no_grad():
        for w in ref["windows"]:
            ids = torch.tensor([w["token_ids"]])
            lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)[:-1]
            want = lp.gather(1, ids[0, 1:, None]).squeeze(1)
            torch.testing.assert_close(torch.tensor(w["ref_logprobs"], dtype=torch.float64), want, rtol=0, atol=1e-6)
