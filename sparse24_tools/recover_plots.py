"""Plots of recovery runs (matplotlib, optional): a run's training loss and evaluation perplexity
(``recover_curves.png`` beside its report), and perplexity vs tokens of several runs (the
benchmark's)."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, png: str | os.PathLike | io.BytesIO) -> None:
    if isinstance(png, io.BytesIO):
        fig.savefig(png, format="png", dpi=120)
    else:
        tmp = Path(str(png) + ".tmp.png")
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, png)


def plot_perplexity(series: list[dict[str, Any]], png: str | os.PathLike | io.BytesIO, title: str,
                    dense_ppl: float | None = None) -> bool:
    """Perplexity vs training tokens, one line per ``{"label", "tokens", "perplexity"}``
    series (log y). Returns False (and logs) when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in series:
        ax.plot(s["tokens"], s["perplexity"], marker="o", markersize=3, label=s["label"])
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="#777", linestyle="--", label=f"dense teacher {dense_ppl:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (blocks mode: tokens per layer x layers done / layers)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, png)
    plt.close(fig)
    return True


def plot_curves(report: dict[str, Any], title: str) -> bytes | None:
    """One run's PNG: left its training loss per step (global: loss, KL, SquareHead vs tokens;
    blocks: each layer's normalized MSE), right its perplexity on --eval-text vs tokens with the
    dense teacher's, and each --domain's before and after training. None without matplotlib or
    without a curve."""
    curve, evals = report.get("loss_curve") or [], report.get("evals") or []
    plt = _pyplot() if curve or evals else None
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if curve and "tokens" in curve[0]:  # global mode
        x = [r["tokens"] for r in curve]
        for key in ("loss", "kl", "squarehead"):
            if key in curve[0]:
                left.plot(x, [r[key] for r in curve], label=key, linewidth=1)
        left.set_xlabel("training tokens")
    elif curve:  # blocks mode: x = layer + fraction of its steps
        steps = max(r["step"] for r in curve)
        left.plot([r["layer"] + r["step"] / steps for r in curve], [r["loss"] for r in curve],
                  label="layer output normalized MSE", linewidth=1)
        left.set_xlabel("decoder layer (and its steps)")
    left.set_yscale("log")
    left.set_ylabel("training loss (log scale)")
    left.grid(True, which="both", alpha=0.3)
    if evals:
        right.plot([e["tokens"] for e in evals], [e["perplexity"] for e in evals], marker="o", markersize=3,
                   label="--eval-text")
    end = evals[-1]["tokens"] if evals else (report.get("train") or {}).get("tokens", 0)
    for name, d in (report.get("domains") or {}).items():
        if name != "eval-text" and d.get("one_shot") and d.get("recovered"):
            line, = right.plot([0, end], [d["one_shot"], d["recovered"]], marker="s", markersize=4,
                               linestyle=":", label=f"{name} (before, after)")
            if d.get("dense"):
                right.axhline(d["dense"], color=line.get_color(), linestyle="--", linewidth=0.8)
    dense = (report.get("teacher_eval") or {}).get("perplexity")
    if dense is not None:
        right.axhline(dense, color="#777", linestyle="--", label=f"dense teacher {dense:.2f} (dashed: each text's)")
    right.set_yscale("log")
    right.set_xlabel("training tokens")
    right.set_ylabel("perplexity (log scale)")
    right.grid(True, which="both", alpha=0.3)
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    _save(fig, buf)
    plt.close(fig)
    return buf.getvalue()
