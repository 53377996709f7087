"""The ``vllm-sparse24`` console command: version, help for every option, dispatch."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

import sparse24_tools.cli as cli
from sparse24_tools.__main__ import build_parser as offline_parser
from vllm_sparse24.demo import build_parser as demo_parser

BIN = shutil.which("vllm-sparse24", path=str(Path(sys.executable).parent))


def _console(*args: str, **kw) -> subprocess.CompletedProcess:
    assert BIN, f"no vllm-sparse24 script beside {sys.executable}: install the package (pip install -e .)"
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=300, **kw)


def test_version_comes_from_the_package_metadata():
    import vllm_sparse24

    proc = _console("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"vllm-sparse24 {version('vllm-sparse24')}" == f"vllm-sparse24 {vllm_sparse24.__version__}"


def test_compress_help_runs():
    proc = _console("compress", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: vllm-sparse24 compress") and "--calib" in proc.stdout


def _parsers(ap: argparse.ArgumentParser, name: str):
    yield name, ap
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_has_help():
    missing = []
    for name, ap in [*_parsers(offline_parser(), "offline"), ("demo", demo_parser())]:
        missing += [f"{name} {a.option_strings or a.dest}" for a in ap._actions
                    if not isinstance(a, argparse._SubParsersAction) and not a.help]
    assert not missing, missing
    top = cli.build_parser(cli.commands())
    listed = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    assert all(c.help for c in listed._choices_actions)
    assert set(listed.choices) == set(cli.commands()) >= {"compress", "eval", "compare", "demo", "build"}


def test_unknown_or_missing_command_is_an_error(capsys):
    for argv in (["nope"], []):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_recover_is_listed_once_offline_recover_exists(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "_available", lambda module: module == "sparse24_tools.recover")
    monkeypatch.setattr("sparse24_tools.__main__.main", lambda argv, prog: calls.append((argv, prog)) or 0)
    assert "recover" in cli.commands()
    assert cli.main(["recover", "--model", "m"]) == 0
    assert calls == [(["recover", "--model", "m"], "vllm-sparse24")]
    monkeypatch.setattr(cli, "_available", lambda module: False)
    assert "recover" not in cli.commands()


def test_demo_server_command_on_cpu():
    from vllm_sparse24.demo import server_command

    cmd = server_command(Path("m"), "127.0.0.1", 8123, ["--max-model-len", "512"], cuda=False)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--dtype") + 1] == "float32" and cmd[-2:] == ["--max-model-len", "512"]
    # a KV cache of its own size: vLLM's CPU default reserves 92% of the machine's memory
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == "1G" and "--gpu-memory-utilization" not in cmd


def test_readme_cpu_commands_fit_a_small_machine():
    """The README's CPU server command passes the demo's CPU flags, and its Python example has the
    flags and the __main__ guard that a script starting an engine needs."""
    from vllm_sparse24.demo import CPU_SERVER_ARGS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    cpu_serve = re.search(r"python -m vllm\.entrypoints\.openai\.api_server --model models/smollm2-sparse24 "
                          r"\\\n\s+(.*?)\s+# CPU", readme)
    assert cpu_serve and cpu_serve.group(1).split() == CPU_SERVER_ARGS
    python = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "LLM(" in b)
    assert 'if __name__ == "__main__":' in python
    assert 'dtype="float32", kv_cache_memory_bytes=2**30, enforce_eager=True' in python


def test_compress_magnitude_needs_no_calibration(tmp_path):
    import tiny_llama as tl

    dense = tmp_path / "dense"
    model = tl.build_dense(dense, hidden=128, intermediate=256, layers=1)
    model.save_pretrained(dense)
    out = tmp_path / "out"
    proc = _console("compress", "--model", str(dense), "--out", str(out), "--method", "magnitude", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "compress_report.json").read_text())
    assert report["calib"] is None and "not measured" in report["errors"]
    assert report["totals"]["sparse"] == 7


@pytest.mark.parametrize("command", sorted(cli.commands()))
def test_every_command_answers_help_under_its_own_name(command):
    t0 = time.perf_counter()
    proc = _console(command, "--help")
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"usage: vllm-sparse24 {command} ")
    assert "python -m" not in proc.stdout and "(default: None)" not in proc.stdout
    assert not re.search(r"\(default[^)]*\)\s*\(default", proc.stdout), "an option shows its default twice"
    if command not in ("demo", "build"):  # the offline tools' parsers import no torch: measured ~0.1 s
        assert seconds < 2.0, f"{command} --help took {seconds:.1f}s"


def test_the_docs_name_the_console_command():
    root = Path(__file__).resolve().parents[1]
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        stale = re.findall(r"python -m (?:offline|sparse24_tools) \w+|`offline (?:eval|recover|compress|compare)`",
                           doc.read_text())
        assert not stale, (doc.name, stale)


def test_building_the_parsers_imports_no_torch():
    """``--help`` stays fast: the flags come from options dataclasses and registries that import no torch."""
    code = ("import sys; from sparse24_tools.__main__ import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_the_scheme_choices_are_the_grids():
    from sparse24_tools.compress_options import SCHEMES
    from vllm_sparse24.quant import SCHEME_GRIDS

    assert SCHEMES == tuple(SCHEME_GRIDS)
