"""python -m offline {compress,eval,compare,merge,recover} ..."""

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


def _add_recover_args(p: argparse.ArgumentParser) -> None:
    from .recover import AMP, EXTRAS, LOSSES, MODES, RecoverOptions

    d = RecoverOptions()
    p.add_argument("--teacher", required=True, help="the dense model: HF folder or .gguf file")
    p.add_argument("--student", required=True, help="sparse24 checkpoint folder (python -m offline compress)")
    p.add_argument("--out", required=True, help="output checkpoint folder (written atomically)")
    p.add_argument("--calib", required=True, help="training text: file, folder of text files or HF data set name")
    p.add_argument("--mode", choices=MODES, default=d.mode,
                   help="global: distill the whole model; blocks: fit each decoder layer's output to the "
                   "dense layer's in turn (cheaper)")
    p.add_argument("--tokens", type=int, default=d.tokens,
                   help="training tokens (global: in all; blocks: per decoder layer)")
    p.add_argument("--seqlen", type=int, default=d.seqlen, help="tokens per training sequence")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per optimizer step")
    p.add_argument("--lr", type=float, default=d.lr,
                   help="peak AdamW learning rate: linear warm-up, then cosine decay to 0")
    p.add_argument("--warmup", type=float, default=d.warmup, help="warm-up, a fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decoupled weight decay")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: no clipping)")
    p.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="global mode: KL(teacher||student) on the logits, optionally + SquareHead "
                   "(per decoder layer ||t-s||^2/||t||^2, mean over layers)")
    p.add_argument("--kl-weight", type=float, default=d.kl_weight, help="weight of the KL term")
    p.add_argument("--squarehead-weight", type=float, default=d.squarehead_weight,
                   help="weight of the SquareHead term (--loss kl+squarehead)")
    p.add_argument("--generate-tokens", type=int, default=d.generate_tokens,
                   help="tokens the teacher samples itself (continuations of calibration prompts), added "
                   "to the calibration windows as training data")
    p.add_argument("--gen-prompt-len", type=int, default=d.gen_prompt_len,
                   help="calibration tokens that prompt each generated sequence")
    p.add_argument("--gen-batch-size", type=int, default=d.gen_batch_size,
                   help="sequences the teacher generates at once")
    p.add_argument("--gen-temperature", type=float, default=d.gen_temperature,
                   help="sampling temperature of the generated text")
    p.add_argument("--gen-top-p", type=float, default=d.gen_top_p, help="nucleus sampling (1: off)")
    p.add_argument("--quant-from", type=float, default=d.quant_from,
                   help="fraction of the steps trained in float before int8 fake-quant starts (0: throughout)")
    p.add_argument("--train-extra", nargs="*", choices=EXTRAS, default=[],
                   help="also train these (frozen by default): norms, embeddings (and a tied output "
                   "layer), ignored (unquantized linears such as lm_head)")
    p.add_argument("--eval-text", default=None, help="text file for perplexity / top-1 agreement evaluations")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="evaluate every N steps (blocks: every N layers); 0: before and after only")
    p.add_argument("--eval-windows", type=int, default=d.eval_windows,
                   help="evaluate on the first N non-overlapping windows of --eval-text (as offline eval)")
    p.add_argument("--eval-seqlen", type=int, default=d.eval_seqlen, help="tokens per evaluation window")
    p.add_argument("--block-pool-tokens", type=int, default=d.block_pool_tokens,
                   help="blocks mode: tokens whose hidden states are kept on the device")
    p.add_argument("--save-every", type=int, default=d.save_every,
                   help="save the training state every N steps (blocks: after every layer)")
    p.add_argument("--state-dir", default=None, help="where the training state goes; OUT.recover-state when not given")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its saved state")
    p.add_argument("--keep-state", action="store_true", help="keep the training state after success")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="time budget for the whole run: the step count is lowered to fit it, measured "
                   "on the first steps")
    p.add_argument("--amp", choices=AMP, default=d.amp, help="bf16 autocast while training (auto: on CUDA)")
    p.add_argument("--vocab-chunk", type=int, default=d.vocab_chunk,
                   help="vocabulary rows per slice of the chunked KL")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where teacher and student train (both are kept there whole)")
    p.add_argument("--seed", type=int, default=d.seed, help="data order, generation and sampling seed")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def _recover_options(args: argparse.Namespace):
    from .recover import RecoverOptions

    return RecoverOptions(
        mode=args.mode, tokens=args.tokens, seqlen=args.seqlen, batch_size=args.batch_size, lr=args.lr,
        warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip, loss=args.loss,
        kl_weight=args.kl_weight, squarehead_weight=args.squarehead_weight,
        generate_tokens=args.generate_tokens, gen_prompt_len=args.gen_prompt_len,
        gen_batch_size=args.gen_batch_size, gen_temperature=args.gen_temperature, gen_top_p=args.gen_top_p,
        quant_from=args.quant_from, train_extra=tuple(args.train_extra), eval_text=args.eval_text,
        eval_every=args.eval_every, eval_windows=args.eval_windows, eval_seqlen=args.eval_seqlen,
        block_pool_tokens=args.block_pool_tokens, save_every=args.save_every, max_minutes=args.max_minutes,
        amp=args.amp, vocab_chunk=args.vocab_chunk, device=args.device, seed=args.seed,
        progress=not args.no_progress,
    )


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

    r = sub.add_parser(
        "recover", help="sparse24 checkpoint -> accuracy-recovered sparse24 checkpoint (distillation)",
        description="Distill a 2:4 W8A8 student from its dense teacher with the 2:4 mask fixed and the "
        "plugin's int8 arithmetic in the forward (STE); writes the compressor's checkpoint format "
        "atomically, with recover_report.json and recover_perplexity.png inside it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_recover_args(r)

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
    elif args.cmd == "recover":
        from .recover import recover

        rep = recover(args.teacher, args.student, args.out, args.calib, _recover_options(args),
                      state_dir=args.state_dir, resume=args.resume, overwrite=args.overwrite,
                      keep_state=args.keep_state, argv=sys.argv)
        print(json.dumps({"train": rep["train"], "data": rep["data"], "final_eval": rep["final_eval"],
                          "teacher_eval": rep["teacher_eval"]}, indent=2))
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
