"""Accuracy recovery of SmolLM2-135M 2:4 + W8A8 / W4A8 on one GPU, end to end (no vLLM needed).

    python benchmarks/recovery_smollm2.py --teacher SmolLM2-135M-Instruct.Q4_1.gguf \\
        --calib wiki_calib.txt --eval-text wiki_eval.txt --out results/recovery \\
        [--domain code=code.txt --domain dialogue=dialogue.txt] [--scheme int8|fp8|w4a8] [--processes 2]

1. the dense teacher's perplexity on ``--eval-text`` and every ``--domain`` text (``vllm-sparse24
   eval``'s code: the first ``--windows`` non-overlapping windows of 512 tokens);
2. two one-shot students with the compressor (SparseGPT-joint) in ``--scheme`` (int8: int8
   weights and activations; fp8: e4m3 weights and activations; w4a8: int4 2:4 weights with channel
   and group scales, int8 activations and dense layers): all linears 2:4, and
   ``--dense-layers auto:10`` (its sensitivities taken from the all-sparse run, as
   ``vllm-sparse24 compare`` does), each evaluated like step 1 (``one_shot`` in the JSON);
3. each student recovered in each ``--modes`` by ``vllm-sparse24 recover`` with its defaults (the
   recipe of ``RecoverOptions``: the command a user runs, recorded per run as ``recover_command``;
   ``--recover-args`` adds flags, blocks mode evaluates every ``--eval-every-layers``), each run
   within its ``--max-minutes`` (``--minutes`` to change it); with ``--processes N`` > 1 global
   mode runs across N GPUs (``torchrun ... recover --fsdp``). Each written checkpoint is
   evaluated like step 1 on every text;
4. ``recovery-smollm2-<gpu>-<date>.json`` (``gpu``, ``date``, ``command``, ``dense``: text ->
   perplexity, ``one_shot``: scheme -> student -> text -> perplexity, ``runs``: scheme, mode,
   processes, dense_layers, ppl_before, ppl_after, ``domains`` (per text: dense, one-shot,
   recovered and their ratios), tokens, minutes, and the curves; ``table``: scheme -> student ->
   text -> dense, one-shot and recovered perplexities) and a PNG of perplexity vs training
   tokens, written after every run; the table is also printed as markdown.

Runs add up: students already in ``--out/students`` are reused (``--recompress`` redoes them), and
the runs of an existing JSON of the same GPU and date are kept (a run of the same scheme, student,
mode and process count is replaced), so the experiment can be split over several invocations, e.g.
one per ``--scheme`` or ``--students``/``--modes`` pair; ``--modes`` with no value measures the
one-shot students only. int8 students and recovered checkpoints are in ``students/<student>`` and
``recovered/<student>-<mode>``, those of the other schemes in ``students/<student>-<scheme>`` and
``recovered/<student>-<scheme>-<mode>`` (``-xN`` appended for N processes).

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
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparse24_tools.__main__ import build_parser  # noqa: E402
from sparse24_tools.compress import compress  # noqa: E402
from sparse24_tools.compress_options import SCHEMES, CompressOptions  # noqa: E402
from sparse24_tools.evaluate import load_for_eval, perplexity  # noqa: E402
from sparse24_tools.model_walk import load_model  # noqa: E402
from sparse24_tools.options import options_from  # noqa: E402
from sparse24_tools.provenance import machine_info  # noqa: E402
from sparse24_tools.recover import RecoverOptions, recover  # noqa: E402
from sparse24_tools.recover_domains import domain_table  # noqa: E402
from sparse24_tools.recover_options import EVAL_TEXT_DOMAIN  # noqa: E402
from sparse24_tools.recover_plots import plot_perplexity  # noqa: E402

log = logging.getLogger("recovery_smollm2")
STUDENTS = {"all-sparse": (), "auto10": ("auto:10",)}
# --smoke: recover flags that shrink a run to seconds on the tiny test model
_SMOKE_RECOVER = ["--seqlen", "64", "--batch-size", "2", "--tokens", "512", "--generate-tokens", "64",
                  "--gen-batch-size", "4", "--block-pool-tokens", "512", "--eval-windows", "2",
                  "--eval-seqlen", "128", "--eval-every", "2"]


def gpu_tag() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower().replace("nvidia", "").strip()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def _tag(student: str, scheme: str) -> str:
    """Folder name of a student: int8 ones keep the names of before the fp8 scheme."""
    return student if scheme == "int8" else f"{student}-{scheme}"


def results_table(doc: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """scheme -> student -> {"one_shot": perplexity, "<mode>": recovered perplexity, "texts": text ->
    {"dense", "one_shot", "<mode>"}}: the table of every scheme, with and without recovery, on every
    evaluated text (a run over N processes is "<mode>-xN")."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    dense = doc.get("dense") or {EVAL_TEXT_DOMAIN: doc["dense_ppl"]}
    for scheme, students in doc.get("one_shot", {}).items():
        for student, ppl in students.items():
            cell = table.setdefault(scheme, {}).setdefault(student, {})
            by_text = ppl if isinstance(ppl, dict) else {EVAL_TEXT_DOMAIN: ppl}
            cell["one_shot"] = by_text.get(EVAL_TEXT_DOMAIN)
            for name, value in by_text.items():
                cell.setdefault("texts", {})[name] = {"dense": dense.get(name), "one_shot": value}
    for r in doc["runs"]:
        scheme, student, mode, processes = _key(r)
        column = mode if processes == 1 else f"{mode}-x{processes}"
        cell = table.setdefault(scheme, {}).setdefault(student, {})
        cell.setdefault("one_shot", r["ppl_before"])
        cell[column] = r["ppl_after"]
        # runs made before the domains were evaluated: the eval text's numbers only
        domains = r.get("domains") or {EVAL_TEXT_DOMAIN: {"dense": dense.get(EVAL_TEXT_DOMAIN),
                                                          "one_shot": r["ppl_before"], "recovered": r["ppl_after"]}}
        for name, d in domains.items():
            row = cell.setdefault("texts", {}).setdefault(name, {"dense": d["dense"], "one_shot": d["one_shot"]})
            row[column] = d["recovered"]
    return table


def markdown_table(doc: dict[str, Any]) -> str:
    """The table as markdown: one row per scheme, student and text, perplexity and x dense."""
    table = results_table(doc)
    columns = sorted({c for st in table.values() for cell in st.values() for t in cell.get("texts", {}).values()
                      for c in t if c not in ("dense", "one_shot")})
    head = ["scheme", "student", "text", "dense", "one-shot", *(f"recovered ({c})" for c in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def cell(v: float | None, dense: float | None) -> str:
        return "" if v is None else (f"{v:.2f} ({v / dense:.2f}x)" if dense else f"{v:.2f}")

    for scheme, students in table.items():
        for student, c in students.items():
            for name, t in c.get("texts", {}).items():
                dense = t.get("dense")
                row = [scheme, student, name, "" if dense is None else f"{dense:.2f}", cell(t.get("one_shot"), dense),
                       *(cell(t.get(col), dense) for col in columns)]
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)


def _texts(args: argparse.Namespace) -> dict[str, str]:
    """Every evaluated text by name: --eval-text, then the --domain texts."""
    texts = {EVAL_TEXT_DOMAIN: str(args.eval_text)}
    texts.update(dict(d.split("=", 1) for d in args.domain))
    return texts


def _ppl(path_or_model: Any, tok: Any, args: argparse.Namespace) -> dict[str, float]:
    """Perplexity on every text (vllm-sparse24 eval's arithmetic), by text name."""
    if isinstance(path_or_model, (str, Path)):
        model, tok = load_for_eval(path_or_model)
    else:
        model = path_or_model
    model.to(args.device)
    return {name: perplexity(model, tok, text, seqlen=args.eval_seqlen, windows=args.windows, progress=False,
                             device=args.device)["perplexity"]
            for name, text in _texts(args).items()}


def _student(run: dict[str, Any]) -> str:
    return "auto10" if run["dense_layers"] == "auto:10" else "all-sparse"


def _key(run: dict[str, Any]) -> tuple[str, str, str, int]:
    """A run's identity in a results JSON: scheme, student, mode, processes (runs made before the fp8
    scheme are int8, before FSDP one process)."""
    return run.get("scheme", "int8"), _student(run), run["mode"], run.get("processes", 1)


def _put_run(doc: dict[str, Any], run: dict[str, Any]) -> None:
    """Add ``run`` to the results, replacing a run of the same scheme, student and mode."""
    doc["runs"] = [r for r in doc["runs"] if _key(r) != _key(run)]
    doc["runs"].append(run)


def _label(run: dict[str, Any]) -> str:
    scheme, student, mode, processes = _key(run)
    return f"{scheme} {student}, {mode}" + (f" x{processes} GPUs" if processes > 1 else "")


def _write_plot(doc: dict[str, Any], png_path: Path) -> None:
    """Perplexity vs training tokens of every run in ``doc``."""
    series = [{"label": _label(r), "tokens": [c["tokens"] for c in r["curve"]],
               "perplexity": [c["perplexity"] for c in r["curve"]]} for r in doc["runs"]]
    minutes = sorted({r["options"].get("max_minutes") for r in doc["runs"]} - {None})
    budget = "/".join(f"{m:g}" for m in minutes) or "?"
    opts = doc["options"]
    plot_perplexity(series, png_path, f"SmolLM2-135M 2:4 + W8A8 recovery ({doc['gpu'] or 'CPU'}, {budget} min "
                    f"per run; recover's evaluations during training, {opts['eval_seqlen']}-token windows)",
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
        same = ((d.get("gpu"), d.get("eval"), d.get("smoke"), d.get("texts", {}))
                == (first.get("gpu"), first.get("eval"), first.get("smoke"), first.get("texts", {})))
        if not same or abs(d["dense_ppl"] - first["dense_ppl"]) > 1e-6 * first["dense_ppl"]:
            raise SystemExit(f"{p}: GPU, evaluation settings or dense perplexity differ from {json_paths[0]}")
    commands = [c for d in docs for c in (d["command"] if isinstance(d["command"], list) else [d["command"]])]
    doc = dict(first, runs=[], merged_from=[str(p) for p in json_paths], command=commands, one_shot={})
    for d in docs:
        for scheme, students in d.get("one_shot", {}).items():
            doc["one_shot"].setdefault(scheme, {}).update(students)
        doc["dense"] = {**(doc.get("dense") or {}), **(d.get("dense") or {})}
    for d in docs:
        for run in d["runs"]:
            _put_run(doc, run)
    doc["table"] = results_table(doc)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(json_paths[0]).stem
    _write_json(out / f"{stem}.json", doc)
    _write_plot(doc, out / f"{stem}.png")
    print(markdown_table(doc))
    print(f"merged {len(doc['runs'])} runs into {out / stem}.json and .png")
    return doc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="dense SmolLM2: .gguf file or HF folder")
    ap.add_argument("--calib", help="calibration / training text (wiki_calib.txt)")
    ap.add_argument("--eval-text", help="evaluation text (wiki_eval.txt)")
    ap.add_argument("--domain", action="append", default=[], metavar="NAME=PATH",
                    help="one more text to evaluate on (not trained on), as recover --domain; repeatable")
    ap.add_argument("--out", required=True, help="output folder (checkpoints, JSON, PNG)")
    ap.add_argument("--minutes", type=float, default=None,
                    help=f"time budget of each recovery run (default: recover's, {RecoverOptions.max_minutes:g})")
    ap.add_argument("--modes", nargs="*", default=["global", "blocks"], choices=["global", "blocks"],
                    help="recovery modes (none: the one-shot students only)")
    ap.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    ap.add_argument("--scheme", default="int8", choices=list(SCHEMES),
                    help="quantization of the students: int8 or fp8 (e4m3) weights and activations, or w4a8 "
                         "(int4 2:4 weights with group scales, int8 activations)")
    ap.add_argument("--processes", type=int, default=1,
                    help="global mode across this many GPUs (torchrun, recover --fsdp); blocks runs use one")
    ap.add_argument("--recover-args", default="", help="more recover flags for every run (quoted), e.g. "
                    "'--gen-batch-size 1024'; without them a run is recover's defaults")
    ap.add_argument("--eval-every-layers", type=int, default=5, help="blocks mode: evaluate every N layers")
    ap.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"],
                    help="one-shot method of the students (SparseGPT: joint with the scheme's grid)")
    ap.add_argument("--nsamples", type=int, default=128, help="compressor calibration samples")
    ap.add_argument("--calib-seqlen", type=int, default=2048, help="compressor calibration sample length")
    ap.add_argument("--windows", type=int, default=64, help="evaluation windows")
    ap.add_argument("--eval-seqlen", type=int, default=512, help="evaluation window length")
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
        args.eval_every_layers = 1
    return args


def recover_argv(args: argparse.Namespace, student: Path, out: Path, mode: str) -> list[str]:
    """The flags of ``vllm-sparse24 recover`` for one run: the recipe's defaults, the evaluation
    texts, and what this invocation changes."""
    argv = ["--teacher", str(args.teacher), "--student", str(student), "--out", str(out),
            "--calib", str(args.calib), "--eval-text", str(args.eval_text)]
    for d in args.domain:
        argv += ["--domain", d]
    if mode != "global":
        argv += ["--mode", mode, "--eval-every", str(args.eval_every_layers)]
    if args.minutes is not None:
        argv += ["--max-minutes", f"{args.minutes:g}"]
    if args.device != ("cuda" if torch.cuda.is_available() else "cpu"):
        argv += ["--device", args.device]
    if args.seed:
        argv += ["--seed", str(args.seed)]
    return argv + (_SMOKE_RECOVER if args.smoke else []) + shlex.split(args.recover_args)


def _run_recover(args: argparse.Namespace, argv: list[str], processes: int, teacher: Any, tok: Any) -> dict[str, Any]:
    """One recovery: in this process (the teacher already loaded), or across ``processes`` GPUs."""
    if processes == 1:
        ns = build_parser().parse_args(["recover", *argv])
        return recover(ns.teacher, ns.student, ns.out, ns.calib, options_from(RecoverOptions, ns), overwrite=True,
                       teacher_model=teacher, teacher_tokenizer=tok, argv=["vllm-sparse24", "recover", *argv])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
           "-m", "sparse24_tools", "recover", *argv, "--fsdp", "--overwrite"]
    log.info("running %s", shlex.join(cmd))
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "recover_report.json").read_text())


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
        "texts": _texts(args), "eval": {"windows": args.windows, "seqlen": args.eval_seqlen}, "smoke": args.smoke,
        "machine": machine_info(), "options": {k: v for k, v in vars(args).items()},
        "dense_ppl": None, "dense": None, "one_shot": {}, "runs": [],
    }

    if json_path.exists():  # an earlier invocation of the same day: keep its runs
        old = json.loads(json_path.read_text())
        if (old.get("eval"), old.get("smoke"), old.get("texts")) == (doc["eval"], doc["smoke"], doc["texts"]):
            for key in ("runs", "dense_ppl", "dense", "one_shot"):
                doc[key] = old.get(key, doc[key])
            for r in doc["runs"]:  # runs of before the fp8 scheme were int8
                r.setdefault("scheme", "int8")
            doc["earlier_commands"] = old.get("earlier_commands", []) + [old.get("command")]
        else:
            log.warning("%s was made with other evaluation settings or texts: starting it anew", json_path)

    teacher, tok = load_model(args.teacher, torch.float32)
    if doc["dense"] is None:
        doc["dense"] = _ppl(teacher, tok, args)
        doc["dense_ppl"] = doc["dense"][EVAL_TEXT_DOMAIN]
        teacher.to("cpu")
    log.info("dense perplexity %s", doc["dense"])
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
        before = _ppl(spath, tok, args)
        doc["one_shot"].setdefault(args.scheme, {})[name] = before
        doc["table"] = results_table(doc)
        _write_json(json_path, doc)
        log.info("%s %s one-shot: perplexity %s (dense %s)", args.scheme, name, before, doc["dense"])
        for mode in args.modes:
            processes = args.processes if mode == "global" else 1
            rpath = out / "recovered" / (f"{_tag(name, args.scheme)}-{mode}" + (f"-x{processes}" if processes > 1 else ""))
            run_argv = recover_argv(args, spath, rpath, mode)
            t0 = time.perf_counter()
            rep = _run_recover(args, run_argv, processes, teacher, tok)
            minutes = (time.perf_counter() - t0) / 60
            teacher.to("cpu")
            after = _ppl(rpath, tok, args)
            run = {
                "scheme": args.scheme, "mode": mode, "processes": processes,
                "dense_layers": "auto:10" if name == "auto10" else [],
                "ppl_before": before[EVAL_TEXT_DOMAIN], "ppl_after": after[EVAL_TEXT_DOMAIN],
                "domains": domain_table({n: Path(t) for n, t in _texts(args).items()},
                                        {n: {"perplexity": v} for n, v in before.items()},
                                        {n: {"perplexity": v} for n, v in after.items()}, doc["dense"]),
                "tokens": rep["train"]["tokens"], "minutes": round(minutes, 2), "student": str(spath),
                "checkpoint": str(rpath), "recover_command": shlex.join(["vllm-sparse24", "recover", *run_argv]),
                "train": rep["train"], "data": rep["data"], "seconds": rep["seconds"],
                "peak_gpu_memory_gib": rep["peak_gpu_memory_gib"], "options": rep["options"],
                "curve": [{k: e.get(k) for k in ("tokens", "perplexity", "top1_agreement", "kl")}
                          for e in rep["evals"]],
            }
            _put_run(doc, run)
            doc["table"] = results_table(doc)
            log.info("%s %s %s: perplexity %.3f -> %.3f (dense %.3f), %d tokens in %.1f min", args.scheme, name,
                     mode, run["ppl_before"], run["ppl_after"], doc["dense_ppl"], run["tokens"], minutes)
            _write_json(json_path, doc)
            _write_plot(doc, png_path)
    doc["table"] = results_table(doc)
    _write_json(json_path, doc)
    print(markdown_table(doc))
    print(f"wrote {json_path} and {png_path}")
    return doc


if __name__ == "__main__":
    main()
