"""``vllm-sparse24 recover``: accuracy recovery of a 2:4 W8A8 / W4A8 checkpoint by distillation from
its dense teacher, with the 2:4 mask fixed and the arithmetic of the plugin (int8, fp8 or w4a8) in the forward.

Orchestration only: the options are in :mod:`sparse24_tools.recover_options`, the run's state and
schedule in :mod:`sparse24_tools.recover_run`, the two training loops in
:mod:`sparse24_tools.recover_global` and :mod:`sparse24_tools.recover_blocks`, the spreading of
global mode over several GPUs in :mod:`sparse24_tools.recover_fsdp`, the losses in
:mod:`sparse24_tools.distill_loss`, the quantization-aware linear in :mod:`sparse24_tools.qat`, the
student loading in :mod:`sparse24_tools.student`, the training data in
:mod:`sparse24_tools.distill_data`, the evaluation texts in :mod:`sparse24_tools.recover_domains`.

Modes:

* ``global``: the whole student is trained on KL(teacher || student) of the next-token
  distributions (optionally + SquareHead on every decoder layer's output), AdamW, warm-up then
  cosine decay; with ``fsdp``, across the processes torchrun starts;
* ``blocks``: each decoder layer in turn is fitted to the dense layer's output (EBFT-style
  block-wise reconstruction): cheaper, no output-layer cost, one layer's memory.

Every quantized linear trains its kept weights on the student's grid, int8 or fp8, or w4a8's int4 grid with the
student's channel and group scales frozen (``QATLinear``); pruned weights stay 0 and the exported bitmask (and
group scales) are the student's bit for bit. The result is written in the
compressor's format (``sparse24_tools.export.write_sparse24``, atomically) with ``recover_report.json``
(per evaluated text: dense, one-shot and recovered perplexity) and ``recover_curves.png`` beside it.
The training state is saved every ``save_every`` steps (blocks: every layer) into
``OUT.recover-state`` so that ``resume`` continues an interrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import inputs
from .architectures import architecture_of
from .calib import check_source
from .distill_data import generate_sequences, text_windows
from .group import LinearResult
from .model_walk import decoder_layers, load_model
from .provenance import machine_info, utc_now
from .recover_blocks import train_blocks
from .recover_budget import BudgetError
from .recover_domains import domain_table, domain_windows, eval_windows_of, evaluation_texts
from .recover_global import train_global
from .recover_options import EVAL_TEXT_DOMAIN, RecoverError, RecoverOptions
from .recover_plots import plot_curves
from .recover_run import STATE_FILE, STATE_FORMAT, OneProcess, RecoveryRun
from .student import Student, check_compatible, load_student, wrap_quantized

log = logging.getLogger(__name__)

__all__ = ["BudgetError", "RecoverError", "RecoverOptions", "recover"]
# the run's loss and perplexity curves, beside recover_report.json in the output
CURVES_PNG = "recover_curves.png"


# -- setup -------------------------------------------------------------------------------------


def _set_trainable(student: Student, extras: tuple[str, ...]) -> list[nn.Parameter]:
    model = student.model
    for p in model.parameters():
        p.requires_grad_(False)
    for q in student.qat.values():
        q.weight.requires_grad_(True)
    if "embeddings" in extras:
        model.get_input_embeddings().weight.requires_grad_(True)
    if "norms" in extras:
        for name in architecture_of(model.config).norm_names(len(decoder_layers(model))):
            model.get_submodule(name).weight.requires_grad_(True)
    quantized = set(student.qat)
    for name, mod in model.named_modules():
        if "ignored" in extras and isinstance(mod, nn.Linear) and name not in quantized:
            mod.weight.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    log.info("training %d tensors, %.2fM values (extras: %s)", len(params),
             sum(p.numel() for p in params) / 1e6, ", ".join(extras) or "none")
    return params


def _load_state(state_dir: Path, opts: RecoverOptions, resume: bool) -> dict[str, Any] | None:
    path = state_dir / STATE_FILE
    if not resume:
        if path.exists():
            raise RecoverError(f"{state_dir} holds the saved state of an interrupted run: pass --resume to "
                               "continue it, or delete it to start over")
        return None
    if not path.exists():
        raise RecoverError(f"--resume: no saved state at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a torn or foreign file
        raise RecoverError(f"--resume: cannot read {path} ({e})") from e
    if state.get("format") != STATE_FORMAT:
        raise RecoverError(f"--resume: {path} has state format {state.get('format')!r}, expected {STATE_FORMAT}")
    want = opts.resume_key()
    diff = {k: (state["key"].get(k), v) for k, v in want.items() if state["key"].get(k) != v}
    if diff:
        raise RecoverError(f"--resume: {path} was saved with other options (saved, now): {diff}")
    log.info("resuming from %s", path)
    return state


def _data(teacher: nn.Module, student: Student, calib: str | os.PathLike, opts: RecoverOptions,
          state: dict[str, Any] | None, device: torch.device,
          parallel: OneProcess) -> tuple[torch.Tensor, int, float]:
    """(training pool: the calibration windows then the generated sequences, how many are
    calibration windows, seconds spent generating)."""
    windows = text_windows(student.tokenizer, calib, opts.seqlen)
    t0 = time.perf_counter()
    if state is not None:
        generated = state["generated"]
    else:
        limit = opts.gen_max_share * opts.max_minutes * 60 if opts.max_minutes is not None else None
        wanted = opts.generate_tokens
        if opts.mode == "blocks" and wanted > opts.block_pool_tokens // 2:
            # blocks mode trains on a pool of --block-pool-tokens: half of it generated is plenty
            wanted = opts.block_pool_tokens // 2
            log.info("blocks mode: generating %d tokens (half of --block-pool-tokens), not %d", wanted,
                     opts.generate_tokens)
        generated = generate_sequences(
            teacher, windows, wanted, opts.seqlen, prompt_len=opts.gen_prompt_len,
            batch_size=opts.gen_batch_size, temperature=opts.gen_temperature, top_p=opts.gen_top_p,
            seed=opts.seed, device=device, eos_token_id=student.tokenizer.eos_token_id, progress=opts.progress,
            stop=None if limit is None else lambda: parallel.agree(time.perf_counter() - t0) >= limit,
            rank=parallel.rank, world=parallel.world, gather=parallel.gather,
        )
    return torch.cat([windows, generated]), windows.shape[0], time.perf_counter() - t0


# -- the public entry point -----------------------------------------------------------------


def _parallel(opts: RecoverOptions) -> OneProcess:
    if opts.fsdp:
        from .recover_fsdp import Sharded

        return Sharded(opts)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecoverError(f"started as one of {os.environ['WORLD_SIZE']} processes (torchrun): pass --fsdp to "
                           "train across them")
    return OneProcess()


def _export_results(student: Student, mode: str) -> dict[str, LinearResult]:
    results: dict[str, LinearResult] = {}
    for prefix, q in student.qat.items():
        codes, scale = q.export()
        mask = q.bool_mask()
        if mask is not None and not torch.equal(mask, student.masks[prefix]):
            raise RecoverError(f"{prefix}: the mask changed during training (a bug)")
        results[prefix] = LinearResult(
            name=prefix, kind=student.kinds[prefix], method=f"recover-{mode}", q=codes, scale=scale,
            err_before=float("nan"), err_after=float("nan"), seconds=0.0, mask=mask,
            group_scale=q.export_group_scale(),
        )
    return results


def _unsharded_student(path: str | os.PathLike, extras: tuple[str, ...],
                       trained: dict[str, torch.Tensor]) -> Student:
    """A fresh copy of the student (rank 0) holding the trained parameters gathered from the shards."""
    student = load_student(path)
    wrap_quantized(student)
    _set_trainable(student, extras)
    with torch.no_grad():
        for name, p in student.model.named_parameters():
            if p.requires_grad:
                if name not in trained:
                    raise RecoverError(f"{name} was not gathered from the shards (a bug)")
                p.copy_(trained[name])
    return student


def recover(
    teacher_path: str | os.PathLike,
    student_path: str | os.PathLike,
    out: str | os.PathLike,
    calib: str | os.PathLike,
    opts: RecoverOptions | None = None,
    *,
    state_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    keep_state: bool = False,
    teacher_model: nn.Module | None = None,
    teacher_tokenizer: Any = None,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Distill ``student_path`` (a sparse24 checkpoint) from ``teacher_path`` (dense HF folder or
    .gguf) into ``out``; returns the report (also written as ``out/recover_report.json``).
    ``teacher_model``/``teacher_tokenizer`` may be given pre-loaded (the model is moved to
    ``opts.device`` and frozen, its weights are not changed). With ``opts.fsdp`` every process
    torchrun started calls this; rank 0 writes the output."""
    t_start = time.perf_counter()
    opts = opts or RecoverOptions()
    if opts.device is None:
        opts = replace(opts, device="cuda" if torch.cuda.is_available() else "cpu")
    if opts.max_minutes == 0:
        opts = replace(opts, max_minutes=None)
    opts.validate()
    out = Path(out)
    # every input path before any loading
    inputs.new_output(out, "--out", overwrite)
    if teacher_model is None:
        inputs.model_source(teacher_path, "--teacher")
    inputs.checkpoint_folder(student_path, "--student")
    check_source(calib)
    texts = evaluation_texts(opts)  # --eval-text and every --domain
    state_dir = Path(state_dir) if state_dir else out.parent / f"{out.name}.recover-state"
    state = _load_state(state_dir, opts, resume)
    parallel = _parallel(opts)
    try:
        return _recover(teacher_path, student_path, out, calib, opts, texts, parallel, state_dir, state, t_start,
                        overwrite=overwrite, keep_state=keep_state, teacher_model=teacher_model,
                        teacher_tokenizer=teacher_tokenizer, argv=argv)
    finally:
        parallel.close()


def _recover(teacher_path: str | os.PathLike, student_path: str | os.PathLike, out: Path, calib: str | os.PathLike,
             opts: RecoverOptions, texts: dict[str, Path], parallel: OneProcess, state_dir: Path,
             state: dict[str, Any] | None, t_start: float, *, overwrite: bool, keep_state: bool,
             teacher_model: nn.Module | None, teacher_tokenizer: Any, argv: list[str] | None) -> dict[str, Any]:
    from .export import write_sparse24

    if parallel.sharded:
        device = parallel.device
        opts = replace(opts, device=str(device), progress=opts.progress and parallel.rank == 0)
    else:
        device = torch.device(opts.device)
    torch.manual_seed(opts.seed)

    def load() -> tuple[Student, nn.Module, list[nn.Parameter]]:
        student = load_student(student_path)
        if teacher_model is None:
            teacher, teacher_tok = load_model(teacher_path, torch.float32)
        else:
            teacher, teacher_tok = teacher_model, teacher_tokenizer
        check_compatible(teacher, teacher_tok, teacher_path, student)
        wrap_quantized(student)
        params = _set_trainable(student, tuple(opts.train_extra))
        teacher.eval().requires_grad_(False)
        if parallel.sharded:
            params = parallel.shard(student, teacher, bf16_teacher=device.type == "cuda" and opts.amp != "none")
        else:
            teacher.to(device)
            student.model.to(device)
        return student, teacher, params

    student, teacher, params = parallel.in_turn(load) if parallel.sharded else load()
    if state is not None and state["student"] != str(student.path):
        log.warning("resuming with student %s; the state was saved for %s", student.path, state["student"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_load = time.perf_counter() - t_start

    pool, n_calib, t_gen = _data(teacher, student, calib, opts, state, device, parallel)
    eval_windows = (eval_windows_of(student.tokenizer, opts.eval_text, opts.eval_seqlen, opts.eval_windows)
                    if opts.eval_text else None)
    run = RecoveryRun(opts, teacher, student, pool, n_calib, eval_windows, device, t_start, state_dir, state,
                      seconds_before=float(state["seconds"]) if state else 0.0, parallel=parallel,
                      domain_windows=domain_windows(student.tokenizer, texts, opts.eval_seqlen, opts.eval_windows))
    if state is not None:
        run.restore_params()
    log.info("training pool: %d calibration windows + %d generated sequences of %d tokens",
             n_calib, pool.shape[0] - n_calib, opts.seqlen)
    run.set_quant(True)
    if "one_shot" not in run.domain_evals:
        run.evaluate_domains("one_shot")

    t_train = time.perf_counter()
    summary = train_global(run, params) if opts.mode == "global" else train_blocks(run)
    t_train = time.perf_counter() - t_train
    run.set_quant(True)
    final = run.evaluate(summary["steps"], summary["tokens"], final=True) if eval_windows is not None else None
    if final is not None and run.stopped_by_budget and final["perplexity"] > run.evals[0]["perplexity"]:
        raise BudgetError(f"--max-minutes {opts.max_minutes:g}: the time ran out after {summary['steps']} steps "
                          f"with perplexity {final['perplexity']:.3f}, worse than the student's "
                          f"{run.evals[0]['perplexity']:.3f}; nothing was written. Give it more minutes")
    run.evaluate_domains("recovered")

    if parallel.sharded:  # gathered on rank 0, which writes the output
        trained = parallel.trained_on_rank0(student.model)
        if parallel.rank != 0:
            parallel.barrier()
            return {}
        student = _unsharded_student(student_path, tuple(opts.train_extra), trained)
    results = _export_results(student, opts.mode)
    one_shot = {**run.domain_evals.get("one_shot", {})}
    recovered = {**run.domain_evals.get("recovered", {})}
    dense = {name: e["teacher_perplexity"] for name, e in recovered.items()}
    if final is not None:
        one_shot[EVAL_TEXT_DOMAIN], recovered[EVAL_TEXT_DOMAIN] = run.evals[0], final
        dense[EVAL_TEXT_DOMAIN] = run.teacher_eval["perplexity"]
    report: dict[str, Any] = {
        "teacher": str(teacher_path), "student": str(student_path), "out": str(out), "calib": str(calib),
        "command": " ".join(argv) if argv else None,
        "date": utc_now(),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        "machine": machine_info(), "processes": parallel.world,
        "data": {
            "seqlen": opts.seqlen, "calib_windows": n_calib, "calib_tokens": n_calib * opts.seqlen,
            "generated_sequences": pool.shape[0] - n_calib,
            "generated_tokens": (pool.shape[0] - n_calib) * (opts.seqlen - opts.gen_prompt_len),
            "generated_prompt_tokens": (pool.shape[0] - n_calib) * opts.gen_prompt_len,
        },
        "train": {**summary, "tokens_from_calib_windows": run.tokens_calib,
                  "tokens_from_generated_sequences": run.tokens_generated,
                  "stopped_by_time_budget": run.stopped_by_budget},
        "teacher_eval": run.teacher_eval, "final_eval": final, "evals": run.evals,
        "domains": domain_table(texts, one_shot, recovered, dense), "loss_curve": run.curve,
        "linears": {"sparse": sum(k == "sparse" for k in student.kinds.values()),
                    "dense": sum(k == "dense" for k in student.kinds.values()), "mask_unchanged": True},
        "seconds": {"load": round(t_load, 1), "generate": round(t_gen, 1), "train": round(t_train, 1),
                    "eval": round(run.seconds_eval, 1), "total_before_export": round(run.elapsed(), 1)},
        "peak_gpu_memory_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                                if device.type == "cuda" else None),
    }
    extra = {"recover_report.json": json.dumps(report, indent=2).encode()}
    png = plot_curves(report, f"{Path(str(student_path)).name}: recovery ({opts.mode}, {parallel.world} "
                      f"process{'es' if parallel.world > 1 else ''}), {opts.eval_windows}x{opts.eval_seqlen} "
                      "eval tokens per text")
    if png is not None:
        extra[CURVES_PNG] = png
    compress_report = dict(student.compress_report or {})
    compress_report["recovered"] = {k: report[k] for k in ("teacher", "student", "date", "options", "train")}
    write_sparse24(out, student.model, student.tokenizer, results, student.scheme, compress_report,
                   student.float_dtype, overwrite=overwrite, extra_files=extra)
    if not keep_state and state_dir.exists():
        shutil.rmtree(state_dir)
    parallel.barrier()
    if final:
        log.info("recovered %s: perplexity %.3f -> %.3f (teacher %.3f), %d tokens in %.0fs", out,
                 run.evals[0]["perplexity"], final["perplexity"], run.teacher_eval["perplexity"],
                 summary["tokens"], run.elapsed())
    return report
