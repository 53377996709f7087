"""The state of one recovery run, shared by both training loops (``recover_global``,
``recover_blocks``): options, models and data, time budget, precision, evaluation (of the
--eval-text and of the --domain texts), the saved training state, the learning-rate schedule, and
what differs when the run is spread over several processes (:class:`OneProcess`; FSDP:
``recover_fsdp.Sharded``)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .recover_options import RecoverError, RecoverOptions
from .student import Student

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
STATE_FORMAT = 1


class OneProcess:
    """Training in this process alone: the hooks the training loop calls where a run spread over
    several processes differs (``recover_fsdp.Sharded``)."""

    sharded = False
    rank, world = 0, 1

    def local(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's share of a step's sequences."""
        return idx

    def mean(self, values: list[float]) -> list[float]:
        """Averaged over the processes (values for the curve)."""
        return values

    def mean_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def agree(self, value: float) -> float:
        """Rank 0's value: what is decided on the clock is decided alike in every process."""
        return value

    def gather(self, items: list[Any]) -> list[Any]:
        """Every process's items, concatenated."""
        return items

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class RecoveryRun:
    """Everything one recovery needs; the mode functions fill ``curve`` and ``evals``."""

    opts: RecoverOptions
    teacher: nn.Module
    student: Student
    pool: torch.Tensor  # [P, seqlen] token ids: calibration windows first, then generated
    n_calib: int  # how many of the pool's sequences are calibration windows
    eval_windows: torch.Tensor | None
    device: torch.device
    t_start: float
    state_dir: Path
    state: dict[str, Any] | None  # the saved state when resuming
    seconds_before: float = 0.0  # time spent by the interrupted run(s)
    parallel: OneProcess = field(default_factory=OneProcess)
    domain_windows: dict[str, torch.Tensor] = field(default_factory=dict)  # --domain name -> windows
    domain_evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> domain -> evaluation
    reserved_seconds: float = 0.0  # kept back from the budget for the final evaluation of the domains
    curve: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    tokens_calib: int = 0
    tokens_generated: int = 0
    seconds_eval: float = 0.0
    teacher_eval: dict[str, float] | None = None
    stopped_by_budget: bool = False

    # -- time --------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.t_start

    def budget_left(self) -> float:
        if self.opts.max_minutes is None:
            return math.inf
        return self.parallel.agree(self.opts.max_minutes * 60 - self.elapsed() - self.reserved_seconds)

    def eval_seconds(self) -> float:
        """The mean time of the evaluations so far (0 before any)."""
        return self.seconds_eval / len(self.evals) if self.evals else 0.0

    # -- precision ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def train_precision(self) -> Iterator[None]:
        """bf16 autocast (``--amp``) and TF32 matmuls on CUDA while training; evaluation runs
        in plain float32, as ``vllm-sparse24 eval`` does."""
        use_bf16 = self.opts.amp == "bf16" or (self.opts.amp == "auto" and self.device.type == "cuda")
        if self.device.type != "cuda":
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                yield
            return
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, step: int, tokens: int, **extra: Any) -> dict[str, Any] | None:
        if self.eval_windows is None:
            return None
        t0 = time.perf_counter()
        res = evaluate_pair(self.student.model, self.teacher, self.eval_windows, self.device)
        self.seconds_eval += self.parallel.agree(time.perf_counter() - t0)
        if self.teacher_eval is None:
            self.teacher_eval = {"perplexity": res.pop("teacher_perplexity")}
        else:
            res.pop("teacher_perplexity")
        row = {"step": step, "tokens": tokens, **extra, **res, "seconds": round(self.elapsed(), 1)}
        self.evals.append(row)
        log.info("eval at %d tokens: perplexity %.3f (teacher %.3f), top-1 agreement %.4f, KL %.4f",
                 tokens, res["perplexity"], self.teacher_eval["perplexity"], res["top1_agreement"], res["kl"])
        return row

    def evaluate_domains(self, stage: str) -> None:
        """Evaluate on every --domain text (``stage``: "one_shot" before training, "recovered" after)."""
        t0 = time.perf_counter()
        evals = self.domain_evals.setdefault(stage, {})
        for name, windows in self.domain_windows.items():
            res = evaluate_pair(self.student.model, self.teacher, windows, self.device)
            evals[name] = res
            log.info("domain %s (%s): perplexity %.3f (teacher %.3f), top-1 agreement %.4f", name, stage,
                     res["perplexity"], res["teacher_perplexity"], res["top1_agreement"])
        if stage == "one_shot":  # the final evaluation of the domains will take as long: keep it back
            self.reserved_seconds = self.parallel.agree(time.perf_counter() - t0)

    # -- state ---------------------------------------------------------------------------------
    def save_state(self, extra: dict[str, Any], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Write the training state atomically (a temporary file renamed over the old one; with
        several processes the parameters and optimizer state go sharded beside it)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": STATE_FORMAT, "key": self.opts.resume_key(),
            "student": str(self.student.path), "generated": self.pool[self.n_calib :].clone(),
            "curve": self.curve, "evals": self.evals, "teacher_eval": self.teacher_eval,
            "domain_evals": self.domain_evals, "reserved_seconds": self.reserved_seconds,
            "tokens_calib": self.tokens_calib, "tokens_generated": self.tokens_generated,
            "seconds": self.elapsed(), "seconds_eval": self.seconds_eval, **extra,
        }

        def write(sharded: str | None) -> None:
            tmp = self.state_dir / f".{STATE_FILE}.tmp-{os.getpid()}"
            torch.save({**doc, "sharded": sharded}, tmp)
            os.replace(tmp, self.state_dir / STATE_FILE)

        if self.parallel.sharded:
            assert optimizer is not None, "a sharded state needs its optimizer"
            self.parallel.save_state(self.state_dir, int(extra.get("step", 0)), self.student.model, optimizer, write)
            return
        doc["params"] = {n: p.detach().cpu().clone() for n, p in self.student.model.named_parameters()
                         if p.requires_grad}
        if optimizer is not None:
            doc["optimizer"] = optimizer.state_dict()
        write(None)

    def _sharded_folder(self) -> Path | None:
        assert self.state is not None
        name = self.state.get("sharded")
        if bool(name) != self.parallel.sharded:
            raise RecoverError(f"--resume: {self.state_dir} was saved by a run {'with' if name else 'without'} "
                               f"--fsdp; resume it the same way")
        return self.state_dir / name if name else None

    def restore_params(self) -> None:
        assert self.state is not None
        folder = self._sharded_folder()
        if folder is not None:
            self.parallel.load_params(folder, self.student.model)
        else:
            params = dict(self.student.model.named_parameters())
            with torch.no_grad():
                for n, t in self.state["params"].items():
                    if n not in params:
                        raise RecoverError(f"saved state {self.state_dir}: parameter {n} is not in the student")
                    params[n].copy_(t.to(params[n].device))
        self.domain_evals = dict(self.state.get("domain_evals", {}))
        self.reserved_seconds = float(self.state.get("reserved_seconds", 0.0))
        self.curve = list(self.state["curve"])
        self.evals = list(self.state["evals"])
        self.teacher_eval = self.state["teacher_eval"]
        self.tokens_calib = self.state["tokens_calib"]
        self.tokens_generated = self.state["tokens_generated"]
        self.seconds_eval = self.state["seconds_eval"]

    def restore_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        folder = self._sharded_folder()
        if folder is not None:
            self.parallel.load_optimizer(folder, self.student.model, optimizer)
        else:
            optimizer.load_state_dict(self.state["optimizer"])

    def count_tokens(self, idx: torch.Tensor) -> None:
        calib = int((idx < self.n_calib).sum())
        self.tokens_calib += calib * self.opts.seqlen
        self.tokens_generated += (idx.numel() - calib) * self.opts.seqlen

    def set_quant(self, on: bool) -> None:
        for q in self.student.qat.values():
            q.quant = on

    def reapply_masks(self) -> None:
        for q in self.student.qat.values():
            q.reapply_mask()


def warmup_steps(total: int, warmup: float) -> int:
    """The warm-up of a schedule of ``total`` steps: ceil(warmup * total), at least 1 when warmup > 0."""
    return max(1, math.ceil(warmup * total)) if warmup > 0 else 0


def lr_at(step: int, total: int, lr: float, warmup: float) -> float:
    """Linear warm-up over ``warmup_steps(total, warmup)`` steps, then cosine decay to 0 at ``total``."""
    warm = warmup_steps(total, warmup)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@torch.no_grad()
def evaluate_pair(student: nn.Module, teacher: nn.Module, windows: torch.Tensor,
                  device: torch.device, batch_size: int = 2) -> dict[str, float]:
    """Student perplexity (the arithmetic of ``vllm-sparse24 eval``: float32, full logits), the
    teacher's, the student's top-1 agreement with the teacher and mean KL(teacher || student)
    over the next-token predictions of ``windows`` [n, T]."""
    nll_s = nll_t = kl = 0.0
    agree = count = 0
    for b in range(0, windows.shape[0], batch_size):
        x = windows[b : b + batch_size].to(device)
        tgt = x[:, 1:, None]
        ls = torch.log_softmax(student(input_ids=x).logits.float()[:, :-1], dim=-1)
        lt = torch.log_softmax(teacher(input_ids=x).logits.float()[:, :-1], dim=-1)
        nll_s -= float(ls.gather(-1, tgt).sum())
        nll_t -= float(lt.gather(-1, tgt).sum())
        kl += float((lt.exp() * (lt - ls)).sum())
        agree += int((ls.argmax(-1) == lt.argmax(-1)).sum())
        count += x[:, 1:].numel()
    return {"perplexity": math.exp(nll_s / count), "teacher_perplexity": math.exp(nll_t / count),
            "top1_agreement": agree / count, "kl": kl / count, "eval_tokens": count}
