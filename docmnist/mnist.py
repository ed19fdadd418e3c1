"""Real MNIST digits for DocMNIST: IDX reading, lookup, and the per-split digit pools."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from villa.errors import VillaError

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class DigitPools:
    """Grey 28x28 uint8 digits and their labels for each split; ``source`` says where they came from."""

    images: dict[str, np.ndarray]  # split -> (N, 28, 28) uint8
    labels: dict[str, np.ndarray]  # split -> (N,) int64
    source: str
    full: bool  # True: full MNIST (train/val from MNIST train); False: the test split divided into three


def _find(folder: Path, stem: str) -> Optional[Path]:
    for sub in (folder, folder / "MNIST" / "raw", folder / "raw"):
        for name in (stem, stem + ".gz"):
            if (sub / name).is_file():
                return sub / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array; a bad file is a :class:`VillaError`."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
        if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
            raise ValueError("not an unsigned-byte IDX file")
        ndim = data[3]
        dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
        offset = 4 + 4 * ndim
        n = int(np.prod(dims))
        if len(data) - offset != n:
            raise ValueError(f"expected {n} bytes of data after the header, found {len(data) - offset}")
        return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)
    except (OSError, EOFError, ValueError, gzip.BadGzipFile) as e:
        raise VillaError(f"cannot read MNIST file {path}: {e}; re-download MNIST or fix --mnist_dir") from e


def candidate_dirs(mnist_dir: Optional[str]) -> list[Path]:
    """Lookup order: ``--mnist_dir``, ``$VILLA_MNIST_DIR``, ``data/mnist``."""
    out = []
    if mnist_dir:
        out.append(Path(mnist_dir))
    if os.environ.get("VILLA_MNIST_DIR"):
        out.append(Path(os.environ["VILLA_MNIST_DIR"]))
    out.append(Path("data") / "mnist")
    return out


def download_mnist(root: Path) -> None:
    """Fetch MNIST with torchvision into ``root`` (torchvision layout: ``root/MNIST/raw``)."""
    from torchvision.datasets import MNIST

    try:
        for train in (True, False):
            MNIST(str(root), train=train, download=True)
    except Exception as e:  # network errors come in many types
        raise VillaError(f"could not download MNIST into {root}: {e}; copy the IDX files there instead") from e


def load_digit_pools(
    mnist_dir: Optional[str] = None, seed: int = 23, download: bool = False, val_fraction: float = 0.2
) -> DigitPools:
    """Digit pools per split.

    Full MNIST (train and test files found): train pool = 80% of MNIST train, val pool = the other 20%, test pool =
    MNIST test. Only the test split found (offline machines): its 10,000 digits split into disjoint pools, 60% /
    20% / 20%. The split of a pool is a seeded permutation, so the same seed gives the same pools.
    """
    tried = candidate_dirs(mnist_dir)
    if download:
        download_mnist(tried[0])
    for folder in tried:
        test_img, test_lab = _find(folder, _FILES["test"][0]), _find(folder, _FILES["test"][1])
        if test_img is None or test_lab is None:
            continue
        rng = np.random.default_rng([seed, 7])
        train_img, train_lab = _find(folder, _FILES["train"][0]), _find(folder, _FILES["train"][1])
        timg, tlab = read_idx(test_img), read_idx(test_lab).astype(np.int64)
        if len(timg) != len(tlab):
            raise VillaError(f"MNIST in {folder}: {len(timg)} images but {len(tlab)} labels; re-download it")
        if train_img is not None and train_lab is not None:
            img, lab = read_idx(train_img), read_idx(train_lab).astype(np.int64)
            perm = rng.permutation(len(img))
            n_val = int(round(val_fraction * len(img)))
            tr, va = perm[n_val:], perm[:n_val]
            return DigitPools(
                images={"train": img[tr], "val": img[va], "test": timg},
                labels={"train": lab[tr], "val": lab[va], "test": tlab},
                source=str(folder),
                full=True,
            )
        perm = rng.permutation(len(timg))
        n = len(timg)
        a, b = int(0.6 * n), int(0.8 * n)
        parts = {"train": perm[:a], "val": perm[a:b], "test": perm[b:]}
        return DigitPools(
            images={k: timg[v] for k, v in parts.items()},
            labels={k: tlab[v] for k, v in parts.items()},
            source=str(folder),
            full=False,
        )
    tried_s = ", ".join(str(p) for p in tried)
    raise VillaError(
        f"MNIST not found (tried {tried_s}); put the IDX files in one of them, set VILLA_MNIST_DIR, "
        "or pass --download on a machine with internet"
    )
