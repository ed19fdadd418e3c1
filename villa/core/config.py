"""Compose villa's real Hydra configs from Python (tests, the demo, experiments) with command-line-style overrides."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from villa.core import env
from villa.core.env import config_dir
from villa.core.errors import VillaError
from villa.core.log import setup_logging
from villa.core.schemas import COMMANDS, help_text, register_schemas, validate_config
from villa.data.vocab import Vocabulary, load_vocab, vocab_from_dict


def _basename(path: Any) -> str:
    return Path(str(path)).name or "data"


register_schemas()

# ${basename:${data_dir}} in the configs: checkpoint folders named by their dataset, so two datasets never share one
if not OmegaConf.has_resolver("basename"):
    OmegaConf.register_new_resolver("basename", _basename)
# ${villa_env:data_root}: the folders villa/core/env.py reads from the environment (the one place it is read)
if not OmegaConf.has_resolver("villa_env"):
    OmegaConf.register_new_resolver("villa_env", lambda name: str({"data_root": env.data_root,
                                                                    "checkpoint_root": env.checkpoint_root}[name]()))  # fmt: skip

# Keys that were renamed (old spelling -> new); an old spelling is one line naming the new one.
RENAMED = {"mode": "objective", "grain_boxes": "grain.boxes", "crop": "pretrain.crop",
           "crop_margin": "pretrain.crop_margin"}  # fmt: skip
RENAMED_VALUES = {("mode", "baseline"): "one_to_one"}


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


def vocab_from_config(cfg: DictConfig) -> Vocabulary:
    """The vocabulary of the composed ``dataset`` group (configs/dataset/<name>.yaml, or a YAML given by path)."""
    if "path" in cfg.dataset:
        return load_vocab(cfg.dataset.path)
    return vocab_from_dict(OmegaConf.to_container(cfg.dataset, resolve=True), source=f"dataset={cfg.dataset.name}")


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


def hydra_entry(config_name: str, run: Callable[[DictConfig], Any], doc: str = "") -> Callable[[], None]:
    """A ``@hydra.main`` entry point for ``run(cfg)``: villa's logging, and bad input as one ``error:`` line, exit 2.

    Plain ``key=value`` overrides are composed and validated against the schema (villa/schemas.py) before Hydra
    starts, so a bad override creates no output folder; ``--help`` prints each key with its type and description.
    """

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)
    def hydra_main(cfg: DictConfig) -> None:
        setup_logging()
        try:
            run(per_job_folders(cfg, config_name))
        except VillaError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    def main() -> None:
        args = dataset_path_overrides(sys.argv[1:])
        sys.argv = sys.argv[:1] + args  # what Hydra parses
        if "--help" in args or "-h" in args:
            overrides = [a for a in args if not a.startswith("-")]
            try:
                cfg = compose_config(config_name, overrides)
            except Exception:  # help still prints, without the defaults
                cfg = None
            print(help_text(config_name, doc or f"{COMMANDS[config_name]} [key=value ...]", cfg))
            return
        if not any(a.startswith("-") for a in args):  # Hydra's own flags (--multirun, --cfg...) go to Hydra
            try:
                check_overrides(config_name, args)
            except VillaError as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
        hydra_main()

    return main
