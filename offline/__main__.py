"""python -m offline {compress,eval,compare,merge} ... (the same commands as ``vllm-sparse24``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .calib import DEFAULT_SIZE

METHODS = ("magnitude", "wanda", "sparsegpt")
_CPU_N, _CPU_T = DEFAULT_SIZE["cpu"]
_GPU_N, _GPU_T = DEFAULT_SIZE["cuda"]


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _common_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's default)")
    return p


def _add_compress_args(p: argparse.ArgumentParser, single: bool = True) -> None:
    if single:
        p.add_argument("--method", choices=METHODS, default="sparsegpt",
                       help="2:4 pruning algorithm (default sparsegpt). magnitude needs no calibration data; "
                            "wanda and sparsegpt need --calib")
        p.add_argument("--joint", action=argparse.BooleanOptionalAction, default=True,
                       help="sparsegpt: round kept weights to the int8 grid inside the OBS loop (default on)")
        p.add_argument("--export", choices=("sparse24", "dense-w8a8"), default="sparse24",
                       help="sparse24: the plugin's 2:4 + W8A8 checkpoint (default); dense-w8a8: no pruning, "
                            "a compressed-tensors int8 W8A8 checkpoint that stock vLLM loads (for comparison)")
        p.add_argument("--dense-layers", nargs="*", default=[], metavar="REGEX",
                       help="linears kept dense W8A8 instead of 2:4: regexes matched (re.match) against HF "
                            "module names, e.g. 'model\\.layers\\.0\\.mlp\\..*'; or auto:P to keep the P%% most "
                            "sensitive linears dense (needs --calib). Fused groups (q/k/v, gate/up) must agree")
        p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--calib", metavar="SOURCE",
                   help="calibration text: a .txt file, a folder of text files, or a Hugging Face data set name "
                        "(needs the `datasets` package and network). Required by wanda and sparsegpt and by "
                        "--dense-layers auto:P; magnitude runs without it and then reports weight errors instead "
                        "of output errors")
    p.add_argument("--nsamples", type=int, default=None,
                   help=f"calibration windows (default {_GPU_N} on CUDA, {_CPU_N} on CPU: SparseGPT on a 135M "
                        "model then takes about 5 minutes on a 2-core CPU)")
    p.add_argument("--seqlen", type=int, default=None,
                   help=f"tokens per calibration window (default {_GPU_T} on CUDA, {_CPU_T} on CPU)")
    p.add_argument("--dampening", type=float, default=0.01,
                   help="sparsegpt: Hessian dampening, a fraction of its mean diagonal (default 0.01)")
    p.add_argument("--block-size", type=int, default=128,
                   help="sparsegpt: columns per lazy-update block, a multiple of 4 (default 128)")
    p.add_argument("--ignore", nargs="*", default=["lm_head"], metavar="NAME",
                   help="linears left unquantized, by module name or regex (default: lm_head)")
    p.add_argument("--device", default=None,
                   help="where the layer being compressed and its calibration activations live "
                        "(default: cuda if available, else cpu); the rest of the model stays on CPU")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the model is loaded and calibrated in, and of the unquantized tensors written "
                        "(default float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window choice (default 0)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="calibration windows per layer forward (default 8; lower it if memory runs out)")


def build_parser(prog: str = "python -m offline") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Make and evaluate sparse24 (2:4 + W8A8) checkpoints.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    common = _common_args()

    c = sub.add_parser("compress", parents=[common], help="dense model -> sparse24 (or dense W8A8) checkpoint",
                       description="Compress a dense Llama / Mistral / Qwen2 model into a sparse24 checkpoint "
                                   "(2:4 sparse + int8 W8A8) that `vllm serve` loads with the plugin.")
    c.add_argument("--model", required=True, help="dense model: a Hugging Face folder or a .gguf file")
    c.add_argument("--out", required=True, help="checkpoint folder to write (written beside, then renamed)")
    _add_compress_args(c)

    e = sub.add_parser("eval", parents=[common], help="perplexity, computed as the plugin computes",
                       description="Perplexity of a dense model or a sparse24 / dense W8A8 checkpoint on a text "
                                   "file (quantized weights dequantized, linear inputs fake-quantized per token).")
    e.add_argument("--model", required=True, help="a Hugging Face folder (dense or quantized) or a .gguf file")
    e.add_argument("--text", required=True, help="plain text file to evaluate on")
    e.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--windows", type=int, default=64,
                   help="number of non-overlapping windows from the start of the text (default 64)")

    m = sub.add_parser("compare", parents=[common], help="several methods -> table + JSON + PNG",
                       description="Compress one model with several methods, evaluate each, and write a table "
                                   "(stdout), a JSON file and a bar plot.")
    m.add_argument("--model", required=True, help="dense model: a Hugging Face folder or a .gguf file")
    m.add_argument("--text", required=True, help="evaluation text file")
    m.add_argument("--work-dir", required=True, help="folder for the compressed checkpoints")
    m.add_argument("--runs", nargs="+", default=None, metavar="RUN",
                   help="subset of: dense dense-w8a8 magnitude wanda sparsegpt sparsegpt-joint "
                        "sparsegpt-joint-auto10 (default: all)")
    m.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window (default 512)")
    m.add_argument("--windows", type=int, default=64, help="evaluation windows (default 64)")
    m.add_argument("--json", required=True, help="result JSON path")
    m.add_argument("--png", required=True, help="bar plot PNG path")
    m.add_argument("--title", default=None, help="plot title (default: model name and evaluation size)")
    _add_compress_args(m, single=False)

    g = sub.add_parser("merge", parents=[common], help="combine compare JSON files -> one JSON + PNG + table",
                       description="Combine the rows of compare runs made by separate processes.")
    g.add_argument("parts", nargs="+", metavar="PART",
                   help="compare JSON files; PATH:SUFFIX appends SUFFIX to that file's run names")
    g.add_argument("--json", required=True, help="merged JSON path")
    g.add_argument("--png", required=True, help="merged bar plot PNG path")
    g.add_argument("--title", default="2:4 + W8A8 perplexity", help="plot title")
    return ap


def main(argv: list[str] | None = None, prog: str = "python -m offline") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "device", "unset") is None:
        args.device = _default_device()
    if args.cmd == "compress":
        from .compress import compress

        rep = compress(
            args.model, args.out, method=args.method, joint=args.joint, calib=args.calib,
            nsamples=args.nsamples, seqlen=args.seqlen, dampening=args.dampening,
            block_size=args.block_size, ignore=tuple(args.ignore), dense_layers=tuple(args.dense_layers),
            device=args.device, dtype=args.dtype, seed=args.seed, export=args.export,
            batch_size=args.batch_size, overwrite=args.overwrite,
        )
        print(json.dumps(rep["totals"], indent=2))
    elif args.cmd == "eval":
        from .evaluate import load_for_eval, perplexity

        model, tok = load_for_eval(args.model)
        res = perplexity(model, tok, args.text, seqlen=args.seqlen, windows=args.windows)
        print(json.dumps({"model": args.model, "text": args.text, **res}, indent=2))
    elif args.cmd == "merge":
        from .compare import merge

        merge(args.parts, args.json, args.png, args.title)
    else:
        from .compare import RUNS, compare

        compare(args.model, args.text, args.work_dir, runs=args.runs or list(RUNS), calib=args.calib,
                nsamples=args.nsamples, seqlen=args.seqlen, dampening=args.dampening,
                block_size=args.block_size, device=args.device, dtype=args.dtype, seed=args.seed,
                batch_size=args.batch_size, eval_seqlen=args.eval_seqlen, windows=args.windows,
                json_path=args.json, png_path=args.png, argv=sys.argv, title=args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
