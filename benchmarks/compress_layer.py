"""Seconds per decoder layer of SparseGPT-joint 2:4 + int8 on one random Llama-3-8B-shaped layer.

    python benchmarks/compress_layer.py --out layer.json                 # CUDA, 128 x 2048 tokens, bf16
    python benchmarks/compress_layer.py --tiny --device cpu --out t.json # smoke test

Runs exactly the driver's per-layer path (``sparse24_tools.driver.compress_layer``: Hessians with hooks,
q/k/v -> o -> gate/up -> down with re-runs, joint OBS loop, outputs for the next layer) and prints
/ writes wall seconds (after one warm-up layer on a small slice), peak device memory, versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sparse24_tools.architectures import LLAMA  # noqa: E402
from sparse24_tools.compress_options import CompressOptions  # noqa: E402
from sparse24_tools.driver import compress_layer  # noqa: E402
from sparse24_tools.prune import METHODS  # noqa: E402

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_key_value_heads": 8, "max_position_embeddings": 8192, "rope_theta": 500000.0}
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1024, "rope_theta": 10000.0}


def build_layer(shape: dict, dtype: torch.dtype, device: torch.device, seed: int):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(num_hidden_layers=1, vocab_size=128, **shape)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    layer = LlamaDecoderLayer(cfg, layer_idx=0)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return layer.to(device, dtype).eval(), LlamaRotaryEmbedding(cfg).to(device)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON result path")
    ap.add_argument("--tiny", action="store_true", help="256-wide layer, 4 x 64 tokens (CPU smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--method", choices=tuple(METHODS), default="sparsegpt")
    ap.add_argument("--no-joint", dest="joint", action="store_false")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False (use --tiny --device cpu to smoke-test)")
    shape = TINY if args.tiny else LLAMA3_8B
    nsamples = args.nsamples or (4 if args.tiny else 128)
    seqlen = args.seqlen or (64 if args.tiny else 2048)
    dtype = getattr(torch, args.dtype or ("float32" if args.tiny else "bfloat16"))

    layer, rotary = build_layer(shape, dtype, device, args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed)
    inps = torch.randn(nsamples, seqlen, shape["hidden_size"], generator=g, device=device, dtype=dtype)
    pos = torch.arange(seqlen, device=device).unsqueeze(0)
    kwargs = {"position_embeddings": rotary(inps[:1], pos), "position_ids": pos, "attention_mask": None,
              "use_cache": False}
    names = LLAMA.linear_names(1)
    kinds = dict.fromkeys(names, "sparse")
    opts = CompressOptions(method=args.method, joint=args.joint, device=str(device),
                           batch_size=args.batch_size, progress=False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # warm-up on a copy-free small slice (kernels, cuBLAS/cuSOLVER handles); weights are then
    # rebuilt so the timed run starts from the dense layer
    compress_layer(layer, LLAMA.layer_prefix(0), LLAMA.linear_groups, inps[: min(2, nsamples)], kwargs, kinds, opts)
    layer, _ = build_layer(shape, dtype, device, args.seed)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    _, results = compress_layer(layer, LLAMA.layer_prefix(0), LLAMA.linear_groups, inps, kwargs, kinds, opts)
    sync()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    import transformers

    doc = {
        "what": "offline compress_layer, one Llama decoder layer",
        "shape": shape, "nsamples": nsamples, "seqlen": seqlen, "dtype": str(dtype), "method": args.method,
        "joint": args.joint, "batch_size": args.batch_size,
        "seconds_per_layer": round(seconds, 3), "peak_gpu_memory_gib": None if peak is None else round(peak, 2),
        "algorithm_seconds": round(sum(r.seconds for r in results), 3),
        "mean_rel_error_after": sum(r.err_after for r in results) / len(results),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/compress_layer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"seconds per layer: {seconds:.2f}  peak GPU memory: {doc['peak_gpu_memory_gib']} GiB  "
          f"({nsamples} x {seqlen} tokens, {dtype}, {shape['hidden_size']}/{shape['intermediate_size']})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out)
    return doc


if __name__ == "__main__":
    main()
