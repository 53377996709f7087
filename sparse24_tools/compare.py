"""``vllm-sparse24 compare``: compress with several methods, evaluate each, write a table
(stdout), JSON and a log-scale bar plot (PNG)."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from . import inputs
from .calib import check_source
from .compress import compress
from .compress_options import CompressOptions, calibration_size, comparison_runs
from .evaluate import load_for_eval, perplexity
from .model_walk import load_model
from .provenance import machine_info, utc_now

log = logging.getLogger(__name__)

def plot(rows: list[dict[str, Any]], png_path: str | os.PathLike, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["run"] for r in rows]
    ppl = [r["perplexity"] for r in rows]
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 4.5))
    bars = ax.bar(names, ppl, color=["#777" if r["run"].startswith("dense") else "#3a7" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title(title, fontsize=9)
    for b, v in zip(bars, ppl, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    plt.xticks(rotation=25, ha="right")
    fig.tight_layout()
    tmp = Path(str(png_path) + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, png_path)


def compare(
    model_path: str, text: str, work_dir: str, *, runs: list[str], opts: CompressOptions,
    eval_seqlen: int = 512, windows: int = 64, json_path: str, png_path: str,
    argv: list[str] | None = None, title: str | None = None,
) -> list[dict[str, Any]]:
    """Compress with ``opts`` changed as each of ``runs`` says (:func:`comparison_runs`), evaluate
    each, write the table, JSON and plot."""
    inputs.model_source(model_path, "--model")
    inputs.text_file(text, "--text")
    if opts.calib is not None:
        check_source(opts.calib)
    table_of_runs = comparison_runs()
    unknown = [r for r in runs if r not in table_of_runs]
    if unknown:
        raise ValueError(f"unknown runs {unknown}; choose from {list(table_of_runs)}")
    nsamples, seqlen = calibration_size(opts.device, opts.nsamples, opts.seqlen)
    opts = replace(opts, nsamples=nsamples, seqlen=seqlen, overwrite=True)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    dense_model, tok = load_model(model_path, torch.float32)
    rows: list[dict[str, Any]] = []
    all_sparse: dict[str, float] | None = None  # sensitivities of the sparsegpt-joint run
    for run in runs:
        changes = table_of_runs[run]
        if changes is not None and changes.get("export") == "dense-w8a8":
            # its layers are 8-bit: the scheme's 8-bit grid (w4a8: int8, which compress --scheme w4a8 refuses)
            changes = {**changes, "scheme": opts.grid.name}
        t0 = time.perf_counter()
        row: dict[str, Any] = {"run": run}
        if changes is None:
            model, seconds = dense_model, 0.0
        else:
            out = work / run
            extra = {"sensitivity": all_sparse} if run.endswith("-auto10") and all_sparse else {}
            rep = compress(model_path, out, replace(opts, **changes), model=copy.deepcopy(dense_model),
                           tokenizer=tok, **extra)
            if run == "sparsegpt-joint":
                all_sparse = {n: v["rel_error_after"] for n, v in rep["linears"].items()}
            seconds = time.perf_counter() - t0
            row.update({"checkpoint": str(out), "mean_rel_error_after": rep["totals"]["mean_rel_error_after"],
                        "dense_linears": rep["totals"]["dense"], "sparse_linears": rep["totals"]["sparse"]})
            model, _ = load_for_eval(out)
        res = perplexity(model, tok, text, seqlen=eval_seqlen, windows=windows)
        row.update({"perplexity": res["perplexity"], "compress_seconds": round(seconds, 1),
                    "eval_windows": res["windows"], "eval_seqlen": res["seqlen"]})
        rows.append(row)
        log.info("%s: perplexity %.2f (compress %.0fs)", run, row["perplexity"], seconds)
        _write(rows, model_path, text, opts, argv, json_path)
    print(table(rows))
    plot(rows, png_path, title or f"{Path(model_path).name}: 2:4 + W8A8 perplexity, {windows}x{eval_seqlen} tokens")
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    dense_ppl = next((r["perplexity"] for r in rows if r["run"] == "dense"), None)
    lines = ["| run | perplexity | x dense | compress time (s) |", "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['perplexity'] / dense_ppl:.2f}" if dense_ppl else "-"
        lines.append(f"| {r['run']} | {r['perplexity']:.2f} | {ratio} | {r['compress_seconds']:.0f} |")
    return "\n".join(lines)


def merge(parts: list[str], json_path: str, png_path: str, title: str) -> list[dict[str, Any]]:
    """Combine the rows of several compare JSON files (runs done by separate processes) into
    one JSON + PNG; each part's command, date and machine are kept. A part is PATH or
    PATH:SUFFIX (SUFFIX is appended to that part's run names)."""
    docs, suffixes = [], []
    for p in parts:
        path, suffix = inputs.compare_part(p)
        docs.append(json.loads(path.read_text()))
        suffixes.append(suffix)
    by_run: dict[str, dict[str, Any]] = {}
    for i, d in enumerate(docs):
        for r in d["rows"]:
            name = r["run"] + suffixes[i]
            by_run[name] = r | {"run": name, "part": i}
    known = comparison_runs()
    order = [r for r in known if r in by_run] + [r for r in by_run if r not in known]
    rows = [by_run[r] for r in order]
    doc = {"date": max(d["date"] for d in docs),
           "parts": [{k: v for k, v in d.items() if k != "rows"} for d in docs], "rows": rows}
    tmp = Path(str(json_path) + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, json_path)
    print(table(rows))
    plot(rows, png_path, title)
    return rows


def _write(rows, model_path, text, opts: CompressOptions, argv, json_path) -> None:
    doc = {
        "date": utc_now(), "command": " ".join(argv or []), "model": model_path, "eval_text": text,
        "calib": opts.calib, "compress_options": asdict(opts), "machine": machine_info(), "rows": rows,
    }
    tmp = Path(str(json_path) + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, json_path)
