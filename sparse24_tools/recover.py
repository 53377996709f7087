"""``python -m sparse24_tools recover``: accuracy recovery of a 2:4 W8A8 checkpoint by distillation from
its dense teacher, with the 2:4 mask fixed and the arithmetic of the plugin (int8 or fp8) in the forward.

Orchestration only: the losses are in :mod:`sparse24_tools.distill_loss`, the quantization-aware linear
in :mod:`sparse24_tools.qat`, the student loading in :mod:`sparse24_tools.student`, the training data in
:mod:`sparse24_tools.distill_data` and the block-wise mode in :mod:`sparse24_tools.block_recon`.

Modes:

* ``global``: the whole student is trained on KL(teacher || student) of the next-token
  distributions (optionally + SquareHead on every decoder layer's output), AdamW, warm-up then
  cosine decay;
* ``blocks``: each decoder layer in turn is fitted to the dense layer's output (EBFT-style
  block-wise reconstruction): cheaper, no output-layer cost, one layer's memory.

Every quantized linear trains its kept weights on the student's grid, int8 or fp8 (``QATLinear``); pruned weights
stay 0 and the exported bitmask is the student's bit for bit. The result is written in the
compressor's format (``sparse24_tools.export.write_sparse24``, atomically) with ``recover_report.json``
and ``recover_perplexity.png`` beside it. The training state is saved every ``save_every`` steps
(blocks: every layer) into ``OUT.recover-state`` so that ``resume`` continues an interrupted run.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .calib import read_text
from .distill_data import BatchOrder, generate_sequences, text_windows
from .distill_loss import DEFAULT_VOCAB_CHUNK, chunked_kl, squarehead_loss
from .group import LinearResult
from .model_walk import decoder_layers, load_model
from .student import RecoverError, Student, check_compatible, load_student, wrap_quantized

log = logging.getLogger(__name__)

MODES = ("global", "blocks")
LOSSES = ("kl", "kl+squarehead")
EXTRAS = ("norms", "embeddings", "ignored")
AMP = ("auto", "bf16", "none")
STATE_FILE = "state.pt"
STATE_FORMAT = 1
# options a resumed run must share with the interrupted one
_RESUME_KEYS = ("mode", "tokens", "seqlen", "batch_size", "lr", "warmup", "weight_decay", "grad_clip",
                "loss", "kl_weight", "squarehead_weight", "generate_tokens", "gen_prompt_len",
                "gen_temperature", "gen_top_p", "quant_from", "train_extra", "block_pool_tokens", "seed")

__all__ = ["RecoverError", "RecoverOptions", "recover", "plot_perplexity"]


@dataclass
class RecoverOptions:
    """Training options (the CLI flags of ``python -m sparse24_tools recover``)."""

    mode: str = "global"
    tokens: int = 1_000_000  # global: tokens trained on; blocks: tokens each layer trains on
    seqlen: int = 512
    batch_size: int = 8
    lr: float = 1e-4
    warmup: float = 0.05  # fraction of the steps (per layer in blocks mode)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss: str = "kl"
    kl_weight: float = 1.0
    squarehead_weight: float = 1.0
    generate_tokens: int = 0
    gen_prompt_len: int = 32
    gen_batch_size: int = 32
    gen_temperature: float = 1.0
    gen_top_p: float = 1.0
    quant_from: float = 0.0  # fraction of the steps trained in float before fake-quant starts
    train_extra: tuple[str, ...] = ()
    eval_text: str | None = None
    eval_every: int = 0  # global: steps; blocks: layers; 0: before and after only
    eval_windows: int = 16
    eval_seqlen: int = 512
    block_pool_tokens: int = 262_144
    save_every: int = 100
    max_minutes: float | None = None
    amp: str = "auto"
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK
    device: str = "cpu"
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if self.mode not in MODES:
            raise RecoverError(f"unknown --mode {self.mode!r}; choose from {MODES}")
        if self.loss not in LOSSES:
            raise RecoverError(f"unknown --loss {self.loss!r}; choose from {LOSSES}")
        if self.amp not in AMP:
            raise RecoverError(f"unknown --amp {self.amp!r}; choose from {AMP}")
        bad = [e for e in self.train_extra if e not in EXTRAS]
        if bad:
            raise RecoverError(f"unknown --train-extra {bad}; choose from {EXTRAS}")
        if self.seqlen < 2 or self.batch_size < 1:
            raise RecoverError(f"--seqlen must be >= 2 and --batch-size >= 1 (got {self.seqlen}, {self.batch_size})")
        if self.tokens < self.seqlen * self.batch_size:
            raise RecoverError(f"--tokens {self.tokens} is less than one batch (--batch-size {self.batch_size} "
                               f"x --seqlen {self.seqlen} = {self.batch_size * self.seqlen})")
        if not 0 <= self.quant_from < 1 or not 0 <= self.warmup < 1:
            raise RecoverError("--quant-from and --warmup are fractions of the steps within [0, 1)")
        if self.generate_tokens < 0 or self.lr <= 0 or self.save_every < 1:
            raise RecoverError("--generate-tokens must be >= 0, --lr > 0 and --save-every >= 1")
        if self.generate_tokens and not 0 < self.gen_prompt_len < self.seqlen:
            raise RecoverError(f"--gen-prompt-len {self.gen_prompt_len} must be within 1..{self.seqlen - 1}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise RecoverError("--max-minutes must be > 0")

    def resume_key(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in _RESUME_KEYS}


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
        return self.opts.max_minutes * 60 - self.elapsed()

    # -- precision ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def train_precision(self) -> Iterator[None]:
        """bf16 autocast (``--amp``) and TF32 matmuls on CUDA while training; evaluation runs
        in plain float32, as ``offline eval`` does."""
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
        self.seconds_eval += time.perf_counter() - t0
        if self.teacher_eval is None:
            self.teacher_eval = {"perplexity": res.pop("teacher_perplexity")}
        else:
            res.pop("teacher_perplexity")
        row = {"step": step, "tokens": tokens, **extra, **res, "seconds": round(self.elapsed(), 1)}
        self.evals.append(row)
        log.info("eval at %d tokens: perplexity %.3f (teacher %.3f), top-1 agreement %.4f, KL %.4f",
                 tokens, res["perplexity"], self.teacher_eval["perplexity"], res["top1_agreement"], res["kl"])
        return row

    # -- state ---------------------------------------------------------------------------------
    def save_state(self, extra: dict[str, Any]) -> None:
        """Write the training state atomically (a temporary file renamed over the old one)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": STATE_FORMAT, "key": self.opts.resume_key(),
            "student": str(self.student.path), "generated": self.pool[self.n_calib :].clone(),
            "params": {n: p.detach().cpu().clone() for n, p in self.student.model.named_parameters()
                       if p.requires_grad},
            "curve": self.curve, "evals": self.evals, "teacher_eval": self.teacher_eval,
            "tokens_calib": self.tokens_calib, "tokens_generated": self.tokens_generated,
            "seconds": self.elapsed(), "seconds_eval": self.seconds_eval, **extra,
        }
        tmp = self.state_dir / f".{STATE_FILE}.tmp-{os.getpid()}"
        torch.save(doc, tmp)
        os.replace(tmp, self.state_dir / STATE_FILE)

    def restore_params(self) -> None:
        assert self.state is not None
        params = dict(self.student.model.named_parameters())
        with torch.no_grad():
            for n, t in self.state["params"].items():
                if n not in params:
                    raise RecoverError(f"saved state {self.state_dir}: parameter {n} is not in the student")
                params[n].copy_(t.to(params[n].device))
        self.curve = list(self.state["curve"])
        self.evals = list(self.state["evals"])
        self.teacher_eval = self.state["teacher_eval"]
        self.tokens_calib = self.state["tokens_calib"]
        self.tokens_generated = self.state["tokens_generated"]
        self.seconds_eval = self.state["seconds_eval"]

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


def lr_at(step: int, total: int, lr: float, warmup: float) -> float:
    """Linear warm-up over ceil(warmup * total) steps, then cosine decay to 0 at ``total``."""
    warm = max(1, math.ceil(warmup * total)) if warmup > 0 else 0
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@torch.no_grad()
def evaluate_pair(student: nn.Module, teacher: nn.Module, windows: torch.Tensor,
                  device: torch.device, batch_size: int = 2) -> dict[str, float]:
    """Student perplexity (the arithmetic of ``offline eval``: float32, full logits), the
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


def _check_text_file(path: str | os.PathLike, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise RecoverError(f"{what} {p}: not a file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise RecoverError(f"{what} {p}: empty")
    return text


def eval_windows_of(tokenizer: Any, text_file: str | os.PathLike, seqlen: int, windows: int) -> torch.Tensor:
    """The first ``windows`` non-overlapping windows, as ``sparse24_tools.evaluate.perplexity`` takes them."""
    p = Path(text_file)
    text = _check_text_file(p, "--eval-text")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = min(windows, ids.numel() // seqlen)
    if n == 0:
        raise RecoverError(f"--eval-text {p}: {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)


def plot_perplexity(series: list[dict[str, Any]], png: str | os.PathLike | io.BytesIO, title: str,
                    dense_ppl: float | None = None) -> bool:
    """Perplexity vs training tokens, one line per ``{"label", "tokens", "perplexity"}``
    series (log y). Returns False (and logs) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no perplexity plot")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in series:
        ax.plot(s["tokens"], s["perplexity"], marker="o", markersize=3, label=s["label"])
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="#777", linestyle="--", label=f"dense teacher {dense_ppl:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (blocks mode: tokens per layer x layers done / layers)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if isinstance(png, io.BytesIO):
        fig.savefig(png, format="png", dpi=120)
    else:
        tmp = Path(str(png) + ".tmp.png")
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, png)
    plt.close(fig)
    return True


# -- setup -------------------------------------------------------------------------------------


def _set_trainable(student: Student, extras: tuple[str, ...]) -> list[nn.Parameter]:
    model = student.model
    for p in model.parameters():
        p.requires_grad_(False)
    for q in student.qat.values():
        q.weight.requires_grad_(True)
    if "embeddings" in extras:
        model.get_input_embeddings().weight.requires_grad_(True)
    quantized = set(student.qat)
    for name, mod in model.named_modules():
        if "norms" in extras and "norm" in name.rsplit(".", 1)[-1] and hasattr(mod, "weight"):
            mod.weight.requires_grad_(True)
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
          state: dict[str, Any] | None, device: torch.device) -> tuple[torch.Tensor, int, float]:
    windows = text_windows(student.tokenizer, calib, opts.seqlen)
    t0 = time.perf_counter()
    if state is not None:
        generated = state["generated"]
    else:
        eos = student.tokenizer.eos_token_id
        generated = generate_sequences(
            teacher, windows, opts.generate_tokens, opts.seqlen, prompt_len=opts.gen_prompt_len,
            batch_size=opts.gen_batch_size, temperature=opts.gen_temperature, top_p=opts.gen_top_p,
            seed=opts.seed, device=device, eos_token_id=eos, progress=opts.progress,
        )
    return torch.cat([windows, generated]), windows.shape[0], time.perf_counter() - t0


# -- the public entry point -----------------------------------------------------------------


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
    ``opts.device`` and frozen, its weights are not changed)."""
    from .compare import machine_info
    from .export import write_sparse24

    t_start = time.perf_counter()
    opts = opts or RecoverOptions()
    opts.validate()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    state_dir = Path(state_dir) if state_dir else out.parent / f"{out.name}.recover-state"
    state = _load_state(state_dir, opts, resume)
    read_text(calib)  # a missing or empty calibration text fails here, before any loading
    if opts.eval_text is not None:
        _check_text_file(opts.eval_text, "--eval-text")
    device = torch.device(opts.device)
    torch.manual_seed(opts.seed)

    student = load_student(student_path)
    if teacher_model is None:
        teacher, teacher_tok = load_model(teacher_path, torch.float32)
    else:
        teacher, teacher_tok = teacher_model, teacher_tokenizer
    check_compatible(teacher, teacher_tok, teacher_path, student)
    if state is not None and state["student"] != str(student.path):
        log.warning("resuming with student %s; the state was saved for %s", student.path, state["student"])
    wrap_quantized(student)
    params = _set_trainable(student, tuple(opts.train_extra))
    teacher.eval().requires_grad_(False)
    teacher.to(device)
    student.model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_load = time.perf_counter() - t_start

    pool, n_calib, t_gen = _data(teacher, student, calib, opts, state, device)
    eval_windows = (eval_windows_of(student.tokenizer, opts.eval_text, opts.eval_seqlen, opts.eval_windows)
                    if opts.eval_text else None)
    run = RecoveryRun(opts, teacher, student, pool, n_calib, eval_windows, device, t_start, state_dir, state,
                      seconds_before=float(state["seconds"]) if state else 0.0)
    if state is not None:
        run.restore_params()
    log.info("training pool: %d calibration windows + %d generated sequences of %d tokens",
             n_calib, pool.shape[0] - n_calib, opts.seqlen)

    t_train = time.perf_counter()
    if opts.mode == "global":
        summary = train_global(run, params)
    else:
        from .block_recon import train_blocks

        summary = train_blocks(run)
    t_train = time.perf_counter() - t_train
    run.set_quant(True)
    final = run.evaluate(summary["steps"], summary["tokens"], final=True) if eval_windows is not None else None

    results: dict[str, LinearResult] = {}
    for prefix, q in student.qat.items():
        codes, scale = q.export()
        mask = q.bool_mask()
        if mask is not None and not torch.equal(mask, student.masks[prefix]):
            raise RecoverError(f"{prefix}: the mask changed during training (a bug)")
        results[prefix] = LinearResult(
            name=prefix, kind=student.kinds[prefix], method=f"recover-{opts.mode}", q=codes, scale=scale,
            err_before=float("nan"), err_after=float("nan"), seconds=0.0, mask=mask,
        )

    report: dict[str, Any] = {
        "teacher": str(teacher_path), "student": str(student_path), "out": str(out), "calib": str(calib),
        "command": " ".join(argv) if argv else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        "machine": machine_info(),
        "data": {
            "seqlen": opts.seqlen, "calib_windows": n_calib, "calib_tokens": n_calib * opts.seqlen,
            "generated_sequences": pool.shape[0] - n_calib,
            "generated_tokens": (pool.shape[0] - n_calib) * (opts.seqlen - opts.gen_prompt_len),
            "generated_prompt_tokens": (pool.shape[0] - n_calib) * opts.gen_prompt_len,
        },
        "train": {**summary, "tokens_from_calib_windows": run.tokens_calib,
                  "tokens_from_generated_sequences": run.tokens_generated,
                  "stopped_by_time_budget": run.stopped_by_budget},
        "teacher_eval": run.teacher_eval, "final_eval": final, "evals": run.evals, "loss_curve": run.curve,
        "linears": {"sparse": sum(k == "sparse" for k in student.kinds.values()),
                    "dense": sum(k == "dense" for k in student.kinds.values()), "mask_unchanged": True},
        "seconds": {"load": round(t_load, 1), "generate": round(t_gen, 1), "train": round(t_train, 1),
                    "eval": round(run.seconds_eval, 1), "total_before_export": round(run.elapsed(), 1)},
        "peak_gpu_memory_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                                if device.type == "cuda" else None),
    }
    extra = {"recover_report.json": json.dumps(report, indent=2).encode()}
    if run.evals:
        buf = io.BytesIO()
        series = [{"label": f"{opts.mode} recovery", "tokens": [e["tokens"] for e in run.evals],
                   "perplexity": [e["perplexity"] for e in run.evals]}]
        title = f"{Path(str(student_path)).name}: recovery ({opts.mode}), {eval_windows.shape[0]}x{opts.eval_seqlen} eval tokens"
        if plot_perplexity(series, buf, title, (run.teacher_eval or {}).get("perplexity")):
            extra["recover_perplexity.png"] = buf.getvalue()
    compress_report = dict(student.compress_report or {})
    compress_report["recovered"] = {k: report[k] for k in ("teacher", "student", "date", "options", "train")}
    write_sparse24(out, student.model, student.tokenizer, results, student.scheme, compress_report,
                   student.float_dtype, overwrite=overwrite, extra_files=extra)
    if not keep_state and state_dir.exists():
        shutil.rmtree(state_dir)
    if final:
        log.info("recovered %s: perplexity %.3f -> %.3f (teacher %.3f), %d tokens in %.0fs", out,
                 run.evals[0]["perplexity"], final["perplexity"], run.teacher_eval["perplexity"],
                 summary["tokens"], run.elapsed())
    return report


# -- global mode -------------------------------------------------------------------------------


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
