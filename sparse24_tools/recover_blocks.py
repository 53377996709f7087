"""``--mode blocks``: block-wise reconstruction (EBFT-style), the cheap alternative to global
distillation. Model walking only; the loss is :func:`sparse24_tools.distill_loss.normalized_mse`.

Decoder layer i of the student is trained (kept weights on the student's int8, fp8 or w4a8 grid, mask fixed) so that,
fed the student's own layer-i inputs (the outputs of its already-recovered layers, computed in
the plugin's arithmetic), it reproduces the dense teacher layer's outputs on the teacher's
inputs, ||t - s||^2 / ||t||^2. Every layer trains on ``--tokens`` tokens drawn from a pool of at
most ``--block-pool-tokens`` tokens whose hidden states stay on the device. The state is saved
after every layer; a resumed run recomputes the inputs of its next layer from the saved layers.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from .architectures import architecture_of
from .distill_data import BatchOrder
from .distill_loss import normalized_mse
from .model_walk import capture_layer0_inputs, decoder_layers, layer_forward
from .recover_budget import EXPORT_SECONDS, MIN_STEPS, BudgetError, fit_point, memory_gib, refuse
from .recover_options import RecoverError
from .recover_progress import TrainingProgress
from .recover_run import RecoveryRun, lr_at, warmup_steps

log = logging.getLogger(__name__)


@torch.no_grad()
def _propagate(layer: nn.Module, x: torch.Tensor, kwargs: dict[str, Any], batch: int) -> torch.Tensor:
    out = torch.empty_like(x)
    for b in range(0, x.shape[0], batch):
        out[b : b + batch] = layer_forward(layer, x[b : b + batch], kwargs)
    return out


def train_blocks(run: RecoveryRun) -> dict[str, Any]:
    opts, dev = run.opts, run.device
    student, teacher = run.student.model, run.teacher
    layers_s, layers_t = decoder_layers(student), decoder_layers(teacher)
    arch = architecture_of(student.config)
    n_layers = len(layers_s)
    per_step = opts.batch_size * opts.seqlen
    steps = opts.planned_tokens() // per_step
    start, steps_done = 0, 0
    if run.state is not None:
        start, steps, steps_done = (int(run.state[k]) for k in ("layer", "steps_per_layer", "steps_done"))

    g = torch.Generator().manual_seed(opts.seed)
    n_pool = min(run.pool.shape[0], max(opts.batch_size, opts.block_pool_tokens // opts.seqlen))
    sel = torch.randperm(run.pool.shape[0], generator=g)[:n_pool].sort().values
    samples = [run.pool[i : i + 1] for i in sel.tolist()]
    with run.train_precision():
        xt, layer_kwargs = capture_layer0_inputs(teacher, samples, dev)
        xs, _ = capture_layer0_inputs(student, samples, dev)
    teacher.to(dev)  # capture_layer0_inputs sends the embeddings back to the CPU
    student.to(dev)
    mem = memory_gib(dev)
    log.info("blocks: %d sequences x %d tokens of hidden states on %s (%.2f GiB, three copies); %d steps per "
             "layer; memory in use %s", n_pool, opts.seqlen, dev, 3 * xs.numel() * xs.element_size() / 2**30,
             steps, "unknown" if mem is None else f"{mem:.1f} GiB")

    if start == 0:
        run.set_quant(True)
        run.evaluate(0, 0, layers_done=0)
    if opts.max_minutes is not None and run.budget_left() <= EXPORT_SECONDS + run.eval_seconds():
        raise refuse(opts.max_minutes, f"{run.budget_left():.0f}s are left after loading, the hidden states and the "
                     "first evaluation", 0, "steps per layer")
    fitting = run.state is None and opts.max_minutes is not None
    progress = TrainingProgress(run, "recover (blocks)", steps * n_layers * per_step, steps_done * per_step)
    layer_seconds: list[float] = []  # each trained layer: its teacher forward, training, student forward
    for i in range(n_layers):
        t_layer = time.perf_counter()
        ls, lt, kwargs, name = layers_s[i], layers_t[i], layer_kwargs[i], arch.layer_prefix(i)
        with run.train_precision():
            yt = _propagate(lt, xt, kwargs, opts.batch_size)
        if i < start:  # trained before the interruption: only recompute its outputs
            run.set_quant(True)
            with run.train_precision():
                xs = _propagate(ls, xs, kwargs, opts.batch_size)
            xt = yt
            continue
        params = [p for p in ls.parameters() if p.requires_grad]
        if not params:
            raise RecoverError(f"{name}: no trainable parameter (all its linears are ignored?)")
        opt = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.95), weight_decay=opts.weight_decay)
        order = BatchOrder(n_pool, opts.batch_size, opts.seed + 7919 * (i + 1))
        first = last = None
        step_times: list[float] = []
        step = 0
        while step < steps:
            if run.budget_left() <= 0:
                if i == start and step < max(1, warmup_steps(steps, opts.warmup)):
                    raise BudgetError(f"--max-minutes {opts.max_minutes:g}: the time ran out in the first layer's "
                                      f"learning-rate warm-up (step {step} of {steps}); nothing was written. "
                                      "Give it more minutes")
                run.stopped_by_budget = True
                break
            t0 = time.perf_counter()
            run.set_quant(step >= int(opts.quant_from * steps))
            idx = order.batch(step)
            lr = lr_at(step, steps, opts.lr, opts.warmup)
            for grp in opt.param_groups:
                grp["lr"] = lr
            with run.train_precision():
                out = layer_forward(ls, xs[idx.to(xs.device)], kwargs)
                loss = normalized_mse(out, yt[idx.to(yt.device)])
            if not torch.isfinite(loss):
                raise RecoverError(f"{name}: loss is {loss.item()} at step {step}; lower --lr")
            loss.backward()
            if opts.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.reapply_masks()
            run.count_tokens(sel[idx])
            step += 1
            steps_done += 1
            value = loss.item()
            first = value if first is None else first
            last = value
            if step == 1 or step == steps or step % max(1, steps // 20) == 0:
                run.curve.append({"layer": i, "step": step, "loss": value, "lr": lr})
            progress.advance(per_step, layer=i, step=f"{step}/{steps}", loss=value)
            step_times.append(time.perf_counter() - t0)
            if fitting and (point := fit_point(step_times)):
                seconds, first_fit = point  # (not `first`: the first loss, logged below)
                steps = _fit_budget_blocks(run, i, n_layers, step, steps, seconds,
                                           time.perf_counter() - t_layer - sum(step_times), refuse_below=first_fit)
                progress.replan(n_layers * steps * per_step)
                fitting = first_fit
        if run.stopped_by_budget:
            log.warning("time budget reached in layer %d (step %d of %d)", i, step, steps)
        log.info("%s: normalized MSE %.5f -> %.5f in %d steps", name, first or 0, last or 0, step)
        run.set_quant(True)
        with run.train_precision():
            xs = _propagate(ls, xs, kwargs, opts.batch_size)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        layer_seconds.append(round(time.perf_counter() - t_layer, 3))
        xt = yt
        tokens_equiv = steps_done * per_step // n_layers
        if opts.eval_every and (i + 1) % opts.eval_every == 0 and i + 1 < n_layers:
            run.evaluate(steps_done, tokens_equiv, layers_done=i + 1)
        run.save_state({"layer": i + 1, "steps_per_layer": steps, "steps_done": steps_done})
        if run.stopped_by_budget:
            break
    progress.close()
    return {"mode": "blocks", "steps": steps_done, "steps_per_layer": steps, "tokens": steps_done * per_step // n_layers,
            "tokens_per_layer": steps * per_step, "pool_sequences": n_pool, "layers": n_layers,
            "layer_seconds": layer_seconds}


def _fit_budget_blocks(run: RecoveryRun, layer: int, n_layers: int, step: int, steps: int,
                       step_seconds: float, setup_seconds: float, refuse_below: bool) -> int:
    """Steps per layer so that the remaining layers, evaluations and export fit --max-minutes
    (``setup_seconds``: the teacher layer's forward over the pool; the student's after training
    costs about as much); with ``refuse_below`` a BudgetError when fewer than MIN_STEPS fit."""
    left = run.budget_left()
    eval_s = run.eval_seconds()
    n_evals = (n_layers - layer) // run.opts.eval_every if run.opts.eval_every else 0
    layers_left = n_layers - layer
    spare = left - EXPORT_SECONDS - eval_s * (n_evals + 1) - 2 * setup_seconds * layers_left + step * step_seconds
    fit = max(0, int(spare / (layers_left * step_seconds)))
    if refuse_below and fit < MIN_STEPS:
        raise refuse(run.opts.max_minutes, f"a step took {step_seconds:.2f}s and each layer {setup_seconds:.1f}s "
                     f"besides, for {layers_left} layers in the {left:.0f}s left", fit, "steps per layer")
    new = max(step + 1, min(steps, max(fit, MIN_STEPS)))
    log.info("time budget %.1f min: %.3fs/step, %.1fs per layer besides -> %d steps per layer (warm-up %d)",
             run.opts.max_minutes, step_seconds, setup_seconds, new, warmup_steps(new, run.opts.warmup))
    return new
