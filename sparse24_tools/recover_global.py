"""``--mode global``: KL (+ SquareHead) distillation of the whole student from the dense teacher,
AdamW, warm-up then cosine decay; the time budget is fitted from the first step's time
(``recover_budget``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .distill_data import BatchOrder
from .distill_loss import chunked_kl, squarehead_loss
from .model_walk import decoder_layers
from .recover_budget import (
    MIN_STEPS,
    BudgetError,
    fit_point,
    log_forecast,
    log_measured,
    probe,
    refuse,
    steps_that_fit,
)
from .recover_options import RecoverError
from .recover_progress import TrainingProgress
from .recover_run import RecoveryRun, lr_at, warmup_steps

log = logging.getLogger(__name__)


class _LayerOutputs:
    """Forward hooks that keep every decoder layer's output (for SquareHead) while ``recording``
    (training forwards only: evaluations in between would pile up theirs)."""

    def __init__(self, model: nn.Module) -> None:
        self.outs: list[torch.Tensor] = []
        self.recording = False
        self.hooks = [layer.register_forward_hook(self._hook) for layer in decoder_layers(model)]

    def _hook(self, _mod, _args, out) -> None:
        if self.recording:
            self.outs.append(out[0] if isinstance(out, tuple) else out)

    def take(self) -> list[torch.Tensor]:
        outs, self.outs = self.outs, []
        return outs

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _hidden_and_head(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The final (normed) hidden states [B, T, H] and the output layer's weight [V, H], through the
    model's own forward (under FSDP it gathers the root: embeddings, final norm, output layer)
    asked for no logits: the chunked KL computes them a vocabulary slice at a time."""
    captured: list[torch.Tensor] = []
    hook = model.get_decoder().register_forward_hook(lambda _m, _a, out: captured.append(out.last_hidden_state))
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=torch.empty(0, dtype=torch.long, device=ids.device))
    finally:
        hook.remove()
    return captured[0], model.get_output_embeddings().weight


@dataclass
class _Losses:
    loss: torch.Tensor
    kl: torch.Tensor  # mean over tokens
    agree: torch.Tensor  # per token: the student's top-1 is the teacher's
    squarehead: torch.Tensor | None


class _Distill:
    """The loss of one batch: KL(teacher || student), + SquareHead with ``--loss kl+squarehead``."""

    def __init__(self, run: RecoveryRun) -> None:
        self.run = run
        squarehead = run.opts.loss == "kl+squarehead"
        # (student, teacher) layer outputs
        self.layers = (_LayerOutputs(run.student.model), _LayerOutputs(run.teacher)) if squarehead else ()

    def __call__(self, ids: torch.Tensor) -> _Losses:
        opts, student, teacher, par = self.run.opts, self.run.student.model, self.run.teacher, self.run.parallel
        for h in self.layers:
            h.recording = True
        try:
            with self.run.train_precision():
                with torch.no_grad():
                    th, head_t = _hidden_and_head(teacher, ids)
                sh, head_s = _hidden_and_head(student, ids)
                kl, agree = chunked_kl(sh.reshape(-1, sh.shape[-1]), th.reshape(-1, th.shape[-1]),
                                       head_s, head_t, opts.vocab_chunk)
                kl_mean = kl.mean()
                loss = opts.kl_weight * kl_mean
                sq = None
                if self.layers:
                    # several processes: each layer's ||t||^2 of the whole batch (see squarehead_loss)
                    sq = squarehead_loss(self.layers[0].take(), self.layers[1].take(),
                                         par.mean_tensor if par.sharded else None)
                    loss = loss + opts.squarehead_weight * sq
        finally:
            for h in self.layers:
                h.recording = False
        return _Losses(loss, kl_mean, agree, sq)

    def close(self) -> None:
        for h in self.layers:
            h.remove()


def _forecast(run: RecoveryRun, distill: _Distill, params: list[nn.Parameter], first: torch.Tensor,
              total: int) -> None:
    """Measure one sequence's forward and backward, log the expected memory and time, and refuse a
    budget that cannot hold the evaluations and MIN_STEPS steps even at one sequence's time per
    step, before the first evaluation spends it."""
    opts = run.opts
    p = probe(lambda: distill(run.pool[first[:1]].to(run.device)).loss.backward(), params, run.device)
    p.seconds = run.parallel.agree(p.seconds)  # the budget is decided alike in every process
    log_forecast(p, opts.batch_size, total, opts.max_minutes, run.device)
    if opts.max_minutes is None:
        return
    # an evaluation runs two forwards (student, teacher) per window, the probe four units (two
    # forwards and a backward worth two)
    eval_s = p.seconds / 2 * opts.eval_windows * opts.eval_seqlen / opts.seqlen if run.eval_windows is not None else 0
    fit = steps_that_fit(run.budget_left() - eval_s, p.seconds, eval_s, opts.eval_every)
    if fit < MIN_STEPS:
        raise refuse(opts.max_minutes, f"{run.budget_left():.0f}s are left after loading, one sequence's forward + "
                     f"backward takes {p.seconds:.1f}s and an evaluation about {eval_s:.0f}s", fit)


def train_global(run: RecoveryRun, params: list[nn.Parameter]) -> dict[str, Any]:
    """KL (+ SquareHead) distillation of the whole student; returns steps and tokens done."""
    opts, dev = run.opts, run.device
    per_step = opts.batch_size * opts.seqlen
    total = opts.planned_tokens() // per_step
    start = 0
    opt = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.95), weight_decay=opts.weight_decay)
    par = run.parallel
    if run.state is not None:
        run.restore_optimizer(opt)
        start, total = int(run.state["step"]), int(run.state["total_steps"])
    order = BatchOrder(run.pool.shape[0], opts.batch_size, opts.seed)
    distill = _Distill(run)
    if start == 0:
        run.set_quant(True)
        _forecast(run, distill, params, order.batch(0), total)
        run.evaluate(0, 0)
    step_times: list[float] = []
    fitting = run.state is None and opts.max_minutes is not None
    progress = TrainingProgress(run, "recover (global)", total * per_step, start * per_step)
    step = start
    try:
        while step < total:
            if run.budget_left() <= 0:
                _stop_for_budget(run, step, total)
                break
            t0 = time.perf_counter()
            run.set_quant(step >= int(opts.quant_from * total))
            idx = order.batch(step)
            lr = lr_at(step, total, opts.lr, opts.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            out = distill(run.pool[par.local(idx)].to(dev))
            if not torch.isfinite(out.loss):
                raise RecoverError(f"loss is {out.loss.item()} at step {step}; lower --lr")
            out.loss.backward()
            gnorm = par.clip_grad_norm(params, opts.grad_clip) if opts.grad_clip > 0 else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.reapply_masks()
            run.count_tokens(idx)
            step += 1
            values = par.mean([out.loss.item(), out.kl.item(), float(out.agree.float().mean())]
                              + ([out.squarehead.item()] if out.squarehead is not None else []))
            row = {"step": step, "tokens": step * per_step, "loss": values[0], "kl": values[1],
                   "top1_agreement": values[2], "lr": lr}
            if out.squarehead is not None:
                row["squarehead"] = values[3]
            if gnorm is not None:
                row["grad_norm"] = float(gnorm)
            run.curve.append(row)
            progress.advance(per_step, loss=row["loss"], kl=row["kl"], lr=f"{lr:.2e}")
            step_times.append(par.agree(time.perf_counter() - t0))
            if len(step_times) == 1:
                log_measured(step_times[0], dev)
            if fitting and (point := fit_point(step_times)):
                seconds, first = point
                total = _fit_budget(run, step, total, seconds, refuse_below=first)
                progress.replan(total * per_step)
                fitting = first
            if opts.eval_every and step % opts.eval_every == 0 and step < total:
                run.set_quant(True)
                run.evaluate(step, step * per_step)
            if step % opts.save_every == 0 or step == total:
                run.save_state({"step": step, "total_steps": total}, optimizer=opt)
    finally:
        progress.close()
        distill.close()
    return {"mode": "global", "steps": step, "planned_steps": total, "tokens": step * per_step,
            "epochs": round(step * opts.batch_size / run.pool.shape[0], 3)}


def _stop_for_budget(run: RecoveryRun, step: int, total: int) -> None:
    """The budget ran out at ``step``: refuse a run still in warm-up (its model would be no better
    than its input), else stop here, cut short in the decay."""
    warm = warmup_steps(total, run.opts.warmup)
    if step < max(warm, 1):
        raise BudgetError(f"--max-minutes {run.opts.max_minutes:g}: the time ran out after {step} of {total} steps, "
                          f"before the end of the learning rate's {max(warm, 1)}-step warm-up; nothing was written. "
                          "Give it more minutes")
    log.warning("time budget reached at step %d of %d", step, total)
    run.stopped_by_budget = True


def _fit_budget(run: RecoveryRun, step: int, total: int, step_seconds: float, refuse_below: bool) -> int:
    """The step count (at most ``total``) whose remaining steps, evaluations and export fit
    --max-minutes; with ``refuse_below`` a BudgetError when fewer than MIN_STEPS steps fit."""
    fit = step + steps_that_fit(run.budget_left(), step_seconds, run.eval_seconds(), run.opts.eval_every)
    if refuse_below and fit < MIN_STEPS:
        raise refuse(run.opts.max_minutes, f"the first step took {step_seconds:.1f}s with "
                     f"{run.budget_left():.0f}s left", fit)
    new = min(max(step + 1, MIN_STEPS, min(total, fit)), total)
    log.info("time budget %.1f min: %.2fs/step -> %d steps in all (warm-up %d), expected to end in %.1f min",
             run.opts.max_minutes, step_seconds, new, warmup_steps(new, run.opts.warmup),
             (run.elapsed() + (new - step) * step_seconds) / 60)
    return new
