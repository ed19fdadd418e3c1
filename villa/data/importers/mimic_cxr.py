"""MIMIC-CXR: chest X-rays (MIMIC-CXR-JPG) with their free-text reports; attributes are the CheXpert observations
the findings and impression sections affirm (negation and uncertainty handled by the extractor).

    python -m villa.data.importers.mimic_cxr --reports mimic-cxr-reports --images mimic-cxr-jpg --out_dir data/mimic \
        [--regions grid --grid 1 3 | --boxes_csv boxes.csv --regions given] [--views PA AP]

Published layouts (PhysioNet): reports ``files/pXX/pNNNNNNNN/sNNNNNNNN.txt`` (mimic-cxr-reports); images
``files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg`` with ``mimic-cxr-2.0.0-metadata.csv(.gz)`` (dicom_id,
subject_id, study_id, ViewPosition, Rows, Columns, ...) and ``mimic-cxr-2.0.0-split.csv(.gz)`` (dicom_id,
study_id, subject_id, split: train / validate / test) beside ``files/``. One row per image of the chosen views;
the text is its study's findings and impression; the split is the published one (patients never straddle it).
``--boxes_csv``: ``dicom_id,x0,y0,x1,y1[,label]`` rows, for users who have boxes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from villa.core.errors import VillaError, exit_on_error
from villa.data.importers.common import (
    ImportedRows,
    importer_parser,
    normalize_split,
    parse_importer_args,
    problems_error,
    write_dataset,
)
from villa.data.vocab import SENTENCE_SEP

SECTIONS = ("findings", "impression")
HEADER = re.compile(r"^\s*([A-Z][A-Z &/()-]{2,40}):", re.MULTILINE)


def report_sections(text: str) -> dict[str, str]:
    """A report's sections by upper-case header (``FINDINGS:``, ``IMPRESSION:``...), lower-cased names, whitespace
    collapsed."""
    out: dict[str, str] = {}
    marks = list(HEADER.finditer(text))
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        body = " ".join(text[m.end() : end].split())
        if body:
            out[m.group(1).strip().lower()] = body
    return out


def report_text(text: str, sections: Sequence[str] = SECTIONS) -> str:
    """The chosen sections joined as sentences (empty when the report has none of them)."""
    sec = report_sections(text)
    parts = [sec[s].rstrip(".") for s in sections if s in sec]
    return SENTENCE_SEP.join(p for p in parts if p)


def _read_csv(folder: Path, stem: str) -> pd.DataFrame:
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        if (folder / name).is_file():
            try:
                return pd.read_csv(folder / name)
            except Exception as e:
                raise VillaError(f"cannot read {folder / name} ({type(e).__name__}: {e})") from e
    raise VillaError(f"{folder}/{stem}.csv(.gz) not found; it belongs beside files/ in MIMIC-CXR-JPG")


def import_mimic(
    reports,
    images,
    vocab,
    regions,
    out_dir=None,
    views: Sequence[str] = ("PA", "AP"),
    sections: Sequence[str] = SECTIONS,
    boxes_csv: Optional[str] = None,
    **kw,
) -> Path:
    reports, images = Path(reports), Path(images)
    meta = _read_csv(images, "mimic-cxr-2.0.0-metadata")
    split = _read_csv(images, "mimic-cxr-2.0.0-split")
    for df, name, cols in (
        (meta, "metadata", ("dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns")),
        (split, "split", ("dicom_id", "split")),
    ):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise VillaError(f"mimic-cxr-2.0.0-{name}.csv lacks columns {missing}; use the published file")
    df = meta.merge(split[["dicom_id", "split"]], on="dicom_id", how="inner")
    if views:
        df = df[df["ViewPosition"].isin(list(views))]
    if df.empty:
        raise VillaError(f"no image of {images} has a view in {list(views)} and a split")
    subj = df["subject_id"].astype(np.int64).astype(str)
    study = df["study_id"].astype(np.int64).astype(str)
    rel = "files/p" + subj.str[:2] + "/p" + subj + "/s" + study
    df = df.assign(report=rel + ".txt", image=rel + "/" + df["dicom_id"] + ".jpg").reset_index(drop=True)
    texts, empty = {}, []
    for r in df["report"].unique():
        p = reports / r
        if not p.is_file():
            empty.append(f"{p} missing")
            continue
        t = report_text(p.read_text(errors="replace"), sections)
        if t:
            texts[r] = t
    keep = df["report"].isin(list(texts)).to_numpy()
    if not keep.any():
        raise problems_error("reports have no findings or impression", empty or ["all"], "check --reports")
    if (~keep).any():
        print(f"left out {int((~keep).sum())} images whose report is missing or has no {'/'.join(sections)} section")
    df = df[keep].reset_index(drop=True)
    rows = ImportedRows(
        image_id=df["dicom_id"].to_numpy().astype(str),
        filepath=df["image"].tolist(),
        text=[texts[r] for r in df["report"]],
        split=normalize_split(df["split"].tolist(), "mimic-cxr-2.0.0-split.csv"),
        group=df["subject_id"].tolist(),
        image_size=df[["Columns", "Rows"]].to_numpy().astype(np.int64),
    )
    if boxes_csv:
        b = pd.read_csv(boxes_csv)
        need = ["dicom_id", "x0", "y0", "x1", "y1"]
        if any(c not in b.columns for c in need):
            raise VillaError(f"{boxes_csv}: needs columns {need} (and optionally label)")
        pos = pd.Index(rows.image_id).get_indexer(b["dicom_id"].astype(str))
        if (pos < 0).any():
            raise problems_error(
                f"boxes in {boxes_csv} are for images not imported",
                b["dicom_id"][pos < 0].astype(str).unique().tolist(),
                "give boxes of these images only",
            )
        order = np.argsort(pos, kind="stable")
        rows.box_offsets = np.concatenate([[0], np.cumsum(np.bincount(pos, minlength=len(rows.image_id)))])
        rows.boxes = b[["x0", "y0", "x1", "y1"]].to_numpy(np.float32)[order]
        if "label" in b.columns:
            rows.box_labels = [[s] if isinstance(s, str) else [] for s in b["label"].to_numpy()[order]]
    return write_dataset(rows, images, vocab, regions, Path(out_dir) if out_dir else None, source="mimic_cxr", **kw)


@exit_on_error
def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = importer_parser("villa.data.importers.mimic_cxr", __doc__)
    p.add_argument("--reports", required=True, help="folder holding files/pXX/pNNNNNNNN/sNNNNNNNN.txt")
    p.add_argument("--images", required=True, help="MIMIC-CXR-JPG folder: files/ and the metadata and split CSVs")
    p.add_argument("--views", nargs="*", default=["PA", "AP"], help="ViewPosition values to keep (none: all)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), help="report sections that form the text")
    p.add_argument("--boxes_csv", default=None, help="dicom_id,x0,y0,x1,y1[,label] rows (with --regions given)")
    a, vocab, spec, kw = parse_importer_args(p, argv, "grid", "chexpert")
    return import_mimic(a.reports, a.images, vocab, spec, a.out_dir, a.views, a.sections, a.boxes_csv, **kw)


if __name__ == "__main__":
    main()
