"""Blocks-mode recovery (``recover --mode blocks``) at the Llama-3 8B or 70B layer shape on one GPU:
peak GPU memory and time per decoder layer, measured on random weights with a few layers, and the
full depth's peak extrapolated from them (an estimate: a straight line through the measured layer
counts, as blocks mode holds both whole models on the device and adds the same per layer).

    python benchmarks/recovery_blocks_memory.py --shape llama3-8b --layers 2 4 --out DIR

For each layer count: a random dense Llama of the shape (transformers' initialisation; the
tokenizer is the tiny test one, the vocabulary rows are the shape's) and a random-word training
text, compressed 2:4 by magnitude (the quickest method; recovery's memory and speed do not depend on
it), then ``recover --mode blocks`` with recover's defaults (--seqlen, --batch-size,
--block-pool-tokens) and ``--steps`` steps per layer, no evaluation, no generated data. Writes
``recovery-blocks-memory-<shape>-<gpu>-<date>.json`` in DIR (the models are deleted after each
count: the 8B shape takes about 2 GB of disk per layer, twice). ``--shape tiny`` checks the script on
a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparse24_tools.compress import compress  # noqa: E402
from sparse24_tools.compress_options import CompressOptions  # noqa: E402
from sparse24_tools.provenance import machine_info  # noqa: E402
from sparse24_tools.recover import RecoverOptions, recover  # noqa: E402
from vllm_sparse24.tiny import build_tokenizer  # noqa: E402

log = logging.getLogger("recovery_blocks_memory")
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 128256, "num_hidden_layers": 32, "rope_theta": 500000.0},
    "llama3-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                   "num_key_value_heads": 8, "vocab_size": 128256, "num_hidden_layers": 80, "rope_theta": 500000.0},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 512, "num_hidden_layers": 2, "rope_theta": 10000.0},
}
_WORDS = "the sparse model keeps two of every four weights and rounds each row to int8 on the grid".split()


def _teacher(folder: Path, shape: dict[str, Any], layers: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True)
    build_tokenizer(folder)
    cfg = LlamaConfig(**{**shape, "num_hidden_layers": layers}, max_position_embeddings=4096, bos_token_id=0,
                      eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)


def _text(path: Path, words: int) -> Path:
    g = torch.Generator().manual_seed(0)
    path.write_text(" ".join(_WORDS[i] for i in torch.randint(len(_WORDS), (words,), generator=g).tolist()))
    return path


def measure(shape_name: str, layers: int, steps: int, device: str, work: Path,
            pool_tokens: int = RecoverOptions.block_pool_tokens) -> dict[str, Any]:
    """One layer count: build, compress, recover in blocks mode; its peak memory and layer times."""
    shape, opts = SHAPES[shape_name], RecoverOptions(block_pool_tokens=pool_tokens)
    folder = work / f"{shape_name}-{layers}-layers"
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    _teacher(folder / "teacher", shape, layers)
    # about one token a word: enough windows to fill the default pool of hidden states
    calib = _text(folder / "calib.txt", opts.block_pool_tokens + 8 * opts.seqlen)
    compress(folder / "teacher", folder / "student", CompressOptions(method="magnitude", device=device, progress=False))
    built = time.perf_counter() - t0
    rep = recover(folder / "teacher", folder / "student", folder / "recovered", calib, RecoverOptions(
        mode="blocks", tokens=steps * opts.batch_size * opts.seqlen, generate_tokens=0, max_minutes=None,
        block_pool_tokens=pool_tokens, device=device, progress=False))
    shutil.rmtree(folder)
    seconds = rep["train"]["layer_seconds"]
    row = {"layers": layers, "peak_gpu_memory_gib": rep["peak_gpu_memory_gib"], "layer_seconds": seconds,
           "median_layer_seconds": statistics.median(seconds), "steps_per_layer": rep["train"]["steps_per_layer"],
           "tokens_per_layer": rep["train"]["tokens_per_layer"], "pool_sequences": rep["train"]["pool_sequences"],
           "recover_seconds": rep["seconds"], "build_seconds": round(built, 1)}
    log.info("%s, %d layers: peak %s GiB, %.2fs per layer", shape_name, layers, row["peak_gpu_memory_gib"],
             row["median_layer_seconds"])
    return row


def extrapolate(rows: list[dict[str, Any]], full_layers: int) -> dict[str, Any] | None:
    """Least-squares line peak = fixed + per_layer * layers through the measured rows, at the full
    depth (None without two measured counts or without GPU memory figures)."""
    pts = [(r["layers"], r["peak_gpu_memory_gib"]) for r in rows if r["peak_gpu_memory_gib"] is not None]
    if len({x for x, _ in pts}) < 2:
        return None
    mx, my = statistics.mean(x for x, _ in pts), statistics.mean(y for _, y in pts)
    per_layer = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    fixed = my - per_layer * mx
    return {"estimate": True, "how": "least-squares line through the measured (layers, peak) points",
            "fixed_gib": round(fixed, 3), "per_layer_gib": round(per_layer, 3), "layers": full_layers,
            "peak_gpu_memory_gib": round(fixed + per_layer * full_layers, 1),
            "seconds_all_layers": round(full_layers * statistics.median(r["median_layer_seconds"] for r in rows), 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="layer counts to measure")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per layer")
    ap.add_argument("--out", required=True, type=Path, help="folder for the JSON (and the models while measured)")
    ap.add_argument("--block-pool-tokens", type=int, default=RecoverOptions.block_pool_tokens,
                    help="tokens of hidden states kept on the device (default: recover's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    rows = [measure(args.shape, n, args.steps, args.device, args.out, args.block_pool_tokens) for n in args.layers]
    doc = {"shape": args.shape, "config": SHAPES[args.shape], "gpu": gpu,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
           "machine": machine_info(), "recover_options": {"seqlen": RecoverOptions.seqlen,
                                                          "batch_size": RecoverOptions.batch_size,
                                                          "block_pool_tokens": args.block_pool_tokens},
           "measured": rows, "full_depth": extrapolate(rows, SHAPES[args.shape]["num_hidden_layers"])}
    tag = re.sub(r"[^a-z0-9]+", "-", (gpu or "cpu").lower().replace("nvidia", "")).strip("-")
    path = args.out / f"recovery-blocks-memory-{args.shape}-{tag}-{datetime.now(timezone.utc):%Y-%m-%d}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({"measured": [{k: r[k] for k in ("layers", "peak_gpu_memory_gib", "median_layer_seconds")}
                                   for r in rows], "full_depth": doc["full_depth"]}, indent=2))
    print(f"wrote {path}")
    return doc


if __name__ == "__main__":
    main()
