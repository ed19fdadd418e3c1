"""Regions of a dataset's images: image loading, the batched region-embedding loop, BatchNorm calibration, and
:func:`embed_dataset`, which writes a dataset's region and attribute embeddings (the ``preprocess`` command).

Stage 2 and evaluation read images through :class:`ImageDataset` as preprocessing does: one loader for all.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from villa.data import gather_index
from villa.data_format import Annotations, load_annotations
from villa.embeddings import FORMAT, encoder_meta, write_index, write_meta
from villa.encoders import Clip, RegionEncoder, calibrate_batchnorm, create_clip, encode_attributes
from villa.errors import VillaError
from villa.paths import PathLike, atomic_dir, resolve_data_dir
from villa.runtime import Runtime, get_runtime, seed_everything
from villa.vocab import Vocabulary, load_vocab

log = logging.getLogger(__name__)


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


def collate_images(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack uint8 images, zero-padding right/bottom to the largest (boxes keep their pixel coordinates)."""
    h = max(im.shape[1] for im, _ in batch)
    w = max(im.shape[2] for im, _ in batch)
    out = torch.zeros(len(batch), 3, h, w, dtype=torch.uint8)
    for k, (im, _) in enumerate(batch):
        out[k, :, : im.shape[1], : im.shape[2]] = im
    return out, torch.tensor([r for _, r in batch], dtype=torch.long)


def region_batches(ann: Annotations, rows: np.ndarray, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(
        ImageDataset(ann, rows),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


def boxes_of(ann: Annotations, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All boxes of the given images, (K, 4) float32, and the batch position of each box (K,)."""
    idx, pos = gather_index(ann.region_offsets, rows.numpy())
    return torch.from_numpy(ann.boxes[idx]), torch.from_numpy(pos)


@torch.no_grad()
def embed_regions(
    encoder: RegionEncoder,
    ann: Annotations,
    runtime: Runtime,
    out: np.ndarray,
    batch_size: int = 64,
    num_workers: int = 2,
    progress: bool = True,
    rows: Optional[np.ndarray] = None,
) -> None:
    """Fill ``out`` with the embedding of every region of ``rows`` (default: all images), in order, many images
    per forward pass and one ROI-Align call per batch."""
    encoder.eval()
    rows = np.arange(ann.n_images) if rows is None else rows
    loader = region_batches(ann, rows, batch_size, num_workers)
    bar = tqdm(total=len(rows), desc="regions", unit="img", disable=not progress)
    pos = 0
    for images, batch_rows in loader:
        boxes, box_image = boxes_of(ann, batch_rows)
        images = images.to(runtime.device, non_blocking=True).float().div_(255)
        with runtime.autocast():
            z = encoder(images, boxes.to(runtime.device), box_image.to(runtime.device))
        out[pos : pos + len(z)] = z.float().cpu().numpy().astype(out.dtype)
        pos += len(z)
        bar.update(len(batch_rows))
    bar.close()


CALIBRATION_BATCH = 64


def calibrate_on_data(encoder: RegionEncoder, ann: Annotations, runtime: Runtime, rows: np.ndarray) -> None:
    """Random-init encoders: BatchNorm statistics from the first 10 batches of 64 images of ``rows`` (fixed, so
    that results depend neither on the batch size nor on the number of processes; see
    :func:`villa.encoders.calibrate_batchnorm`)."""
    batch_size = CALIBRATION_BATCH

    def batches():
        for images, r in region_batches(ann, rows, batch_size, num_workers=0):
            boxes, owner = boxes_of(ann, r)
            yield images.to(runtime.device).float().div_(255), boxes.to(runtime.device), owner.to(runtime.device)

    n = calibrate_batchnorm(encoder, batches())
    log.info("random init: BatchNorm statistics estimated from %d batches of the data", n)


def embed_dataset(
    data_dir: PathLike,
    dataset_config: str = "docmnist",
    model: str = "RN50",
    pretrained: Optional[str] = "openai",
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int = 2,
    dtype: str = "float16",
    normalize: bool = False,
    input_size: Optional[int] = None,
    out_dir: Optional[PathLike] = None,
    required_splits: Sequence[str] = ("train",),
    progress: bool = True,
    vocab: Optional[Vocabulary] = None,
    seed: int = 0,
) -> Path:
    """Validate a dataset, embed its regions and attributes with a frozen CLIP, write the embeddings folder."""
    t0 = time.perf_counter()
    if dtype not in ("float16", "float32"):
        raise VillaError(f"dtype={dtype!r}: use float16 or float32")
    if batch_size < 1:
        raise VillaError(f"batch_size={batch_size}: must be >= 1")
    root = resolve_data_dir(data_dir)
    vocab = vocab or load_vocab(dataset_config)
    ann = load_annotations(root, vocab, required_splits=required_splits)
    runtime = get_runtime(device)
    seed_everything(seed)  # random-init encoders (pretrained=none) are reproducible
    clip: Clip = create_clip(model, pretrained, device=runtime.device)
    encoder = RegionEncoder(clip.model.visual, normalize=normalize, input_size=input_size).to(runtime.device)
    if clip.pretrained is None:
        # training images only (no statistics from the held-out splits); all images for data without a train split
        train = np.flatnonzero(ann.split == "train")
        calibrate_on_data(encoder, ann, runtime, train if len(train) else np.arange(ann.n_images))
    out = Path(out_dir) if out_dir else root / "embeddings"
    enc = encoder_meta(clip.source)
    with atomic_dir(out, overwrite=True) as tmp:
        arr = np.lib.format.open_memmap(
            tmp / "regions.npy", mode="w+", dtype=dtype, shape=(len(ann.boxes), clip.embed_dim)
        )
        embed_regions(encoder, ann, runtime, arr, batch_size, num_workers, progress)
        arr.flush()
        del arr
        write_index(tmp / "index.feather", ann.image_id, ann.split, ann.n_regions)
        np.save(tmp / "attributes.npy", encode_attributes(clip, vocab, runtime).numpy().astype(np.float32))
        meta = {
            "format": FORMAT,
            "dataset": str(root),
            "vocab": vocab.name,
            "attribute_names": list(vocab.attributes),
            "vocab_digest": vocab.digest,
            "encoder": enc,
            "attribute_encoder": enc,
            "region_path": {"normalize": normalize, "input_size": input_size, "roi_size": encoder.roi_size},
            "dtype": dtype,
            "images": int(ann.n_images),
            "regions": int(len(ann.boxes)),
            "dim": int(clip.embed_dim),
        }
        write_meta(tmp / "meta.json", meta)
    secs = time.perf_counter() - t0
    print(
        f"preprocess: {len(ann.boxes)} regions of {ann.n_images} images, D={clip.embed_dim}, {clip.model_name} "
        f"(pretrained={clip.pretrained or 'none'}), {secs:.1f}s, {len(ann.boxes) / secs:.0f} regions/s -> {out}"
    )
    return out
