"""Bad inputs to the offline tools: each fails naming the file and what was expected, the command
line shows it as one line ``vllm-sparse24 <cmd>: error: ...`` with exit status 2 (the traceback only
under -v), and the input paths are checked before any model loads."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import tiny_llama as tl
from test_cli import _console

from sparse24_tools.evaluate import EvalError, load_for_eval
from vllm_sparse24.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    dense = root / "dense"
    model = tl.build_dense(dense, hidden=128, intermediate=256, layers=1)
    model.save_pretrained(dense)
    tl.write_checkpoint(model, dense, root / "sparse24")
    text = root / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 200)
    return root, dense, root / "sparse24", text


@pytest.mark.parametrize("kind", ["dense", "sparse24"])
def test_eval_of_a_truncated_safetensors_names_the_file(models, tmp_path, kind):
    _, dense, sparse24, _ = models
    folder = tmp_path / kind
    shutil.copytree(dense if kind == "dense" else sparse24, folder)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises((CheckpointError, EvalError), match=re.escape(str(f)) + ".*corrupt or truncated"):
        load_for_eval(folder)


def _fails(*args: str, error: str) -> str:
    """Run the command; it must exit 2 with ``error`` (a regex) as its last line and no traceback;
    returns its stderr."""
    proc = _console(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.fullmatch(error, lines[-1]), lines[-1]
    return proc.stderr


def _no_model_loaded(stderr: str) -> None:
    assert "loading " not in stderr and "Loading weights" not in stderr, stderr[-3000:]


def test_missing_inputs_fail_before_any_model_loads(models, tmp_path):
    root, dense, sparse24, text = models
    missing = str(tmp_path / "missing.txt")
    err = _fails("eval", "--model", str(sparse24), "--text", missing,
                 error=rf"vllm-sparse24 eval: error: --text {re.escape(missing)}: no such file; expected a text file")
    _no_model_loaded(err)
    err = _fails("compress", "--model", str(dense), "--out", str(tmp_path / "out"), "--calib", missing,
                 error=rf"vllm-sparse24 compress: error: calibration source {re.escape(missing)} does not exist .*")
    _no_model_loaded(err)
    _fails("compress", "--model", str(dense), "--out", str(sparse24),
           error=rf"vllm-sparse24 compress: error: --out {re.escape(str(sparse24))} already exists \(pass --overwrite .*")
    _fails("eval", "--model", str(tmp_path / "nothere"), "--text", str(text),
           error=r"vllm-sparse24 eval: error: --model .*nothere: no such file or folder; expected a Hugging Face .*")
    (tmp_path / "empty").mkdir()
    _fails("eval", "--model", str(tmp_path / "empty"), "--text", str(text),
           error=r"vllm-sparse24 eval: error: --model .*empty: no config.json in that folder; .*")
    err = _fails("recover", "--teacher", str(dense), "--student", str(tmp_path / "nothere"), "--calib", str(text),
                 "--out", str(tmp_path / "rec"),
                 error=r"vllm-sparse24 recover: error: --student .*nothere: no such folder; expected a checkpoint .*")
    _no_model_loaded(err)
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n")
    err = _fails("recover", "--teacher", str(dense), "--student", str(sparse24), "--calib", str(text),
                 "--eval-text", str(blank), "--out", str(tmp_path / "rec"),
                 error=r"vllm-sparse24 recover: error: --eval-text .*blank.txt: empty")
    _no_model_loaded(err)
    _fails("merge", str(tmp_path / "part.json"), "--json", "m.json", "--png", "m.png",
           error=r"vllm-sparse24 merge: error: PART .*part.json: no such file; expected the JSON file of a compare run")


def test_errors_found_while_loading_are_one_line_too(models, tmp_path):
    root, dense, sparse24, text = models
    broken = tmp_path / "truncated"
    shutil.copytree(dense, broken)
    (broken / "model.safetensors").write_bytes((dense / "model.safetensors").read_bytes()[:-100])
    _fails("eval", "--model", str(broken), "--text", str(text),
           error=r"vllm-sparse24 eval: error: .*truncated/model.safetensors: cannot read safetensors header .*")
    bad_config = tmp_path / "bad_config"
    shutil.copytree(sparse24, bad_config)
    cfg = json.loads((bad_config / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 7
    (bad_config / "config.json").write_text(json.dumps(cfg))
    _fails("eval", "--model", str(bad_config), "--text", str(text),
           error=r"vllm-sparse24 eval: error: .*bad_config/config.json: .*format_version.*")
    _fails("compress", "--model", str(dense), "--out", str(tmp_path / "out"), "--method", "wanda",
           error=r"vllm-sparse24 compress: error: --method wanda needs calibration data .*")
    _fails("recover", "--teacher", str(dense), "--student", str(sparse24), "--calib", str(text),
           "--out", str(tmp_path / "rec"), "--seqlen", "64", "--batch-size", "2", "--max-minutes", "0.001",
           error=r"vllm-sparse24 recover: error: --max-minutes 0.001: .* fewer than the \d+ a run needs .*")
    assert not (tmp_path / "rec").exists() and not (tmp_path / "out").exists()


def test_verbose_shows_the_traceback_too(models, tmp_path):
    _, dense, _, _ = models
    proc = _console("compress", "-v", "--model", str(dense), "--out", str(tmp_path / "o"), "--calib",
                    str(tmp_path / "missing.txt"))
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "CalibrationError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("vllm-sparse24 compress: error: calibration source ")
