"""Experiment tracking: the ``logger`` option of Stage 1, Stage 2 and pretraining.

    python -m villa.stage2 experiment=docmnist_villa logger=[csv,tensorboard,wandb]

- ``csv`` (always on): ``<checkpoint_dir>/metrics.csv``, one row per logged step (``kind=step``: loss, lr,
  temperature, throughput) and per epoch (``kind=epoch``: train and val loss, and what the run computes at its end,
  e.g. Stage 1's mapping F1). Rewritten whole (temp file and rename) at each epoch's commit, before ``last.pt``: a
  resumed run drops the rows of the epoch it redoes, so the file is the run's, once.
- ``tensorboard``: event files in ``<checkpoint_dir>/tensorboard`` (the ``tensorboard`` package's writer via
  ``torch.utils.tensorboard``); a resume purges the events from the redone epoch on (``purge_step``).
- ``wandb``: Weights & Biases, ``wandb.mode=offline`` by default: nothing touches the network (no hang, no retries
  when offline), the run lands in ``<checkpoint_dir>/wandb`` for ``wandb sync`` later; ``wandb.mode=online`` to
  stream.

Only rank 0 of a distributed run writes. Names are ``train/loss``, ``train/lr``, ``train/temperature``,
``train/images_per_s`` per step, ``epoch/<metric>`` per epoch, ``final/<metric>`` at the end.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from villa.core.checkpoint import config_dict
from villa.core.errors import VillaError
from villa.core.io import atomic_file
from villa.core.schemas import LOGGERS

log = logging.getLogger(__name__)

FIXED = ("kind", "epoch", "step")  # the CSV's first columns


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """Writes a run's metrics to every chosen logger; a no-op on ranks other than 0 (``enabled=False``).

    ``start_epoch``: the epoch a resumed run continues from (rows and events of later epochs are dropped)."""

    def __init__(
        self,
        run_dir: str | Path,
        loggers: Sequence[str] = ("csv",),
        config: Optional[dict[str, Any]] = None,
        start_epoch: int = 0,
        enabled: bool = True,
        wandb_options: Optional[dict[str, Any]] = None,
        name: str = "run",
    ):
        loggers = list(loggers or [])
        unknown = [x for x in loggers if x not in LOGGERS]
        if unknown:
            raise VillaError(
                f"logger={unknown[0]!r}: use a list of {', '.join(LOGGERS)}, e.g. logger=[csv,tensorboard]"
            )
        self.enabled = enabled
        self.dir = Path(run_dir)
        self.path = self.dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self.tb = self.wandb = None
        if not enabled:
            return
        if start_epoch and self.path.is_file():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if r.get("epoch") and int(float(r["epoch"])) <= start_epoch]
        elif self.path.is_file():
            self.path.unlink()  # a fresh run (resume=false or a new fingerprint) starts a new file
        if "tensorboard" in loggers:
            self.tb = _tensorboard(self.dir / "tensorboard", purge_step=self._last_step() + 1 if start_epoch else None)
        if "wandb" in loggers:
            self.wandb = _wandb(self.dir, config or {}, name, wandb_options or {})

    def _last_step(self) -> int:
        return max((int(float(r["step"])) for r in self.rows if r.get("step") not in (None, "")), default=-1)

    def step(self, epoch: int, step: int, metrics: dict[str, Any]) -> None:
        """Per ``log_every`` steps: ``step`` counts optimizer steps over the whole run."""
        if not self.enabled:
            return
        m = _scalars(metrics)
        self.rows.append({"kind": "step", "epoch": epoch, "step": step, **m})
        self._send({f"train/{k}": v for k, v in m.items()}, step)

    def epoch(self, epoch: int, step: int, metrics: dict[str, Any]) -> None:
        """An epoch's metrics; writes metrics.csv (call it before the checkpoint a resume trusts)."""
        if not self.enabled:
            return
        m = _scalars({k: v for k, v in metrics.items() if k != "epoch"})
        self.rows.append({"kind": "epoch", "epoch": epoch, "step": step, **m})
        self._send({f"epoch/{k}": v for k, v in m.items()}, step)
        self.write_csv()

    def final(self, step: int, metrics: dict[str, Any]) -> None:
        """What the run computes once at its end (Stage 1's mapping quality, say)."""
        if not self.enabled:
            return
        m = _scalars(metrics)
        self.rows = [r for r in self.rows if r["kind"] != "final"] + [{"kind": "final", "epoch": "", "step": step, **m}]
        self._send({f"final/{k}": v for k, v in m.items()}, step)
        self.write_csv()

    def _send(self, scalars: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def write_csv(self) -> None:
        cols = list(FIXED)
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, restval="", lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path) as tmp:
            Path(tmp).write_text(buf.getvalue())
        if self.tb is not None:
            self.tb.flush()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _tensorboard(folder: Path, purge_step: Optional[int]):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise VillaError(
            f"logger=tensorboard needs the tensorboard package ({e}); pip install tensorboard, or drop it from logger"
        ) from None
    return SummaryWriter(str(folder), purge_step=purge_step)


def _wandb(run_dir: Path, config: dict[str, Any], name: str, opts: dict[str, Any]):
    try:
        import wandb
    except ImportError as e:
        raise VillaError(
            f"logger=wandb needs the wandb package ({e}); pip install wandb, or drop it from logger"
        ) from None
    mode = opts.get("mode") or "offline"
    if mode not in ("offline", "online", "disabled"):
        raise VillaError(f"wandb.mode={mode!r}: use offline (no network; wandb sync later), online or disabled")
    run_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=opts.get("project") or "villa",
        entity=opts.get("entity"),
        name=name,
        dir=str(run_dir),
        mode=mode,
        config=config,
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off"),
    )


def make_tracker(cfg: DictConfig, start_epoch: int, enabled: bool = True) -> Tracker:
    """The run's :class:`villa.tracking.Tracker` in its checkpoint folder, from ``logger`` and ``wandb``."""
    return Tracker(
        cfg.checkpoint_dir,
        list(cfg.logger),
        config_dict(cfg),
        start_epoch,
        enabled,
        OmegaConf.to_container(cfg.wandb),
        name=f"{cfg.task_name}-{Path(cfg.checkpoint_dir).name}",
    )


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
