"""Replays tests/fuzz_corpus/*.json: minimal reproducers of what the fuzz tests found (each
with the outcome the reader gave before its fix), so a regression shows up by name.

A case holds its files (config.json as text or base64, safetensors as base64) and the expected
outcome: a project error class and a regex its message must match, or "ok" (then the load must
equal the reference reader's).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from fuzz_support import load_like_vllm, record, ref_load_layers, run_case, same_load

CORPUS = sorted((Path(__file__).parent / "fuzz_corpus").glob("*.json"))


def test_corpus_is_there():
    assert len(CORPUS) >= 10


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_corpus_case(path, tmp_path):
    case = json.loads(path.read_text())
    for name, content in case["files"].items():
        data = base64.b64decode(content["base64"]) if "base64" in content else content["text"].encode()
        (tmp_path / name).write_bytes(data)
    outcome, value = run_case(lambda: load_like_vllm(tmp_path))
    record("corpus replay", outcome)
    want = case["expect"]
    assert outcome == want["outcome"], f"{case['description']}: got {outcome}: {value}"
    if outcome != "ok":
        assert re.search(want["match"], str(value)), f"message does not match {want['match']!r}: {value}"
        return
    legacy = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] != "sparse24"
    ref = ref_load_layers(tmp_path, {p: kind for p, (kind, _, _) in value.items()}, legacy)
    assert same_load(value, ref) is None
