"""python -m sparse24_tools {compress,eval,compare,merge,recover} ... (the same commands as ``vllm-sparse24``).

The flags of compress, compare and recover are the fields of their options dataclasses
(``compress_options.CompressOptions``, ``recover_options.RecoverOptions``); building the parsers
imports no torch."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback

from .compress_options import CompressOptions, comparison_runs
from .options import add_options, options_from
from .recover_options import RecoverOptions

# compress flags that name one checkpoint's choices, which compare sets per run
_PER_RUN = ("method", "scheme", "joint", "export", "dense_layers", "quantize_lm_head", "overwrite", "progress")


def _common_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's default)")
    return p


def build_parser(prog: str = "python -m sparse24_tools") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Make and evaluate sparse24 (2:4 + W8A8) checkpoints.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    common = _common_args()

    c = sub.add_parser("compress", parents=[common], help="dense model -> sparse24 (or dense W8A8) checkpoint",
                       description="Compress a dense Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 model into "
                                   "a sparse24 checkpoint "
                                   "(2:4 sparse + int8 or fp8 W8A8) that `vllm serve` loads with the plugin.")
    c.add_argument("--model", required=True, help="dense model: a Hugging Face folder or a .gguf file")
    c.add_argument("--out", required=True, help="checkpoint folder to write (written beside, then renamed)")
    add_options(c, CompressOptions)

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
    m.add_argument("--runs", nargs="+", default=None, metavar="RUN", choices=tuple(comparison_runs()),
                   help=f"subset of: {' '.join(comparison_runs())} (default: all)")
    m.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window (default 512)")
    m.add_argument("--windows", type=int, default=64, help="evaluation windows (default 64)")
    m.add_argument("--json", required=True, help="result JSON path")
    m.add_argument("--png", required=True, help="bar plot PNG path")
    m.add_argument("--title", default=None, help="plot title (default: model name and evaluation size)")
    add_options(m, CompressOptions, skip=_PER_RUN)

    g = sub.add_parser("merge", parents=[common], help="combine compare JSON files -> one JSON + PNG + table",
                       description="Combine the rows of compare runs made by separate processes.")
    g.add_argument("parts", nargs="+", metavar="PART",
                   help="compare JSON files; PATH:SUFFIX appends SUFFIX to that file's run names")
    g.add_argument("--json", required=True, help="merged JSON path")
    g.add_argument("--png", required=True, help="merged bar plot PNG path")
    g.add_argument("--title", default="2:4 + W8A8 perplexity", help="plot title")
    r = sub.add_parser(
        "recover", parents=[common], help="sparse24 checkpoint -> accuracy-recovered sparse24 checkpoint (distillation)",
        description="Distill a 2:4 W8A8 / W4A8 student from its dense teacher with the 2:4 mask fixed and the "
        "plugin's int8, fp8 or w4a8 arithmetic (the student's scheme) in the forward (STE); writes the "
        "compressor's checkpoint format atomically, with recover_report.json and recover_curves.png inside it. "
        "With --fsdp, start it with torchrun (global mode across GPUs).",
)
    r.add_argument("--teacher", required=True, help="the dense model: HF folder or .gguf file")
    r.add_argument("--student", required=True, help="sparse24 checkpoint folder (vllm-sparse24 compress)")
    r.add_argument("--out", required=True, help="output checkpoint folder (written atomically)")
    r.add_argument("--calib", required=True, help="training text: file, folder of text files or HF data set name")
    add_options(r, RecoverOptions)
    r.add_argument("--state-dir", default=None, help="where the training state goes; OUT.recover-state when not given")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run from its saved state")
    r.add_argument("--keep-state", action="store_true", help="keep the training state after success")
    r.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return ap


# What a command's input can cause, each with a message that names the file, option or layer and
# what was expected: shown as one line, not a traceback. By module and name: an error's class is
# loaded when it is raised, so telling them apart imports nothing.
_USER_ERRORS = (
    ("sparse24_tools.architectures", "UnsupportedModelError"), ("sparse24_tools.calib", "CalibrationError"),
    ("sparse24_tools.compress_options", "CompressError"), ("sparse24_tools.evaluate", "EvalError"),
    ("sparse24_tools.inputs", "InputError"), ("sparse24_tools.recover_options", "RecoverError"),
    ("vllm_sparse24.checkpoint.names", "CheckpointError"), ("vllm_sparse24.format", "Sparse24FormatError"),
    ("vllm_sparse24.schema", "Sparse24ConfigError"), ("vllm_sparse24.sparsity", "PruneError"),
)
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_user_error(e: BaseException) -> bool:
    if isinstance(e, _USER_OS_ERRORS):
        return True
    return any(module in sys.modules and isinstance(e, getattr(sys.modules[module], name))
               for module, name in _USER_ERRORS)


def _check_paths(args: argparse.Namespace) -> None:
    """Every input path of the command, before torch or any model loads (the library functions
    check them again for their other callers)."""
    from . import inputs
    from .calib import check_source

    if args.cmd in ("compress", "recover"):
        inputs.new_output(args.out, "--out", args.overwrite)
    if args.cmd in ("compress", "eval", "compare"):
        inputs.model_source(args.model, "--model")
    if args.cmd in ("eval", "compare"):
        inputs.text_file(args.text, "--text")
    if args.cmd == "recover":
        inputs.model_source(args.teacher, "--teacher")
        inputs.checkpoint_folder(args.student, "--student")
        if args.eval_text is not None:
            inputs.text_file(args.eval_text, "--eval-text")
    if getattr(args, "calib", None) is not None:
        check_source(args.calib)
    for part in getattr(args, "parts", ()):
        inputs.compare_part(part)


def main(argv: list[str] | None = None, prog: str = "python -m sparse24_tools") -> int:
    """Run one command; an error of its input prints ``PROG COMMAND: error: ...`` and returns 2
    (with -v after its traceback)."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _check_paths(args)
        _run(args)
    except Exception as e:
        if not is_user_error(e):
            raise
        if args.verbose:
            traceback.print_exc()
        message = str(e).replace("\n", " ")
        print(f"{prog} {args.cmd}: error: {message}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "device", "unset") is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.cmd == "compress":
        from .compress import compress

        rep = compress(args.model, args.out, options_from(CompressOptions, args))
        print(json.dumps(rep["totals"], indent=2))
    elif args.cmd == "eval":
        from .evaluate import load_for_eval, perplexity

        model, tok = load_for_eval(args.model)
        res = perplexity(model, tok, args.text, seqlen=args.seqlen, windows=args.windows)
        print(json.dumps({"model": args.model, "text": args.text, **res}, indent=2))
    elif args.cmd == "recover":
        from .recover import recover

        rep = recover(args.teacher, args.student, args.out, args.calib, options_from(RecoverOptions, args),
                      state_dir=args.state_dir, resume=args.resume, overwrite=args.overwrite,
                      keep_state=args.keep_state, argv=sys.argv)
        if rep:  # under --fsdp, rank 0 reports
            print(json.dumps({"train": rep["train"], "data": rep["data"], "final_eval": rep["final_eval"],
                              "domains": rep["domains"]}, indent=2))
    elif args.cmd == "merge":
        from .compare import merge

        merge(args.parts, args.json, args.png, args.title)
    else:
        from .compare import compare

        compare(args.model, args.text, args.work_dir, runs=args.runs or list(comparison_runs()),
                opts=options_from(CompressOptions, args), eval_seqlen=args.eval_seqlen, windows=args.windows,
                json_path=args.json, png_path=args.png, argv=sys.argv, title=args.title)


if __name__ == "__main__":
    sys.exit(main())
