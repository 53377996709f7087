"""Calibration samples from text (a file, a folder of files, or a HF data set name)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """The calibration source is missing, empty or too short."""


def read_text(source: str | os.PathLike) -> str:
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".md", ""))
        if not files:
            raise CalibrationError(f"calibration folder {p} holds no .txt/.md files")
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    elif p.is_file():
        text = p.read_text(encoding="utf-8", errors="replace")
    elif str(source).count("/") == 1 and not str(source).startswith((".", "/")):
        text = _hf_dataset_text(str(source))
    else:
        raise CalibrationError(f"calibration source {source} does not exist (a text file, a folder, or a HF data set name)")
    if not text.strip():
        raise CalibrationError(f"calibration source {source} is empty")
    return text


def _hf_dataset_text(name: str) -> str:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as e:
        raise CalibrationError(f"{name}: not a file; loading a HF data set needs the 'datasets' package") from e
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # network / hub errors
        raise CalibrationError(f"{name}: cannot load HF data set ({e})") from e
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(str(t) for t in ds[column][:20000])


def token_samples(
    tokenizer: Any, source: str | os.PathLike, nsamples: int, seqlen: int, seed: int = 0
) -> list[torch.Tensor]:
    """``nsamples`` random windows [1, seqlen] of the tokenized text (seeded)."""
    text = read_text(source)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seqlen + 1:
        raise CalibrationError(
            f"calibration source {source}: {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}"
        )
    if ids.numel() < nsamples * seqlen:
        log.warning("calibration text has %d tokens < nsamples*seqlen=%d: windows overlap",
                    ids.numel(), nsamples * seqlen)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return [ids[s : s + seqlen].unsqueeze(0) for s in starts.tolist()]
