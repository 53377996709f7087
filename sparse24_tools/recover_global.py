"""``--mode global``: KL (+ SquareHead) distillation of the whole student from the dense teacher,
AdamW, warm-up then cosine decay; the time budget is fitted on the first steps."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .distill_data import BatchOrder
from .distill_loss import chunked_kl, squarehead_loss
from .model_walk import decoder_layers
from .recover_options import RecoverError
from .recover_run import RecoveryRun, lr_at

log = logging.getLogger(__name__)


class _LayerOutputs:
    """Forward hooks that keep every decoder layer's output (for SquareHead)."""

    def __init__(self, model: nn.Module) -> None:
        self.outs: list[torch.Tensor] = []
        self.hooks = [layer.register_forward_hook(self._hook) for layer in decoder_layers(model)]

    def _hook(self, _mod, _args, out) -> None:
        self.outs.append(out[0] if isinstance(out, tuple) else out)

    def take(self) -> list[torch.Tensor]:
        outs, self.outs = self.outs, []
        return outs

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _head(model: nn.Module) -> torch.Tensor:
    return model.get_output_embeddings().weight


def train_global(run: RecoveryRun, params: list[nn.Parameter]) -> dict[str, Any]:
    """KL (+ SquareHead) distillation of the whole student; returns steps and tokens done."""
    opts, dev = run.opts, run.device
    per_step = opts.batch_size * opts.seqlen
    total = opts.tokens // per_step
    start = 0
    opt = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.95), weight_decay=opts.weight_decay)
    if run.state is not None:
        opt.load_state_dict(run.state["optimizer"])
        start, total = int(run.state["step"]), int(run.state["total_steps"])
    order = BatchOrder(run.pool.shape[0], opts.batch_size, opts.seed)
    squarehead = opts.loss == "kl+squarehead"
    hooks_s = _LayerOutputs(run.student.model) if squarehead else None
    hooks_t = _LayerOutputs(run.teacher) if squarehead else None
    student, teacher = run.student.model, run.teacher
    if start == 0:
        run.set_quant(True)
        run.evaluate(0, 0)
    step_times: list[float] = []
    budget_fixed = run.state is not None or opts.max_minutes is None
    pbar = tqdm(total=total, initial=start, desc="recover (global)", unit="step", disable=not opts.progress)
    step = start
    try:
        while step < total:
            if run.budget_left() <= 0:
                log.warning("time budget reached at step %d of %d", step, total)
                run.stopped_by_budget = True
                break
            t0 = time.perf_counter()
            run.set_quant(step >= int(opts.quant_from * total))
            idx = order.batch(step)
            ids = run.pool[idx].to(dev)
            lr = lr_at(step, total, opts.lr, opts.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            with run.train_precision():
                with torch.no_grad():
                    th = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
                sh = student.model(input_ids=ids, use_cache=False).last_hidden_state
                kl, agree = chunked_kl(sh.reshape(-1, sh.shape[-1]), th.reshape(-1, th.shape[-1]),
                                       _head(student), _head(teacher), opts.vocab_chunk)
                kl_mean = kl.mean()
                loss = opts.kl_weight * kl_mean
                sq = None
                if squarehead:
                    sq = squarehead_loss(hooks_s.take(), hooks_t.take())
                    loss = loss + opts.squarehead_weight * sq
            if not torch.isfinite(loss):
                raise RecoverError(f"loss is {loss.item()} at step {step}; lower --lr")
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip) if opts.grad_clip > 0 else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.reapply_masks()
            run.count_tokens(idx)
            step += 1
            row = {"step": step, "tokens": step * per_step, "loss": loss.item(), "kl": kl_mean.item(),
                   "top1_agreement": float(agree.float().mean()), "lr": lr}
            if sq is not None:
                row["squarehead"] = sq.item()
            if gnorm is not None:
                row["grad_norm"] = float(gnorm)
            run.curve.append(row)
            pbar.update(1)
            pbar.set_postfix(loss=f"{row['loss']:.4f}", kl=f"{row['kl']:.4f}", lr=f"{lr:.2e}")
            step_times.append(time.perf_counter() - t0)
            if not budget_fixed and len(step_times) == 4:
                total = _fit_budget(run, step, total, sorted(step_times[1:])[1], opts.eval_every)
                pbar.total = total
                budget_fixed = True
            if opts.eval_every and step % opts.eval_every == 0 and step < total:
                run.set_quant(True)
                run.evaluate(step, step * per_step)
            if step % opts.save_every == 0 or step == total:
                run.save_state({"step": step, "total_steps": total, "optimizer": opt.state_dict()})
    finally:
        pbar.close()
        for h in (hooks_s, hooks_t):
            if h is not None:
                h.remove()
    return {"mode": "global", "steps": step, "planned_steps": total, "tokens": step * per_step,
            "epochs": round(step * opts.batch_size / run.pool.shape[0], 3)}


def _fit_budget(run: RecoveryRun, step: int, total: int, step_seconds: float, eval_every: int) -> int:
    """Lower ``total`` so that the remaining steps, evaluations and export fit --max-minutes."""
    left = run.budget_left()
    eval_s = run.seconds_eval / max(len(run.evals), 1)
    export_s = 10.0 + eval_s  # the final evaluation and writing the checkpoint
    # n more steps cost n * step_seconds plus an evaluation every eval_every steps
    per_step = step_seconds + (eval_s / eval_every if eval_every else 0.0)
    fit = int((left - export_s) / per_step)
    total = max(step + 1, min(total, step + fit))
    log.info("time budget %.1f min: %.2fs/step -> %d steps in all", run.opts.max_minutes, step_seconds, total)
    return total
