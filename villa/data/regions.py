"""Where a dataset's regions come from: one choice per dataset, ``regions=given|grid|proposals|masks``.

- ``given``: the boxes the data brings (``region_coord`` / a ``boxes`` field / COCO's ground-truth boxes);
- ``grid``: R x C cells per image, optionally several levels (``grid=[1, 2, 3]``: 1x1 + 2x2 + 3x3, the paper's
  grid division); a level is ``N`` (N x N) or ``"RxC"``;
- ``proposals``: a detector's boxes (:mod:`villa.models.detector`: a torchvision Faster R-CNN family model or a local
  checkpoint; the RPN's top-K after NMS with their objectness), or a proposals file in COCO results format
  (``image_id``, ``bbox`` as ``[x, y, w, h]``, ``score``) written by any detector, e.g. RegionCLIP's RPN;
- ``masks``: one box per labelled part of a segmentation or parsing map (the dataset's importer reads the maps).

The choice is recorded in annotations.feather's schema metadata (``villa_regions``), copied by preprocessing into
the embeddings' meta.json, and part of every run's fingerprint (through the annotations' content hash). Proposal
scores are kept in an optional ``region_score`` column.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from villa.core.errors import VillaError

log = logging.getLogger(__name__)

SOURCES = ("given", "grid", "proposals", "masks")
REGIONS_META = "villa_regions"


@dataclass
class RegionSpec:
    """How to make a dataset's regions (one place per dataset; the importers' ``--regions`` options)."""

    source: str = "given"
    grid: list = field(default_factory=lambda: [3])  # levels: N (N x N) or "RxC"
    proposals_file: Optional[str] = None  # COCO results JSON (image_id, bbox [x, y, w, h], score)
    detector: Optional[str] = None  # villa-tiny-frcnn or a torchvision detection model name
    detector_weights: Optional[str] = None  # checkpoint path or torchvision weights name (DEFAULT)
    proposal_kind: str = "rpn"  # rpn: the RPN's boxes and objectness; detections: class-agnostic detections
    top_k: int = 100
    nms: float = 0.7
    min_score: float = 0.0
    min_size: float = 2.0  # pixels: smaller boxes are dropped
    batch_size: int = 16

    def check(self) -> None:
        if self.source not in SOURCES:
            raise VillaError(f"regions={self.source!r}: use one of {', '.join(SOURCES)}")
        if self.top_k < 1 or self.batch_size < 1:
            raise VillaError("top_k and batch_size must be >= 1")
        if not 0 < self.nms <= 1:
            raise VillaError(f"nms={self.nms}: an IoU threshold in (0, 1]")
        if self.source == "grid":
            grid_levels(self.grid)
        if self.source == "proposals" and not (self.proposals_file or self.detector or self.detector_weights):
            raise VillaError(
                "regions=proposals needs --proposals_file (COCO results JSON) or --detector/--detector_weights"
            )
        if self.source == "proposals" and not self.proposals_file and self.detector_weights in (None, "", "none"):
            raise VillaError(
                f"--detector {self.detector} has no weights: an untrained detector proposes random boxes; pass "
                "--detector_weights (a checkpoint from python -m villa.models.detector train, or a torchvision weights "
                "name such as DEFAULT) or --proposals_file (a COCO results JSON, docs/data_format.md)"
            )

    def record(self) -> dict[str, Any]:
        rec = {"source": self.source}
        if self.source == "grid":
            rec["grid"] = [list(x) for x in grid_levels(self.grid)]
        if self.source == "proposals":
            rec.update({k: v for k, v in asdict(self).items() if k not in ("source", "grid", "batch_size")})
            if self.proposals_file:
                from villa.core.provenance import file_sha256

                rec["proposals_sha256"] = file_sha256(self.proposals_file)
        return rec


def grid_levels(levels: Sequence[Any]) -> list[tuple[int, int]]:
    """``[1, 2, "3x4"]`` -> ``[(1, 1), (2, 2), (3, 4)]`` (rows, columns)."""
    if isinstance(levels, (int, str)):
        levels = [levels]
    out = []
    for lv in levels:
        try:
            if isinstance(lv, str) and "x" in lv.lower():
                r, c = (int(v) for v in lv.lower().split("x"))
            else:
                r = c = int(lv)
        except ValueError as e:
            raise VillaError(f"grid level {lv!r}: use N (N x N cells) or RxC, e.g. grid=[1,2,3] or 2x3") from e
        if r < 1 or c < 1:
            raise VillaError(f"grid level {lv!r}: rows and columns must be >= 1")
        out.append((r, c))
    if not out:
        raise VillaError("grid needs at least one level, e.g. grid=[3]")
    return out


def grid_boxes(image_size: np.ndarray, levels: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Every image's grid cells, level by level, row-major: offsets (I + 1,) and boxes (R, 4) float32 in pixels.

    Cell edges are ``round(k * W / C)``, so cells tile the image exactly."""
    lv = grid_levels(levels)
    cells = []
    for r, c in lv:
        ys = np.arange(r + 1) / r
        xs = np.arange(c + 1) / c
        y0, x0 = np.meshgrid(ys[:-1], xs[:-1], indexing="ij")
        y1, x1 = np.meshgrid(ys[1:], xs[1:], indexing="ij")
        cells.append(np.stack([x0.ravel(), y0.ravel(), x1.ravel(), y1.ravel()], 1))
    unit = np.concatenate(cells)  # (K, 4) fractions
    wh = image_size.astype(np.float64)
    scale = np.concatenate([wh, wh], 1)  # (I, 4)
    boxes = np.round(unit[None] * scale[:, None]).reshape(-1, 4).astype(np.float32)
    k = len(unit)
    return np.arange(len(image_size) + 1, dtype=np.int64) * k, boxes


def clean_boxes(boxes: np.ndarray, image_size: np.ndarray, owner: np.ndarray, min_size: float) -> np.ndarray:
    """Clip boxes (R, 4) to their images and return the mask of those at least ``min_size`` wide and high."""
    w, h = image_size[owner, 0], image_size[owner, 1]
    boxes[:, 0] = np.clip(boxes[:, 0], 0, w)
    boxes[:, 2] = np.clip(boxes[:, 2], 0, w)
    boxes[:, 1] = np.clip(boxes[:, 1], 0, h)
    boxes[:, 3] = np.clip(boxes[:, 3], 0, h)
    return ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)


def _top_k_per_image(owner: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best-scoring rows of each owner, grouped by owner, best first."""
    order = np.lexsort((-scores, owner))
    o = owner[order]
    first = np.concatenate([[0], np.flatnonzero(np.diff(o)) + 1]) if len(o) else np.zeros(0, int)
    rank = np.arange(len(o)) - np.repeat(first, np.diff(np.concatenate([first, [len(o)]])))
    return order[rank < k]


def proposals_from_file(
    path: str,
    image_id: np.ndarray,
    image_size: np.ndarray,
    top_k: int = 100,
    min_score: float = 0.0,
    min_size: float = 2.0,
    filepath: Optional[Sequence[str]] = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a COCO results file: offsets (I + 1,), boxes (R, 4) xyxy pixels, scores (R,), each image's best
    ``top_k`` above ``min_score``. An entry names its image by ``file_name`` (the image's path as the captions
    file gives it, matched against ``filepath``) or by ``image_id`` (the dataset's id: a captions file's ``id``
    field, else its 0-based record number). Proposals for images the dataset does not have are an error."""
    p = Path(path)
    try:
        rows = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise VillaError(f"proposals file not found: {p}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VillaError(f"{p} is not JSON ({e}); write a COCO results list [{{image_id, bbox, score}}, ...]") from e
    if not isinstance(rows, list) or not rows:
        raise VillaError(f"{p} holds no proposals; write a non-empty COCO results list [{{image_id, bbox, score}}]")
    by_name = filepath is not None and all(isinstance(r, dict) and "file_name" in r for r in rows)
    if by_name:
        image_id, key = np.asarray([os.path.normpath(f) for f in filepath]), "file_name"
    else:
        key = "image_id"
    try:
        ids = np.array([os.path.normpath(r[key]) if by_name else r[key] for r in rows])
        bbox = np.asarray([r["bbox"] for r in rows], dtype=np.float64).reshape(len(rows), 4)
        score = np.asarray([r.get("score", 1.0) for r in rows], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise VillaError(
            f"{p}: every entry needs image_id (or file_name), bbox [x, y, w, h] and score ({type(e).__name__}: {e})"
        ) from e
    if not np.isfinite(bbox).all() or not np.isfinite(score).all():
        raise VillaError(f"{p}: a bbox or score is not finite; fix the proposals file")
    lookup = {v: i for i, v in enumerate(image_id.tolist())}
    owner = np.fromiter((lookup.get(v, -1) for v in ids.tolist()), dtype=np.int64, count=len(ids))
    if (owner < 0).any():
        bad = ids[owner < 0]
        raise VillaError(
            f"{p} has proposals for {len(np.unique(bad))} images this dataset does not have (e.g. {key} "
            f"{bad.tolist()[0]!r}); pass the proposals written for these images"
        )
    boxes = np.concatenate([bbox[:, :2], bbox[:, :2] + bbox[:, 2:]], 1).astype(np.float32)
    ok = clean_boxes(boxes, image_size, owner, min_size) & (score >= min_score)
    idx = np.flatnonzero(ok)
    idx = idx[_top_k_per_image(owner[idx], score[idx], top_k)]
    counts = np.bincount(owner[idx], minlength=len(image_id))
    return np.concatenate([[0], np.cumsum(counts)]), boxes[idx], score[idx].astype(np.float32)


def detector_proposals(
    root: Path,
    filepath: Sequence[str],
    image_size: np.ndarray,
    spec: RegionSpec,
    progress: bool = True,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Run a detector over every image: offsets, boxes (R, 4), scores (R,) and the detector's identity."""
    from tqdm import tqdm

    from villa.data.images import read_image
    from villa.models.detector import load_detector, propose

    model, ident = load_detector(spec.detector, spec.detector_weights)
    model = model.to(device)
    boxes, scores, counts = [], [], []
    bar = tqdm(total=len(filepath), desc="proposals", unit="img", disable=not progress)
    for s in range(0, len(filepath), spec.batch_size):
        ims = [read_image(root / f).to(device).float().div_(255) for f in filepath[s : s + spec.batch_size]]
        for b, sc in propose(model, ims, spec.top_k, spec.nms, spec.proposal_kind):
            b, sc = b.cpu().numpy().astype(np.float32), sc.cpu().numpy().astype(np.float32)
            boxes.append(b)
            scores.append(sc)
            counts.append(len(b))
        bar.update(len(ims))
    bar.close()
    counts = np.asarray(counts, np.int64)
    b = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
    sc = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    owner = np.repeat(np.arange(len(counts)), counts)
    ok = clean_boxes(b, image_size, owner, spec.min_size) & (sc >= spec.min_score)
    counts = np.bincount(owner[ok], minlength=len(counts))
    return np.concatenate([[0], np.cumsum(counts)]), b[ok], sc[ok], ident


def make_regions(
    spec: RegionSpec,
    root: Path,
    image_id: np.ndarray,
    filepath: Sequence[str],
    image_size: np.ndarray,
    given: Optional[tuple[np.ndarray, np.ndarray]] = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], dict[str, Any]]:
    """Offsets (I + 1,), boxes (R, 4) float32, scores (R,) or None, and the record for the metadata.
    ``given``: (offsets, boxes) the data brings (regions=given, and masks, whose importer computes them)."""
    spec.check()
    record = spec.record()
    if spec.source in ("given", "masks"):
        if given is None:
            raise VillaError(f"regions={spec.source}: this data brings no boxes; use regions=grid or regions=proposals")
        return given[0], given[1], None, record
    if spec.source == "grid":
        off, boxes = grid_boxes(image_size, spec.grid)
        return off, boxes, None, record
    if spec.proposals_file:
        off, boxes, scores = proposals_from_file(
            spec.proposals_file, image_id, image_size, spec.top_k, spec.min_score, spec.min_size, filepath
        )
    else:
        off, boxes, scores, ident = detector_proposals(root, filepath, image_size, spec, progress)
        record.update(ident)
    return off, boxes, scores, record


def with_whole_image(offsets: np.ndarray, boxes: np.ndarray, image_size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Give every image without a region one region: the whole image (so that no image is dropped)."""
    counts = np.diff(offsets)
    empty = np.flatnonzero(counts == 0)
    if not len(empty):
        return offsets, boxes
    whole = np.zeros((len(empty), 4), np.float32)
    whole[:, 2:] = image_size[empty]
    ins = offsets[empty]
    boxes = np.insert(boxes, ins, whole, axis=0)
    counts = counts.copy()
    counts[empty] = 1
    return np.concatenate([[0], np.cumsum(counts)]), boxes


def label_regions(
    offsets: np.ndarray,
    boxes: np.ndarray,
    ref_offsets: np.ndarray,
    ref_boxes: np.ndarray,
    ref_labels: Sequence[Sequence[str]],
    iou: float = 0.5,
) -> list[list[str]]:
    """Ground truth for new regions from reference regions of the same images: each new box takes the labels of the
    reference box it overlaps most, if their IoU is at least ``iou`` (else none). Used to score mappings and
    retrieval of grid or proposal regions against labelled boxes (e.g. DocMNIST's)."""
    from torchvision.ops import box_iou

    out: list[list[str]] = [[] for _ in range(len(boxes))]
    n = len(offsets) - 1
    for i in range(n):
        a, b = slice(offsets[i], offsets[i + 1]), slice(ref_offsets[i], ref_offsets[i + 1])
        if a.start == a.stop or b.start == b.stop:
            continue
        m = box_iou(torch.from_numpy(boxes[a]).float(), torch.from_numpy(ref_boxes[b]).float())
        best, arg = m.max(1)
        for k in np.flatnonzero(best.numpy() >= iou):
            out[a.start + k] = list(ref_labels[b.start + int(arg[k])])
    return out


def regions_record(table: pa.Table) -> Optional[dict[str, Any]]:
    """The region source recorded in an annotations table (None when the data predates the record)."""
    raw = (table.schema.metadata or {}).get(REGIONS_META.encode())
    return json.loads(raw) if raw else None


def recall_at_iou(
    offsets: np.ndarray, boxes: np.ndarray, ref_offsets: np.ndarray, ref_boxes: np.ndarray, iou: float = 0.5
) -> float:
    """Share of reference boxes that some region of the same image overlaps with IoU >= ``iou`` (proposal recall)."""
    from torchvision.ops import box_iou

    hit = total = 0
    for i in range(len(offsets) - 1):
        ref = torch.from_numpy(ref_boxes[ref_offsets[i] : ref_offsets[i + 1]]).float()
        got = torch.from_numpy(boxes[offsets[i] : offsets[i + 1]]).float()
        total += len(ref)
        if len(ref) and len(got):
            hit += int((box_iou(ref, got).max(1).values >= iou).sum())
    return hit / max(total, 1)


def attach_reference_labels(data_dir: Path, reference_dir: Path, vocab, iou: float = 0.5) -> dict[str, Any]:
    """Score-only ground truth: give ``data_dir``'s regions the ``reg_to_attr`` of ``reference_dir``'s labelled
    boxes of the same images (:func:`label_regions`), rewriting its annotations.feather; returns proposal recall
    at IoU 0.5 against the reference boxes. (The offline example measures what grid or proposal regions cost
    against DocMNIST's ground-truth boxes this way; nothing trains on these labels.)"""
    import pyarrow.feather as feather

    from villa.core.io import atomic_file
    from villa.data.annotations import load_annotations

    ann = load_annotations(data_dir, vocab, check_images=False)
    ref = load_annotations(reference_dir, vocab, check_images=False)
    if ref.reg_attr_offsets is None:
        raise VillaError(f"{reference_dir} has no reg_to_attr to take labels from")
    pos = {v: i for i, v in enumerate(ref.image_id.tolist())}
    idx = np.array([pos.get(v, -1) for v in ann.image_id.tolist()])
    if (idx < 0).any():
        raise VillaError(f"{data_dir} has images that {reference_dir} lacks; label from the dataset they came from")
    from villa.data.batches import gather_index

    ref_reg, _ = gather_index(ref.region_offsets, idx)
    ref_off = np.concatenate([[0], np.cumsum(ref.n_regions[idx])])
    names = np.array(vocab.attributes, dtype=object)
    lab_all = [list(names[ref.reg_attr_ids[ref.reg_attr_offsets[r] : ref.reg_attr_offsets[r + 1]]]) for r in ref_reg]
    labels = label_regions(ann.region_offsets, ann.boxes, ref_off, ref.boxes[ref_reg], lab_all, iou)
    recall = recall_at_iou(ann.region_offsets, ann.boxes, ref_off, ref.boxes[ref_reg], 0.5)
    table = ann.table
    if "reg_to_attr" in table.column_names:
        table = table.drop_columns(["reg_to_attr"])
    inner = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum([len(x) for x in labels])]).astype(np.int32)),
        pa.array([a for x in labels for a in x], pa.string()),
    )
    table = table.append_column(
        "reg_to_attr", pa.ListArray.from_arrays(pa.array(ann.region_offsets.astype(np.int32)), inner)
    )
    meta = dict(table.schema.metadata or {})
    rec = json.loads(meta.get(REGIONS_META.encode(), b"{}"))
    rec["labels_from"] = {"reference": str(reference_dir), "iou": iou, "score_only": True}
    meta[REGIONS_META.encode()] = json.dumps(rec).encode()
    with atomic_file(Path(data_dir) / "annotations.feather") as tmp:
        feather.write_feather(table.replace_schema_metadata(meta), str(tmp), compression="zstd")
    return {
        "recall_at_0.5": recall,
        "regions_per_image": float(np.mean(ann.n_regions)),
        "labelled_regions": int(sum(1 for x in labels if x)),
    }
