"""Compose villa's real Hydra configs from Python (tests, the demo, experiments) with command-line-style overrides."""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from villa.errors import VillaError
from villa.log import setup_logging
from villa.paths import config_dir
from villa.vocab import Vocabulary, vocab_from_dict


def compose_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``compose_config("stage2", ["experiment=docmnist_baseline", "epochs=3"])``."""
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def vocab_from_config(cfg: DictConfig) -> Vocabulary:
    """The vocabulary of the composed ``dataset`` group (configs/dataset/<name>.yaml, or an override)."""
    return vocab_from_dict(OmegaConf.to_container(cfg.dataset, resolve=True), source=f"dataset={cfg.dataset.name}")


def hydra_entry(config_name: str, run: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """A ``@hydra.main`` entry point for ``run(cfg)``: villa's logging, and bad input as one ``error:`` line, exit 2."""

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)
    def main(cfg: DictConfig) -> None:
        setup_logging()
        try:
            run(cfg)
        except VillaError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return main
