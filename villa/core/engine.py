"""What every training loop shares (Stage 1, Stage 2 and pretraining): the optimisation step under AMP, gradient
clipping and the non-finite guard."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch

from villa.core.checkpoint import link_checkpoint, save_checkpoint
from villa.core.errors import VillaError
from villa.core.io import atomic_file
from villa.core.tracking import Tracker

log = logging.getLogger(__name__)


def _non_finite_error(value: float, step: int, epoch: int, checkpoint: Optional[Path]) -> VillaError:
    kept = f"; the last good checkpoint is {checkpoint}" if checkpoint and checkpoint.exists() else ""
    return VillaError(f"non-finite loss ({value}) at epoch {epoch} step {step}{kept}; lower lr or check inputs")


def check_finite(loss: torch.Tensor, step: int, epoch: int, checkpoint: Optional[Path]) -> None:
    """Stop the run with a clear message on a non-finite loss (the last good checkpoint is left untouched)."""
    if not math.isfinite(loss.item()):
        raise _non_finite_error(loss.item(), step, epoch, checkpoint)


class FiniteGuard:
    """The non-finite stop without a host sync per step: losses stay on the device and are checked every ``every``
    steps (0: only at :meth:`flush`, e.g. the epoch's end). A NaN or inf still stops the run within one interval,
    and the error names the step where it first appeared; checkpoints are written only after a flush."""

    def __init__(self, every: int, epoch: int, checkpoint: Optional[Path]):
        self.every, self.epoch, self.checkpoint = every, epoch, checkpoint
        self.losses: list[torch.Tensor] = []
        self.steps: list[int] = []
        self.last: Optional[float] = None  # the last checked loss, for progress bars

    def add(self, loss: torch.Tensor, step: int) -> bool:
        """Record a step's loss; True when this step was a check (one host sync)."""
        self.losses.append(loss.detach().reshape(()))
        self.steps.append(step)
        if self.every and len(self.losses) >= self.every:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        if not self.losses:
            return
        values = torch.stack(self.losses).float()
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0, 0])
            raise _non_finite_error(float(values[i]), self.steps[i], self.epoch, self.checkpoint)
        self.last = float(values[-1])
        self.losses, self.steps = [], []


def commit_epoch(
    ckpt_dir: Path, state: dict[str, Any], improved: bool, prefix: str, metrics: dict[str, Any],
    tracker: Optional[Tracker] = None, step: int = 0,
) -> None:  # fmt: skip
    """An epoch's outputs in the order that keeps a resume truthful: ``best.pt`` (when improved), then the metrics
    (metrics.jsonl, the tracker's metrics.csv and events), then ``last.pt``, the checkpoint a resume trusts, last. A
    crash or full disk between them leaves a ``last.pt`` of the epoch before, so the resumed run redoes this epoch
    and rewrites the others."""
    if improved:
        save_checkpoint(ckpt_dir / "best.pt", state)
    log_epoch(prefix, metrics, ckpt_dir / "metrics.jsonl")
    if tracker is not None:
        tracker.epoch(int(metrics.get("epoch", state.get("epoch", 0))), step, metrics)
    if improved:  # the same state: ``last.pt`` becomes a second name of ``best.pt``'s file instead of a second write
        link_checkpoint(ckpt_dir / "best.pt", ckpt_dir / "last.pt")
    else:
        save_checkpoint(ckpt_dir / "last.pt", state)


def log_epoch(prefix: str, metrics: dict[str, Any], path: Optional[Path] = None) -> None:
    """One concise log line per epoch; the same metrics appended as one JSON line to ``path``."""
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if k != "epoch"]
    log.info("%s %s", prefix, " ".join(parts))
    if path is None:
        return
    lines = path.read_text().splitlines() if path.is_file() else []
    epoch = metrics.get("epoch")
    if epoch is not None:  # a redone epoch (a resume after a crash) replaces its line and any later ones
        kept = []
        for ln in lines:
            try:
                if json.loads(ln).get("epoch", 0) < epoch:
                    kept.append(ln)
            except (json.JSONDecodeError, AttributeError):
                continue  # a line cut by a crash
        lines = kept
    with atomic_file(path) as tmp:
        Path(tmp).write_text("".join(ln + "\n" for ln in lines) + json.dumps(metrics) + "\n")
