"""Stage 2's training pairs: per image, each region that has text and the whole image with its caption, as flat
arrays; the DataLoader that assembles a step's images and pairs off the training loop."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import open_clip
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler

from villa.core.config import vocab_from_config
from villa.core.distributed import Dist
from villa.core.errors import VillaError
from villa.core.provenance import (
    file_sha256,
)
from villa.core.runtime import Runtime
from villa.data.annotations import Annotations, load_annotations
from villa.data.batches import gather_index, whole_image_boxes
from villa.data.images import ImageDataset, collate_images
from villa.models.clip import Clip
from villa.models.text import mean_text_embeddings
from villa.stage1.mapping import assign_text, mapping_record


class PairSet:
    """The training pairs of a set of images, as flat arrays: image i's pairs are ``offsets[i]:offsets[i+1]``.

    ``text`` holds each pair's text (a region's assigned sentences, or the whole caption); ``boxes`` (P, 4).
    """

    def __init__(self, offsets: np.ndarray, boxes: np.ndarray, text: list[str]):
        self.offsets, self.boxes, self.text = offsets, boxes.astype(np.float32), text

    @property
    def n_pairs(self) -> int:
        return len(self.boxes)

log = logging.getLogger(__name__)


def build_pairs(
    image_size: np.ndarray,
    captions: list[str],
    region_offsets: Optional[np.ndarray] = None,
    region_boxes: Optional[np.ndarray] = None,
    region_text: Optional[list[str]] = None,
) -> PairSet:
    """Per image: every region that has text (ViLLA: Stage 1 assigned it at least one attribute), then the whole
    image with the whole caption. Without regions (the one-to-one baseline, pretraining): only the whole image."""
    n = len(captions)
    whole = whole_image_boxes(image_size)
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


def content_boxes(ann: Annotations) -> np.ndarray:
    """Per image, the bounding box of its content: the union of its region boxes (on DocMNIST, exactly where the
    non-black pixels can be). (I, 4) float32."""
    start = ann.region_offsets[:-1]
    lo = np.minimum.reduceat(ann.boxes[:, :2], start, axis=0)
    hi = np.maximum.reduceat(ann.boxes[:, 2:], start, axis=0)
    return np.concatenate([lo, hi], 1).astype(np.float32)


def jitter_boxes(boxes: torch.Tensor, sizes: torch.Tensor, margin: float, generator: torch.Generator) -> torch.Tensor:
    """Grow each box by a random margin in [0, margin] pixels per side, clipped to its image (W, H): a
    content-aware random crop (CLIP pretraining's random-resized-crop augmentation, keeping all captioned content)."""
    m = torch.rand(boxes.shape, generator=generator) * margin
    grown = boxes + m * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    upper = torch.cat([sizes - 1, sizes - 1], 1).float()
    return torch.minimum(torch.clamp(grown, min=0), upper)


class PairData:
    """One split's images, their pairs, and each pair's text target (embedding or tokens)."""

    def __init__(
        self,
        ann: Annotations,
        rows: np.ndarray,
        pairs: PairSet,
        text_emb: Optional[torch.Tensor],
        tokens: Optional[torch.Tensor],
    ):
        self.ann, self.rows, self.pairs = ann, rows, pairs
        self.text_emb, self.tokens = text_emb, tokens
        self.grain: Optional[DictConfig] = None  # mode=grain: its options (cfg.grain)


def uses_mapping(cfg: DictConfig) -> bool:
    """ViLLA, and GRAIN on Stage 1's mapping, read mapping.feather; GRAIN on gold pairs reads reg_to_attr."""
    return cfg.mode == "villa" or (cfg.mode == "grain" and cfg.grain_boxes == "mapping")


def load_stage2_annotations(cfg: DictConfig, d: Dist) -> Annotations:
    """The dataset (and, in villa mode, Stage 1's mapping) checked and loaded before any weights are."""
    villa_mode = uses_mapping(cfg)
    if villa_mode and not Path(cfg.mapping_path).is_file():
        raise VillaError(
            f"mapping not found: {cfg.mapping_path}; run Stage 1 first (python -m villa.stage1 ...) or set mapping_path"
        )
    ann_path = Path(cfg.data_dir) / "annotations.feather"
    if villa_mode and ann_path.is_file():
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
    return load_annotations(
        Path(cfg.data_dir), vocab_from_config(cfg), required_splits=("train", "val"), check_images=d.is_main,
        table_path=cfg.mapping_path if villa_mode else None,
        required_columns=("assigned_text",) if villa_mode else (),
    )  # fmt: skip


def load_pair_data(
    cfg: DictConfig, clip: Clip, runtime: Runtime, d: Dist, ann: Optional[Annotations] = None
) -> tuple[PairData, PairData]:
    """Train and val pairs for the mode; texts embedded once by the frozen text tower (villa, baseline)."""
    if ann is None:
        ann = load_stage2_annotations(cfg, d)
    if uses_mapping(cfg):
        col = ann.table.column("assigned_text").combine_chunks()
        region_text = col.flatten().to_pylist()
        pairs = build_pairs(ann.image_size, ann.text, ann.region_offsets, ann.boxes, region_text)
    elif cfg.mode == "grain":  # grain_boxes=gold: the ground-truth pairs, sentences chosen as Stage 1's rule does
        vocab = vocab_from_config(cfg)
        gold = ann.region_attribute_matrix(len(vocab))
        if gold is None:
            raise VillaError(f"grain_boxes=gold needs ground-truth regions: {cfg.data_dir} has no reg_to_attr column")
        region_text = assign_text(ann.text, ann.region_offsets, gold, vocab, np.random.default_rng(cfg.seed))
        pairs = build_pairs(ann.image_size, ann.text, ann.region_offsets, ann.boxes, region_text)
    else:
        pairs = build_pairs(ann.image_size, ann.text)
    text_emb = tokens = None
    if cfg.mode == "pretrain":
        tokens = open_clip.get_tokenizer(clip.model_name)(pairs.text)
        if cfg.crop == "content":
            pairs.boxes = content_boxes(ann)
        elif cfg.crop != "none":
            raise VillaError(f"crop={cfg.crop!r}: use none or content")
    else:
        cache = Path(cfg.data_dir) / "text_cache"  # one file per text tower (villa.encoders.text_tower_digest)
        text_emb = mean_text_embeddings(clip, pairs.text, runtime, cache if d.is_main else None).to(runtime.device)
    out = []
    for split in ("train", "val"):
        out.append(PairData(ann, np.flatnonzero(ann.split == split), pairs, text_emb, tokens))
        if cfg.mode == "grain":
            out[-1].grain = cfg.grain
    n_pairs = int(np.diff(pairs.offsets)[out[0].rows].sum())
    log.info(
        "stage2 (%s): %d train images, %d train pairs, %d val images",
        cfg.mode,
        len(out[0].rows),
        n_pairs,
        len(out[1].rows),
    )
    return out[0], out[1]


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
            images, rows, torch.from_numpy(pair_idx), torch.from_numpy(box_image),
            torch.from_numpy(self.boxes[pair_idx]), torch.from_numpy(whole),
        )  # fmt: skip


def make_loader(
    data: PairData, cfg: DictConfig, d: Dist, train: bool, split: str = "train"
) -> tuple[DataLoader, DistributedSampler]:
    """Training batches are shuffled and, as the original's (``drop_last=True``), the last partial one is dropped
    unless ``drop_last=false``; validation keeps every image."""
    ds = ImageDataset(data.ann, data.rows)
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
        ds, batch_size=per_rank, sampler=sampler, num_workers=cfg.num_workers, collate_fn=PairCollate(data.pairs),
        pin_memory=torch.cuda.is_available(), persistent_workers=cfg.num_workers > 0, drop_last=drop_last,
    )  # fmt: skip
    return loader, sampler
