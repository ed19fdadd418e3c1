"""Regions of a dataset's images: image loading, the batched region-embedding loop, BatchNorm calibration, and
:func:`embed_dataset`, which writes a dataset's region and attribute embeddings (the ``preprocess`` command).

Stage 2 and evaluation read images through :class:`ImageDataset` as preprocessing does: one loader for all.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from villa.data import gather_index
from villa.data_format import Annotations, load_annotations
from villa.distributed import init_distributed
from villa.embeddings import FORMAT, encoder_meta, write_index, write_meta
from villa.encoders import Clip, RegionEncoder, calibrate_batchnorm, create_clip, encode_attributes
from villa.errors import VillaError
from villa.paths import PathLike, atomic_dir, resolve_data_dir
from villa.region_sources import regions_record
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


OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5 has only the CUDA name
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
    bucket: bool = True,
) -> None:
    """Fill ``out`` with the embedding of every region of ``rows`` (default: all images), in ``rows``' region
    order, many images per forward pass and one ROI-Align call per batch. With ``bucket``, images of one size are
    batched together (no padding to a batch's largest image); each batch's regions go to their own rows of
    ``out``."""
    encoder.eval()
    rows = np.arange(ann.n_images) if rows is None else rows
    batches = size_buckets(ann.image_size, rows, batch_size, bucket)
    local = np.concatenate([[0], np.cumsum(ann.n_regions[rows])])  # region offsets within ``out``
    loader = region_batches(ann, rows, batch_size, num_workers, batches)
    bar = tqdm(total=len(rows), desc="regions", unit="img", disable=not progress)
    for positions, (images, batch_rows) in zip(batches, loader):
        boxes, box_image = boxes_of(ann, batch_rows)
        try:
            images = images.to(runtime.device, non_blocking=True).float().div_(255)
            with runtime.autocast():
                z = encoder(images, boxes.to(runtime.device), box_image.to(runtime.device))
        except (OOM, RuntimeError) as e:
            if not isinstance(e, OOM) and "alloc" not in str(e).lower():
                raise
            r = int(batch_rows[0])
            w, h = (int(v) for v in ann.image_size[r])
            raise VillaError(
                f"out of memory embedding {len(batch_rows)} image(s) of {w}x{h} (e.g. {ann.root / ann.filepath[r]}); "
                "lower --batch_size, or pass --input_size to resize images first"
            ) from None
        dest, _ = gather_index(local, positions)
        z = z.float().cpu().numpy().astype(out.dtype)
        if len(dest) and dest[-1] - dest[0] + 1 == len(dest):  # contiguous (same-size data): a slice write
            out[dest[0] : dest[-1] + 1] = z
        else:
            out[dest] = z
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
    """Validate a dataset, embed its regions and attributes with a frozen CLIP, write the embeddings folder.

    Launched by ``torchrun --nproc_per_node=N -m preprocess ...``, the images are sharded over the ranks in
    contiguous blocks and each rank writes its slice of the one memory-mapped ``regions.npy``."""
    t0 = time.perf_counter()
    if dtype not in ("float16", "float32"):
        raise VillaError(f"dtype={dtype!r}: use float16 or float32")
    if batch_size < 1:
        raise VillaError(f"batch_size={batch_size}: must be >= 1")
    root = resolve_data_dir(data_dir)
    vocab = vocab or load_vocab(dataset_config)
    ann = load_annotations(root, vocab, required_splits=required_splits)
    d = init_distributed(device)
    runtime = get_runtime(
        f"cuda:{d.local_rank}" if d.enabled and device != "cpu" and torch.cuda.is_available() else device
    )
    seed_everything(seed)  # random-init encoders (pretrained=none) are reproducible
    clip: Clip = create_clip(model, pretrained, device=runtime.device)
    encoder = RegionEncoder(clip.model.visual, normalize=normalize, input_size=input_size).to(runtime.device)
    if clip.pretrained is None:
        # training images only (no statistics from the held-out splits); all images for data without a train split
        train = np.flatnonzero(ann.split == "train")
        calibrate_on_data(encoder, ann, runtime, train if len(train) else np.arange(ann.n_images))
    out = Path(out_dir) if out_dir else root / "embeddings"
    enc = encoder_meta(clip.source)
    n_regions = len(ann.boxes)
    with contextlib.ExitStack() as stack:
        # rank 0 makes the temporary folder and the memory-mapped array; every rank writes its images' regions
        tmp = stack.enter_context(atomic_dir(out, overwrite=True)) if d.is_main else None
        if d.is_main:
            arr = np.lib.format.open_memmap(
                tmp / "regions.npy", mode="w+", dtype=dtype, shape=(n_regions, clip.embed_dim)
            )
            del arr
            # reserve the blocks now: a sparse memory map on a full disk fails later with SIGBUS, not an error
            fd = os.open(tmp / "regions.npy", os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate: write as before
                    raise
            finally:
                os.close(fd)
        if d.enabled:
            box = [str(tmp) if tmp is not None else None]
            dist.broadcast_object_list(box, src=0)
            tmp = Path(box[0])
        # shard: contiguous blocks of images, so that each rank's regions are one slice of the array
        rows = np.array_split(np.arange(ann.n_images), d.world_size)[d.rank]
        arr = np.load(tmp / "regions.npy", mmap_mode="r+")
        lo, hi = (int(ann.region_offsets[rows[0]]), int(ann.region_offsets[rows[-1] + 1])) if len(rows) else (0, 0)
        embed_regions(encoder, ann, runtime, arr[lo:hi], batch_size, num_workers, progress and d.is_main, rows=rows)
        arr.flush()
        del arr
        if d.enabled:
            dist.barrier()
        if d.is_main:
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
                "regions_from": regions_record(ann.table) or {"source": "given"},
                "dtype": dtype,
                "images": int(ann.n_images),
                "regions": int(n_regions),
                "dim": int(clip.embed_dim),
                "world_size": d.world_size,
            }
            write_meta(tmp / "meta.json", meta)
    if d.enabled:
        dist.barrier()  # the folder is in place before any rank returns
    if not d.is_main:
        return out
    secs = time.perf_counter() - t0
    print(
        f"preprocess: {len(ann.boxes)} regions of {ann.n_images} images, D={clip.embed_dim}, {clip.model_name} "
        f"(pretrained={clip.pretrained or 'none'}), {secs:.1f}s, {len(ann.boxes) / secs:.0f} regions/s -> {out}"
    )
    return out
