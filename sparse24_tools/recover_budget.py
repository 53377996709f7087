"""What a recovery run will take, and its time budget (``--max-minutes``).

Before training, a probe (forward and backward of one sequence) measures the time and memory a
step will need; the forecast (peak memory, seconds per step, steps and minutes) is logged. With a
budget, the step count (blocks: steps per layer) is fitted from the first step's time and refitted
on the next steps; the learning-rate schedule (warm-up and decay) follows the fitted count. A run
whose budget cannot hold ``MIN_STEPS`` steps, or that runs out of time while still warming up, is
refused with a BudgetError: nothing is written."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_sparse24.fsutil import proc_status

from .recover_options import RecoverError

log = logging.getLogger(__name__)

# Fewer optimizer steps than this (global: in all; blocks: per layer) do not train meaningfully: on
# SmolLM2-135M the first 6 of 12 CPU steps took perplexity from 99 to 92 (docs/recovery.md), while
# a run stopped after 2 steps was still in warm-up and came out worse than its input.
MIN_STEPS = 8
# writing the checkpoint after the final evaluation
EXPORT_SECONDS = 10.0
# steps timed before the schedule is refitted (the first of them carries one-time costs)
REFIT_AFTER = 4
_GIB = 2**30


class BudgetError(RecoverError):
    """The run cannot train meaningfully within --max-minutes (nothing is written)."""


# -- memory --------------------------------------------------------------------------------------


def _memory_gib(device: torch.device, peak: bool) -> float | None:
    """Memory in use now (or its peak): the CUDA allocator's on a CUDA device, else this process's
    resident set (Linux)."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(device) / _GIB
    kib = proc_status("VmHWM" if peak else "VmRSS")
    return None if kib is None else int(kib) / 2**20


def memory_gib(device: torch.device) -> float | None:
    return _memory_gib(device, peak=False)


def reset_peak_memory(device: torch.device) -> bool:
    """Start measuring a new peak; False where this platform cannot (then ``peak_memory_gib`` is None)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: "5" resets the peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_gib(device: torch.device) -> float | None:
    return _memory_gib(device, peak=True)


# -- the probe ------------------------------------------------------------------------------------


@dataclass
class Probe:
    """Forward and backward of one training sequence, measured before training."""

    seconds: float
    held_gib: float | None  # in use before it: models, data
    activation_gib: float | None  # what one sequence adds at its peak, gradients not counted
    trainable_gib: float  # the trainable parameters; their gradients take as much, AdamW twice

    def peak_gib(self, batch_size: int) -> float | None:
        if self.held_gib is None or self.activation_gib is None:
            return None
        return self.held_gib + 3 * self.trainable_gib + batch_size * self.activation_gib


def probe(step_once: Callable[[], None], trainable: list[torch.nn.Parameter], device: torch.device) -> Probe:
    """Time and memory of ``step_once`` (forward and backward of one sequence, leaving gradients
    in the parameters, which are dropped here: the probe trains nothing)."""
    trainable_gib = sum(p.numel() * p.element_size() for p in trainable) / _GIB
    held = memory_gib(device)
    can_peak = reset_peak_memory(device)
    t0 = time.perf_counter()
    step_once()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = peak_memory_gib(device) if can_peak else None
    for p in trainable:
        p.grad = None
    activation = None if peak is None or held is None else max(0.0, peak - held - trainable_gib)
    return Probe(seconds, held, activation, trainable_gib)


def log_forecast(p: Probe, batch_size: int, steps: int, max_minutes: float | None, device: torch.device) -> None:
    """The expected peak memory and time, before training starts."""
    what = "CUDA memory" if device.type == "cuda" else "resident memory"
    peak = p.peak_gib(batch_size)
    if peak is not None:
        log.info("expected peak %s: %.1f GiB (%.1f GiB now, gradients and AdamW state %.1f GiB, activations "
                 "%.2f GiB per sequence x %d)", what, peak, p.held_gib, 3 * p.trainable_gib, p.activation_gib,
                 batch_size)
    step_s = p.seconds * batch_size
    budget = f" before fitting them to --max-minutes {max_minutes:g}" if max_minutes is not None else ""
    log.info("expected time: one sequence forward + backward took %.2fs, so a step of %d about %.1fs (less where "
             "the device runs a batch in parallel): %d steps about %.1f min%s", p.seconds, batch_size, step_s,
             steps, steps * step_s / 60, budget)


def log_measured(step_seconds: float, device: torch.device) -> None:
    """What the first step took: its time, and the peak memory since the probe."""
    peak = peak_memory_gib(device)
    log.info("first step: %.1fs, peak %s memory so far %s", step_seconds,
             "CUDA" if device.type == "cuda" else "resident", "unknown" if peak is None else f"{peak:.1f} GiB")


# -- the budget -----------------------------------------------------------------------------------


def fit_point(step_times: list[float]) -> tuple[float, bool] | None:
    """Where the budget is fitted: (seconds per step, whether it is the first fit) after the steps
    timed so far, or None between. The first step's time fits the schedule, so that warm-up and
    decay follow it from the start; the median of the next ones, free of the first step's one-time
    costs, refits it."""
    if len(step_times) == 1:
        return step_times[0], True
    if len(step_times) == REFIT_AFTER:
        later = sorted(step_times[1:])
        return later[len(later) // 2], False
    return None


def steps_that_fit(seconds_left: float, step_seconds: float, eval_seconds: float, eval_every: int) -> int:
    """Steps that fit in ``seconds_left`` with an evaluation every ``eval_every`` steps (0: none),
    keeping time for the final evaluation and writing the checkpoint."""
    per_step = step_seconds + (eval_seconds / eval_every if eval_every else 0.0)
    return max(0, math.floor((seconds_left - EXPORT_SECONDS - eval_seconds) / per_step))


def refuse(max_minutes: float, what: str, fit: int, unit: str = "steps") -> BudgetError:
    return BudgetError(
        f"--max-minutes {max_minutes:g}: {what}, so {fit} {unit} fit, fewer than the {MIN_STEPS} a run needs to "
        "train meaningfully; nothing was written. Give it more minutes, or fewer tokens per step "
        "(--batch-size, --seqlen), or set the steps with --tokens and no --max-minutes")

