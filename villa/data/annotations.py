"""The annotation schema every dataset follows (docs/data_format.md), its validator, and flat-array access.

A dataset folder holds ``annotations.feather`` (one row per image) and the image files. :func:`load_annotations`
validates it before any work and names the first problem precisely; it returns the columns as flat numpy arrays
plus offsets (regions of image i are rows ``region_offsets[i]:region_offsets[i+1]``), never per-row objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
from PIL import Image

from villa.core.errors import VillaError
from villa.core.io import PathLike
from villa.data.vocab import Vocabulary

REQUIRED_COLUMNS = {
    "image_id": "unique id of the image (int or string)",
    "image_filepath": "image path relative to the dataset folder",
    "image_size": "[width, height] in pixels",
    "split": "train / val / test",
    "text": "the caption",
    "region_coord": "per region [x0, y0, x1, y1] in pixels",
    "num_regions": "number of regions",
    "attributes": "the attribute names the caption mentions",
}
OPTIONAL_COLUMNS = {
    "reg_to_attr": "per region: its ground-truth attribute names (scores mappings and region retrieval); null for an "
    "unlabelled image",
    "region_score": "per region: the proposal's objectness (regions from a detector)",
}


@dataclass
class Annotations:
    """A validated dataset as flat arrays. I images, R regions."""

    root: Path
    table: pa.Table
    image_id: np.ndarray  # (I,)
    split: np.ndarray  # (I,) str
    filepath: list[str]  # (I,)
    image_size: np.ndarray  # (I, 2) [width, height]
    text: list[str]  # (I,)
    region_offsets: np.ndarray  # (I + 1,)
    boxes: np.ndarray  # (R, 4) float32
    attr_offsets: np.ndarray  # (I + 1,) into attr_ids
    attr_ids: np.ndarray  # vocabulary index of each image's attributes
    reg_attr_offsets: Optional[np.ndarray]  # (R + 1,) into reg_attr_ids, when reg_to_attr is present
    reg_attr_ids: Optional[np.ndarray]
    labelled: Optional[np.ndarray] = None  # (I,) bool: the image has region labels (reg_to_attr not null)

    @property
    def n_images(self) -> int:
        return len(self.image_id)

    @property
    def n_regions(self) -> np.ndarray:
        return np.diff(self.region_offsets)

    def attribute_matrix(self, n_attributes: int) -> np.ndarray:
        """(I, A) bool: which attributes each image's text mentions."""
        m = np.zeros((self.n_images, n_attributes), dtype=bool)
        img = np.repeat(np.arange(self.n_images), np.diff(self.attr_offsets))
        m[img, self.attr_ids] = True
        return m

    def region_attribute_matrix(self, n_attributes: int) -> Optional[np.ndarray]:
        """(R, A) bool ground truth from ``reg_to_attr``, or None when the dataset has none."""
        if self.reg_attr_offsets is None:
            return None
        m = np.zeros((len(self.boxes), n_attributes), dtype=bool)
        reg = np.repeat(np.arange(len(self.boxes)), np.diff(self.reg_attr_offsets))
        m[reg, self.reg_attr_ids] = True
        return m


def _list_offsets(col: pa.ChunkedArray, name: str, nullable: bool = False) -> tuple[np.ndarray, pa.Array]:
    arr = col.combine_chunks()
    if not pa.types.is_list(arr.type) and not pa.types.is_large_list(arr.type):
        raise VillaError(f"column {name!r} must hold a list per row, found {arr.type}; see docs/data_format.md")
    if arr.null_count and not nullable:
        row = int(np.flatnonzero(np.asarray(arr.is_null()))[0])
        raise VillaError(f"column {name!r} is null at row {row}; give every row a (possibly empty) list")
    return np.asarray(arr.offsets, dtype=np.int64), arr.flatten()


def _encode_names(values: pa.Array, vocab: Vocabulary, where: str, ids_of_rows: np.ndarray, ids: list) -> np.ndarray:
    names = values.to_numpy(zero_copy_only=False).astype(object)
    lookup = vocab.index
    out = np.fromiter((lookup.get(n, -1) for n in names), dtype=np.int64, count=len(names))
    bad = np.flatnonzero(out < 0)
    if len(bad):
        i = bad[0]
        raise VillaError(
            f"unknown attribute {names[i]!r} in {where} of image {ids[ids_of_rows[i]]!r}: not in the "
            f"{vocab.name!r} vocabulary; add it to the dataset config or fix the annotations"
        )
    return out


def load_annotations(
    data_dir: PathLike,
    vocab: Vocabulary,
    required_splits: Sequence[str] = ("train",),
    check_images: bool = True,
    table_path: Optional[PathLike] = None,
    required_columns: Sequence[str] = (),
) -> Annotations:
    """Read and validate ``<data_dir>/annotations.feather`` (or ``table_path``, e.g. Stage 1's mapping.feather,
    whose images are still under ``data_dir``); raise :class:`VillaError` on the first problem."""
    root = Path(data_dir)
    path = Path(table_path) if table_path is not None else root / "annotations.feather"
    table = read_table(root, path, required_columns)
    image_id, ids = _image_ids(table, path)
    split = np.asarray(table.column("split").to_numpy(zero_copy_only=False)).astype(str)
    for s in required_splits:
        if not (split == s).any():
            present = ", ".join(sorted(set(split)))
            raise VillaError(f"split {s!r} is empty in {path} (splits present: {present}); add {s} rows")
    reg_off, boxes = _regions(table, ids)
    wh = _image_sizes(table, ids)
    _check_boxes_inside(boxes, reg_off, wh, ids)
    attr_off, attr_vals = _list_offsets(table.column("attributes"), "attributes")
    attr_ids = _encode_names(attr_vals, vocab, "'attributes'", np.repeat(np.arange(len(ids)), np.diff(attr_off)), ids)
    reg_attr_off, reg_attr_ids, labelled = _region_labels(table, vocab, reg_off, ids)
    filepath = _image_paths(table, path, root, split, ids, check_images)
    return Annotations(
        root=root,
        table=table,
        image_id=image_id,
        split=split,
        filepath=filepath,
        image_size=wh.astype(np.int64),
        text=_texts(table, ids),
        region_offsets=reg_off,
        boxes=boxes,
        attr_offsets=attr_off,
        attr_ids=attr_ids,
        reg_attr_offsets=reg_attr_off,
        reg_attr_ids=reg_attr_ids,
        labelled=labelled,
    )


def read_table(root: Path, path: Path, required_columns: Sequence[str] = ()) -> pa.Table:
    """The annotation table, with villa's required columns (and ``required_columns``) and at least one row."""
    if not root.is_dir():
        raise VillaError(f"dataset folder not found: {root}; generate it or pass the right data_dir")
    if not path.is_file():
        raise VillaError(f"{path} not found; a dataset folder needs annotations.feather (docs/data_format.md)")
    try:
        table = feather.read_table(str(path))
    except Exception as e:
        raise VillaError(f"cannot read {path}: {e}") from e
    for col, what in REQUIRED_COLUMNS.items():
        if col not in table.column_names:
            raise VillaError(f"{path}: missing column {col!r} ({what}); see docs/data_format.md")
    for col in required_columns:
        if col not in table.column_names:
            raise VillaError(f"{path}: missing column {col!r}; it is written by Stage 1 (python -m villa.stage1 ...)")
    if table.num_rows == 0:
        raise VillaError(f"{path} has no rows")
    return table


def _image_ids(table: pa.Table, path: Path) -> tuple[np.ndarray, list]:
    """The ids (finite, unique) and the same as plain Python values for messages."""
    image_id = table.column("image_id").to_numpy(zero_copy_only=False)
    if table.column("image_id").null_count or (image_id.dtype.kind == "f" and not np.isfinite(image_id).all()):
        i = int(np.flatnonzero(_null_ids(image_id))[0])
        raise VillaError(f"{path}: row {i}: image_id is not finite (null or NaN); give every image an id")
    if len(np.unique(image_id)) != table.num_rows:
        raise VillaError(f"{path}: column 'image_id' has duplicates; ids must be unique")
    return image_id, image_id.tolist()


def _regions(table: pa.Table, ids: list) -> tuple[np.ndarray, np.ndarray]:
    """Region offsets (I + 1,) and boxes (R, 4): every image has regions, each a finite [x0, y0, x1, y1]."""
    reg_off, coords = _list_offsets(table.column("region_coord"), "region_coord")
    n_reg = np.diff(reg_off)
    num_regions = table.column("num_regions").to_numpy().astype(np.int64)
    bad = np.flatnonzero(num_regions != n_reg)
    if len(bad):
        i = bad[0]
        raise VillaError(
            f"image {ids[i]!r}: num_regions={num_regions[i]} but region_coord has {n_reg[i]} boxes; make them agree"
        )
    if (n_reg == 0).any():
        i = int(np.flatnonzero(n_reg == 0)[0])
        raise VillaError(f"image {ids[i]!r} has no region; drop it or give it at least one box")
    if not (pa.types.is_list(coords.type) or pa.types.is_fixed_size_list(coords.type)):
        raise VillaError(f"region_coord must be a list of [x0, y0, x1, y1] per image, found {coords.type}")
    box_len = np.diff(np.asarray(coords.offsets)) if pa.types.is_list(coords.type) else None
    if box_len is not None and (box_len != 4).any():
        r = int(np.flatnonzero(box_len != 4)[0])
        i = int(np.searchsorted(reg_off, r, side="right") - 1)
        raise VillaError(f"image {ids[i]!r}: region {r - reg_off[i]} has {box_len[r]} coordinates, expected 4")
    boxes = np.asarray(coords.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, 4)
    if not np.isfinite(boxes).all():
        r = int(np.flatnonzero(~np.isfinite(boxes).all(1))[0])
        i = int(np.searchsorted(reg_off, r, side="right") - 1)
        raise VillaError(
            f"image {ids[i]!r}: region {r - reg_off[i]} has a coordinate that is not finite ({boxes[r].tolist()})"
        )
    return reg_off, boxes


def _image_sizes(table: pa.Table, ids: list) -> np.ndarray:
    """(I, 2) [width, height]."""
    size_off, sizes = _list_offsets(table.column("image_size"), "image_size")
    if (np.diff(size_off) < 2).any():
        i = int(np.flatnonzero(np.diff(size_off) < 2)[0])
        raise VillaError(f"image {ids[i]!r}: image_size must be [width, height]")
    sizes = np.asarray(sizes.to_numpy(zero_copy_only=False), dtype=np.float64)
    return np.stack([sizes[size_off[:-1]], sizes[size_off[:-1] + 1]], 1)


def boxes_outside(boxes: np.ndarray, region_image: np.ndarray, wh: np.ndarray) -> np.ndarray:
    """(R,) bool: boxes that leave their image (negative, beyond its width or height) or are empty or inverted."""
    w, h = wh[region_image, 0], wh[region_image, 1]
    return (
        (boxes[:, 0] < 0)
        | (boxes[:, 1] < 0)
        | (boxes[:, 2] > w)
        | (boxes[:, 3] > h)
        | (boxes[:, 2] <= boxes[:, 0])
        | (boxes[:, 3] <= boxes[:, 1])
    )


def _check_boxes_inside(boxes: np.ndarray, reg_off: np.ndarray, wh: np.ndarray, ids: list) -> None:
    reg_img = np.repeat(np.arange(len(ids)), np.diff(reg_off))
    outside = boxes_outside(boxes, reg_img, wh)
    if outside.any():
        r = int(np.flatnonzero(outside)[0])
        i = reg_img[r]
        raise VillaError(
            f"image {ids[i]!r}: box {boxes[r].tolist()} (region {r - reg_off[i]}) is outside its "
            f"{int(wh[i, 0])}x{int(wh[i, 1])} image or empty; boxes are [x0, y0, x1, y1] in pixels"
        )


def _region_labels(
    table: pa.Table, vocab: Vocabulary, reg_off: np.ndarray, ids: list
) -> tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
    """``reg_to_attr`` as region-level offsets and vocabulary ids, and which images are labelled (None, None, None
    without the column); an unlabelled image (null) has no labels on its regions."""
    if "reg_to_attr" not in table.column_names:
        return None, None, None
    n_reg = np.diff(reg_off)
    ra_col = table.column("reg_to_attr").combine_chunks()
    labelled = ~np.asarray(ra_col.is_null(), dtype=bool)
    _, ra_lists = _list_offsets(table.column("reg_to_attr"), "reg_to_attr", nullable=True)  # labelled images'
    per_image = np.asarray(pc.fill_null(pc.list_value_length(ra_col), 0), dtype=np.int64)
    wrong = labelled & (per_image != n_reg)
    if wrong.any():
        i = int(np.flatnonzero(wrong)[0])
        raise VillaError(f"image {ids[i]!r}: reg_to_attr must have one list per region ({n_reg[i]}), or be null")
    n_boxes = int(reg_off[-1])
    inner_len = np.diff(np.asarray(ra_lists.offsets, dtype=np.int64))
    reg_count = np.zeros(n_boxes, np.int64)
    reg_count[np.repeat(labelled, n_reg)] = inner_len
    reg_attr_off = np.concatenate([[0], np.cumsum(reg_count)]).astype(np.int64)
    reg_img = np.repeat(np.arange(len(ids)), n_reg)
    owners = reg_img[np.repeat(np.arange(n_boxes), reg_count)]
    reg_attr_ids = _encode_names(ra_lists.flatten(), vocab, "'reg_to_attr'", owners, ids)
    return reg_attr_off, reg_attr_ids, labelled


def _image_paths(table: pa.Table, path: Path, root: Path, split: np.ndarray, ids: list, check_images: bool) -> list:
    """Relative paths that stay in the dataset folder, each image in one split only, the files readable."""
    filepath = table.column("image_filepath").to_pylist()
    outside_paths = [i for i, p in enumerate(filepath) if not path_inside(p)]
    if outside_paths:
        i = outside_paths[0]
        raise VillaError(
            f"{path}: image {ids[i]!r} has image_filepath {filepath[i]!r}, which leaves the dataset folder "
            f"({len(outside_paths)} such rows); image paths must be relative to {root}, without '..'"
        )
    conflicts = split_conflicts(filepath, split)
    if conflicts:
        raise VillaError(
            f"{path}: {len(conflicts)} images are listed under more than one split, e.g. {conflicts[0]}: an image in "
            "train and test would be evaluated on what trained; give each image one split (import the data again)"
        )
    if check_images:
        check_image_files(root, filepath, ids)
    return filepath


def _texts(table: pa.Table, ids: list) -> list[str]:
    text = table.column("text").to_pylist()
    if any(t is None for t in text):
        i = text.index(None)
        raise VillaError(f"image {ids[i]!r}: text is null; give every image its caption")
    blank = [i for i, t in enumerate(text) if not t.strip()]
    if blank:
        raise VillaError(
            f"image {ids[blank[0]]!r}: text is empty ({len(blank)} such images); give every image its caption"
        )
    return text


def _null_ids(a: np.ndarray) -> np.ndarray:
    """Null or NaN entries of an id column (object or float)."""
    if a.dtype.kind == "f":
        return ~np.isfinite(a)
    return np.array([v is None or (isinstance(v, float) and v != v) for v in a.tolist()], dtype=bool)


def image_key(path: str) -> str:
    """One image file, however its relative path is spelled (``a/./b.png`` and ``a/b.png`` are one file)."""
    return os.path.normpath(str(path))


def split_conflicts(paths: Sequence[str], split: np.ndarray) -> list[str]:
    """Images listed under more than one split, each as ``'path' (train, test)``: such an image would be evaluated
    on what trained."""
    seen: dict[str, set[str]] = {}
    for p, s in zip(paths, split):
        seen.setdefault(image_key(p), set()).add(str(s))
    order = {"train": 0, "val": 1, "test": 2}
    return [f"{p!r} ({', '.join(sorted(s, key=lambda x: order.get(x, 3)))})" for p, s in seen.items() if len(s) > 1]


def path_inside(rel: str) -> bool:
    """A relative path that stays inside its folder: not absolute, no ``..`` part, no drive letter."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        return False
    p = PurePosixPath(rel.replace("\\", "/"))
    return not p.is_absolute() and ".." not in p.parts and not (len(rel) > 1 and rel[1] == ":")


def boxes_only(
    root: Path,
    image_id: np.ndarray,
    filepath: list[str],
    image_size: np.ndarray,
    region_offsets: np.ndarray,
    boxes: np.ndarray,
) -> Annotations:
    """An :class:`Annotations` of images and boxes alone (no texts or attributes): what the region loop reads, for
    images outside villa's schema (a COCO ground truth, a classification CSV)."""
    n = len(image_id)
    return Annotations(
        root=Path(root),
        table=None,
        image_id=image_id,
        split=np.full(n, "test"),
        filepath=filepath,
        image_size=image_size,
        text=[""] * n,
        region_offsets=region_offsets,
        boxes=boxes,
        attr_offsets=np.zeros(n + 1, np.int64),
        attr_ids=np.zeros(0, np.int64),
        reg_attr_offsets=None,
        reg_attr_ids=None,
    )


def check_image_files(root: Path, filepath: list[str], ids: list) -> None:
    """Every image exists and its header reads (decoding errors are reported by the loader, naming the file)."""
    for i, p in enumerate(filepath):
        full = root / p
        try:
            with Image.open(full) as im:
                im.size  # noqa: B018 - reads the header
        except FileNotFoundError as e:
            raise VillaError(f"image {ids[i]!r}: file {full} not found; image_filepath is relative to {root}") from e
        except Exception as e:
            raise VillaError(f"image {ids[i]!r}: cannot read {full} ({type(e).__name__}); replace the file") from e
