"""Calibration samples from text (a file, a folder of files, or a HF data set name). Torch is
imported where the samples are made: the command line checks a source before torch loads."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """The calibration source is missing, empty or too short."""


def _text_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix in (".txt", ".md", ""))


def _is_dataset_name(source: str | os.PathLike) -> bool:
    return str(source).count("/") == 1 and not str(source).startswith((".", "/"))


def check_source(source: str | os.PathLike) -> None:
    """A calibration source that can be read: a non-empty text file, a folder holding text files, or
    (not checked further without loading it) a Hugging Face data set name. Reads no data set."""
    p = Path(source)
    if p.is_dir():
        if not _text_files(p):
            raise CalibrationError(f"calibration folder {p} holds no .txt/.md files")
    elif p.is_file():
        if not p.read_text(encoding="utf-8", errors="replace").strip():
            raise CalibrationError(f"calibration source {source} is empty")
    elif not _is_dataset_name(source):
        raise CalibrationError(f"calibration source {source} does not exist (a text file, a folder, or a HF data set name)")


def read_text(source: str | os.PathLike) -> str:
    check_source(source)
    p = Path(source)
    if p.is_dir():
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in _text_files(p))
    elif p.is_file():
        text = p.read_text(encoding="utf-8", errors="replace")
    else:
        text = _hf_dataset_text(str(source))
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
    import torch

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
