"""What every importer shares: safe relative paths, image sizes, deterministic splits, attributes from the text,
regions from the chosen source, and one atomic ``annotations.feather`` in villa's schema (docs/data_format.md).

An importer turns its published layout into flat columns (ids, image paths, texts, optional boxes and labels) and
calls :func:`write_dataset`; everything after that is the same for every source of data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
from PIL import Image

from villa.core.errors import VillaError
from villa.core.io import atomic_dir, atomic_file, write_json_atomic
from villa.data.annotations import boxes_outside, image_key, path_inside, split_conflicts
from villa.data.attributes import Extraction, extract_attributes, format_report
from villa.data.batches import gather_index
from villa.data.regions import REGIONS_META, RegionSpec, label_regions, make_regions, with_whole_image
from villa.data.vocab import SENTENCE_SEP, Vocabulary

log = logging.getLogger(__name__)

NO_ATTRIBUTE = ("error", "drop", "keep")
SAME_IMAGE = ("join", "separate")
IMPORT_META = "villa_import"
MAX_LISTED = 5  # problems named in one message (the count says how many there are)


def problems_error(what: str, problems: list[str], fix: str) -> VillaError:
    """Every problem of one kind at once: a count, the first few, and the fix, on one line."""
    shown = "; ".join(problems[:MAX_LISTED]) + (
        f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    )
    return VillaError(f"{len(problems)} {what}: {shown}; {fix}")


def check_inside(paths: Sequence[str], where: str) -> None:
    bad = [f"{p!r}" for p in paths if not path_inside(str(p))]
    if bad:
        raise problems_error(
            "image paths leave the dataset folder",
            bad,
            f"in {where}, give paths relative to the images folder, without '..'",
        )


def _decode(path: Path) -> tuple[int, int, str]:
    """(width, height, problem) of an image decoded whole: a truncated or corrupt file is found here, at import,
    not later in a training worker."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.size[0], im.size[1], ""
    except FileNotFoundError:
        return 0, 0, "missing"
    except Exception as e:  # noqa: BLE001 - any decoder error names the file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return 0, 0, f"unreadable ({type(e).__name__}{': ' + reason[:80] if reason else ''})"


def image_sizes(
    root: Path, paths: Sequence[str], workers: int = 8, expected: Optional[np.ndarray] = None
) -> np.ndarray:
    """(I, 2) [width, height] of every image, each decoded whole in a thread pool; every missing, unreadable or
    truncated image is reported at once, and so is one whose size is not the one the layout states (``expected``)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        res = list(ex.map(lambda p: _decode(root / p), paths, chunksize=64))
    bad = [f"{root / p} {why}" for p, (_, _, why) in zip(paths, res) if why]
    if bad:
        raise problems_error("images cannot be read", bad, "fix or remove them (or their rows) and import again")
    sizes = np.array([[w, h] for w, h, _ in res], dtype=np.int64).reshape(-1, 2)
    if expected is not None:
        wrong = np.flatnonzero((np.asarray(expected, np.int64) != sizes).any(1))
        if len(wrong):
            shown = [
                f"{root / paths[i]} is {sizes[i, 0]}x{sizes[i, 1]}, stated {expected[i][0]}x{expected[i][1]}"
                for i in wrong
            ]
            raise problems_error(
                "images differ from the size their annotation states", shown, "fix the annotation or the files"
            )
    return sizes


def hash_unit(keys: Sequence[Any], seed: int) -> np.ndarray:
    """A deterministic number in [0, 1) per key (sha1 of seed and key): splits that do not depend on row order."""
    out = np.empty(len(keys), np.float64)
    for i, k in enumerate(keys):
        h = hashlib.sha1(f"{seed}:{k}".encode()).digest()
        out[i] = int.from_bytes(h[:8], "big") / 2.0**64
    return out


def assign_splits(keys: Sequence[Any], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> np.ndarray:
    """train / val / test per row by a hash of its key (an image, or a group: a patient, a source photo), so that
    rows of one group never straddle splits and adding rows never moves the others."""
    f = np.asarray(fractions, np.float64)
    if len(f) != 3 or (f < 0).any() or f.sum() <= 0:
        raise VillaError(f"split fractions {list(fractions)}: give three non-negative numbers (train val test)")
    edges = np.cumsum(f / f.sum())
    u = hash_unit([str(k) for k in keys], seed)
    return np.array(["train", "val", "test"])[np.minimum(np.searchsorted(edges, u, side="right"), 2)]


def normalize_split(values: Sequence[Any], where: str) -> np.ndarray:
    """Split names as villa's: train, val (also validate / valid / validation / dev) and test."""
    aliases = {
        "train": "train",
        "training": "train",
        "val": "val",
        "valid": "val",
        "validate": "val",
        "validation": "val",
        "dev": "val",
        "test": "test",
        "testing": "test",
    }
    out = [aliases.get(str(v).strip().lower()) for v in values]
    bad = sorted({str(v) for v, o in zip(values, out) if o is None})
    if bad:
        raise VillaError(f"{where}: unknown split name(s) {bad[:5]}; use train, val or test")
    return np.array(out)


def _list_array(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(np.asarray(offsets, np.int32)), values)


@dataclass
class ImportedRows:
    """An importer's flat columns, one row per image (I) and, when the data brings boxes, per box (R)."""

    image_id: np.ndarray
    filepath: list[str]
    text: list[str]
    split: Optional[np.ndarray] = None  # (I,) or None: assigned by hash of ``group`` (else the image path)
    group: Optional[Sequence[Any]] = None  # (I,) keys kept within one split
    box_offsets: Optional[np.ndarray] = None  # (I + 1,) given boxes
    boxes: Optional[np.ndarray] = None  # (R, 4) xyxy pixels
    box_labels: Optional[list[list[str]]] = None  # (R,) per-box ground-truth attributes (reg_to_attr), if known
    image_size: Optional[np.ndarray] = None  # (I, 2) when the layout states it (else read from the files)
    attributes: Optional[list[list[str]]] = None  # (I,) when the layout labels them (else from the text)


def one_row_per_image(
    rows: ImportedRows, split: np.ndarray, how: str = "join", source: str = "generic"
) -> tuple[ImportedRows, np.ndarray, int]:
    """Refuse an image listed under two splits; join (``how="join"``) the rows of one image in one split.

    Joined rows keep the first row's id; their texts are joined as sentences (:func:`join_texts`), their attribute
    lists united, and their boxes (and box labels) put together, a box given twice kept once. Returns the rows,
    their splits and how many rows were joined into others."""
    conflicts = split_conflicts(rows.filepath, split)
    if conflicts:
        raise problems_error(
            "images are listed under more than one split",
            conflicts,
            f"give each image one split in the {source} data (an image in train and test would be evaluated on what "
            "trained)",
        )
    keys = [image_key(p) for p in rows.filepath]
    first: dict[str, int] = {}
    members: list[list[int]] = []
    for i, k in enumerate(keys):
        if k in first:
            members[first[k]].append(i)
        else:
            first[k] = len(members)
            members.append([i])
    merged = len(keys) - len(members)
    if not merged or how == "separate":
        return rows, split, 0 if how == "separate" else merged
    lead = np.array([m[0] for m in members])
    out = ImportedRows(
        image_id=np.asarray(rows.image_id)[lead],
        filepath=[rows.filepath[i] for i in lead],
        text=[join_texts([rows.text[i] for i in m]) if len(m) > 1 else rows.text[m[0]] for m in members],
        split=None if rows.split is None else np.asarray(rows.split)[lead],
        group=None if rows.group is None else [rows.group[i] for i in lead],
        image_size=None if rows.image_size is None else rows.image_size[lead],
    )
    if rows.attributes is not None:
        out.attributes = [sorted({a for i in m for a in rows.attributes[i]}) for m in members]
    if rows.box_offsets is not None:
        _join_boxes(rows, members, out)
    log.info("%d rows name an image already listed in the same split: joined into one row each", merged)
    return out, split[lead], merged


def _join_boxes(rows: ImportedRows, members: list[list[int]], out: ImportedRows) -> None:
    """Each joined image's boxes: every row's boxes in order, a box given twice kept once (labels united)."""
    off, boxes, labels = rows.box_offsets, rows.boxes, rows.box_labels
    new_boxes, new_labels, counts = [], [], []
    for m in members:
        index: dict[tuple, int] = {}
        for i in m:
            for r in range(off[i], off[i + 1]):
                key = tuple(np.asarray(boxes[r], np.float64).tolist())
                if key not in index:
                    index[key] = len(new_boxes)
                    new_boxes.append(boxes[r])
                    new_labels.append(list(labels[r]) if labels is not None else [])
                elif labels is not None:
                    got = new_labels[index[key]]
                    got.extend(a for a in labels[r] if a not in got)
        counts.append(len(index))
    out.box_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    out.boxes = np.asarray(new_boxes, np.float32).reshape(-1, 4)
    out.box_labels = new_labels if labels is not None else None


def write_dataset(
    rows: ImportedRows,
    root: Path,
    vocab: Vocabulary,
    regions: RegionSpec,
    out_dir: Optional[Path] = None,
    no_attribute: str = "error",
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    source: str = "generic",
    progress: bool = True,
    label_iou: float = 0.5,
    same_image: str = "join",
) -> Path:
    """Finish an import: splits, one row per image, image sizes (every image decoded), attributes, regions; write
    ``annotations.feather`` and ``import_report.json`` atomically.

    ``same_image``: several rows naming one image file in one split are joined into one (``join``: their texts
    joined, boxes and labels together) or imported as separate images (``separate``); rows of one image in
    different splits are refused either way (:func:`one_row_per_image`). ``root``: the folder the image paths are
    relative to. ``out_dir``: the dataset folder to write (default ``root``); when it differs, it gets a link
    ``source`` to ``root`` and the paths are prefixed with it. A new ``out_dir`` appears whole or not at all.
    Returns the dataset folder."""
    if no_attribute not in NO_ATTRIBUTE:
        raise VillaError(f"no_attribute={no_attribute!r}: use drop, keep or error")
    if same_image not in SAME_IMAGE:
        raise VillaError(f"same_image={same_image!r}: use {' or '.join(SAME_IMAGE)}")
    regions.check()
    root = Path(root)
    out = Path(out_dir) if out_dir else root
    rows, split, merged = checked_rows(rows, root, split_fractions, seed, same_image, source)
    sizes = image_sizes(root, rows.filepath, expected=rows.image_size)
    attrs, keep, extraction = image_attributes(rows, vocab, no_attribute)
    reg_off, boxes, scores, labels, record = image_regions(rows, root, sizes, regions, label_iou, progress)
    prefix = "source/" if out.resolve() != root.resolve() else ""
    table = annotation_table(
        rows, np.flatnonzero(keep), split, sizes, attrs, vocab, reg_off, boxes, labels, scores, prefix
    )
    meta = {
        "source": source,
        "vocab": vocab.name,
        "vocab_digest": vocab.digest,
        "no_attribute": no_attribute,
        "seed": seed,
    }
    table = table.replace_schema_metadata(
        {REGIONS_META.encode(): json.dumps(record).encode(), IMPORT_META.encode(): json.dumps(meta).encode()}
    )
    splits = {
        s: int((table.column("split").to_numpy(zero_copy_only=False) == s).sum()) for s in ("train", "val", "test")
    }
    report = {
        "source": source,
        "images": table.num_rows,
        "regions": int(len(table.column("region_coord").combine_chunks().flatten())),
        "regions_from": record,
        "rows_joined": merged,
        "splits": splits,
        "attributes": extraction.report,
    }
    write_dataset_files(out, root if prefix else None, table, report)
    print(
        f"wrote {out / 'annotations.feather'}: {report['images']} images ({splits['train']} train, {splits['val']} "
        f"val, {splits['test']} test), {report['regions']} regions from {regions.source}; report in "
        "import_report.json"
    )
    return out


def checked_rows(
    rows: ImportedRows, root: Path, split_fractions: Sequence[float], seed: int, same_image: str, source: str
) -> tuple[ImportedRows, np.ndarray, int]:
    """The rows checked (images, paths inside the folder, texts), their splits, one row per image, unique ids."""
    if len(rows.image_id) == 0:
        raise VillaError(f"nothing to import from {root}: no images")
    check_inside(rows.filepath, source)
    empty_text = [repr(np.asarray(rows.image_id)[i].item()) for i, t in enumerate(rows.text) if not (t or "").strip()]
    if empty_text and rows.attributes is None:
        raise problems_error("images have an empty text", empty_text, "give each image its caption or drop the rows")
    if rows.split is not None:
        split = np.asarray(rows.split)
    else:
        split = assign_splits(rows.group if rows.group is not None else rows.filepath, split_fractions, seed)
    rows, split, merged = one_row_per_image(rows, split, same_image, source)
    ids, c = np.unique(np.asarray(rows.image_id), return_counts=True)
    if (c > 1).any():
        raise problems_error("image ids are repeated", [repr(i) for i in ids[c > 1].tolist()], "give each image one id")
    return rows, split, merged


def image_attributes(rows: ImportedRows, vocab: Vocabulary, no_attribute: str) -> tuple[list, np.ndarray, Extraction]:
    """Each image's attributes (labelled by the layout, else extracted from the text; the coverage report printed
    either way) and which images are kept (``no_attribute``: texts that mention none are an error, dropped or kept)."""
    extraction = extract_attributes(rows.text, vocab)
    attrs = rows.attributes if rows.attributes is not None else extraction.attributes
    print(format_report(extraction.report))
    n = len(rows.image_id)
    keep = np.ones(n, bool)
    none = np.flatnonzero([len(a) == 0 for a in attrs])
    if len(none):
        if no_attribute == "error":
            raise VillaError(
                f"{len(none)} of {n} texts mention no attribute of the {vocab.name!r} vocabulary (e.g. image "
                f"{np.asarray(rows.image_id)[none[0]].item()!r}); add aliases to the dataset config, or pass "
                "--no_attribute drop (leave them out) or keep (import them without attributes)"
            )
        if no_attribute == "drop":
            keep[none] = False
            print(f"dropped {len(none)} images whose text mentions no attribute (--no_attribute drop)")
        else:
            print(f"kept {len(none)} images whose text mentions no attribute (--no_attribute keep)")
    return attrs, keep, extraction


def check_given_boxes(rows: ImportedRows, sizes: np.ndarray, where: str) -> None:
    """Boxes the data brings lie inside their image and are not empty or inverted (else every such box is named)."""
    counts = np.diff(rows.box_offsets)
    owner = np.repeat(np.arange(len(counts)), counts)
    bad = np.flatnonzero(boxes_outside(rows.boxes.astype(np.float64), owner, sizes.astype(np.float64)))
    if len(bad):
        shown = [
            f"{rows.filepath[owner[r]]!r} box {rows.boxes[r].tolist()} (its image is "
            f"{sizes[owner[r], 0]}x{sizes[owner[r], 1]})"
            for r in bad
        ]
        raise problems_error(
            "boxes are outside their image, empty or inverted",
            shown,
            f"in {where}, give boxes as [x0, y0, x1, y1] in pixels inside the image",
        )


def image_regions(
    rows: ImportedRows, root: Path, sizes: np.ndarray, regions: RegionSpec, label_iou: float, progress: bool
) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[list], dict[str, Any]]:
    """Regions from the chosen source (an image with none gets the whole image), their ground-truth labels where
    the data labels boxes (given as they are; grid cells and proposals by overlap), their scores, the record."""
    given = None
    if rows.box_offsets is not None:
        check_given_boxes(rows, sizes, "the data")
        given = (rows.box_offsets, rows.boxes)
    reg_off, boxes, scores, record = make_regions(
        regions, root, rows.image_id, rows.filepath, sizes, given=given, progress=progress
    )
    labels = None
    if rows.box_labels is not None and rows.box_offsets is not None:
        if regions.source in ("given", "masks"):
            labels = rows.box_labels
        else:  # ground truth for grid cells / proposals from the labelled boxes they overlap
            labels = label_regions(reg_off, boxes, rows.box_offsets, rows.boxes, rows.box_labels, label_iou)
            record["labels_from"] = {"boxes": "given", "iou": label_iou}
    counts = np.diff(reg_off)
    if (counts == 0).any():
        print(f"{int((counts == 0).sum())} images have no region from {regions.source}: each gets the whole image")
        whole_off, boxes = with_whole_image(reg_off, boxes, sizes)
        if labels is not None:
            labels = _insert_empty(labels, reg_off, counts)
        if scores is not None:
            scores = _insert_values(scores, reg_off, counts, 0.0)
        reg_off = whole_off
    return reg_off, boxes, scores, labels, record


def annotation_table(
    rows: ImportedRows,
    sel: np.ndarray,
    split: np.ndarray,
    sizes: np.ndarray,
    attrs: list,
    vocab: Vocabulary,
    reg_off: np.ndarray,
    boxes: np.ndarray,
    labels: Optional[list],
    scores: Optional[np.ndarray],
    prefix: str,
) -> pa.Table:
    """The selected images (and their regions) in villa's schema (docs/data_format.md)."""
    reg_idx, _ = gather_index(reg_off, sel)
    counts = np.diff(reg_off)[sel]
    new_off = np.concatenate([[0], np.cumsum(counts)])
    vocab_index = vocab.index
    attr_lists = [sorted(attrs[i], key=vocab_index.__getitem__) for i in sel]
    attr_off = np.concatenate([[0], np.cumsum([len(a) for a in attr_lists])])
    box_arr = np.round(boxes[reg_idx].astype(np.float64), 2).astype(np.float32)
    cols: dict[str, pa.Array] = {
        "image_id": pa.array(np.asarray(rows.image_id)[sel]),
        "image_filepath": pa.array([prefix + rows.filepath[i] for i in sel], pa.string()),
        "image_size": _list_array(np.arange(len(sel) + 1) * 2, pa.array(sizes[sel].reshape(-1).astype(np.int32))),
        "split": pa.array(split[sel].astype(str), pa.string()),
        "text": pa.array([rows.text[i] for i in sel], pa.string()),
        "region_coord": _list_array(
            new_off, _list_array(np.arange(len(reg_idx) + 1) * 4, pa.array(box_arr.reshape(-1), pa.float32()))
        ),
        "num_regions": pa.array(counts.astype(np.int32)),
        "attributes": _list_array(attr_off, pa.array([a for lst in attr_lists for a in lst], pa.string())),
    }
    if labels is not None:
        lab = [[a for a in labels[r] if a in vocab_index] for r in reg_idx]
        lab_off = np.concatenate([[0], np.cumsum([len(x) for x in lab])])
        cols["reg_to_attr"] = _list_array(
            new_off, _list_array(lab_off, pa.array([a for x in lab for a in x], pa.string()))
        )
    if scores is not None:
        cols["region_score"] = _list_array(new_off, pa.array(scores[reg_idx].astype(np.float32)))
    return pa.table(cols)


def write_dataset_files(out: Path, link_to: Optional[Path], table: pa.Table, report: dict[str, Any]) -> None:
    """``import_report.json``, the ``source`` link (when the images live elsewhere) and ``annotations.feather``,
    the file that makes a folder a dataset, last. A new folder is built under a temporary name and renamed when
    complete, so an import that is killed or fills the disk leaves nothing behind."""
    if out.exists():
        _write_into(out, out, link_to, table, report)
        return
    with atomic_dir(out) as tmp:
        _write_into(tmp, out, link_to, table, report)


def _write_into(folder: Path, out: Path, link_to: Optional[Path], table: pa.Table, report: dict[str, Any]) -> None:
    write_json_atomic(folder / "import_report.json", report)
    if link_to is not None:
        link = folder / "source"
        if link.is_symlink() and Path(os.readlink(link)) != link_to.resolve():
            link.unlink()
        if not link.exists():
            link.symlink_to(link_to.resolve(), target_is_directory=True)
        elif not link.is_symlink():
            raise VillaError(f"{out / 'source'} exists and is not the link to {link_to}; choose another --out_dir")
    with atomic_file(folder / "annotations.feather") as tmp:
        feather.write_feather(table, str(tmp), compression="zstd")


def _insert_empty(labels: list, offsets: np.ndarray, counts: np.ndarray) -> list:
    out = []
    for i in range(len(counts)):
        out.extend(labels[offsets[i] : offsets[i + 1]] if counts[i] else [[]])
    return out


def _insert_values(values: np.ndarray, offsets: np.ndarray, counts: np.ndarray, fill: float) -> np.ndarray:
    empty = np.flatnonzero(counts == 0)
    return np.insert(values, offsets[empty], fill)


# --- the command-line options every importer shares ---------------------------------------------------------------


def add_common_args(p: argparse.ArgumentParser, default_regions: str = "given") -> None:
    g = p.add_argument_group("output, splits and attributes")
    g.add_argument("--out_dir", default=None, help="dataset folder to write (default: the images' folder)")
    g.add_argument("--dataset_config", default=None, help="vocabulary YAML (path or name under configs/dataset/)")
    g.add_argument(
        "--no_attribute",
        default="error",
        choices=NO_ATTRIBUTE,
        help="texts that mention no attribute: error (default, lists them), drop or keep",
    )
    g.add_argument(
        "--split_fractions",
        type=float,
        nargs=3,
        default=[0.8, 0.1, 0.1],
        help="train val test fractions when the data names no split",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the hash that assigns splits")
    g.add_argument(
        "--same_image",
        default="join",
        choices=SAME_IMAGE,
        help="rows naming one image in one split: join (one image, texts joined) or separate",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    r = p.add_argument_group("regions")
    r.add_argument(
        "--regions",
        default=default_regions,
        choices=("given", "grid", "proposals", "masks"),
        help="where regions come from (docs/data_format.md)",
    )
    r.add_argument("--grid", nargs="+", default=["3"], help="grid levels: N (N x N) or RxC, e.g. --grid 1 2 3")
    r.add_argument("--proposals_file", default=None, help="COCO results JSON of proposals (image_id, bbox, score)")
    r.add_argument("--detector", default=None, help="villa-tiny-frcnn or a torchvision detection model name")
    r.add_argument("--detector_weights", default=None, help="detector checkpoint path or torchvision weights name")
    r.add_argument("--proposal_kind", default="rpn", choices=("rpn", "detections"), help="RPN boxes or detections")
    r.add_argument("--top_k", type=int, default=100, help="proposals kept per image")
    r.add_argument("--nms", type=float, default=0.7, help="NMS IoU threshold of proposals")
    r.add_argument("--min_score", type=float, default=0.0, help="drop proposals scoring below this")
    r.add_argument(
        "--label_iou",
        type=float,
        default=0.5,
        help="grid/proposal regions take the labels of a labelled box they overlap at this IoU",
    )


def importer_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """An importer's command line (villa's logging set up); its own arguments go first, then
    :func:`parse_importer_args` adds the shared ones and parses."""
    from villa.core.log import setup_logging

    setup_logging()
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])


def parse_importer_args(
    p: argparse.ArgumentParser, argv: Optional[Sequence[str]], default_regions: str, default_vocab: Optional[str]
) -> tuple[argparse.Namespace, Vocabulary, RegionSpec, dict[str, Any]]:
    """(arguments, vocabulary, region source, the keyword arguments every importer passes to write_dataset)."""
    add_common_args(p, default_regions)
    a = p.parse_args(argv)
    kw = {
        "no_attribute": a.no_attribute,
        "split_fractions": a.split_fractions,
        "seed": a.seed,
        "progress": not a.quiet,
        "label_iou": a.label_iou,
        "same_image": a.same_image,
    }
    return a, load_dataset_vocab(a.dataset_config, default_vocab), region_spec(a), kw


def region_spec(a: argparse.Namespace) -> RegionSpec:
    return RegionSpec(
        source=a.regions,
        grid=list(a.grid),
        proposals_file=a.proposals_file,
        detector=a.detector,
        detector_weights=a.detector_weights,
        proposal_kind=a.proposal_kind,
        top_k=a.top_k,
        nms=a.nms,
        min_score=a.min_score,
    )


def load_dataset_vocab(name_or_path: Optional[str], default: Optional[str] = None) -> Vocabulary:
    """The importer's vocabulary: ``--dataset_config``, else the importer's own default (COCO's categories...)."""
    from villa.data.vocab import load_vocab

    if not (name_or_path or default):
        raise VillaError(
            "pass --dataset_config: the vocabulary YAML (attributes, aliases, templates) to find in the text"
        )
    return load_vocab(name_or_path or default)


def join_texts(texts: Sequence[str]) -> str:
    """Several captions of one image as one text, sentences separated as villa's captions are."""
    parts = [t.strip().rstrip(".").strip() for t in texts if t and t.strip()]
    return SENTENCE_SEP.join(parts)
