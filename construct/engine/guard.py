"""The non-finite-loss guard of training: checked every step (eager) or on the device (fast path)."""

from __future__ import annotations

from pathlib import Path

import torch

from construct.errors import ConStructError


class TrainingError(ConStructError):
    """Training cannot go on (a non-finite loss, an incompatible resume, a reused work dir)."""


class FiniteLossGuard:
    """Stops training on a non-finite total loss, naming the iteration and the last good checkpoint.

    Eager (``deferred=False``): :meth:`check` reads the loss on the host every step, before the
    update. Deferred (the fast path): :meth:`check` only records, on the device, the first
    iteration whose loss was not finite and its terms, so the step needs no host sync;
    :meth:`raise_if_seen`, called where the trainer syncs anyway (log lines, validation,
    checkpoints, the end), raises the same error. Updates after the bad iteration reach only the
    weights in memory: every checkpoint is written after a :meth:`raise_if_seen`, so the last one
    on disk predates the bad iteration.
    """

    def __init__(self, work_dir: Path, deferred: bool) -> None:
        self.work_dir = work_dir
        self.deferred = deferred
        self.first_bad: torch.Tensor | None = None
        """0-dim int64 on the device: the first non-finite iteration, 0 while there is none."""
        self.bad_terms: torch.Tensor | None = None
        self.term_names: list[str] = []

    def check(self, losses: dict[str, torch.Tensor], iteration: int) -> None:
        """Look at ``losses`` (with ``total``) of ``iteration`` (counted from 1)."""
        total = losses["total"].detach()
        if not self.deferred:
            if not torch.isfinite(total):
                raise self._error(iteration, {name: float(value.detach()) for name, value in losses.items()})
            return
        values = torch.stack([value.detach().float() for value in losses.values()])
        if self.first_bad is None:
            self.term_names = list(losses)
            self.first_bad = torch.zeros((), dtype=torch.int64, device=total.device)
            self.bad_terms = torch.zeros_like(values)
        first = ~torch.isfinite(total) & (self.first_bad == 0)
        self.first_bad = torch.where(first, torch.full_like(self.first_bad, iteration), self.first_bad)
        self.bad_terms = torch.where(first, values, self.bad_terms)

    def raise_if_seen(self) -> None:
        """Raise for the first non-finite iteration recorded so far (a host sync); eager: nothing to do."""
        if self.first_bad is None:
            return
        iteration = int(self.first_bad)
        if iteration:
            assert self.bad_terms is not None
            raise self._error(iteration, dict(zip(self.term_names, self.bad_terms.tolist())))

    def _error(self, iteration: int, terms: dict[str, float]) -> TrainingError:
        described = ", ".join(f"{name}={value:.4g}" for name, value in terms.items())
        kept = self.work_dir / "latest.pth"
        return TrainingError(
            f"loss is not finite at iteration {iteration} ({described}); stopped. "
            + (f"The last good checkpoint is {kept}" if kept.exists() else "No checkpoint was written yet")
        )
