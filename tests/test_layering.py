"""The plugin package never imports the offline compressor: vLLM loads the plugin in every
process, and a serving install needs none of the compressor's code or dependencies."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PLUGIN = Path(__file__).resolve().parents[1] / "vllm_sparse24"


def test_importing_the_plugin_pulls_in_no_offline_module():
    code = ("import json, sys; import vllm_sparse24, vllm_sparse24.config, vllm_sparse24.demo, vllm_sparse24.tiny; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'sparse24_tools' or m.startswith('sparse24_tools.'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_no_plugin_source_imports_offline():
    # also catches imports inside functions, which the subprocess check above does not execute
    bad = []
    for path in sorted(PLUGIN.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            bad += [f"{path.relative_to(PLUGIN.parent)}:{node.lineno} imports {n}"
                    for n in names if n == "sparse24_tools" or n.startswith("sparse24_tools.")]
    assert not bad, bad
