"""Options of ``vllm-sparse24 recover`` (no torch import: the command line is built from them).

The defaults are the recipe measured best on one GPU (docs/recovery.md): global distillation on
KL + SquareHead, the calibration text plus 1M tokens the teacher generates itself, 16 x 512 tokens
per step at lr 1e-4, as many steps as fit in 10 minutes. They are defined here only: the command
line, the Python API and the benchmark (benchmarks/recovery_smollm2.py) all take them from here."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .options import option

MODES = ("global", "blocks")
LOSSES = ("kl", "kl+squarehead")
EXTRAS = ("norms", "embeddings", "ignored")
AMP = ("auto", "bf16", "none")
# vocabulary rows per slice of the chunked KL (distill_loss.chunked_kl)
DEFAULT_VOCAB_CHUNK = 8192
# options a resumed run must share with the interrupted one
_RESUME_KEYS = ("mode", "tokens", "seqlen", "batch_size", "lr", "warmup", "weight_decay", "grad_clip",
                "loss", "kl_weight", "squarehead_weight", "generate_tokens", "gen_prompt_len",
                "gen_temperature", "gen_top_p", "quant_from", "train_extra", "block_pool_tokens", "seed")
# the name the --eval-text gets among the evaluated domains (recover_report.json's "domains")
EVAL_TEXT_DOMAIN = "eval-text"
_DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# steps planned when --tokens is not given: more than any time budget holds
_UNBOUNDED_TOKENS = 10**13


class RecoverError(ValueError):
    """Inputs that recovery cannot use (names the file, tensor or layer)."""


@dataclass
class RecoverOptions:
    """Training options (the flags of ``vllm-sparse24 recover``: one field, one flag)."""

    mode: str = option("global", "global: distill the whole model; blocks: fit each decoder layer's output to the "
                       "dense layer's in turn (cheaper)", choices=MODES)
    tokens: int | None = option(None, "training tokens (global: in all; blocks: per decoder layer); default: as many "
                                "as --max-minutes holds")
    seqlen: int = option(512, "tokens per training sequence")
    batch_size: int = option(16, "sequences per optimizer step (with --fsdp: in all, split over the processes)")
    lr: float = option(1e-4, "peak AdamW learning rate: linear warm-up, then cosine decay to 0")
    warmup: float = option(0.05, "warm-up, a fraction of the steps (per layer in blocks mode)")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    grad_clip: float = option(1.0, "max gradient norm (0: no clipping)")
    loss: str = option("kl+squarehead", "global mode: KL(teacher||student) on the logits, optionally + SquareHead (per decoder "
                       "layer ||t-s||^2/||t||^2, mean over layers)", choices=LOSSES)
    kl_weight: float = option(1.0, "weight of the KL term")
    squarehead_weight: float = option(1.0, "weight of the SquareHead term (--loss kl+squarehead)")
    generate_tokens: int = option(1_000_000, "tokens the teacher samples itself (continuations of calibration "
                                  "prompts), added to the calibration windows as training data")
    gen_prompt_len: int = option(32, "calibration tokens that prompt each generated sequence")
    gen_batch_size: int = option(256, "sequences the teacher generates at once")
    gen_max_share: float = option(0.25, "the teacher stops generating (with fewer tokens) once it has taken this "
                                  "share of --max-minutes")
    gen_temperature: float = option(1.0, "sampling temperature of the generated text")
    gen_top_p: float = option(1.0, "nucleus sampling (1: off)")
    quant_from: float = option(0.0, "fraction of the steps trained in float before fake-quant (the student's grid: int8, fp8 or w4a8) starts "
                               "(0: throughout)")
    train_extra: tuple[str, ...] = option((), "also train these (frozen by default): norms, embeddings (and a tied "
                                          "output layer), ignored (unquantized linears such as lm_head)",
                                          choices=EXTRAS)
    eval_text: str | None = option(None, "text file for perplexity / top-1 agreement evaluations")
    eval_every: int = option(250, "evaluate every N steps (blocks: every N layers); 0: before and after only")
    eval_windows: int = option(16, "evaluate on the first N non-overlapping windows of --eval-text (as vllm-sparse24 eval)")
    eval_seqlen: int = option(512, "tokens per evaluation window")
    domain: tuple[str, ...] = option((), "NAME=PATH: one more text to evaluate on before and after training (text the "
                                     "run does not train on, e.g. code or dialogue), reported per domain; repeatable",
                                     metavar="NAME=PATH", repeat=True)
    block_pool_tokens: int = option(262_144, "blocks mode: tokens whose hidden states are kept on the device")
    save_every: int = option(100, "save the training state every N steps (blocks: after every layer)")
    max_minutes: float | None = option(10.0, "time budget for the whole run: the step count is lowered to fit it, "
                                       "measured on the first steps (0: no limit, --tokens decides)")
    amp: str = option("auto", "bf16 autocast while training (auto: on CUDA)", choices=AMP)
    vocab_chunk: int = option(DEFAULT_VOCAB_CHUNK, "vocabulary rows per slice of the chunked KL")
    device: str | None = option(None, "where teacher and student train, both kept there whole (default: cuda if "
                                "available, else cpu; with --fsdp: each process's own GPU, or the CPU)")
    fsdp: bool = option(False, "global mode across the processes torchrun starts (PyTorch FSDP2): both models sharded "
                        "per decoder layer, --batch-size split over the processes")
    seed: int = option(0, "data order, generation and sampling seed")
    progress: bool = option(True, "tqdm progress bars")

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
        if self.tokens is not None and self.tokens < self.seqlen * self.batch_size:
            raise RecoverError(f"--tokens {self.tokens} is less than one batch (--batch-size {self.batch_size} "
                               f"x --seqlen {self.seqlen} = {self.batch_size * self.seqlen})")
        if not 0 <= self.quant_from < 1 or not 0 <= self.warmup < 1:
            raise RecoverError("--quant-from and --warmup are fractions of the steps within [0, 1)")
        if self.generate_tokens < 0 or self.lr <= 0 or self.save_every < 1:
            raise RecoverError("--generate-tokens must be >= 0, --lr > 0 and --save-every >= 1")
        if self.generate_tokens and not 0 < self.gen_prompt_len < self.seqlen:
            raise RecoverError(f"--gen-prompt-len {self.gen_prompt_len} must be within 1..{self.seqlen - 1}")
        if self.max_minutes is not None and self.max_minutes < 0:
            raise RecoverError("--max-minutes must be >= 0 (0: no time limit)")
        if self.tokens is None and not self.max_minutes:
            raise RecoverError("--max-minutes 0 (no time limit) needs --tokens")
        if not 0 < self.gen_max_share <= 1:
            raise RecoverError(f"--gen-max-share {self.gen_max_share} must be within (0, 1]")
        if self.fsdp and self.mode != "global":
            raise RecoverError("--fsdp trains --mode global (blocks mode trains one layer at a time on one device)")
        self.domain_paths()

    def planned_tokens(self) -> int:
        """--tokens, or more than any budget holds when it is not given (--max-minutes decides)."""
        return self.tokens if self.tokens is not None else _UNBOUNDED_TOKENS

    def domain_paths(self) -> dict[str, Path]:
        """--domain NAME=PATH as {NAME: PATH}; a malformed or repeated NAME is a RecoverError."""
        out: dict[str, Path] = {}
        for item in self.domain:
            name, sep, path = item.partition("=")
            if not sep or not path or not _DOMAIN_NAME.fullmatch(name):
                raise RecoverError(f"--domain {item!r}: expected NAME=PATH (NAME: letters, digits, '_', '.', '-')")
            if name in out or name == EVAL_TEXT_DOMAIN:
                raise RecoverError(f"--domain {item!r}: the name {name!r} is "
                                   + ("given twice" if name in out else "reserved for --eval-text"))
            out[name] = Path(path)
        return out

    def resume_key(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in _RESUME_KEYS}
