"""Checks of the files and folders a command is given, made before any model loads (a missing text
file must not cost a minute of loading first). Each error names the option and the path. No torch
import."""

from __future__ import annotations

import os
from pathlib import Path


class InputError(ValueError):
    """An input path that is missing or not what its option takes (names the option and the path)."""


def text_file(path: str | os.PathLike, option: str) -> str:
    """The text of ``path``, which must be a non-empty text file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{option} {p}: {'a folder' if p.is_dir() else 'no such file'}; expected a text file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise InputError(f"{option} {p}: empty")
    return text


def model_source(path: str | os.PathLike, option: str) -> None:
    """A dense model: a Hugging Face folder (with config.json) or a .gguf file."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{option} {p}: no such file or folder; expected a Hugging Face model folder or a .gguf file")
    if p.is_file() and p.suffix != ".gguf":
        raise InputError(f"{option} {p}: a model file must be .gguf; otherwise pass a Hugging Face folder")
    if p.is_dir() and not (p / "config.json").is_file():
        raise InputError(f"{option} {p}: no config.json in that folder; expected a Hugging Face model folder")


def checkpoint_folder(path: str | os.PathLike, option: str) -> None:
    """A checkpoint folder (with config.json), e.g. the output of ``vllm-sparse24 compress``."""
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{option} {p}: {'a file' if p.exists() else 'no such folder'}; expected a checkpoint "
                         "folder (the output of `vllm-sparse24 compress`)")
    if not (p / "config.json").is_file():
        raise InputError(f"{option} {p}: no config.json in that folder; expected a checkpoint folder (the output "
                         "of `vllm-sparse24 compress`)")


def compare_part(part: str) -> tuple[Path, str]:
    """(file, run-name suffix) of a ``merge`` PART: a compare JSON file, or FILE:SUFFIX."""
    path, _, suffix = part.partition(":") if not Path(part).exists() else (part, "", "")
    if not Path(path).is_file():
        raise InputError(f"PART {part}: no such file; expected the JSON file of a compare run")
    return Path(path), suffix


def new_output(path: str | os.PathLike, option: str, overwrite: bool) -> None:
    """An output folder that does not exist yet, unless ``overwrite``."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"{option} {p} already exists (pass --overwrite to replace it)")
