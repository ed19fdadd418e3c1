"""A dataset's images as tensors: decoding, the Dataset every step reads images through, padding collate, and
batches of images grouped by size (no batch padded to a larger image)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from villa.core.errors import VillaError
from villa.data.annotations import Annotations
from villa.data.batches import gather_index


def read_image(path: Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB; a decoding error names the file."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:
        raise VillaError(f"cannot read image {path} ({type(e).__name__}: {e}); replace the file") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class ImageDataset(Dataset):
    """Images of a dataset by row index (boxes stay in flat arrays in the main process). An image whose size is
    not its annotated ``image_size`` is an error: its boxes would point at the wrong pixels."""

    def __init__(self, ann: Annotations, rows: Optional[np.ndarray] = None):
        self.root = ann.root
        self.filepath = ann.filepath
        self.image_size = ann.image_size
        self.rows = np.arange(ann.n_images) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = int(self.rows[i])
        path = self.root / self.filepath[row]
        im = read_image(path)
        w, h = (int(v) for v in self.image_size[row])
        if (im.shape[2], im.shape[1]) != (w, h):
            raise VillaError(
                f"image {path} is {im.shape[2]}x{im.shape[1]} but annotations.feather says image_size [{w}, {h}]; "
                "fix the annotation or the file"
            )
        return im, row


CACHES = ("auto", "memory", "disk", "off")


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


class DecodedImages(Dataset):
    """The images of ``rows`` decoded once into one uint8 buffer, then read by slicing (no file read or PNG/JPEG
    decode per step): in memory when they fit (``auto``: at most a quarter of this machine's RAM), else in a
    memory-mapped file under ``cache_root`` (``<cache dir>/images/<key>.u8``, keyed by the files' paths, sizes and
    modification times, written to a temporary name and renamed when complete, so a cut run never leaves a file a
    later run trusts). The same items as :class:`ImageDataset`, which does the one decoding pass (size checks
    included), with ``num_workers`` worker processes."""

    def __init__(
        self,
        ann: Annotations,
        rows: np.ndarray,
        mode: str = "auto",
        cache_root: Optional[Path] = None,
        num_workers: int = 0,
        progress: bool = False,
    ):
        if mode not in CACHES or mode == "off":
            raise VillaError(f"image_cache={mode!r}: use one of {', '.join(CACHES)}")
        self.rows = np.asarray(rows)
        wh = ann.image_size[self.rows].astype(np.int64)
        self.shapes = np.stack([np.full(len(self.rows), 3), wh[:, 1], wh[:, 0]], 1)
        sizes = self.shapes.prod(1)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        total = int(self.offsets[-1])
        if mode == "auto":
            mode = "memory" if total <= _memory_bytes() // 4 else "disk"
        self.mode = mode
        if mode == "memory":
            self.buffer = np.empty(total, dtype=np.uint8)
            self._fill(ImageDataset(ann, self.rows), num_workers, progress)
            return
        from villa.core.env import cache_dir

        path = Path(cache_root or cache_dir() / "images") / f"{self._key(ann)}.u8"
        if not (path.is_file() and path.stat().st_size == total):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            self.buffer = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(max(total, 1),))
            self._fill(ImageDataset(ann, self.rows), num_workers, progress)
            self.buffer.flush()
            del self.buffer
            os.replace(tmp, path)
        self.buffer = np.memmap(path, dtype=np.uint8, mode="r", shape=(max(total, 1),))

    def _key(self, ann: Annotations) -> str:
        import hashlib

        h = hashlib.sha256(str(Path(ann.root).resolve()).encode())
        for row in self.rows:
            st = (ann.root / ann.filepath[row]).stat()
            h.update(f"{ann.filepath[row]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:24]

    def _fill(self, images: ImageDataset, num_workers: int, progress: bool) -> None:
        from tqdm import tqdm

        loader = DataLoader(images, batch_size=None, num_workers=num_workers)
        for i, (im, _) in enumerate(tqdm(loader, desc="decoding images", disable=not progress, leave=False)):
            self.buffer[self.offsets[i] : self.offsets[i + 1]] = im.numpy().reshape(-1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        a, b = self.offsets[i], self.offsets[i + 1]
        im = torch.from_numpy(np.array(self.buffer[a:b]) if self.mode == "disk" else self.buffer[a:b])
        return im.view(*(int(v) for v in self.shapes[i])), int(self.rows[i])


def image_dataset(
    ann: Annotations,
    rows: np.ndarray,
    cache: str = "off",
    num_workers: int = 0,
    progress: bool = False,
    cache_root: Optional[Path] = None,
) -> Dataset:
    """The images of ``rows`` as a Dataset of (uint8 (3, H, W), row): decoded at every read (``cache=off``) or once
    (:class:`DecodedImages`)."""
    if cache == "off":
        return ImageDataset(ann, rows)
    return DecodedImages(ann, rows, cache, cache_root, num_workers, progress)


def collate_images(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack uint8 images, zero-padding right/bottom to the largest (boxes keep their pixel coordinates)."""
    h = max(im.shape[1] for im, _ in batch)
    w = max(im.shape[2] for im, _ in batch)
    out = torch.zeros(len(batch), 3, h, w, dtype=torch.uint8)
    for k, (im, _) in enumerate(batch):
        out[k, :, : im.shape[1], : im.shape[2]] = im
    return out, torch.tensor([r for _, r in batch], dtype=torch.long)


MAX_BATCH_PIXELS = 64 * 512 * 512  # a bucket's batch holds at most this many pixels (and at least one image)


def size_buckets(
    image_size: np.ndarray, rows: np.ndarray, batch_size: int, bucket: bool = True, max_pixels: int = MAX_BATCH_PIXELS
) -> list[np.ndarray]:
    """Batches of positions into ``rows``: with ``bucket``, images of one size batch together (sorted by height,
    width; stable), so no batch is padded to a larger image, and a batch of large images holds at most
    ``max_pixels`` pixels (a 6000 x 6000 image goes alone); else consecutive rows, as given."""
    n = len(rows)
    if not bucket or n == 0:
        return [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    wh = image_size[rows]
    order = np.lexsort((np.arange(n), wh[:, 0], wh[:, 1]))
    key = wh[order, 1] * (1 << 32) + wh[order, 0]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(key)) + 1, [n]])
    out = []
    for a, b in zip(starts[:-1], starts[1:]):
        w, h = wh[order[a]]
        step = max(1, min(batch_size, max_pixels // max(1, int(w) * int(h))))
        out += [order[s : min(s + step, b)] for s in range(a, b, step)]
    return out


def padded_pixels(image_size: np.ndarray, rows: np.ndarray, batches: list[np.ndarray]) -> tuple[int, int]:
    """(pixels processed including padding, pixels of the images themselves) for these batches."""
    total = 0
    for b in batches:
        wh = image_size[rows[b]]
        total += int(len(b) * wh[:, 0].max() * wh[:, 1].max())
    return total, int((image_size[rows, 0].astype(np.int64) * image_size[rows, 1]).sum())


class _Batches:
    """A batch sampler over fixed batches (picklable for worker processes)."""

    def __init__(self, batches: list[np.ndarray]):
        self.batches = [b.tolist() for b in batches]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def region_batches(
    ann: Annotations, rows: np.ndarray, batch_size: int, num_workers: int, batches: Optional[list[np.ndarray]] = None
) -> DataLoader:
    """Images of ``rows`` in batches (``batches``: positions into ``rows``; default consecutive)."""
    sampler = _Batches(batches if batches is not None else size_buckets(ann.image_size, rows, batch_size, False))
    return DataLoader(
        ImageDataset(ann, rows),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


def boxes_of(ann: Annotations, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All boxes of the given images, (K, 4) float32, and the batch position of each box (K,)."""
    idx, pos = gather_index(ann.region_offsets, rows.numpy())
    return torch.from_numpy(ann.boxes[idx]), torch.from_numpy(pos)
