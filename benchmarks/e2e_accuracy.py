"""Accuracy of sparse24 THROUGH vLLM on the GPU: the tiny random Llama (vllm_sparse24.tiny,
2:4 magnitude + W8A8) -> vLLM prompt logprobs vs the float64 reference with per-token
activation fake-quant (tests/tiny_llama.reference_logprobs); greedy generations printed.

    python benchmarks/e2e_accuracy.py --out DIR [--runs cuda-bf16,torch-fp32]

Runs (each vLLM engine in its own process):
  * ``cuda-bf16``: dtype bfloat16, the CUDA kernel (cuSPARSELt / Triton decode), CUDA graphs;
    tolerance max |dlogprob| <= 0.25 and mean <= 0.05 nats (bf16 activations and residual stream
    against a float64 reference; the int8 activation grid sees bf16-rounded inputs).
  * ``torch-fp32``: dtype float32, ``VLLM_SPARSE24_KERNEL=torch`` (the reference kernel on the
    GPU); tolerance max |dlogprob| <= 1e-3 (the CPU engine test's LOGPROB_ATOL).
SmolLM2-135M (the issue's model) is not used: its compressed checkpoint and its GGUF are each
larger than the device tool's 64 MiB carry limit, and the GPU machine has no network.
Writes e2e-accuracy.json into --out; exits 1 if a tolerance is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "the quick brown fox jumps over the lazy dog in the city of paris, the capital",
    "every group of four weights keeps two values while int8 activations are quantized per token",
    "the sparse model runs fast on tensor cores and the capital of france is paris which",
    "one scale a row the quick brown fox jumps over the lazy dog in the city",
]
RUNS = {
    "cuda-bf16": {"dtype": "bfloat16", "env": {}, "max_abs": 0.25, "mean_abs": 0.05},
    "torch-fp32": {"dtype": "float32", "env": {"VLLM_SPARSE24_KERNEL": "torch"}, "max_abs": 1e-3, "mean_abs": 1e-3},
    "cuda-bf16-tp2": {"dtype": "bfloat16", "env": {}, "tp": 2, "max_abs": 0.25, "mean_abs": 0.05},
}
# TP=2 against TP=1 (both bf16, CUDA kernel): only the all-reduce order and bf16 rounding of the
# partial sums differ; a wrong K shard of a row-parallel layer moves logprobs by whole nats
TP_VS_TP1 = {"max_abs": 0.15, "mean_abs": 0.03}


def child(args) -> None:
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(args.spec).read_text())
    llm = LLM(spec["model"], quantization="sparse24", dtype=spec["dtype"], max_model_len=512,
              gpu_memory_utilization=0.3, seed=0, enforce_eager=spec.get("enforce_eager", False),
              tensor_parallel_size=spec.get("tp", 1))
    outs = llm.generate([{"prompt_token_ids": ids} for ids in spec["ids"]],
                        SamplingParams(max_tokens=16, prompt_logprobs=0, temperature=0.0))
    res = []
    for ids, o in zip(spec["ids"], outs, strict=True):
        lps = [o.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
        res.append({"prompt_logprobs": lps, "completion_ids": list(o.outputs[0].token_ids),
                    "completion_text": o.outputs[0].text})
    Path(args.result).write_text(json.dumps({
        "quantization": llm.llm_engine.vllm_config.model_config.quantization, "prompts": res}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--runs", default="cuda-bf16,torch-fp32")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per engine process")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        child(args)
        return 0
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import tiny_llama as tl
    import torch
    from transformers import AutoTokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="s24acc-"))
    model = tl.build_dense(work / "dense")
    dequant = tl.write_checkpoint(model, work / "dense", work / "sparse24")
    tok = AutoTokenizer.from_pretrained(work / "sparse24")
    ids = [tok(t).input_ids for t in TEXTS]
    refs = [tl.reference_logprobs(model, dequant, i) for i in ids]
    summary = {"model": "tiny random Llama (vllm_sparse24.tiny.build_dense: hidden 256, intermediate 512, "
                        "2 layers, vocab 384), 2:4 magnitude + int8 per-channel, W8A8 per-token",
               "reference": "float64 HF forward, dequantized weights, per-token fake-quant of linear inputs",
               "prompts": [len(i) for i in ids], "runs": {}}
    ok = True
    for name in args.runs.split(","):
        run = RUNS[name]
        spec = {"model": str(work / "sparse24"), "dtype": run["dtype"], "ids": ids,
                "enforce_eager": name == "torch-fp32", "tp": run.get("tp", 1)}
        (work / f"{name}.spec.json").write_text(json.dumps(spec))
        res_path = work / f"{name}.json"
        env = dict(os.environ, **run["env"])
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--spec", str(work / f"{name}.spec.json"),
               "--result", str(res_path)]
        try:
            rc = subprocess.run(cmd, env=env, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if not res_path.exists():
            summary["runs"][name] = {"error": f"engine process rc={rc}"}
            print(f"[{name}] FAILED rc={rc}", flush=True)
            ok = False
            continue
        res = json.loads(res_path.read_text())
        diffs = torch.cat([(torch.tensor(p["prompt_logprobs"], dtype=torch.float64) - r).abs()
                           for p, r in zip(res["prompts"], refs, strict=True)])
        mx, mean = diffs.max().item(), diffs.mean().item()
        passed = mx <= run["max_abs"] and mean <= run["mean_abs"]
        ok &= passed
        summary["runs"][name] = {
            "dtype": run["dtype"], "env": run["env"], "quantization": res["quantization"],
            "max_abs_diff": mx, "mean_abs_diff": mean, "tolerance": {"max_abs": run["max_abs"], "mean_abs": run["mean_abs"]},
            "passed": passed, "n_logprobs": diffs.numel(),
            "greedy": [{"prompt": t, "completion_ids": p["completion_ids"],
                        "completion": tok.decode(p["completion_ids"])} for t, p in zip(TEXTS, res["prompts"], strict=True)],
        }
        print(f"[{name}] quantization={res['quantization']} max|d|={mx:.3e} mean|d|={mean:.3e} "
              f"tol max {run['max_abs']} mean {run['mean_abs']} -> {'PASS' if passed else 'FAIL'}", flush=True)
        for g in summary["runs"][name]["greedy"]:
            print(f"    {g['prompt']!r} -> {g['completion']!r}", flush=True)
    tp1, tp2 = work / "cuda-bf16.json", work / "cuda-bf16-tp2.json"
    if tp1.exists() and tp2.exists():
        a, b = (json.loads(p.read_text())["prompts"] for p in (tp1, tp2))
        d = torch.cat([(torch.tensor(x["prompt_logprobs"]) - torch.tensor(y["prompt_logprobs"])).abs()
                       for x, y in zip(a, b, strict=True)])
        passed = d.max().item() <= TP_VS_TP1["max_abs"] and d.mean().item() <= TP_VS_TP1["mean_abs"]
        ok &= passed
        summary["tp2_vs_tp1"] = {"max_abs_diff": d.max().item(), "mean_abs_diff": d.mean().item(),
                                 "tolerance": TP_VS_TP1, "passed": passed,
                                 "same_greedy": [x["completion_ids"] == y["completion_ids"] for x, y in zip(a, b, strict=True)]}
        print(f"[tp2 vs tp1] {summary['tp2_vs_tp1']}", flush=True)
    (out / "e2e-accuracy.json").write_text(json.dumps(summary, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
