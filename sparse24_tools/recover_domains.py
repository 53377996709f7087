"""The texts a recovery is evaluated on ("domains"): ``--eval-text`` and every ``--domain
NAME=PATH``, none of them trained on. The student is evaluated on each before training (the
one-shot student) and after it (the recovered one), the dense teacher once, so
``recover_report.json`` tells how far the recovery carries over to kinds of text (code, dialogue)
other than the one it trained on. Bookkeeping only: the evaluation is ``recover_run.evaluate_pair``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from . import inputs
from .recover_options import EVAL_TEXT_DOMAIN, RecoverError, RecoverOptions


def evaluation_texts(opts: RecoverOptions) -> dict[str, Path]:
    """{domain name: file} of --eval-text (as ``EVAL_TEXT_DOMAIN``) and every --domain, each checked
    to be a non-empty text file (``inputs.InputError`` naming the option; before anything loads)."""
    texts = {EVAL_TEXT_DOMAIN: Path(opts.eval_text)} if opts.eval_text is not None else {}
    texts.update(opts.domain_paths())
    for name, path in texts.items():
        inputs.text_file(path, "--eval-text" if name == EVAL_TEXT_DOMAIN else f"--domain {name}")
    return texts


def eval_windows_of(tokenizer: Any, text_file: str | os.PathLike, seqlen: int, windows: int,
                    what: str = "--eval-text") -> torch.Tensor:
    """The first ``windows`` non-overlapping windows, as ``sparse24_tools.evaluate.perplexity`` takes them."""
    p = Path(text_file)
    ids = torch.tensor(tokenizer(inputs.text_file(p, what), add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = min(windows, ids.numel() // seqlen)
    if n == 0:
        raise RecoverError(f"{what} {p}: {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)


def domain_windows(tokenizer: Any, texts: dict[str, Path], seqlen: int, windows: int) -> dict[str, torch.Tensor]:
    """The evaluation windows of every --domain text (the --eval-text's are the run's own)."""
    return {name: eval_windows_of(tokenizer, path, seqlen, windows, f"--domain {name}")
            for name, path in texts.items() if name != EVAL_TEXT_DOMAIN}


def _ratio(ppl: float | None, dense: float | None) -> float | None:
    return None if ppl is None or not dense else round(ppl / dense, 4)


def domain_table(texts: dict[str, Path], one_shot: dict[str, dict[str, Any]], recovered: dict[str, dict[str, Any]],
                 dense: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Per domain: its file, the dense teacher's, the one-shot and the recovered student's
    perplexity and their ratios to the dense one, and the student's top-1 agreement and KL
    with the teacher before and after."""
    table = {}
    for name, path in texts.items():
        before, after = one_shot.get(name, {}), recovered.get(name, {})
        ppl_dense = dense.get(name)
        table[name] = {
            "text": str(path), "eval_tokens": before.get("eval_tokens"), "dense": ppl_dense,
            "one_shot": before.get("perplexity"), "recovered": after.get("perplexity"),
            "one_shot_vs_dense": _ratio(before.get("perplexity"), ppl_dense),
            "recovered_vs_dense": _ratio(after.get("perplexity"), ppl_dense),
            "top1_agreement": {"one_shot": before.get("top1_agreement"), "recovered": after.get("top1_agreement")},
            "kl": {"one_shot": before.get("kl"), "recovered": after.get("kl")},
        }
    return table
