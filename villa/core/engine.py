"""What every training loop shares (Stage 1, Stage 2 and pretraining), written once:

- :class:`Stepper`: the optimisation step: gradients cleared, the loss backpropagated (through a GradScaler under
  fp16 autocast), gradients clipped (``grad_clip``; 0 = off, the original's), each optimiser stepped, then each
  per-step schedule; its state is part of every checkpoint.
- :class:`FiniteGuard`: the non-finite stop, checked every ``log_every`` steps without a host sync per step.
- :class:`LossMeter`: an epoch's mean loss, summed on the device.
- :class:`Progress` and :func:`resume_state` / :func:`restore`: resume from ``last.pt`` only when it is the same run
  (the fingerprint), with the model, optimisers, scaler, RNG and progress it recorded.
- :class:`Cadence`: which epochs end in a checkpoint (or a validation pass): every N, after M minutes, the last.
- :func:`commit_epoch`: an epoch's outputs in the order that keeps a resume truthful (``last.pt`` last).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from villa.core.checkpoint import (
    check_best_on_resume,
    link_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from villa.core.errors import VillaError
from villa.core.io import atomic_file
from villa.core.provenance import check_resume
from villa.core.runtime import Runtime
from villa.core.tracking import Tracker

log = logging.getLogger(__name__)


class Stepper:
    """One optimisation step over named optimisers (``{"optimizer": ..., "head_optimizer": ...}``, the names their
    states have in checkpoints) and per-step schedules (``{"head_scheduler": ...}``)."""

    def __init__(
        self,
        optimizers: Mapping[str, torch.optim.Optimizer],
        runtime: Runtime,
        grad_clip: float = 0.0,
        schedules: Optional[Mapping[str, Any]] = None,
    ):
        self.optimizers = dict(optimizers)
        self.schedules = dict(schedules or {})
        self.grad_clip = float(grad_clip)
        self.scaler = torch.amp.GradScaler("cuda") if runtime.amp_dtype == torch.float16 else None

    @property
    def first(self) -> torch.optim.Optimizer:
        """The main optimiser (its learning rate is the one logged)."""
        return next(iter(self.optimizers.values()))

    def step(self, loss: torch.Tensor) -> None:
        opts = list(self.optimizers.values())
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.grad_clip > 0:
            if self.scaler is not None:
                for opt in opts:
                    self.scaler.unscale_(opt)
            params = [p for opt in opts for g in opt.param_groups for p in g["params"] if p.grad is not None]
            nn.utils.clip_grad_norm_(params, self.grad_clip)
        if self.scaler is not None:
            for opt in opts:
                self.scaler.step(opt)
            self.scaler.update()
        else:
            for opt in opts:
                opt.step()
        for sched in self.schedules.values():
            sched.step()

    def state_dict(self) -> dict[str, Any]:
        state = {name: opt.state_dict() for name, opt in self.optimizers.items()}
        state.update({name: s.state_dict() for name, s in self.schedules.items()})
        state["scaler"] = self.scaler.state_dict() if self.scaler is not None else None
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, obj in [*self.optimizers.items(), *self.schedules.items()]:
            obj.load_state_dict(state[name])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


@dataclass
class Progress:
    """Where a run stands: epochs done, the best validation loss, early stopping, and the per-epoch history."""

    epoch: int = 0
    best_val: float = float("inf")
    bad_epochs: int = 0
    stopped: bool = False
    history: list = field(default_factory=list)

    def update(self, val_loss: Optional[float], patience: Optional[int] = None) -> bool:
        """Record an epoch's validation loss (None: an epoch without a validation pass); True when it improved on
        the best. With ``patience``, stop after that many epochs without improvement."""
        if val_loss is None:
            self.epoch += 1
            return False
        improved = val_loss < self.best_val
        if improved:
            self.best_val, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1
        if patience is not None:
            self.stopped = self.bad_epochs >= patience
        self.epoch += 1
        return improved

    def state(self) -> dict[str, Any]:
        return asdict(self)


def resume_state(last: Path, fingerprint: dict[str, Any], enabled: bool) -> Optional[dict[str, Any]]:
    """``last.pt`` when resuming is on and it exists, checked to be this run (else one line naming the difference)."""
    if not (enabled and last.exists()):
        return None
    state = load_checkpoint(last, "checkpoint", "delete it, or set resume=false to start over")
    check_resume(state.get("fingerprint"), fingerprint, last)
    return state


def load_module_state(module: nn.Module, state_dict: Mapping[str, Any], checkpoint: Path, what: str) -> None:
    """Strict ``load_state_dict``; a mismatch is one line naming the checkpoint."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        raise VillaError(f"{checkpoint} holds {what} ({str(e).splitlines()[0]}); set resume=false or delete it") from e


def restore(
    state: Mapping[str, Any], stepper: Stepper, generator: Optional[torch.Generator], ckpt_dir: Path
) -> Progress:
    """Optimisers, scaler, RNG and progress from a checkpoint (the model's weights are the caller's)."""
    stepper.load_state_dict(state)
    set_rng_state(state["rng"], generator)
    progress = Progress(
        epoch=state["epoch"],
        best_val=state["best_val"],
        bad_epochs=state.get("bad_epochs", 0),
        stopped=state.get("stopped", False),
        history=list(state.get("history", [])),
    )
    check_best_on_resume(state, ckpt_dir)
    return progress


def training_state(stepper: Stepper, generator: Optional[torch.Generator], progress: Progress) -> dict[str, Any]:
    """What a checkpoint needs to resume: optimisers, scaler, RNG, progress."""
    return {**stepper.state_dict(), "rng": rng_state(generator), **progress.state()}


class LossMeter:
    """Mean of the losses of an epoch: per batch (``batch``, Stage 2's original) or weighted by images per batch
    (``image``). Losses are summed on the device; reading :attr:`mean` is the one host sync."""

    def __init__(self, average: str = "image"):
        if average not in ("batch", "image"):
            raise VillaError(f"loss_average={average!r}: use batch (the original's) or image")
        self.average, self.n = average, 0
        self.total: torch.Tensor | float = 0.0

    def add(self, loss: torch.Tensor | float, images: int) -> None:
        w = 1 if self.average == "batch" else images
        value = loss.detach().double() if isinstance(loss, torch.Tensor) else loss
        self.total = self.total + value * w
        self.n += w

    @property
    def mean(self) -> float:
        return float(self.total) / max(self.n, 1)


class Cadence:
    """Which epochs end in a checkpoint or a validation pass: every ``every`` epochs, whenever ``minutes`` (0: off)
    have passed since the last one, and always the run's last epoch (Lightning's ``every_n_epochs`` and
    ``train_time_interval``). The skipped epochs cost a resume nothing but time: it restarts from the last
    checkpoint with the optimiser and RNG state of that epoch and redoes the epochs after it, the same run."""

    def __init__(self, every: int, minutes: float = 0.0):
        if every < 1:
            raise VillaError(f"every={every}: an epoch cadence is at least 1")
        self.every, self.minutes = int(every), float(minutes)
        self.since = time.monotonic()

    def due(self, epochs_done: int, last_epoch: int, stopping: bool = False) -> bool:
        """Whether the epoch that brings the count to ``epochs_done`` ends in one (and, when it does, restart the
        clock)."""
        late = self.minutes > 0 and time.monotonic() - self.since >= 60 * self.minutes
        due = epochs_done % self.every == 0 or epochs_done >= last_epoch or stopping or late
        if due:
            self.since = time.monotonic()
        return due


def _non_finite_error(value: float, step: int, epoch: int, checkpoint: Optional[Path]) -> VillaError:
    kept = f"; the last good checkpoint is {checkpoint}" if checkpoint and checkpoint.exists() else ""
    return VillaError(f"non-finite loss ({value}) at epoch {epoch} step {step}{kept}; lower lr or check inputs")


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
    ckpt_dir: Path,
    state: dict[str, Any],
    improved: bool,
    prefix: str,
    metrics: dict[str, Any],
    tracker: Optional[Tracker] = None,
    step: int = 0,
    checkpoint: bool = True,
) -> None:
    """An epoch's outputs in the order that keeps a resume truthful: ``best.pt`` (when improved), then the metrics
    (metrics.jsonl, the tracker's metrics.csv and events), then ``last.pt``, the checkpoint a resume trusts, last. A
    crash or full disk between them leaves a ``last.pt`` of the epoch before, so the resumed run redoes this epoch
    and rewrites the others. ``checkpoint=False`` (an epoch the :class:`Cadence` skips) writes the metrics and,
    when it improved, ``best.pt`` (with ``last.pt`` as its second name: the same state, so no extra write)."""
    if improved:
        save_checkpoint(ckpt_dir / "best.pt", state)
    log_epoch(prefix, metrics, ckpt_dir / "metrics.jsonl")
    if tracker is not None:
        tracker.epoch(int(metrics.get("epoch", state.get("epoch", 0))), step, metrics)
    if improved:  # the same state: ``last.pt`` becomes a second name of ``best.pt``'s file instead of a second write
        link_checkpoint(ckpt_dir / "best.pt", ckpt_dir / "last.pt")
    elif checkpoint:
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
