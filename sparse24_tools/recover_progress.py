"""The progress line of a recovery's training loop (tqdm): tokens trained of those planned, tokens
per second and the time left at that rate, the last loss and the last evaluation."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from .recover_run import RecoveryRun


class TrainingProgress:
    """``advance(tokens, loss=...)`` after every step; ``replan(total)`` when the time budget
    changes the plan. Counts tokens, so tqdm's rate is tokens/s and its remaining time the ETA."""

    def __init__(self, run: RecoveryRun, desc: str, total_tokens: int, done_tokens: int = 0) -> None:
        self.run = run
        self.bar = tqdm(total=total_tokens, initial=done_tokens, desc=desc, unit="tok", unit_scale=True,
                        disable=not run.opts.progress, dynamic_ncols=True)

    def _last_eval(self) -> str | None:
        if not self.run.evals:
            return None
        e = self.run.evals[-1]
        return f"ppl {e['perplexity']:.2f}@{tqdm.format_sizeof(e['tokens'])}"

    def advance(self, tokens: int, **values: Any) -> None:
        shown = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in values.items()}
        last = self._last_eval()
        if last is not None:
            shown["eval"] = last
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(tokens)

    def replan(self, total_tokens: int) -> None:
        self.bar.total = total_tokens
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
