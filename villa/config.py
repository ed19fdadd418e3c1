"""Compose villa's real Hydra configs from Python (tests, the demo, experiments) with command-line-style overrides."""

from __future__ import annotations

from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from villa.paths import config_dir


def compose_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``compose_config("stage2", ["experiment=docmnist_baseline", "epochs=3"])``."""
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(name, overrides=list(overrides))
