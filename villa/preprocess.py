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
from omegaconf import DictConfig
from tqdm import tqdm

from villa.core.distributed import init_distributed
from villa.core.env import resolve_data_dir
from villa.core.errors import VillaError
from villa.core.io import PathLike, atomic_dir
from villa.core.runtime import Runtime, get_runtime, seed_everything
from villa.core.schemas import check_inputs, validate_config
from villa.data.annotations import Annotations, load_annotations
from villa.data.batches import gather_index
from villa.data.embeddings import FORMAT, encoder_meta, write_index, write_meta
from villa.data.images import boxes_of, region_batches, size_buckets
from villa.data.regions import regions_record
from villa.data.vocab import Vocabulary, load_vocab, vocab_from_config
from villa.models.clip import Clip, create_clip
from villa.models.region_encoder import RegionEncoder, calibrate_batchnorm
from villa.models.text import encode_attributes

log = logging.getLogger(__name__)


OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5 has only the CUDA name


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


def embeddings_meta(
    root: Path, vocab: Vocabulary, clip: Clip, encoder: RegionEncoder, ann: Annotations, dtype: str, world_size: int
) -> dict:
    """What meta.json records: the encoder of regions and attributes, the region path's options, where the regions
    came from, the counts (what :func:`villa.data.embeddings.open_embeddings` checks)."""
    enc = encoder_meta(clip.source)
    return {
        "format": FORMAT,
        "dataset": str(root),
        "vocab": vocab.name,
        "attribute_names": list(vocab.attributes),
        "vocab_digest": vocab.digest,
        "encoder": enc,
        "attribute_encoder": enc,
        "region_path": {"normalize": encoder.normalize, "input_size": encoder.input_size, "roi_size": encoder.roi_size},
        "regions_from": regions_record(ann.table) or {"source": "given"},
        "dtype": dtype,
        "images": int(ann.n_images),
        "regions": int(len(ann.boxes)),
        "dim": int(clip.embed_dim),
        "world_size": world_size,
    }


def allocate_regions(path: Path, shape: tuple[int, int], dtype: str) -> None:
    """The ``regions.npy`` every rank writes its slice of, with its blocks reserved now: a sparse memory map on a
    full disk fails later with SIGBUS, not an error."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    del arr
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate: written as before
            raise
    finally:
        os.close(fd)


def frozen_encoder(
    model: str,
    pretrained: Optional[str],
    normalize: bool,
    input_size: Optional[int],
    ann: Annotations,
    runtime: Runtime,
    seed: int,
) -> tuple[Clip, RegionEncoder]:
    """The CLIP model and its region path; a randomly initialised one (``pretrained=none``, reproducible from
    ``seed``) gets BatchNorm statistics from the training images only (all images for data without a train split)."""
    seed_everything(seed)
    clip = create_clip(model, pretrained, device=runtime.device)
    encoder = RegionEncoder(clip.model.visual, normalize=normalize, input_size=input_size).to(runtime.device)
    if clip.pretrained is None:
        train = np.flatnonzero(ann.split == "train")
        calibrate_on_data(encoder, ann, runtime, train if len(train) else np.arange(ann.n_images))
    return clip, encoder


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
    if dtype not in ("float16", "float32") or batch_size < 1:
        raise VillaError(f"dtype={dtype!r}, batch_size={batch_size}: use float16 or float32, and a batch of >= 1")
    root = resolve_data_dir(data_dir)
    vocab = vocab or load_vocab(dataset_config)
    ann = load_annotations(root, vocab, required_splits=required_splits)
    d = init_distributed(device)
    runtime = get_runtime(
        f"cuda:{d.local_rank}" if d.enabled and device != "cpu" and torch.cuda.is_available() else device
    )
    clip, encoder = frozen_encoder(model, pretrained, normalize, input_size, ann, runtime, seed)
    out = Path(out_dir) if out_dir else root / "embeddings"
    n_regions = len(ann.boxes)
    with contextlib.ExitStack() as stack:
        # rank 0 makes the temporary folder and the memory-mapped array; every rank writes its images' regions
        tmp = stack.enter_context(atomic_dir(out, overwrite=True)) if d.is_main else None
        if d.is_main:
            allocate_regions(tmp / "regions.npy", (n_regions, clip.embed_dim), dtype)
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
            write_meta(tmp / "meta.json", embeddings_meta(root, vocab, clip, encoder, ann, dtype, d.world_size))
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


def run_preprocess(cfg: DictConfig) -> Path:
    """``python -m preprocess``: :func:`embed_dataset` with the composed config's keys."""
    validate_config(cfg, "preprocess")
    check_inputs(cfg, "preprocess")
    return embed_dataset(
        cfg.data_dir,
        model=cfg.model.name,
        pretrained=cfg.model.pretrained,
        batch_size=cfg.batch_size,
        device=cfg.device,
        num_workers=cfg.num_workers,
        dtype=cfg.dtype,
        normalize=cfg.model.normalize,
        input_size=cfg.model.input_size,
        out_dir=cfg.out_dir,
        required_splits=list(cfg.splits),
        progress=cfg.progress,
        vocab=vocab_from_config(cfg),
        seed=cfg.seed,
    )
