"""COCO 2017: each image's five captions as its text, the category names (and aliases) they mention as its
attributes, regions from the ground-truth boxes or from proposals, ``reg_to_attr`` from the boxes' categories.

    python -m villa.data.importers.coco --coco_dir coco2017 --out_dir data/coco [--regions proposals --proposals_file p.json]

Published layout (cocodataset.org): ``annotations/captions_{train,val}2017.json``,
``annotations/instances_{train,val}2017.json``, images under ``train2017/`` and ``val2017/``. ``train2017`` gives
the train split and, by a hash of the image id, ``--val_fraction`` of it the val split; ``val2017`` is the test
split (the zero-shot detection protocol evaluates on it). Crowd boxes (``iscrowd``) are left out, as COCOeval
ignores them. The vocabulary is configs/dataset/coco.yaml (the 80 categories with aliases) unless
``--dataset_config`` names another; every category of the instances file must be in it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from villa.core.errors import VillaError, exit_on_error
from villa.core.io import read_text
from villa.data.importers.common import (
    ImportedRows,
    hash_unit,
    importer_parser,
    join_texts,
    parse_importer_args,
    problems_error,
    write_dataset,
)
from villa.data.vocab import Vocabulary

SPLITS = {"train2017": "train", "val2017": "test"}


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise VillaError(
            f"{path} not found; the COCO layout has annotations/captions_<split>.json and instances_<split>.json"
        )
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise VillaError(f"{path} is not JSON ({e}); download it again") from e


def _positions(ids_sorted: np.ndarray, query: np.ndarray, what: str) -> np.ndarray:
    """Row of each queried image id in the sorted ids; ids that are not there are one error naming them all."""
    pos = np.searchsorted(ids_sorted, query)
    bad = (pos >= len(ids_sorted)) | (ids_sorted[np.minimum(pos, len(ids_sorted) - 1)] != query)
    if bad.any():
        raise problems_error(what, [str(v) for v in np.unique(query[bad])], "use the files of one COCO release")
    return pos


def read_coco_split(coco_dir: Path, name: str, vocab: Vocabulary, with_boxes: bool = True) -> ImportedRows:
    """One split's images, joined captions, and (``with_boxes``) non-crowd boxes with their category names."""
    caps = _load_json(coco_dir / "annotations" / f"captions_{name}.json")
    images = caps.get("images") or []
    if not images:
        raise VillaError(f"captions_{name}.json lists no images")
    ids = np.array([im["id"] for im in images], dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    ids_sorted = ids[order]
    files = [f"{name}/{images[i]['file_name']}" for i in order]
    size = np.array([[images[i]["width"], images[i]["height"]] for i in order], dtype=np.int64)
    anns = caps.get("annotations") or []
    cap_img = np.array([a["image_id"] for a in anns], dtype=np.int64)
    pos = _positions(ids_sorted, cap_img, f"captions in captions_{name}.json name unknown image ids")
    by = np.argsort(pos, kind="stable")
    bounds = np.searchsorted(pos[by], np.arange(len(ids_sorted) + 1))
    texts_all = [anns[k]["caption"] for k in by]
    texts = [join_texts(texts_all[bounds[i] : bounds[i + 1]]) for i in range(len(ids_sorted))]
    rows = ImportedRows(image_id=ids_sorted, filepath=files, text=texts, image_size=size)
    if not with_boxes:
        return rows
    inst = _load_json(coco_dir / "annotations" / f"instances_{name}.json")
    cats = {c["id"]: c["name"] for c in inst.get("categories") or []}
    missing = sorted(n for n in cats.values() if n not in vocab.index)
    if missing:
        raise problems_error(
            f"categories of instances_{name}.json are not in the {vocab.name!r} vocabulary",
            missing,
            "add them to the dataset config (configs/dataset/coco.yaml lists COCO's 80)",
        )
    boxes_ann = [a for a in inst.get("annotations") or [] if not a.get("iscrowd", 0)]
    b_img = np.array([a["image_id"] for a in boxes_ann], dtype=np.int64)
    bpos = _positions(
        ids_sorted, b_img, f"boxes in instances_{name}.json name image ids that captions_{name}.json lacks"
    )
    xywh = np.array([a["bbox"] for a in boxes_ann], dtype=np.float64).reshape(-1, 4)
    cat = np.array([a["category_id"] for a in boxes_ann], dtype=np.int64)
    unknown = sorted({int(c) for c in cat if int(c) not in cats})
    if unknown:
        raise problems_error(
            f"boxes in instances_{name}.json have unknown category ids",
            [str(c) for c in unknown],
            "use an instances file whose categories list them",
        )
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    wh = size[bpos]
    xyxy[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, wh[:, :1])
    xyxy[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, wh[:, 1:])
    ok = (xyxy[:, 2] - xyxy[:, 0] >= 1) & (xyxy[:, 3] - xyxy[:, 1] >= 1)
    sel = np.flatnonzero(ok)
    sel = sel[np.argsort(bpos[sel], kind="stable")]
    rows.box_offsets = np.concatenate([[0], np.cumsum(np.bincount(bpos[sel], minlength=len(ids_sorted)))])
    rows.boxes = xyxy[sel].astype(np.float32)
    rows.box_labels = [[cats[int(c)]] for c in cat[sel]]
    return rows


def concat_rows(parts: list[ImportedRows]) -> ImportedRows:
    out = ImportedRows(
        image_id=np.concatenate([p.image_id for p in parts]),
        filepath=[f for p in parts for f in p.filepath],
        text=[t for p in parts for t in p.text],
        split=np.concatenate([p.split for p in parts]),
        image_size=np.concatenate([p.image_size for p in parts]),
    )
    if all(p.box_offsets is not None for p in parts):
        counts = np.concatenate([np.diff(p.box_offsets) for p in parts])
        out.box_offsets = np.concatenate([[0], np.cumsum(counts)])
        out.boxes = np.concatenate([p.boxes for p in parts])
        out.box_labels = [lab for p in parts for lab in p.box_labels]
    return out


def import_coco(
    coco_dir,
    vocab: Vocabulary,
    regions,
    out_dir=None,
    splits: Sequence[str] = ("train2017", "val2017"),
    val_fraction: float = 0.05,
    seed: int = 0,
    **kw,
) -> Path:
    coco_dir = Path(coco_dir)
    parts = []
    for name in splits:
        if name not in SPLITS:
            raise VillaError(f"COCO split {name!r}: use train2017 and/or val2017")
        p = read_coco_split(coco_dir, name, vocab, with_boxes=True)
        split = np.full(len(p.image_id), SPLITS[name], dtype=object)
        if SPLITS[name] == "train":
            split[hash_unit(p.image_id.tolist(), seed) < val_fraction] = "val"
        p.split = split.astype(str)
        parts.append(p)
    rows = concat_rows(parts)
    return write_dataset(
        rows, coco_dir, vocab, regions, Path(out_dir) if out_dir else None, source="coco", seed=seed, **kw
    )


@exit_on_error
def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = importer_parser("villa.data.importers.coco", __doc__)
    p.add_argument("--coco_dir", required=True, help="folder with annotations/, train2017/, val2017/")
    p.add_argument(
        "--splits", nargs="+", default=["train2017", "val2017"], help="train2017 -> train/val, val2017 -> test"
    )
    p.add_argument("--val_fraction", type=float, default=0.05, help="share of train2017 held out as val (by id hash)")
    a, vocab, spec, kw = parse_importer_args(p, argv, "given", "coco")
    return import_coco(a.coco_dir, vocab, spec, a.out_dir, a.splits, a.val_fraction, **kw)


if __name__ == "__main__":
    main()
