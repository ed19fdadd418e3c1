"""A folder of images plus a JSONL or CSV of captions: the layout a researcher with their own data has.

    python -m villa.data.importers.generic --root my_photos --captions my_photos/captions.jsonl \
        --dataset_config my_vocab.yaml --regions grid --grid 1 2 3 [--group_key source]
    python -m villa.data.importers.generic --root my_photos --captions my_photos/captions.jsonl \
        --dataset_config my_vocab.yaml --explain 20       # what the config finds in 20 captions; writes nothing

One record per image: ``image`` (path relative to ``--root``), ``caption``, optional ``split``
(train/val/test), optional ``boxes`` (``[[x0, y0, x1, y1], ...]`` in pixels) and any other field (e.g. ``id``,
or a group key such as a patient or source photo given with ``--group_key`` so that its images never straddle
splits). Ids are the ``id`` field when present, else the row number. Every schema problem of the file is reported
at once (file:line), not one per run.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from villa.core.errors import VillaError, exit_on_error
from villa.core.io import read_text
from villa.data.importers.common import (
    ImportedRows,
    importer_parser,
    normalize_split,
    parse_importer_args,
    problems_error,
    write_dataset,
)


def read_records(path: Path, encoding: str = "utf-8") -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of a JSONL (one object per line) or CSV (a header row) file in ``encoding``."""
    if not path.is_file():
        raise VillaError(f"captions file not found: {path}")
    text = read_text(path, encoding, fix="re-save it as UTF-8 or pass --encoding with its encoding (e.g. latin-1)")
    records, bad = [], []
    if path.suffix.lower() == ".csv":
        with io.StringIO(text, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "image" not in reader.fieldnames:
                raise VillaError(f"{path}:1: the CSV header must name an 'image' and a 'caption' column")
            for i, rec in enumerate(reader, start=2):
                if None in rec:
                    bad.append(f"{path}:{i}: more fields than the header")
                    continue
                if rec.get("boxes"):
                    try:
                        rec["boxes"] = json.loads(rec["boxes"])
                    except json.JSONDecodeError:
                        bad.append(f"{path}:{i}: boxes is not JSON ([[x0, y0, x1, y1], ...])")
                        continue
                records.append((i, rec))
    else:
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append(f"{path}:{i}: not JSON ({e.msg})")
                continue
            if not isinstance(rec, dict):
                bad.append(f"{path}:{i}: not an object")
                continue
            records.append((i, rec))
    if bad:
        raise problems_error(
            "malformed lines", bad, "fix them (one JSON object per line, or CSV rows matching the header)"
        )
    if not records:
        raise VillaError(f"{path} has no records")
    return records


def parse_records(path: Path, records: list[tuple[int, dict[str, Any]]], group_key: Optional[str]) -> ImportedRows:
    """Check every record; collect all problems before reporting them."""
    bad: list[str] = []
    images, texts, splits, groups, ids = [], [], [], [], []
    box_counts, boxes = [], []
    has_split = any(r.get("split") not in (None, "") for _, r in records)
    has_boxes = any(r.get("boxes") not in (None, "") for _, r in records)
    has_id = all(r.get("id") not in (None, "") for _, r in records)
    for line, r in records:
        where = f"{path}:{line}"
        img, cap = r.get("image"), r.get("caption")
        if not isinstance(img, str) or not img:
            bad.append(f"{where}: no 'image' path")
        if not isinstance(cap, str) or not cap.strip():
            bad.append(f"{where}: no 'caption' text")
        if has_split and r.get("split") in (None, ""):
            bad.append(f"{where}: no 'split' (other lines give one)")
        if group_key and r.get(group_key) in (None, ""):
            bad.append(f"{where}: no {group_key!r} (the --group_key)")
        b = r.get("boxes") if has_boxes else None
        if has_boxes:
            try:
                arr = np.asarray(b, dtype=np.float64).reshape(-1, 4) if b not in (None, "") else np.zeros((0, 4))
                if not np.isfinite(arr).all():
                    raise ValueError("not finite")
            except (TypeError, ValueError):
                bad.append(f"{where}: boxes must be [[x0, y0, x1, y1], ...] of finite numbers")
                arr = np.zeros((0, 4))
            box_counts.append(len(arr))
            boxes.append(arr)
        images.append(img if isinstance(img, str) else "")
        texts.append(cap if isinstance(cap, str) else "")
        splits.append(r.get("split"))
        groups.append(r.get(group_key) if group_key else img)
        ids.append(r.get("id"))
    if bad:
        raise problems_error("problems in the captions file", bad, "fix them and import again (docs/data_format.md)")
    image_id = np.array(ids) if has_id else np.arange(len(records))
    if has_id and image_id.dtype.kind not in "iu":
        image_id = image_id.astype(str)
    rows = ImportedRows(
        image_id=image_id,
        filepath=images,
        text=texts,
        split=normalize_split(splits, str(path)) if has_split else None,
        group=groups,
    )
    if has_boxes:
        rows.box_offsets = np.concatenate([[0], np.cumsum(box_counts)]).astype(np.int64)
        rows.boxes = np.concatenate(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32)
    return rows


def import_generic(
    root: str | Path,
    captions: str | Path,
    vocab,
    regions,
    out_dir=None,
    group_key: Optional[str] = None,
    encoding: str = "utf-8",
    **kw,
) -> Path:
    records = read_records(Path(captions), encoding)
    rows = parse_records(Path(captions), records, group_key)
    if regions.source == "given" and rows.box_offsets is None:
        raise VillaError(
            f"{captions} gives no boxes, so regions=given has none: pass --regions grid or --regions proposals"
        )
    return write_dataset(rows, Path(root), vocab, regions, Path(out_dir) if out_dir else None, source="generic", **kw)


@exit_on_error
def main(argv: Optional[Sequence[str]] = None) -> Optional[Path]:
    p = importer_parser("villa.data.importers.generic", __doc__)
    p.add_argument("--root", required=True, help="the folder the image paths are relative to")
    p.add_argument("--captions", required=True, help="JSONL or CSV: image, caption[, split, boxes, id, ...]")
    p.add_argument("--group_key", default=None, help="field whose values never straddle splits (e.g. patient)")
    p.add_argument("--encoding", default="utf-8", help="the captions file's text encoding (e.g. latin-1, cp1252)")
    p.add_argument(
        "--explain",
        type=int,
        default=None,
        metavar="N",
        help="print what the dataset config finds in the first N captions (found, negated, uncertain, ignored) and "
        "write nothing",
    )
    a, vocab, spec, kw = parse_importer_args(p, argv, "grid", None)
    if a.explain is not None:
        from villa.data.attributes import explain

        if a.explain < 1:
            raise VillaError(f"--explain {a.explain}: give how many captions to explain (>= 1)")
        records = read_records(Path(a.captions), a.encoding)[: a.explain]
        texts = [str(r.get("caption") or "") for _, r in records]
        print(explain(texts, vocab, [f"{a.captions}:{line} {r.get('image', '')}" for line, r in records]))
        return None
    return import_generic(a.root, a.captions, vocab, spec, a.out_dir, a.group_key, a.encoding, **kw)


if __name__ == "__main__":
    main()
