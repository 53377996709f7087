"""Training sequences for recovery: windows of the calibration text, and continuations the
teacher samples itself from calibration prompts (made in the same run), in a seeded order."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .calib import CalibrationError, read_text

log = logging.getLogger(__name__)


def text_windows(tokenizer: Any, source: str | os.PathLike, seqlen: int) -> torch.Tensor:
    """All non-overlapping windows [S, seqlen] of the tokenized text (file, folder or data set)."""
    text = read_text(source)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = ids.numel() // seqlen
    if n == 0:
        raise CalibrationError(f"calibration source {source}: {ids.numel()} tokens, fewer than one window "
                               f"of --seqlen {seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)


@torch.no_grad()
def generate_sequences(
    teacher: nn.Module,
    prompts_from: torch.Tensor,
    new_tokens: int,
    seqlen: int,
    *,
    prompt_len: int = 32,
    batch_size: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    eos_token_id: int | None = None,
    progress: bool = True,
    stop: Callable[[], bool] | None = None,
    rank: int = 0,
    world: int = 1,
    gather: Callable[[list[Any]], list[Any]] | None = None,
) -> torch.Tensor:
    """[G, seqlen] sequences: ``prompt_len`` tokens from random windows of ``prompts_from``
    followed by ``seqlen - prompt_len`` tokens sampled from the teacher (end-of-sequence is
    suppressed so every sequence is full), G = ceil(new_tokens / (seqlen - prompt_len)).

    Each batch of ``batch_size`` sequences is sampled with its own seed, so the result does not
    depend on how the batches are shared out: with ``world`` > 1 processes (a sharded teacher, all
    of them in every forward), process ``rank`` samples batches rank, rank + world, ... and
    ``gather`` (its list -> every process's lists, concatenated) collects them. ``stop``, asked
    before every round of ``world`` batches, ends the generation early (fewer sequences); under
    several processes it must answer the same in all of them."""
    if new_tokens <= 0:
        return torch.empty(0, seqlen, dtype=torch.long)
    if not 0 < prompt_len < seqlen:
        raise ValueError(f"prompt length {prompt_len} must be within 1..seqlen-1 ({seqlen - 1})")
    per_seq = seqlen - prompt_len
    count = -(-new_tokens // per_seq)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, prompts_from.shape[0], (count,), generator=g)
    offs = torch.randint(0, prompts_from.shape[1] - prompt_len + 1, (count,), generator=g)
    prompts = torch.stack([prompts_from[i, o : o + prompt_len] for i, o in zip(pick.tolist(), offs.tolist(),
                                                                                strict=True)])
    n_batches = -(-count // batch_size)
    mine: list[tuple[int, torch.Tensor]] = []
    use_cache = teacher.config.use_cache
    teacher.config.use_cache = True
    try:
        for first in tqdm(range(0, n_batches, world), desc="teacher generates", unit="round",
                          disable=not progress):
            if stop is not None and stop():
                log.warning("generation stopped early (time share used up) after %d of %d batches", first, n_batches)
                break
            b = first + rank
            # a process without a batch in the last round still takes part in every forward
            x = prompts[b * batch_size : (b + 1) * batch_size] if b < n_batches else prompts[:1]
            torch.manual_seed(seed * 1_000_003 + b)
            y = teacher.generate(
                input_ids=x.to(device), attention_mask=torch.ones_like(x, device=device), do_sample=True,
                temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=per_seq, min_new_tokens=per_seq,
                use_cache=True, pad_token_id=eos_token_id if eos_token_id is not None else 0,
            )
            if y.shape[1] != seqlen:
                raise RuntimeError(f"teacher generated {y.shape[1] - prompt_len} tokens, expected {per_seq}")
            if b < n_batches:
                mine.append((b, y.cpu()))
    finally:
        teacher.config.use_cache = use_cache
    done = sorted(gather(mine) if gather is not None else mine, key=lambda item: item[0])
    seqs = torch.cat([y for _, y in done]) if done else torch.empty(0, seqlen, dtype=torch.long)
    log.info("teacher generated %d sequences x %d new tokens (%d tokens)", seqs.shape[0], per_seq,
             seqs.shape[0] * per_seq)
    return seqs


class BatchOrder:
    """Indices of the sequences of each step: the pool shuffled anew each epoch (seeded), so a
    resumed run draws exactly the batches an uninterrupted one would."""

    def __init__(self, pool_size: int, batch_size: int, seed: int) -> None:
        if pool_size <= 0:
            raise ValueError("empty training pool")
        self.n, self.b, self.seed = pool_size, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def batch(self, step: int) -> torch.Tensor:
        start = step * self.b
        idx = [int(self._perm((start + j) // self.n)[(start + j) % self.n]) for j in range(self.b)]
        return torch.tensor(idx, dtype=torch.long)
