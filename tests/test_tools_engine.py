"""A tiny model compressed by ``vllm-sparse24 compress`` loads in the sparse24 plugin on
CPU and generates, with prompt log-probs equal to ``offline eval``'s model (one engine start)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
# float32 engine vs float32 transformers eval of the same dequantized weights
LOGPROB_ATOL = 1e-3

RUNNER = textwrap.dedent("""
    import json, os, sys
    if __name__ == "__main__":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # as tests/engine_runner.py: eager, in this process
        from vllm import LLM, SamplingParams
        model, out, ids = sys.argv[1], sys.argv[2], [int(i) for i in sys.argv[3].split(",")]
        llm = LLM(model, quantization="sparse24", dtype="float32", max_model_len=512,
                  gpu_memory_utilization=0.3, seed=0, enforce_eager=True, distributed_executor_backend="uni")
        res = llm.generate({"prompt_token_ids": ids},
                           SamplingParams(max_tokens=8, prompt_logprobs=0, temperature=0.0))[0]
        lps = [res.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
        json.dump({"prompt_logprobs": lps, "completion_ids": list(res.outputs[0].token_ids)}, open(out, "w"))
""")


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
    script = tmp_path / "run_engine.py"
    script.write_text(RUNNER)
    result = tmp_path / "engine.json"
    proc = subprocess.run([sys.executable, str(script), str(out), str(result), ",".join(map(str, ids))],
                          cwd=tmp_path, timeout=900, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(result.read_text())
    assert len(got["completion_ids"]) > 0

    from sparse24_tools.evaluate import load_for_eval

    ev, _ = load_for_eval(out)
    with torch.no_grad():
        lp = torch.log_softmax(ev(torch.tensor([ids])).logits[0].double(), -1)[:-1]
    ref = lp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    diff = (torch.tensor(got["prompt_logprobs"], dtype=torch.float64) - ref).abs().max()
    assert diff < LOGPROB_ATOL, f"plugin vs offline eval: max |logprob diff| {diff}"
