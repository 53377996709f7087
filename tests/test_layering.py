"""The plugin package never imports the offline compressor: vLLM loads the plugin in every
process, and a serving install needs none of the compressor's code or dependencies. And neither
package has an import cycle."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "vllm_sparse24"
PACKAGES = ("vllm_sparse24", "sparse24_tools")


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


def import_graph(packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the modules of ``packages`` it imports, anywhere in its source (inside functions and
    ``TYPE_CHECKING`` blocks too: an import deferred to dodge a cycle is still a cycle). ``from pkg
    import name`` counts as an import of ``pkg.name`` when that is a module, else of ``pkg``."""
    files = {}
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:
                    target = f"{base}.{a.name}"
                    deps |= {target} if target in files else {base} if base in files else set()
        graph[module] = deps - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20 and "vllm_sparse24.kernels.dispatch" in graph
    assert {"vllm_sparse24.kernels.cuda.sparse24_linear", "vllm_sparse24.kernels.torch_ref"} <= \
        graph["vllm_sparse24.kernels.dispatch"]
    assert {"sparse24_tools.recover_global", "sparse24_tools.recover_blocks"} <= graph["sparse24_tools.recover"]
    assert cycles(graph) == []


def test_no_benchmark_script_shadows_a_package_transformers_probes():
    """Scripts in benchmarks/ run with that folder first on sys.path; transformers imports optional
    packages by name to probe for them (``import kernels``...), so a script of such a name would be
    imported in their place, in the middle of whatever import was running."""
    import re

    import transformers.utils.import_utils as probes

    probed = set(re.findall(r"""_is_package_available\(\s*["']([\w.]+)["']""", Path(probes.__file__).read_text()))
    assert "kernels" in probed and "torch" in probed  # the pattern still finds transformers' probes
    scripts = {p.stem for p in (ROOT / "benchmarks").rglob("*.py")}
    assert not scripts & probed, sorted(scripts & probed)
