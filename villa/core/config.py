"""Compose villa's real Hydra configs from Python (tests, the demo, experiments) with command-line-style overrides."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from villa.core import env
from villa.core.env import config_dir
from villa.core.errors import VillaError, error_line
from villa.core.log import setup_logging
from villa.core.schemas import COMMANDS, check_inputs, help_text, register_schemas, validate_config


def _basename(path: Any) -> str:
    return Path(str(path)).name or "data"


register_schemas()

# ${basename:${data_dir}} in the configs: checkpoint folders named by their dataset, so two datasets never share one
if not OmegaConf.has_resolver("basename"):
    OmegaConf.register_new_resolver("basename", _basename)
# ${villa_env:data_root}: the folders villa/core/env.py reads from the environment (the one place it is read)
if not OmegaConf.has_resolver("villa_env"):
    OmegaConf.register_new_resolver(
        "villa_env", lambda name: str({"data_root": env.data_root, "checkpoint_root": env.checkpoint_root}[name]())
    )

# Keys that were renamed (old spelling -> new); an old spelling is one line naming the new one.
RENAMED = {
    "mode": "objective",
    "grain_boxes": "grain.boxes",
    "crop": "pretrain.crop",
    "crop_margin": "pretrain.crop_margin",
    "amp": "precision",
}
RENAMED_VALUES = {
    ("mode", "baseline"): "one_to_one",
    ("amp", "false"): "fp32",
    ("amp", "true"): "auto",
    ("amp", "fp16"): "fp16",
    ("amp", "bf16"): "bf16",
}


def check_renamed(overrides: Sequence[str]) -> None:
    for o in overrides:
        key, sep, value = o.lstrip("+~").partition("=")
        if sep and key in RENAMED:
            new = RENAMED_VALUES.get((key, value), value)
            raise VillaError(f"{key}= is now {RENAMED[key]}= (use {RENAMED[key]}={new})")


def dataset_path_overrides(overrides: Sequence[str]) -> list[str]:
    """``dataset=path/to/vocab.yaml`` (a YAML path, not a name under configs/dataset/) becomes ``dataset=file
    dataset.path=<absolute path>``: Hydra groups take names only, so a path is carried by the ``file`` option."""
    out = []
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and key.lstrip("+~") == "dataset" and (value.endswith((".yaml", ".yml")) or os.sep in value):
            out += ["dataset=file", f"dataset.path={Path(value).expanduser().resolve()}"]
        else:
            out.append(o)
    return out


def compose_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``compose_config("stage2", ["experiment=docmnist_baseline", "epochs=3"])``."""
    check_renamed(overrides)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(name, overrides=dataset_path_overrides(overrides))


def _one_line(e: BaseException) -> str:
    parts = []
    while e is not None and len(parts) < 3:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].strip()
        if first and first not in parts and "$VALUE" not in first:
            parts.append(first)
        e = e.__cause__ or e.__context__
    return ": ".join(parts)


def check_overrides(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """Compose and validate ``config_name`` with ``overrides``; any problem is one :class:`VillaError` line."""
    try:
        cfg = compose_config(config_name, overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise VillaError(f"{_one_line(e)}; see {COMMANDS[config_name]} --help for the keys and their types") from e
    validate_config(cfg, config_name)
    check_inputs(cfg, config_name)
    return cfg


def sweep_job_name(task_overrides: Sequence[str], command: Sequence[str]) -> str:
    """A multirun job's folder name: the job's values of the keys the command sweeps (``lr=1e-4,5e-5`` in
    ``command``), sorted, e.g. ``lr=0.0001,seed=1``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in command if not a.startswith("-") and "=" in a]
    try:
        swept = {o.key_or_group for o in OverridesParser.create().parse_overrides(args) if o.is_sweep_override()}
    except HydraException:
        swept = set()
    keep = []
    for o in task_overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key in swept:
            keep.append(f"{key}={value}".replace(os.sep, "_"))
    return ",".join(sorted(keep))


def per_job_folders(cfg: DictConfig, config_name: str) -> DictConfig:
    """In a Hydra multirun (``-m lr=1e-4,5e-5 seed=1,2``) every job of a training command gets its own
    ``checkpoint_dir`` (``<checkpoint_dir>/<job name>``, :func:`sweep_job_name`) and Stage 1 its own
    ``mapping_path`` in it, unless the command sets them: no job resumes another's checkpoint, and the same sweep
    run again resumes each job where it stopped. Single runs are unchanged."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if "checkpoint_dir" not in cfg or not HydraConfig.initialized():
        return cfg
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return cfg
    task = list(hc.overrides.task)
    explicit = {o.lstrip("+~").partition("=")[0] for o in task}
    name = sweep_job_name(task, sys.argv[1:]) or f"job{hc.job.num}"
    if "checkpoint_dir" not in explicit:
        cfg.checkpoint_dir = str(Path(cfg.checkpoint_dir) / name)
    if config_name == "stage1" and "mapping_path" not in explicit:
        cfg.mapping_path = str(Path(cfg.checkpoint_dir) / "mapping.feather")
    logging.getLogger(__name__).info("multirun job %d: checkpoint_dir=%s", hc.job.num, cfg.checkpoint_dir)
    return cfg


SWEEP_FLAGS = ("-m", "--multirun")


def sweep_jobs(args: Sequence[str]) -> list[list[str]]:
    """The overrides of every job a ``-m`` command line runs (Hydra's basic sweeper's cartesian product)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in args if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise VillaError(f"{_one_line(e)}") from e
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def check_sweep(config_name: str, args: Sequence[str]) -> int:
    """Compose and validate every job of a sweep before the first one starts; the first bad job is one line naming
    it by its swept values. Returns the number of jobs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    jobs = sweep_jobs(args)
    overrides = [a for a in args if not a.startswith("-")]
    swept = {o.key_or_group for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()}
    for i, job in enumerate(jobs):
        try:
            check_overrides(config_name, job)
        except VillaError as e:
            named = [o for o in job if o.lstrip("+~").partition("=")[0] in swept]
            raise VillaError(f"sweep job {i} ({' '.join(named)}): {e}; nothing was run") from None
    return len(jobs)


def _target(run: Union[str, Callable[[DictConfig], Any]]) -> Callable[[DictConfig], Any]:
    """``"module:function"`` imported when a job starts (so ``--help`` and bad overrides never import torch)."""
    if callable(run):
        return run
    import importlib

    module, _, name = run.partition(":")
    return getattr(importlib.import_module(module), name)


def _where(cfg: DictConfig) -> str:
    for key in ("checkpoint_dir", "output", "out_dir"):
        if key in cfg:
            return f"{key}={cfg[key]}"
    return ""


def hydra_entry(
    config_name: str,
    run: Union[str, Callable[[DictConfig], Any]],
    doc: str = "",
    spell: Optional[Callable[[str], str]] = None,
) -> Callable[[], None]:
    """A ``@hydra.main`` entry point for ``run(cfg)`` (a function, or ``"module:function"`` imported when a job
    starts): villa's logging, and bad input as one ``error:`` line, exit 2.

    Plain ``key=value`` overrides are composed and validated against the schema (villa/core/schemas.py) before Hydra
    starts, so a bad override creates no output folder; with ``-m`` every job of the sweep is validated before the
    first runs, a job that fails while running is reported and the sweep goes on, and a summary ends it (exit 1 if
    any job failed). ``--help`` prints each key with its type and description, and the environment variables.
    ``spell`` rewrites an error line in the spelling of the command the user ran (the original's flags).
    """
    spell = spell or (lambda message: message)
    outcomes: list[tuple[int, str, str, str]] = []  # (job, its overrides, "done" | "failed: reason", where)

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)
    def hydra_main(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        setup_logging()
        hc = HydraConfig.get()
        sweep = hc.mode == RunMode.MULTIRUN
        cfg = per_job_folders(cfg, config_name)
        try:
            _target(run)(cfg)
        except Exception as e:  # noqa: BLE001 - a sweep reports every job's failure and goes on
            if not sweep and not isinstance(e, VillaError):
                raise
            if not sweep:
                print(f"error: {spell(error_line(e))}", file=sys.stderr)
                sys.exit(2)
            reason = error_line(e)
            if not isinstance(e, VillaError):
                reason = f"{type(e).__name__}: {reason}"
            print(f"error: sweep job {hc.job.num}: {reason}", file=sys.stderr)
            outcomes.append((hc.job.num, " ".join(hc.overrides.task), f"failed: {reason}", _where(cfg)))
            return
        if sweep:
            outcomes.append((hc.job.num, " ".join(hc.overrides.task), "done", _where(cfg)))

    def main() -> None:
        args = dataset_path_overrides(sys.argv[1:])
        sys.argv = sys.argv[:1] + args  # what Hydra parses
        command = COMMANDS[config_name]
        if "--help" in args or "-h" in args:
            overrides = [a for a in args if not a.startswith("-")]
            try:
                cfg = compose_config(config_name, overrides)
            except Exception:  # help still prints, without the defaults
                cfg = None
            print(help_text(config_name, doc or f"{command} [key=value ...]", cfg))
            return
        flags = [a for a in args if a.startswith("-")]
        try:
            if set(flags) <= set(SWEEP_FLAGS) and flags:
                check_sweep(config_name, args)
            elif not flags:  # Hydra's other flags (--cfg job, --info...) go to Hydra as they are
                check_overrides(config_name, args)
        except VillaError as e:
            print(f"error: {spell(str(e))}", file=sys.stderr)
            sys.exit(2)
        hydra_main()
        if outcomes:
            failed = [o for o in outcomes if o[2] != "done"]
            print(f"sweep: {len(outcomes)} jobs, {len(outcomes) - len(failed)} done, {len(failed)} failed")
            for num, overrides, outcome, where in sorted(outcomes):
                print(f"  job {num} ({overrides}): {outcome}" + (f" ({where})" if where else ""))
            if failed:
                sys.exit(1)

    return main
