"""python -m sparse24_tools {compress,eval,compare,merge,recover} ... (the same commands as ``vllm-sparse24``)."""

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
        p.add_argument("--scheme", choices=("int8", "fp8"), default="int8",
                       help="W8A8 quantization: int8 (int8 weights per channel, int8 activations per token; "
                            "default) or fp8 (float8_e4m3fn weights per channel with scale absmax/448, e4m3 "
                            "activations per token; runs on Hopper GPUs in bfloat16 models)")
        p.add_argument("--joint", action=argparse.BooleanOptionalAction, default=True,
                       help="sparsegpt: round kept weights to the scheme's grid (int8 or e4m3) inside the OBS "
                            "loop (default on)")
        p.add_argument("--export", choices=("sparse24", "dense-w8a8"), default="sparse24",
                       help="sparse24: the plugin's 2:4 + W8A8 checkpoint (default); dense-w8a8: no pruning, "
                            "a compressed-tensors W8A8 checkpoint (int8, or fp8 with --scheme fp8) that stock vLLM "
                            "loads (for comparison)")
        p.add_argument("--dense-layers", nargs="*", default=[], metavar="REGEX",
                       help="linears kept dense W8A8 instead of 2:4: regexes matched (re.match) against HF "
                            "module names, e.g. 'model\\.layers\\.0\\.mlp\\..*'; or auto:P to keep the P%% most "
                            "sensitive linears dense (needs --calib). Fused groups (q/k/v, gate/up) must agree")
        p.add_argument("--quantize-lm-head", action="store_true",
                       help="also quantize lm_head, dense W8A8 on the scheme's grid (tied embeddings stay float "
                            "for the gather; the plugin quantizes a copy for the logits): less weight to read "
                            "per decode step, some accuracy cost (see the README)")
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


def _add_recover_args(p: argparse.ArgumentParser) -> None:
    import torch

    from .recover_options import AMP, EXTRAS, LOSSES, MODES, RecoverOptions

    d = RecoverOptions()
    p.add_argument("--teacher", required=True, help="the dense model: HF folder or .gguf file")
    p.add_argument("--student", required=True, help="sparse24 checkpoint folder (python -m sparse24_tools compress)")
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
                   help="fraction of the steps trained in float before fake-quant (int8 or fp8) starts (0: throughout)")
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


def build_parser(prog: str = "python -m sparse24_tools") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Make and evaluate sparse24 (2:4 + W8A8) checkpoints.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    common = _common_args()

    c = sub.add_parser("compress", parents=[common], help="dense model -> sparse24 (or dense W8A8) checkpoint",
                       description="Compress a dense Llama / Mistral / Qwen2 model into a sparse24 checkpoint "
                                   "(2:4 sparse + int8 or fp8 W8A8) that `vllm serve` loads with the plugin.")
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
    r = sub.add_parser(
        "recover", parents=[common], help="sparse24 checkpoint -> accuracy-recovered sparse24 checkpoint (distillation)",
        description="Distill a 2:4 W8A8 student from its dense teacher with the 2:4 mask fixed and the "
        "plugin's int8 or fp8 arithmetic (the student's scheme) in the forward (STE); writes the "
        "compressor's checkpoint format atomically, with recover_report.json and recover_perplexity.png inside it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_recover_args(r)
    return ap


def main(argv: list[str] | None = None, prog: str = "python -m sparse24_tools") -> int:
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
            args.model, args.out, method=args.method, scheme=args.scheme, joint=args.joint, calib=args.calib,
            nsamples=args.nsamples, seqlen=args.seqlen, dampening=args.dampening,
            block_size=args.block_size, ignore=tuple(args.ignore), dense_layers=tuple(args.dense_layers),
            device=args.device, dtype=args.dtype, seed=args.seed, export=args.export,
            batch_size=args.batch_size, overwrite=args.overwrite, quantize_lm_head=args.quantize_lm_head,
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
