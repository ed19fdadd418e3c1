"""Where configs, data and checkpoints live."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


def config_dir() -> Path:
    """The Hydra config folder: ``configs/`` of a source checkout, else the copy installed as ``villa/configs``."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "configs", here / "configs"):
        if (cand / "dataset").is_dir():
            return cand
    raise FileNotFoundError(f"villa's configs/ folder not found beside {here}; reinstall villa (pip install -e .)")


def data_root() -> Path:
    """Root for relative dataset names: ``$VILLA_DATA_DIR`` or ``data``."""
    return Path(os.environ.get("VILLA_DATA_DIR") or "data")


def resolve_data_dir(name: PathLike) -> Path:
    """A dataset folder given by path, or by name under :func:`data_root` (as the original README's commands)."""
    p = Path(name)
    if p.is_absolute() or p.exists():
        return p
    return data_root() / p


@contextmanager
def atomic_dir(final: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it is renamed to ``final`` (never half-written)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_path(final: PathLike) -> Path:
    """A temporary path beside ``final``; write it, then ``os.replace(tmp, final)``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")
