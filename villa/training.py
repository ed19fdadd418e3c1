"""Training plumbing shared by Stage 1, Stage 2 and pretraining: self-describing checkpoints, RNG state, logging."""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from villa.errors import VillaError
from villa.paths import PathLike, atomic_file

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
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
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


def log_epoch(prefix: str, metrics: dict[str, Any], path: Optional[Path] = None) -> None:
    """One concise log line per epoch; the same metrics appended as one JSON line to ``path``."""
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if k != "epoch"]
    log.info("%s %s", prefix, " ".join(parts))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
