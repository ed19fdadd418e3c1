"""Real MNIST digits for DocMNIST: IDX reading, lookup, and the per-split digit pools.

The pools are a fixed partition that never depends on the generator's ``--seed``, so no two DocMNIST datasets
(whatever their seeds) put one digit in the training pool of one and the test pool of the other:

- full MNIST (all four IDX files): train / val = a fixed 80% / 20% division of MNIST's 60,000 training digits,
  test = MNIST's 10,000 test digits (the original's pools);
- only the test files: MNIST's test digits in a fixed 60% / 20% / 20% division.

Each pool is described by :class:`PoolInfo` (the IDX file's digest, the partition scheme and the pool's indices'
fingerprint), recorded in ``generation.json``; :func:`pools_overlap` tells exactly whether two pools share digits.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from villa.core.env import data_root, env
from villa.core.errors import VillaError

log = logging.getLogger(__name__)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The partition: a permutation with this fixed seed (never the generator's) and these fractions. Changing either
# changes every pool, so it is versioned in the scheme names below.
PARTITION_SEED = 20230407
SCHEMES = {
    # scheme -> split -> (IDX file, start fraction, stop fraction) of that file's permuted indices
    "full-v1": {"train": ("train", 0.2, 1.0), "val": ("train", 0.0, 0.2), "test": ("test", None, None)},
    "test-only-v1": {"train": ("test", 0.0, 0.6), "val": ("test", 0.6, 0.8), "test": ("test", 0.8, 1.0)},
}


@dataclass(frozen=True)
class PoolInfo:
    """What identifies one split's digit pool: which IDX file (by content digest), which partition, which indices."""

    scheme: str  # a key of SCHEMES
    split: str  # train | val | test
    file: str  # "train" (MNIST's training file) or "test" (t10k)
    file_sha256: str  # of the decompressed images (IDX payload), so .gz or not does not matter
    file_size: int  # digits in the file
    digits: int  # digits in this pool
    fingerprint: str  # sha256 of the file digest + the pool's sorted indices

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DigitPools:
    """Grey 28x28 uint8 digits and their labels for each split; ``info`` says exactly which digits they are."""

    images: dict[str, np.ndarray]  # split -> (N, 28, 28) uint8
    labels: dict[str, np.ndarray]  # split -> (N,) int64
    source: str
    full: bool  # True: full MNIST (train/val from MNIST train); False: the test file divided into three
    info: dict[str, PoolInfo]


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


def _read_pair(folder: Path, which: str, img_path: Path, lab_path: Path) -> tuple[np.ndarray, np.ndarray]:
    img, lab = read_idx(img_path), read_idx(lab_path)
    if img.ndim != 3 or img.shape[1:] != (28, 28):
        raise VillaError(f"{img_path} holds {img.shape} data, not 28x28 images; re-download MNIST")
    if lab.ndim != 1:
        raise VillaError(f"{lab_path} holds {lab.shape} data, not a label vector; re-download MNIST")
    if len(img) != len(lab):
        raise VillaError(f"MNIST {which} files in {folder}: {len(img)} images but {len(lab)} labels; re-download it")
    return img, lab.astype(np.int64)


def candidate_dirs(mnist_dir: Optional[str]) -> list[Path]:
    """Lookup order: ``--mnist_dir`` alone when given; else ``$VILLA_MNIST_DIR``, then ``<data root>/mnist``."""
    if mnist_dir:
        return [Path(mnist_dir)]
    out = []
    if env("VILLA_MNIST_DIR"):
        out.append(Path(env("VILLA_MNIST_DIR")))
    out.append(default_dir())
    return out


def default_dir() -> Path:
    """Where a download goes: ``<$VILLA_DATA_DIR or data>/mnist``."""
    return data_root() / "mnist"


# MNIST's four files and their SHA-256 (the files torchvision's mirrors serve).
CHECKSUMS = {
    "train-images-idx3-ubyte.gz": "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    "train-labels-idx1-ubyte.gz": "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    "t10k-images-idx3-ubyte.gz": "9fe7630f90c0e670227960a294637bc2e78a29d724810e24204eb342c9f033a1",
    "t10k-labels-idx1-ubyte.gz": "2c54c993d38068b3c3adb720a5cdee07065a066a7b36e7d1df720548d6359eba",
}
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(url: str, dest: Path, expected: str, progress: bool) -> None:
    """One file to a temporary name beside ``dest``, its checksum verified, then renamed; nothing is left otherwise."""
    import urllib.request

    from tqdm import tqdm

    from villa.core.io import atomic_file

    with atomic_file(dest) as tmp:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:  # noqa: S310 - http(s) mirrors only
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress, leave=False) as bar:
                for block in iter(lambda: r.read(1 << 16), b""):
                    f.write(block)
                    bar.update(len(block))
        got = _sha256(tmp)
        if got != expected:
            raise VillaError(
                f"{url} is not MNIST's {dest.name} (sha256 {got[:12]}..., expected {expected[:12]}...); nothing was "
                "kept; use another mirror (VILLA_MNIST_MIRROR) or copy the files by hand and set VILLA_MNIST_DIR"
            )


def download_mnist(dest: Optional[Path] = None, mirror: Optional[str] = None, progress: bool = True) -> Path:
    """MNIST's four .gz files into ``dest`` (default ``<data root>/mnist``) from ``mirror`` (default
    ``$VILLA_MNIST_MIRROR``, else torchvision's mirrors), each verified against its SHA-256; files already there
    and intact are kept. A failure is one line naming what to do instead."""
    import urllib.error

    dest = Path(dest) if dest else default_dir()
    mirrors = [mirror or env("VILLA_MNIST_MIRROR")] if (mirror or env("VILLA_MNIST_MIRROR")) else list(MIRRORS)
    for name, expected in CHECKSUMS.items():
        target = dest / name
        if target.is_file() and _sha256(target) == expected:
            continue
        errors = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + name
            if not url.startswith(("http://", "https://")):
                raise VillaError(f"VILLA_MNIST_MIRROR={base!r} is not an http(s) URL; give the folder's URL")
            try:
                _fetch(url, target, expected, progress)
                break
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                errors.append(f"{url}: {getattr(e, 'reason', e)}")
        else:
            raise VillaError(
                f"cannot download MNIST ({'; '.join(errors)}); without network, put the four IDX .gz files in a folder "
                "and set VILLA_MNIST_DIR to it, or set VILLA_MNIST_MIRROR to a mirror you can reach"
            )
    log.info("MNIST in %s (4 files, checksums verified)", dest)
    return dest


def pool_indices(scheme: str, split: str, file_size: int) -> np.ndarray:
    """The indices into its IDX file of one split's pool under a partition scheme (sorted permutation slice)."""
    file, lo, hi = SCHEMES[scheme][split]
    if lo is None:
        return np.arange(file_size)
    perm = np.random.default_rng(PARTITION_SEED).permutation(file_size)
    return perm[int(round(lo * file_size)) : int(round(hi * file_size))]


def _pool_info(scheme: str, split: str, file_sha: str, file_size: int, idx: np.ndarray) -> PoolInfo:
    h = hashlib.sha256(file_sha.encode())
    h.update(np.sort(idx).astype(np.int64).tobytes())
    return PoolInfo(scheme, split, SCHEMES[scheme][split][0], file_sha, file_size, int(len(idx)), h.hexdigest())


def pools_overlap(a: dict[str, Any], b: dict[str, Any]) -> int:
    """How many digits two pools (``PoolInfo.to_dict()`` records) share: 0 when they come from different files."""
    if a["file_sha256"] != b["file_sha256"]:
        return 0
    if a["fingerprint"] == b["fingerprint"]:
        return int(a["digits"])
    ia = pool_indices(a["scheme"], a["split"], a["file_size"])
    ib = pool_indices(b["scheme"], b["split"], b["file_size"])
    return int(len(np.intersect1d(ia, ib)))


def load_digit_pools(mnist_dir: Optional[str] = None, download: bool = False) -> DigitPools:
    """The digit pool of each split (module docstring): a fixed partition, the same for every generator seed."""
    tried = candidate_dirs(mnist_dir)
    if mnist_dir and not download and not Path(mnist_dir).is_dir():
        raise VillaError(f"--mnist_dir {mnist_dir} does not exist; pass the folder holding MNIST's IDX files")
    if download:
        download_mnist(tried[0])
    pools = _pools_from(tried)
    if pools is None and not mnist_dir:  # found nowhere: fetch it once into <data root>/mnist (with internet)
        log.info("MNIST not found (tried %s): downloading it into %s", ", ".join(map(str, tried)), default_dir())
        download_mnist(default_dir())
        pools = _pools_from([default_dir()])
    if pools is None:
        raise VillaError(
            f"MNIST not found in {mnist_dir}; put the IDX files there, or leave --mnist_dir out to download MNIST"
        )
    return pools


def _pools_from(tried: list[Path]) -> Optional[DigitPools]:
    for folder in tried:
        test_img, test_lab = _find(folder, _FILES["test"][0]), _find(folder, _FILES["test"][1])
        if test_img is None or test_lab is None:
            continue
        files = {"test": _read_pair(folder, "test", test_img, test_lab)}
        train_img, train_lab = _find(folder, _FILES["train"][0]), _find(folder, _FILES["train"][1])
        if train_img is not None and train_lab is not None:
            files["train"] = _read_pair(folder, "train", train_img, train_lab)
            scheme = "full-v1"
        else:
            scheme = "test-only-v1"
        digests = {k: hashlib.sha256(v[0].tobytes()).hexdigest() for k, v in files.items()}
        images, labels, info = {}, {}, {}
        for split, (file, _, _) in SCHEMES[scheme].items():
            img, lab = files[file]
            idx = pool_indices(scheme, split, len(img))
            images[split], labels[split] = img[idx], lab[idx]
            info[split] = _pool_info(scheme, split, digests[file], len(img), idx)
        return DigitPools(images, labels, str(folder), scheme == "full-v1", info)
    return None


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m docmnist.mnist --download [--dir DIR] [--mirror URL]``: fetch MNIST without running anything."""
    import argparse

    from villa.core.errors import exit_on_error
    from villa.core.log import setup_logging

    setup_logging()
    p = argparse.ArgumentParser(prog="python -m docmnist.mnist", description="download MNIST (checksums verified)")
    p.add_argument("--download", action="store_true", help="download the four IDX .gz files")
    p.add_argument("--dir", default=None, help="where (default: $VILLA_DATA_DIR/mnist, else data/mnist)")
    p.add_argument("--mirror", default=None, help="an http(s) folder holding the files (default: $VILLA_MNIST_MIRROR)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if not a.download:
        p.error("nothing to do: pass --download")
    print(exit_on_error(download_mnist)(Path(a.dir) if a.dir else None, a.mirror, not a.quiet))


if __name__ == "__main__":
    main()
