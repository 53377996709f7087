"""Options of ``vllm-sparse24 recover`` (no torch import: the command line is built from them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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


class RecoverError(ValueError):
    """Inputs that recovery cannot use (names the file, tensor or layer)."""


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
