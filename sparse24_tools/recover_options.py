"""Options of ``vllm-sparse24 recover`` (no torch import: the command line is built from them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
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


class RecoverError(ValueError):
    """Inputs that recovery cannot use (names the file, tensor or layer)."""


@dataclass
class RecoverOptions:
    """Training options (the flags of ``vllm-sparse24 recover``: one field, one flag)."""

    mode: str = option("global", "global: distill the whole model; blocks: fit each decoder layer's output to the "
                       "dense layer's in turn (cheaper)", choices=MODES)
    tokens: int = option(1_000_000, "training tokens (global: in all; blocks: per decoder layer)")
    seqlen: int = option(512, "tokens per training sequence")
    batch_size: int = option(8, "sequences per optimizer step")
    lr: float = option(1e-4, "peak AdamW learning rate: linear warm-up, then cosine decay to 0")
    warmup: float = option(0.05, "warm-up, a fraction of the steps (per layer in blocks mode)")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    grad_clip: float = option(1.0, "max gradient norm (0: no clipping)")
    loss: str = option("kl", "global mode: KL(teacher||student) on the logits, optionally + SquareHead (per decoder "
                       "layer ||t-s||^2/||t||^2, mean over layers)", choices=LOSSES)
    kl_weight: float = option(1.0, "weight of the KL term")
    squarehead_weight: float = option(1.0, "weight of the SquareHead term (--loss kl+squarehead)")
    generate_tokens: int = option(0, "tokens the teacher samples itself (continuations of calibration prompts), "
                                  "added to the calibration windows as training data")
    gen_prompt_len: int = option(32, "calibration tokens that prompt each generated sequence")
    gen_batch_size: int = option(32, "sequences the teacher generates at once")
    gen_temperature: float = option(1.0, "sampling temperature of the generated text")
    gen_top_p: float = option(1.0, "nucleus sampling (1: off)")
    quant_from: float = option(0.0, "fraction of the steps trained in float before fake-quant (int8 or fp8) starts "
                               "(0: throughout)")
    train_extra: tuple[str, ...] = option((), "also train these (frozen by default): norms, embeddings (and a tied "
                                          "output layer), ignored (unquantized linears such as lm_head)",
                                          choices=EXTRAS)
    eval_text: str | None = option(None, "text file for perplexity / top-1 agreement evaluations")
    eval_every: int = option(0, "evaluate every N steps (blocks: every N layers); 0: before and after only")
    eval_windows: int = option(16, "evaluate on the first N non-overlapping windows of --eval-text (as vllm-sparse24 eval)")
    eval_seqlen: int = option(512, "tokens per evaluation window")
    block_pool_tokens: int = option(262_144, "blocks mode: tokens whose hidden states are kept on the device")
    save_every: int = option(100, "save the training state every N steps (blocks: after every layer)")
    max_minutes: float | None = option(None, "time budget for the whole run: the step count is lowered to fit it, "
                                       "measured on the first steps")
    amp: str = option("auto", "bf16 autocast while training (auto: on CUDA)", choices=AMP)
    vocab_chunk: int = option(DEFAULT_VOCAB_CHUNK, "vocabulary rows per slice of the chunked KL")
    device: str | None = option(None, "where teacher and student train, both kept there whole (default: cuda if "
                                "available, else cpu)")
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
