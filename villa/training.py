"""Training plumbing shared by Stage 1, Stage 2 and pretraining: self-describing checkpoints, RNG state, logging."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from villa.errors import VillaError
from villa.paths import PathLike, _pid_alive, atomic_file
from villa.tracking import Tracker

log = logging.getLogger(__name__)


def rng_state(generator: Optional[torch.Generator] = None) -> dict[str, Any]:
    """All RNG states as tensors, ints and tuples, so checkpoints load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 - third-party code may use it
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: Optional[torch.Generator] = None) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def save_checkpoint(path: PathLike, state: dict[str, Any]) -> None:
    """Write with torch.save to a temp file, then os.replace: a crash never leaves a half-written checkpoint."""
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """``torch.load`` a checkpoint (weights only); a missing, corrupt, truncated or non-torch file is one
    :class:`VillaError` line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise VillaError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and EOF errors all mean the same to the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if len(reason) > 160:  # cut at a word boundary, never mid-word
            reason = reason[:160].rsplit(" ", 1)[0] + " ..."
        raise VillaError(
            f"{what} {path} cannot be read ({reason}): it is corrupt, truncated or not a torch file; "
            "delete it (or set resume=false) or pass another file"
        ) from e
    if not isinstance(obj, dict):
        raise VillaError(f"{what} {path} holds a {type(obj).__name__}, not a checkpoint dict; pass another file")
    return obj


def config_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


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


@contextmanager
def checkpoint_lock(ckpt_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold ``<ckpt_dir>/.lock`` (the holder's pid) while a run writes there: a second run on the same folder stops
    with one line naming the holder, instead of resuming its epoch mid-run. A lock left by a dead process is taken
    over. (Only the main process of a distributed run locks.)"""
    if not enabled:
        yield
        return
    ckpt_dir = Path(ckpt_dir)
    created = not ckpt_dir.exists()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    lock = ckpt_dir / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(json.loads(lock.read_text()).get("pid", 0))
            except (OSError, ValueError, AttributeError):
                pid = 0
            if pid and pid != os.getpid() and _pid_alive(pid):
                raise VillaError(
                    f"{ckpt_dir} is in use by process {pid} (its .lock); wait for that run, or use another "
                    "checkpoint_dir"
                ) from None
            lock.unlink(missing_ok=True)  # a dead process's lock
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"pid": os.getpid()}))
        break
    try:
        yield
    finally:
        try:
            if json.loads(lock.read_text()).get("pid") == os.getpid():
                lock.unlink()
            if created and not any(ckpt_dir.iterdir()):  # a run that stopped before writing leaves no folder
                ckpt_dir.rmdir()
        except (OSError, ValueError):
            pass


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


def link_checkpoint(src: Path, dst: Path) -> None:
    """``dst`` names the same bytes as ``src``: a hard link put in place atomically (a copy where the filesystem has
    no hard links). Checkpoints are never written in place (:func:`save_checkpoint` replaces the name), so a later
    ``best.pt`` or ``last.pt`` never changes the other."""
    with atomic_file(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def make_tracker(cfg: DictConfig, start_epoch: int, enabled: bool = True) -> Tracker:
    """The run's :class:`villa.tracking.Tracker` in its checkpoint folder, from ``logger`` and ``wandb``."""
    return Tracker(cfg.checkpoint_dir, list(cfg.logger), config_dict(cfg), start_epoch, enabled,
                   OmegaConf.to_container(cfg.wandb), name=f"{cfg.task_name}-{Path(cfg.checkpoint_dir).name}")  # fmt: skip


def flat_scalars(tree: Any, prefix: str = "") -> dict[str, float]:
    """``{"a": {"b": 1.0}}`` -> ``{"a/b": 1.0}``: the numbers of a nested metrics dict, for the loggers."""
    if isinstance(tree, dict):
        out: dict[str, float] = {}
        for k, v in tree.items():
            out.update(flat_scalars(v, f"{prefix}{k}/"))
        return out
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix.rstrip("/"): float(tree)}
    return {}


def check_best_on_resume(state: dict[str, Any], ckpt_dir: Path) -> None:
    """A resumed run's recorded best model exists: ``best.pt`` is there and is at least as good as ``last.pt``
    records (it may be newer: an epoch whose ``last.pt`` was not written yet is redone)."""
    best_val = state.get("best_val", float("inf"))
    if best_val == float("inf"):
        return
    best = ckpt_dir / "best.pt"
    fix = "set resume=false to start over, or use a new checkpoint_dir"
    if not best.is_file():
        raise VillaError(
            f"{ckpt_dir / 'last.pt'} records a best model (val loss {best_val:.4g}) but {best} is missing; {fix}"
        )
    saved = load_checkpoint(best, "best checkpoint")
    if not saved.get("best_val", float("inf")) <= best_val + 1e-12:
        raise VillaError(
            f"{best} (val loss {saved.get('best_val')}) is not the best model {ckpt_dir / 'last.pt'} records "
            f"({best_val:.6g}); {fix}"
        )


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
