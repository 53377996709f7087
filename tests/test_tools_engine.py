"""A tiny model compressed by ``vllm-sparse24 compress`` loads in the sparse24 plugin on
CPU and generates, with prompt log-probs equal to ``offline eval``'s model (one engine start)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import LOGPROB_ATOL, run_engine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.engine
def test_compressed_tiny_model_runs_in_the_plugin(tmp_path):
    import tiny_llama as tl

    dense = tmp_path / "dense"
    model = tl.build_dense(dense, hidden=128, intermediate=256, layers=2)
    model.save_pretrained(dense)
    cfg = json.loads((dense / "config.json").read_text())
    cfg["rope_theta"] = 10000.0
    (dense / "config.json").write_text(json.dumps(cfg))
    calib = tmp_path / "calib.txt"
    calib.write_text("the sparse model keeps two of every four weights and the quick brown fox " * 300)
    out = tmp_path / "sparse24"
    subprocess.run(
        [sys.executable, "-m", "sparse24_tools", "compress", "--model", str(dense), "--out", str(out),
         "--method", "sparsegpt", "--joint", "--calib", str(calib), "--nsamples", "8", "--seqlen", "64",
         "--dense-layers", r"model\.layers\.1\.mlp\.down_proj", "--device", "cpu"],
        check=True, cwd=REPO, timeout=600,
    )
    ids = list(range(2, 40))
    got, _ = run_engine(out, tmp_path / "engine.json", ids, "--quantization", "sparse24")
    assert len(got["completion_ids"]) > 0

    from sparse24_tools.evaluate import load_for_eval

    ev, _ = load_for_eval(out)
    with torch.no_grad():
        lp = torch.log_softmax(ev(torch.tensor([ids])).logits[0].double(), -1)[:-1]
    ref = lp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    diff = (torch.tensor(got["prompt_logprobs"], dtype=torch.float64) - ref).abs().max()
    assert diff < LOGPROB_ATOL, f"plugin vs offline eval: max |logprob diff| {diff}"
