from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

# Float64 reference vs the float32 engine: observed max |diff| ~1e-6 on the tiny model; the
# bound leaves room for a rare int8 rounding tie decided differently, and is ~100x below what
# a per-tensor activation scale or a wrong bitmask bit order does (tests show both fail it).
LOGPROB_ATOL = 1e-3


@dataclass
class TinyModels:
    dense_dir: Path
    sparse24_dir: Path
    legacy_dir: Path
    model: object
    dequant: dict
    ids: list[int]
    reference: torch.Tensor  # float64 prompt logprobs


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModels:
    import tiny_llama as tl
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tiny")
    model = tl.build_dense(root / "dense")
    dequant = tl.write_checkpoint(model, root / "dense", root / "sparse24")
    tl.write_checkpoint(model, root / "dense", root / "legacy", legacy=True)
    tok = AutoTokenizer.from_pretrained(root / "sparse24")
    ids = tok("the quick brown fox jumps over the lazy dog in the city of paris, the capital").input_ids
    ref = tl.reference_logprobs(model, dequant, ids)
    return TinyModels(root / "dense", root / "sparse24", root / "legacy", model, dequant, ids, ref)


@pytest.fixture
def force_kernel(monkeypatch):
    """``force_kernel("torch")`` sets VLLM_SPARSE24_KERNEL for this test (None unsets it); the
    dispatcher reads it once per process, so its cached reading is dropped before and after."""
    from vllm_sparse24.kernels import dispatch

    def force(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(dispatch.KERNEL_ENV, raising=False)
        else:
            monkeypatch.setenv(dispatch.KERNEL_ENV, value)
        dispatch.kernel_override.cache_clear()

    yield force
    dispatch.kernel_override.cache_clear()


def run_engine(model_dir: Path, out: Path, ids: list[int], *extra: str, check: bool = True,
               env: dict[str, str] | None = None):
    """Run tests/engine_runner.py in a fresh process (``env`` added to its environment); returns
    (result dict or None, completed process with stdout+stderr in .stdout)."""
    env = dict(os.environ, VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               **(env or {}))
    cmd = [sys.executable, str(HERE / "engine_runner.py"), str(model_dir), str(out),
           "--ids", ",".join(map(str, ids)), *extra]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"engine run failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    result = json.loads(out.read_text()) if proc.returncode == 0 else None
    return result, proc


def pytest_terminal_summary(terminalreporter) -> None:
    """How many fuzz cases ran, by suite and outcome (a project error class or 'ok'), and the
    lines other tests asked to show (the server soak's numbers)."""
    fuzz = sys.modules.get("fuzz_support")
    if fuzz is not None and fuzz.OUTCOMES:
        terminalreporter.section("fuzz summary")
        total = 0
        for suite, counts in sorted(fuzz.OUTCOMES.items()):
            n = sum(counts.values())
            total += n
            detail = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            terminalreporter.write_line(f"fuzz {suite}: {n} cases: {detail}")
        terminalreporter.write_line(f"fuzz total: {total} cases")
    lines = getattr(sys.modules.get("summary_lines"), "LINES", None)
    if lines:
        terminalreporter.section("reliability summary")
        for line in lines:
            terminalreporter.write_line(line)
