"""The ``vllm-sparse24`` console command: one entry for the offline tools (compress, recover, eval,
compare, merge), the demo server and the CUDA library build.

Each command is handed the rest of the command line by its own parser (``python -m sparse24_tools``
for the offline tools, ``vllm_sparse24.demo``, ``vllm_sparse24.build``), so its options and their
help are written once. The module lives in this package rather than in the plugin because the
plugin (``vllm_sparse24``) never imports the compressor; the plugin modules are imported lazily.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence

PROG = "vllm-sparse24"
Runner = Callable[[list[str]], "int | None"]


def _offline(command: str) -> Runner:
    def run(argv: list[str]) -> int | None:
        from .__main__ import main

        return main([command, *argv], prog=PROG)

    return run


def _module_main(module: str, command: str) -> Runner:
    def run(argv: list[str]) -> int | None:
        try:
            main = importlib.import_module(module).main
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            raise SystemExit(f"{PROG} {command}: this installation has no {module} module") from e
        return main(argv, prog=f"{PROG} {command}")

    return run


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def commands() -> dict[str, tuple[str, Runner]]:
    """name -> (one-line help, runner), in the order ``--help`` lists them."""
    table: dict[str, tuple[str, Runner] | None] = {
        "compress": ("dense Hugging Face model (folder or .gguf) -> sparse24 checkpoint", _offline("compress")),
        "recover": (("fine-tune a sparse24 checkpoint to recover accuracy lost to pruning", _offline("recover"))
                    if _available("sparse24_tools.recover") else None),
        "eval": ("perplexity of a dense or quantized checkpoint, computed as the plugin computes", _offline("eval")),
        "compare": ("compress with several methods, evaluate each -> table, JSON, plot", _offline("compare")),
        "merge": ("combine the JSON files of several compare runs", _offline("merge")),
        "demo": ("serve a sparse24 checkpoint with vLLM's OpenAI server (default: a tiny demo model)",
                 _module_main("vllm_sparse24.demo", "demo")),
        "build": ("compile the plugin's CUDA library (needs nvcc >= 12.2; runs on sm90 GPUs)",
                  _module_main("vllm_sparse24.build", "build")),
    }
    return {name: entry for name, entry in table.items() if entry is not None}


def build_parser(table: dict[str, tuple[str, Runner]]) -> argparse.ArgumentParser:
    from vllm_sparse24 import __version__

    ap = argparse.ArgumentParser(
        prog=PROG, description="Make sparse24 (2:4 sparse + int8 W8A8) checkpoints and serve them with vLLM.",
        epilog=f"`{PROG} COMMAND --help` describes each command's options.")
    ap.add_argument("--version", action="version", version=f"{PROG} {__version__}",
                    help="print the installed version and exit")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, _) in table.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    table = commands()
    if argv and argv[0] in table:
        rc = table[argv[0]][1](argv[1:])
        return rc if isinstance(rc, int) else 0
    build_parser(table).parse_args(argv)  # --help / --version exit here; no or an unknown command: error
    return 2


if __name__ == "__main__":
    sys.exit(main())
