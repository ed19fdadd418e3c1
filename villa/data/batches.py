"""Batches of whole images with variable region counts: concatenated regions plus each region's image index.

No padding: a batch of B images with R regions in all is ``x`` (R, D), ``region_image`` (R,) in [0, B) and the
images' attribute vectors (B, A). No worker processes are needed (works with num_workers=0 by construction).
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from villa.data.embeddings import EmbeddingSet

PRELOAD_BYTES = 2 << 30


def gather_index(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Region rows of images ``rows`` (in that order) and the batch position of each region."""
    counts = offsets[rows + 1] - offsets[rows]
    total = int(counts.sum())
    within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(offsets[rows], counts) + within, np.repeat(np.arange(len(rows)), counts)


class RegionBank:
    """Region embeddings of a dataset, on the device when they fit (< 2 GiB as float32), else memory-mapped."""

    def __init__(self, emb: EmbeddingSet, device: torch.device, preload: Optional[bool] = None):
        self.offsets = emb.offsets
        self.device = device
        nbytes = emb.regions.shape[0] * emb.regions.shape[1] * 4
        self.preload = nbytes < PRELOAD_BYTES if preload is None else preload
        self.memmap = emb.regions
        self.tensor = torch.from_numpy(np.array(emb.regions, dtype=np.float32)).to(device) if self.preload else None

    @property
    def dim(self) -> int:
        return int(self.memmap.shape[1])

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, D) float32 region embeddings of images ``rows`` and their (R,) batch positions, on the device."""
        idx, pos = gather_index(self.offsets, rows)
        if self.tensor is not None:
            x = self.tensor.index_select(0, torch.from_numpy(idx).to(self.device))
        else:
            x = torch.from_numpy(np.asarray(self.memmap[np.sort(idx)], dtype=np.float32)).to(self.device)
            x = x[torch.from_numpy(np.argsort(np.argsort(idx))).to(self.device)]
        return x, torch.from_numpy(pos).to(self.device)


def image_batches(
    rows: np.ndarray,
    batch_size: int,
    shuffle: bool = False,
    generator: Optional[torch.Generator] = None,
    drop_last: bool = False,
) -> Iterator[np.ndarray]:
    """Chunks of image rows; shuffled with ``generator`` (passed down, not global) when asked; ``drop_last`` leaves
    out the last partial chunk (the original's training loaders)."""
    order = rows[torch.randperm(len(rows), generator=generator).numpy()] if shuffle else rows
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for s in range(0, stop, batch_size):
        yield order[s : s + batch_size]


# ---------------------------------------------------------------------------------------------------------------
# Stage 2 / pretraining: (region box, text) pairs per image.


def whole_image_boxes(image_size: np.ndarray) -> np.ndarray:
    """The whole image as a region: [0, 0, W-1, H-1] (the original's box)."""
    w, h = image_size[:, 0].astype(np.float32), image_size[:, 1].astype(np.float32)
    z = np.zeros_like(w)
    return np.stack([z, z, w - 1, h - 1], 1)
