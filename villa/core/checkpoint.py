"""Checkpoint I/O: self-describing checkpoints written atomically and read weights-only, RNG state, the run lock."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from villa.core.errors import VillaError
from villa.core.io import PathLike, atomic_file, pid_alive

log = logging.getLogger(__name__)


def rng_state(generator: Optional[torch.Generator] = None) -> dict[str, Any]:
    """All RNG states as tensors, ints and tuples, so checkpoints load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 - third-party code may use it
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
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


ZIP_MAGIC, PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


class CheckpointError(VillaError):
    """A file that is not a checkpoint villa reads. ``kind``: ``missing``, ``folder``, ``objects`` (it holds Python
    objects that ``weights_only`` refuses to unpickle), ``foreign`` (neither a zip archive nor a pickle) or
    ``corrupt`` (a torch file that is cut short or damaged)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def load_checkpoint(path: PathLike, what: str = "checkpoint", fix: str = "pass another file") -> dict[str, Any]:
    """``torch.load`` a checkpoint (weights only). A missing file, a folder, a file of Python objects, a file that is
    no torch file, or a corrupt one is one :class:`CheckpointError` line naming the file, what it is, and ``fix``."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a checkpoint file; {fix}", "folder")
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}; {fix}", "missing")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(ZIP_MAGIC) or magic.startswith(PICKLE_MAGIC)):
        raise CheckpointError(
            f"{what} {path} is not a torch checkpoint (neither a zip archive nor a pickle); {fix}", "foreign"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise CheckpointError(
                f"{what} {path} holds Python objects villa will not unpickle, so it is not a checkpoint villa or "
                f"open_clip wrote; {fix}",
                "objects",
            ) from None
        raise CheckpointError(f"{what} {path} is corrupt ({_reason(e)}); {fix}", "corrupt") from None
    except Exception as e:  # zip and EOF errors of a truncated or damaged file
        raise CheckpointError(f"{what} {path} is corrupt or truncated ({_reason(e)}); {fix}", "corrupt") from None
    if not isinstance(obj, dict):
        raise VillaError(f"{what} {path} holds a {type(obj).__name__}, not a checkpoint dict; pass another file")
    return obj


def _reason(e: BaseException) -> str:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if len(reason) > 160:  # cut at a word boundary, never mid-word
        reason = reason[:160].rsplit(" ", 1)[0] + " ..."
    return reason


def config_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


@contextmanager
def checkpoint_lock(ckpt_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold ``<ckpt_dir>/.lock`` (the holder's pid) while a run writes there: a second run on the same folder stops
    with one line naming the holder, instead of resuming its epoch mid-run. A lock left by a dead process is taken
    over. (Only the main process of a distributed run locks.)"""
    if not enabled:
        yield
        return
    ckpt_dir = Path(ckpt_dir)
    created = [d for d in [ckpt_dir, *ckpt_dir.parents] if not d.exists()]  # innermost first
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
            if pid and pid != os.getpid() and pid_alive(pid):
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
            for d in created:  # a run that stopped before writing leaves no folder, nor the parents it made
                if any(d.iterdir()):
                    break
                d.rmdir()
        except (OSError, ValueError):
            pass


def link_checkpoint(src: Path, dst: Path) -> None:
    """``dst`` names the same bytes as ``src``: a hard link put in place atomically (a copy where the filesystem has
    no hard links). Checkpoints are never written in place (:func:`save_checkpoint` replaces the name), so a later
    ``best.pt`` or ``last.pt`` never changes the other."""
    with atomic_file(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


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
