"""benchmarks/domain_texts.py on small wheels made here: the code and dialogue texts it writes, its
provenance, and a wheel that is not the pinned one refused."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("domain_texts", REPO / "benchmarks" / "domain_texts.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up
    spec.loader.exec_module(mod)
    return mod


def _wheel(path: Path, files: dict[str, str]) -> str:
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_code_and_dialogue_texts_from_wheels(tmp_path):
    dt = _module()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    code_sha = _wheel(wheels / "pkg.whl", {"pkg/b.py": "B = 2\n", "pkg/a.py": "A = 1\n\n", "pkg/data.json": "{}",
                                           "pkg-1.dist-info/METADATA": "x"})
    chat_sha = _wheel(wheels / "chat.whl", {
        "c/data/english/b.yml": "conversations:\n- - Hi\n  - Hello,\n    there.\n  - Bye\n",
        "c/data/english/a.yml": "categories: [x]\nconversations:\n- - What is 2?\n  - 2\n",
        "c/data/french/a.yml": "conversations:\n- - Salut\n  - Bonjour\n",
    })
    sources = (dt.Source("code", "pkg==1", "pkg.whl", code_sha, "MIT", lambda w: dt.python_source(w, "pkg")),
               dt.Source("dialogue", "chat==1", "chat.whl", chat_sha, "BSD",
                         lambda w: dt.conversations(w, "c/data/english")))
    doc = dt.build(tmp_path / "out", wheels, sources)
    assert (tmp_path / "out" / "code.txt").read_text() == "A = 1\n\nB = 2\n"
    assert (tmp_path / "out" / "dialogue.txt").read_text() == "A: What is 2?\nB: 2\n\nA: Hi\nB: Hello, there.\nA: Bye\n"
    assert doc["code"]["members"] == ["pkg/a.py", "pkg/b.py"] and doc["dialogue"]["wheel_sha256"] == chat_sha
    saved = json.loads((tmp_path / "out" / "domain_texts.json").read_text())
    assert saved == doc and saved["code"]["sha256"] == hashlib.sha256(b"A = 1\n\nB = 2\n").hexdigest()

    _wheel(wheels / "pkg.whl", {"pkg/a.py": "changed\n"})
    with pytest.raises(SystemExit, match=r"pkg.whl: sha256 [0-9a-f]+, expected " + code_sha):
        dt.build(tmp_path / "out", wheels, sources)
    with pytest.raises(SystemExit, match=r"missing.whl: missing \(pip download --no-deps x==1\)"):
        dt.build(tmp_path / "out", wheels, (dt.Source("x", "x==1", "missing.whl", "", "", sources[0].build),))


def test_the_pinned_sources():
    dt = _module()
    assert [(s.name, s.requirement) for s in dt.SOURCES] == [("code", "requests==2.32.3"),
                                                             ("dialogue", "chatterbot-corpus==1.3.3")]
