"""python -m offline {compress,eval,compare} ..."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch


def _add_compress_args(p: argparse.ArgumentParser, single: bool = True) -> None:
    if single:
        p.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), default="sparsegpt")
        p.add_argument("--joint", action=argparse.BooleanOptionalAction, default=True,
                       help="SparseGPT: round kept weights to the int8 grid inside the OBS loop")
        p.add_argument("--export", choices=("sparse24", "dense-w8a8"), default="sparse24")
        p.add_argument("--dense-layers", nargs="*", default=[],
                       help="regexes (re.match on HF module names) of linears kept dense W8A8, or auto:P")
        p.add_argument("--overwrite", action="store_true")
    p.add_argument("--calib", help="calibration text file, folder of text files, or HF data set name")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--dampening", type=float, default=0.01, help="fraction of the mean Hessian diagonal")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--ignore", nargs="*", default=["lm_head"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per layer forward")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m offline", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compress", help="dense model -> sparse24 (or dense W8A8) checkpoint")
    c.add_argument("--model", required=True, help="HF folder or .gguf file")
    c.add_argument("--out", required=True)
    _add_compress_args(c)

    e = sub.add_parser("eval", help="perplexity (quantized checkpoints computed like the plugin)")
    e.add_argument("--model", required=True)
    e.add_argument("--text", required=True)
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--windows", type=int, default=64)
    e.add_argument("--threads", type=int, default=0)

    m = sub.add_parser("compare", help="several methods -> table + JSON + PNG")
    m.add_argument("--model", required=True)
    m.add_argument("--text", required=True, help="evaluation text")
    m.add_argument("--work-dir", required=True, help="where the compressed checkpoints go")
    m.add_argument("--runs", nargs="+", default=None,
                   help="subset of: dense dense-w8a8 magnitude wanda sparsegpt sparsegpt-joint sparsegpt-joint-auto10")
    m.add_argument("--eval-seqlen", type=int, default=512)
    m.add_argument("--windows", type=int, default=64)
    m.add_argument("--json", required=True)
    m.add_argument("--png", required=True)
    m.add_argument("--title", default=None)
    _add_compress_args(m, single=False)

    g = sub.add_parser("merge", help="combine compare JSON files -> one JSON + PNG + table")
    g.add_argument("parts", nargs="+")
    g.add_argument("--json", required=True)
    g.add_argument("--png", required=True)
    g.add_argument("--title", default="2:4 + W8A8 perplexity")
    g.add_argument("--threads", type=int, default=0)

    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
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
