"""Where things live: every environment variable villa reads (read here and nowhere else), the config folder, and
the weights villa ships under a tag.

=========================  =====================================================================================
``VILLA_DATA_DIR``         where relative dataset names resolve and generated datasets go (default ``data``)
``VILLA_CHECKPOINT_DIR``   where training runs keep their checkpoints (default ``checkpoints``)
``VILLA_CACHE_DIR``        villa's cache: image digests for run fingerprints (default ``$XDG_CACHE_HOME/villa``)
``VILLA_MNIST_DIR``        a folder with MNIST's four IDX files, looked at before ``data/mnist``
``VILLA_MNIST_MIRROR``     an http(s) URL whose folder holds MNIST's four ``.gz`` files, for the download
``HF_HUB_OFFLINE``         (Hugging Face's) set: never try to download pretrained weights
=========================  =====================================================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]

ENV_VARS = {
    "VILLA_DATA_DIR": "where relative dataset names resolve and generated datasets go (default: data)",
    "VILLA_CHECKPOINT_DIR": "where training runs keep their checkpoints (default: checkpoints)",
    "VILLA_CACHE_DIR": "villa's cache of image digests (default: $XDG_CACHE_HOME/villa, else ~/.cache/villa)",
    "VILLA_MNIST_DIR": "a folder holding MNIST's IDX files, looked at before data/mnist",
    "VILLA_MNIST_MIRROR": "an http(s) URL whose folder holds MNIST's four .gz files (the download's source)",
    "HF_HUB_OFFLINE": "set to 1: never try to download pretrained weights",
}

PACKAGE = Path(__file__).resolve().parents[1]  # the villa package
SHIPPED_WEIGHTS = {  # tag -> file: villa's own small CLIP (docs/pretrained.md); suits DocMNIST only
    "villa-small-rn-docmnist": PACKAGE / "assets" / "villa-small-rn-docmnist.pt"
}


def env(name: str) -> Optional[str]:
    """The value of one of :data:`ENV_VARS` (empty counts as unset)."""
    if name not in ENV_VARS:
        raise KeyError(f"{name} is not one of villa's environment variables ({', '.join(ENV_VARS)})")
    return os.environ.get(name) or None


def env_help() -> str:
    """The environment variables, one per line, for ``--help``."""
    return "\n".join(f"  {k:<24} {v}" for k, v in ENV_VARS.items())


def data_root() -> Path:
    return Path(env("VILLA_DATA_DIR") or "data")


def checkpoint_root() -> Path:
    return Path(env("VILLA_CHECKPOINT_DIR") or "checkpoints")


def cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(env("VILLA_CACHE_DIR") or Path(xdg) / "villa")


def hf_offline() -> bool:
    return (env("HF_HUB_OFFLINE") or "").lower() in ("1", "true", "yes", "on")


def resolve_data_dir(name: PathLike) -> Path:
    """A dataset folder given by path, or by name under :func:`data_root` (as the original README's commands)."""
    p = Path(name)
    if p.is_absolute() or p.exists():
        return p
    return data_root() / p


def config_dir() -> Path:
    """The Hydra config folder: ``configs/`` of a source checkout, else the copy installed as ``villa/configs``."""
    for cand in (PACKAGE.parent / "configs", PACKAGE / "configs"):
        if (cand / "dataset").is_dir():
            return cand
    raise FileNotFoundError(f"villa's configs/ folder not found beside {PACKAGE}; reinstall villa (pip install -e .)")


def resolve_weights(pretrained: Optional[str]) -> Optional[str]:
    """A shipped tag (:data:`SHIPPED_WEIGHTS`) as its file; anything else (an open_clip tag, a path, none) as given."""
    if pretrained is not None and str(pretrained) in SHIPPED_WEIGHTS:
        return str(SHIPPED_WEIGHTS[str(pretrained)])
    return pretrained
