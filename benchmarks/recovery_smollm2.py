"""Accuracy recovery of SmolLM2-135M 2:4 + W8A8 on one GPU, end to end (no vLLM needed).

    python benchmarks/recovery_smollm2.py --teacher SmolLM2-135M-Instruct.Q4_1.gguf \\
        --calib wiki_calib.txt --eval-text wiki_eval.txt --out results/recovery [--minutes 10] \\
        [--scheme int8|fp8]

1. the dense teacher's perplexity on ``--eval-text`` (``vllm-sparse24 eval``'s code: the first
   ``--windows`` non-overlapping windows of 512 tokens);
2. two one-shot students with the compressor (SparseGPT-joint) in ``--scheme`` (int8: int8
   weights and activations; fp8: e4m3 weights and activations): all linears 2:4, and
   ``--dense-layers auto:10`` (its sensitivities taken from the all-sparse run, as
   ``vllm-sparse24 compare`` does), each evaluated like step 1 (``one_shot`` in the JSON);
3. each student recovered by ``vllm-sparse24 recover`` in each ``--modes`` (global distillation,
   block-wise reconstruction), each run within ``--minutes`` (its token count is fitted to the
   time on its first steps), then evaluated like step 1 from the written checkpoint;
4. ``recovery-smollm2-<gpu>-<date>.json`` (``gpu``, ``date``, ``command``, ``dense_ppl``,
   ``one_shot``: scheme -> student -> perplexity, ``runs``: scheme, mode, dense_layers, ppl_before,
   ppl_after, tokens, minutes, and the curves; ``table``: scheme -> student -> one-shot and
   recovered perplexities) and a PNG of perplexity vs training tokens, written after every run.

Runs add up: students already in ``--out/students`` are reused (``--recompress`` redoes them), and
the runs of an existing JSON of the same GPU and date are kept (a run of the same scheme, student
and mode is replaced), so the experiment can be split over several invocations, e.g. one per
``--scheme`` or ``--students``/``--modes`` pair; ``--modes`` with no value measures the one-shot
students only. int8 students and recovered checkpoints are in ``students/<student>`` and
``recovered/<student>-<mode>``, fp8 ones in ``students/<student>-fp8`` and
``recovered/<student>-fp8-<mode>``.

``--smoke`` shrinks everything (a few steps, a few windows) to check the script on a CPU; the
numbers it prints then mean nothing. Needs the project installed (``pip install -e .``, vLLM not
required) plus ``gguf`` and ``accelerate`` for a .gguf teacher; matplotlib for the PNG.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparse24_tools.compress import compress  # noqa: E402
from sparse24_tools.compress_options import CompressOptions  # noqa: E402
from sparse24_tools.evaluate import load_for_eval, perplexity  # noqa: E402
from sparse24_tools.model_walk import load_model  # noqa: E402
from sparse24_tools.provenance import machine_info  # noqa: E402
from sparse24_tools.recover import RecoverOptions, plot_perplexity, recover  # noqa: E402

log = logging.getLogger("recovery_smollm2")
STUDENTS = {"all-sparse": (), "auto10": ("auto:10",)}


def gpu_tag() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower().replace("nvidia", "").strip()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def _tag(student: str, scheme: str) -> str:
    """Folder name of a student: int8 ones keep the names of before the fp8 scheme."""
    return student if scheme == "int8" else f"{student}-{scheme}"


def results_table(doc: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """scheme -> student -> {"one_shot": perplexity, "<mode>": recovered perplexity}: the int8 vs
    fp8 table, with and without recovery."""
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for scheme, students in doc.get("one_shot", {}).items():
        for student, ppl in students.items():
            table.setdefault(scheme, {}).setdefault(student, {})["one_shot"] = ppl
    for r in doc["runs"]:
        scheme, student, _ = _key(r)
        cell = table.setdefault(scheme, {}).setdefault(student, {})
        cell.setdefault("one_shot", r["ppl_before"])
        cell[r["mode"]] = r["ppl_after"]
    return table


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)


def _ppl(path_or_model: Any, tok: Any, args: argparse.Namespace) -> float:
    if isinstance(path_or_model, (str, Path)):
        model, tok = load_for_eval(path_or_model)
    else:
        model = path_or_model
    model.to(args.device)
    res = perplexity(model, tok, args.eval_text, seqlen=args.eval_seqlen, windows=args.windows,
                     progress=False, device=args.device)
    return res["perplexity"]


def _student(run: dict[str, Any]) -> str:
    return "auto10" if run["dense_layers"] == "auto:10" else "all-sparse"


def _key(run: dict[str, Any]) -> tuple[str, str, str]:
    """A run's identity in a results JSON: scheme, student, mode (runs made before the fp8 scheme are int8)."""
    return run.get("scheme", "int8"), _student(run), run["mode"]


def _put_run(doc: dict[str, Any], run: dict[str, Any]) -> None:
    """Add ``run`` to the results, replacing a run of the same scheme, student and mode."""
    doc["runs"] = [r for r in doc["runs"] if _key(r) != _key(run)]
    doc["runs"].append(run)


def _label(run: dict[str, Any]) -> str:
    scheme, student, mode = _key(run)
    return f"{scheme} {student}, {mode}"


def _write_plot(doc: dict[str, Any], png_path: Path) -> None:
    """Perplexity vs training tokens of every run in ``doc``."""
    series = [{"label": _label(r), "tokens": [c["tokens"] for c in r["curve"]],
               "perplexity": [c["perplexity"] for c in r["curve"]]} for r in doc["runs"]]
    minutes = sorted({r["options"].get("max_minutes") for r in doc["runs"]} - {None})
    budget = "/".join(f"{m:g}" for m in minutes) or "?"
    opts = doc["options"]
    plot_perplexity(series, png_path, f"SmolLM2-135M 2:4 + W8A8 recovery ({doc['gpu'] or 'CPU'}, {budget} min "
                    f"per run; {opts['train_eval_windows']}x{opts['eval_seqlen']} eval tokens during training)",
                    doc["dense_ppl"])


def merge(json_paths: list[Path], out: Path) -> dict[str, Any]:
    """One results JSON + PNG from several invocations' JSONs (e.g. runs made side by side on
    several GPUs, one --out each): the runs of all of them, a later file's run replacing an earlier
    one of the same scheme, student and mode. The JSONs must agree on GPU, evaluation and dense perplexity."""
    docs = [json.loads(Path(p).read_text()) for p in json_paths]
    if not docs:
        raise SystemExit("--merge needs at least one JSON")
    first = docs[0]
    for p, d in zip(json_paths, docs, strict=True):
        same = (d.get("gpu"), d.get("eval"), d.get("smoke")) == (first.get("gpu"), first.get("eval"), first.get("smoke"))
        if not same or abs(d["dense_ppl"] - first["dense_ppl"]) > 1e-6 * first["dense_ppl"]:
            raise SystemExit(f"{p}: GPU, evaluation settings or dense perplexity differ from {json_paths[0]}")
    commands = [c for d in docs for c in (d["command"] if isinstance(d["command"], list) else [d["command"]])]
    doc = dict(first, runs=[], merged_from=[str(p) for p in json_paths], command=commands, one_shot={})
    for d in docs:
        for scheme, students in d.get("one_shot", {}).items():
            doc["one_shot"].setdefault(scheme, {}).update(students)
    for d in docs:
        for run in d["runs"]:
            _put_run(doc, run)
    doc["table"] = results_table(doc)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(json_paths[0]).stem
    _write_json(out / f"{stem}.json", doc)
    _write_plot(doc, out / f"{stem}.png")
    print(f"merged {len(doc['runs'])} runs into {out / stem}.json and .png")
    return doc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="dense SmolLM2: .gguf file or HF folder")
    ap.add_argument("--calib", help="calibration / training text (wiki_calib.txt)")
    ap.add_argument("--eval-text", help="evaluation text (wiki_eval.txt)")
    ap.add_argument("--out", required=True, help="output folder (checkpoints, JSON, PNG)")
    ap.add_argument("--minutes", type=float, default=10.0, help="time budget of each recovery run")
    ap.add_argument("--modes", nargs="*", default=["global", "blocks"], choices=["global", "blocks"],
                    help="recovery modes (none: the one-shot students only)")
    ap.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    ap.add_argument("--scheme", default="int8", choices=["int8", "fp8"],
                    help="quantization of the students: int8 or fp8 (e4m3) weights and activations")
    ap.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"],
                    help="one-shot method of the students (SparseGPT: joint with the scheme's grid)")
    ap.add_argument("--nsamples", type=int, default=128, help="compressor calibration samples")
    ap.add_argument("--calib-seqlen", type=int, default=2048, help="compressor calibration sample length")
    ap.add_argument("--windows", type=int, default=64, help="evaluation windows")
    ap.add_argument("--eval-seqlen", type=int, default=512, help="evaluation window length")
    ap.add_argument("--seqlen", type=int, default=512, help="recovery training sequence length")
    ap.add_argument("--batch-size", type=int, default=16, help="recovery sequences per step")
    ap.add_argument("--lr-global", type=float, default=1e-4, help="peak learning rate, global mode")
    ap.add_argument("--lr-blocks", type=float, default=1e-4, help="peak learning rate, blocks mode")
    ap.add_argument("--loss", default="kl+squarehead", choices=["kl", "kl+squarehead"],
                    help="global mode loss")
    ap.add_argument("--generate-tokens", type=int, default=1_000_000,
                    help="tokens the teacher generates per run (counted in the run's minutes; blocks "
                    "mode: at most half of --block-pool-tokens)")
    ap.add_argument("--gen-batch-size", type=int, default=256)
    ap.add_argument("--block-pool-tokens", type=int, default=262_144)
    ap.add_argument("--train-eval-windows", type=int, default=16, help="windows of the evaluations during training")
    ap.add_argument("--eval-every-steps", type=int, default=250, help="global mode: evaluate every N steps")
    ap.add_argument("--eval-every-layers", type=int, default=5, help="blocks mode: evaluate every N layers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--recompress", action="store_true", help="redo students that exist in --out/students")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: checks the script, numbers mean nothing")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                    help="only merge these results JSONs (one per invocation) into --out, with the PNG")
    args = ap.parse_args(argv)
    if not args.merge and not (args.teacher and args.calib and args.eval_text):
        ap.error("--teacher, --calib and --eval-text are required (unless --merge)")
    if args.smoke:
        args.nsamples, args.calib_seqlen, args.windows, args.eval_seqlen = 4, 128, 2, 128
        args.seqlen, args.batch_size, args.generate_tokens, args.gen_batch_size = 64, 2, 64, 4
        args.block_pool_tokens, args.train_eval_windows = 512, 2
        args.eval_every_steps, args.eval_every_layers = 2, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.merge:
        return merge(args.merge, Path(args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    stem = f"recovery-smollm2-{gpu_tag()}-{date}"
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    doc: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "teacher": str(args.teacher), "calib": str(args.calib), "eval_text": str(args.eval_text),
        "eval": {"windows": args.windows, "seqlen": args.eval_seqlen}, "smoke": args.smoke,
        "machine": machine_info(), "options": {k: v for k, v in vars(args).items()},
        "dense_ppl": None, "one_shot": {}, "runs": [],
    }

    if json_path.exists():  # an earlier invocation of the same day: keep its runs
        old = json.loads(json_path.read_text())
        if old.get("eval") == doc["eval"] and old.get("smoke") == doc["smoke"]:
            doc["runs"], doc["dense_ppl"] = old.get("runs", []), old.get("dense_ppl")
            doc["one_shot"] = old.get("one_shot", {})
            for r in doc["runs"]:  # runs of before the fp8 scheme were int8
                r.setdefault("scheme", "int8")
            doc["earlier_commands"] = old.get("earlier_commands", []) + [old.get("command")]
        else:
            log.warning("%s was made with other evaluation settings: starting it anew", json_path)

    teacher, tok = load_model(args.teacher, torch.float32)
    if doc["dense_ppl"] is None:
        doc["dense_ppl"] = _ppl(teacher, tok, args)
        teacher.to("cpu")
    log.info("dense perplexity %.3f", doc["dense_ppl"])
    _write_json(json_path, doc)

    students: dict[str, Path] = {}
    sensitivity: dict[str, float] | None = None
    for name in ("all-sparse", "auto10"):
        if name not in args.students and not (name == "all-sparse" and "auto10" in args.students):
            continue
        path = out / "students" / _tag(name, args.scheme)
        if path.exists() and not args.recompress and (path / "compress_report.json").exists():
            log.info("reusing student %s", path)
            if name == "all-sparse":
                rep = json.loads((path / "compress_report.json").read_text())
                sensitivity = {n: v["rel_error_after"] for n, v in rep["linears"].items()}
            if name in args.students:
                students[name] = path
            continue
        if path.exists():
            shutil.rmtree(path)
        t0 = time.perf_counter()
        extra = {"sensitivity": sensitivity} if name == "auto10" and sensitivity else {}
        opts = CompressOptions(method=args.method, scheme=args.scheme, joint=True, calib=args.calib,
                               nsamples=args.nsamples, seqlen=args.calib_seqlen, dense_layers=STUDENTS[name],
                               device=args.device, seed=args.seed, progress=False)
        rep = compress(args.teacher, path, opts, model=copy.deepcopy(teacher), tokenizer=tok, **extra)
        if name == "all-sparse":
            sensitivity = {n: v["rel_error_after"] for n, v in rep["linears"].items()}
        log.info("student %s compressed in %.0fs", name, time.perf_counter() - t0)
        if name in args.students:
            students[name] = path

    for name, spath in students.items():
        ppl_before = _ppl(spath, tok, args)
        doc["one_shot"].setdefault(args.scheme, {})[name] = ppl_before
        doc["table"] = results_table(doc)
        _write_json(json_path, doc)
        log.info("%s %s one-shot: perplexity %.3f (dense %.3f)", args.scheme, name, ppl_before, doc["dense_ppl"])
        for mode in args.modes:
            rpath = out / "recovered" / f"{_tag(name, args.scheme)}-{mode}"
            opts = RecoverOptions(
                mode=mode, tokens=10**10 if not args.smoke else 4 * args.batch_size * args.seqlen,
                seqlen=args.seqlen, batch_size=args.batch_size,
                lr=args.lr_global if mode == "global" else args.lr_blocks,
                loss=args.loss if mode == "global" else "kl",
                # blocks mode trains on --block-pool-tokens only: generate about half of that
                generate_tokens=(args.generate_tokens if mode == "global"
                                 else min(args.generate_tokens, args.block_pool_tokens // 2)),
                gen_batch_size=args.gen_batch_size, eval_text=args.eval_text,
                eval_every=args.eval_every_steps if mode == "global" else args.eval_every_layers,
                eval_windows=args.train_eval_windows, eval_seqlen=args.eval_seqlen,
                block_pool_tokens=args.block_pool_tokens, max_minutes=args.minutes, device=args.device,
                seed=args.seed, save_every=10**9, progress=True,
            )
            t0 = time.perf_counter()
            rep = recover(args.teacher, spath, rpath, args.calib, opts, overwrite=True,
                          teacher_model=teacher, teacher_tokenizer=tok)
            minutes = (time.perf_counter() - t0) / 60
            teacher.to("cpu")
            ppl_after = _ppl(rpath, tok, args)
            run = {
                "scheme": args.scheme, "mode": mode, "dense_layers": "auto:10" if name == "auto10" else [],
                "ppl_before": ppl_before, "ppl_after": ppl_after, "tokens": rep["train"]["tokens"],
                "minutes": round(minutes, 2), "student": str(spath), "checkpoint": str(rpath),
                "train": rep["train"], "data": rep["data"], "seconds": rep["seconds"],
                "peak_gpu_memory_gib": rep["peak_gpu_memory_gib"], "options": rep["options"],
                "curve": [{k: e.get(k) for k in ("tokens", "perplexity", "top1_agreement", "kl")}
                          for e in rep["evals"]],
            }
            _put_run(doc, run)
            doc["table"] = results_table(doc)
            log.info("%s %s %s: perplexity %.3f -> %.3f (dense %.3f), %d tokens in %.1f min", args.scheme, name,
                     mode, ppl_before, ppl_after, doc["dense_ppl"], run["tokens"], minutes)
            _write_json(json_path, doc)
            _write_plot(doc, png_path)
    doc["table"] = results_table(doc)
    _write_json(json_path, doc)
    print(json.dumps({"dense_ppl": doc["dense_ppl"], "table": doc["table"], "runs": [
        {k: r[k] for k in ("scheme", "mode", "dense_layers", "ppl_before", "ppl_after", "tokens", "minutes")}
        for r in doc["runs"]]}, indent=2))
    print(f"wrote {json_path} and {png_path}")
    return doc


if __name__ == "__main__":
    main()
