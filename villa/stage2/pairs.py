"""Stage 2's training pairs: per image, each region that has text and the whole image with its caption, as flat
arrays; the dataset checks before any weights load; the DataLoader that assembles a step's images and pairs off the
training loop (worker processes, pinned memory)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler

from villa.core.distributed import Dist
from villa.core.errors import VillaError
from villa.core.provenance import file_sha256
from villa.data.annotations import Annotations, load_annotations
from villa.data.batches import gather_index, whole_image_boxes
from villa.data.images import collate_images, image_dataset
from villa.data.vocab import Vocabulary
from villa.stage1.mapping import mapping_record

log = logging.getLogger(__name__)


class PairSet:
    """The training pairs of a set of images, as flat arrays: image i's pairs are ``offsets[i]:offsets[i+1]``.

    ``text`` holds each pair's text (a region's assigned sentences, or the whole caption); ``boxes`` (P, 4).
    """

    def __init__(self, offsets: np.ndarray, boxes: np.ndarray, text: list[str]):
        self.offsets, self.boxes, self.text = offsets, boxes.astype(np.float32), text

    @property
    def n_pairs(self) -> int:
        return len(self.boxes)


def build_pairs(
    image_size: np.ndarray,
    captions: list[str],
    region_offsets: Optional[np.ndarray] = None,
    region_boxes: Optional[np.ndarray] = None,
    region_text: Optional[list[str]] = None,
    whole_boxes: Optional[np.ndarray] = None,
) -> PairSet:
    """Per image: every region that has text (ViLLA: Stage 1 assigned it at least one attribute), then the whole
    image with the whole caption. Without regions (the one-to-one baseline, pretraining): only the whole image.
    ``whole_boxes`` (I, 4): the box of each whole-image pair (default: the whole image)."""
    n = len(captions)
    whole = whole_image_boxes(image_size) if whole_boxes is None else whole_boxes
    if region_offsets is None:
        return PairSet(np.arange(n + 1), whole, list(captions))
    keep = np.fromiter((bool(t) for t in region_text), dtype=bool, count=len(region_text))
    counts = np.diff(region_offsets)
    region_image = np.repeat(np.arange(n), counts)
    kept_per_image = np.bincount(region_image[keep], minlength=n)
    per_image = kept_per_image + 1
    offsets = np.concatenate([[0], np.cumsum(per_image)])
    boxes = np.empty((offsets[-1], 4), np.float32)
    text = np.empty(int(offsets[-1]), dtype=object)
    # region pairs go first within each image, the whole image last
    kept_idx = np.flatnonzero(keep)
    within = np.arange(len(kept_idx)) - np.repeat(np.cumsum(kept_per_image) - kept_per_image, kept_per_image)
    dest = offsets[region_image[kept_idx]] + within
    boxes[dest] = region_boxes[kept_idx]
    text[dest] = np.asarray(region_text, dtype=object)[kept_idx]
    last = offsets[1:] - 1
    boxes[last] = whole
    text[last] = np.asarray(captions, dtype=object)
    return PairSet(offsets, boxes, text.tolist())


@dataclass
class SplitPairs:
    """One split's images (``rows`` of ``ann``) and the pairs of every image."""

    ann: Annotations
    rows: np.ndarray
    pairs: PairSet


def check_mapping(cfg: DictConfig) -> None:
    """Stage 1's mapping exists and was made for this dataset (its provenance), unless ``trust_mapping``."""
    if not Path(cfg.mapping_path).is_file():
        raise VillaError(
            f"mapping not found: {cfg.mapping_path}; run Stage 1 first (python -m villa.stage1 ...) or set mapping_path"
        )
    ann_path = Path(cfg.data_dir) / "annotations.feather"
    if not ann_path.is_file():
        return  # load_annotations names the missing file
    rec = mapping_record(Path(cfg.mapping_path))
    if rec is None and not cfg.trust_mapping:
        raise VillaError(
            f"{cfg.mapping_path} records no provenance (Stage 1 writes which dataset it mapped): it may belong to "
            "another dataset; run Stage 1 on this dataset, or set trust_mapping=true to use it anyway"
        )
    if rec is not None and rec.get("annotations") != file_sha256(ann_path):
        raise VillaError(
            f"{cfg.mapping_path} was made by Stage 1 for another dataset than {cfg.data_dir}; "
            "run Stage 1 on this dataset or pass its mapping_path"
        )


def load_stage2_annotations(cfg: DictConfig, vocab: Vocabulary, reads_mapping: bool, d: Dist) -> Annotations:
    """The dataset (and, for an objective that reads it, Stage 1's mapping) checked and loaded before any weights."""
    if reads_mapping:
        check_mapping(cfg)
    return load_annotations(
        Path(cfg.data_dir),
        vocab,
        required_splits=("train", "val"),
        check_images=d.is_main,
        table_path=cfg.mapping_path if reads_mapping else None,
        required_columns=("assigned_text",) if reads_mapping else (),
    )


def split_pairs(ann: Annotations, pairs: PairSet) -> tuple[SplitPairs, SplitPairs]:
    """The train and val images and their pairs."""
    train, val = (SplitPairs(ann, np.flatnonzero(ann.split == s), pairs) for s in ("train", "val"))
    n_pairs = int(np.diff(pairs.offsets)[train.rows].sum())
    log.info("stage2: %d train images, %d train pairs, %d val images", len(train.rows), n_pairs, len(val.rows))
    return train, val


class PairBatch(NamedTuple):
    """One step's input, assembled in the DataLoader (worker processes, pinned memory): uint8 images, their rows,
    and every pair of those images: index into the pair arrays, owning batch position, box."""

    images: torch.Tensor  # (B, 3, H, W) uint8
    rows: torch.Tensor  # (B,)
    pair_idx: torch.Tensor  # (P,)
    box_image: torch.Tensor  # (P,) in [0, B)
    boxes: torch.Tensor  # (P, 4) float32, pixels
    whole: torch.Tensor  # (P,) bool: the whole-image pair (the caption), last of each image's pairs


class PairCollate:
    """Collate images and gather their pairs' boxes off the training loop (picklable for worker processes)."""

    def __init__(self, pairs: PairSet):
        self.offsets, self.boxes = pairs.offsets, pairs.boxes

    def __call__(self, batch: list[tuple[torch.Tensor, int]]) -> PairBatch:
        images, rows = collate_images(batch)
        pair_idx, box_image = gather_index(self.offsets, rows.numpy())
        whole = pair_idx == self.offsets[rows.numpy() + 1][box_image] - 1
        return PairBatch(
            images,
            rows,
            torch.from_numpy(pair_idx),
            torch.from_numpy(box_image),
            torch.from_numpy(self.boxes[pair_idx]),
            torch.from_numpy(whole),
        )


def make_loader(
    data: SplitPairs, cfg: DictConfig, d: Dist, train: bool, split: str = "train", cuda: bool = False
) -> tuple[DataLoader, DistributedSampler]:
    """Training batches are shuffled and, as the original's (``drop_last=True``), the last partial one is dropped
    unless ``drop_last=false``; validation keeps every image.

    With ``image_cache`` (default) the images are decoded once, by ``num_workers`` processes, and a batch is then a
    copy out of one buffer (about 2 ms for 64 DocMNIST images): on a CPU the loader runs in the training process,
    as worker processes would only compete with the step for the cores (measured: docs/speed.md); on CUDA
    ``num_workers`` processes still assemble batches ahead of the step."""
    ds = image_dataset(data.ann, data.rows, cfg.image_cache, cfg.num_workers, bool(cfg.progress and d.is_main))
    workers = cfg.num_workers if (cfg.image_cache == "off" or cuda) else 0
    sampler = DistributedSampler(
        ds, num_replicas=d.world_size, rank=d.rank, shuffle=train, seed=cfg.seed, drop_last=False
    )
    per_rank = max(1, cfg.batch_size // d.world_size)
    drop_last = bool(train and cfg.drop_last)
    if drop_last and len(sampler) < per_rank:
        raise VillaError(
            f"the {split} split has {len(ds)} images, fewer than one batch ({cfg.batch_size}) with drop_last=true; "
            "lower batch_size or set drop_last=false"
        )
    loader = DataLoader(
        ds,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=workers,
        collate_fn=PairCollate(data.pairs),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        drop_last=drop_last,
    )
    return loader, sampler
