"""DeepFashion-MultiModal: regions from the human parsing maps (one box per labelled part), the caption as text,
ground truth per region from the parsing label and the shape/fabric/colour label files.

    python -m villa.data.importers.deepfashion --root DeepFashion-MultiModal --out_dir data/deepfashion

Published layout (github.com/yumingj/DeepFashion-MultiModal): ``images/<name>.jpg``, ``segm/<name>_segm.png``
(parsing maps, 24 labels: 0 background, 1 top, 2 outer, 3 skirt, 4 dress, 5 pants, 6 leggings, 7 headwear,
8 eyeglass, 9 neckwear, 10 belt, 11 footwear, 12 bag, 13 hair, 14 face, 15 skin, 16 ring, 17 wrist wearing,
18 socks, 19 gloves, 20 necklace, 21 rompers, 22 earrings, 23 tie), ``labels/fabric/fabric_ann.txt`` and
``labels/color/color_ann.txt`` (``<name> <upper> <lower> <outer>``), ``labels/shape/shape_anno_all.txt`` and
``captions.json`` (``{name: caption}``). With ``--regions masks`` only the images with a parsing map are imported
(12,701 of 44,096); other region sources take every captioned image.

A region's ground truth (``reg_to_attr``) is its part name plus the fabric and texture of the garment it is:
"upper" for top / dress / rompers, "lower" for skirt / pants / leggings, "outer" for outer. Attributes come from
the caption (the extractor), so every attribute has a sentence that names it. Hair, face and skin get boxes but no
vocabulary label. Splits: by a hash of the item id (``id_XXXXXXXX``), so the views of one item stay together.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from villa.core.errors import VillaError, exit_on_error
from villa.core.io import read_text
from villa.data.importers.common import (
    ImportedRows,
    importer_parser,
    parse_importer_args,
    problems_error,
    write_dataset,
)

PARTS = [
    "background",
    "top",
    "outer",
    "skirt",
    "dress",
    "pants",
    "leggings",
    "headwear",
    "eyeglass",
    "neckwear",
    "belt",
    "footwear",
    "bag",
    "hair",
    "face",
    "skin",
    "ring",
    "wrist wearing",
    "socks",
    "gloves",
    "necklace",
    "rompers",
    "earrings",
    "tie",
]
FABRICS = ["denim", "cotton", "leather", "furry", "knitted", "chiffon", "other", "NA"]
TEXTURES = ["floral", "graphic", "striped", "pure color", "lattice", "other", "color block", "NA"]
GARMENT_SLOT = {1: 0, 4: 0, 21: 0, 3: 1, 5: 1, 6: 1, 2: 2}  # part label -> upper (0) / lower (1) / outer (2)


def read_label_file(path: Path, n: int) -> dict[str, list[int]]:
    """``<name> <v1> ... <vn>`` per line; a malformed line is reported with file:line."""
    if not path.is_file():
        return {}
    out, bad = {}, []
    for i, line in enumerate(read_text(path).splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            vals = [int(v) for v in parts[1:]]
        except ValueError:
            vals = []
        if len(vals) != n:
            bad.append(f"{path}:{i}")
            continue
        out[parts[0]] = vals
    if bad:
        raise problems_error("malformed label lines", bad, f"each line is '<image name>' and {n} integers")
    return out


def mask_boxes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (K, 4) xyxy and labels (K,) of the parts present in a parsing map (label 0 is background)."""
    with Image.open(path) as im:
        m = np.asarray(im)
    if m.ndim != 2:
        raise VillaError(f"{path} is not a single-channel parsing map")
    labels = np.unique(m)
    labels = labels[labels > 0]
    boxes = []
    for lab in labels:
        rows = np.flatnonzero((m == lab).any(1))
        cols = np.flatnonzero((m == lab).any(0))
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
    return np.asarray(boxes, np.float32).reshape(-1, 4), labels.astype(np.int64)


def import_deepfashion(root, vocab, regions, out_dir=None, **kw) -> Path:
    root = Path(root)
    cap_path = root / "captions.json"
    if not cap_path.is_file():
        raise VillaError(
            f"{cap_path} not found; --root is the DeepFashion-MultiModal folder (images/, segm/, captions.json)"
        )
    try:
        captions = json.loads(cap_path.read_text())
    except json.JSONDecodeError as e:
        raise VillaError(f"{cap_path} is not JSON ({e})") from e
    segm_dir = next((root / d for d in ("segm", "parsing") if (root / d).is_dir()), None)
    names = sorted(captions)
    if regions.source == "masks":
        if segm_dir is None:
            raise VillaError(f"{root} has no segm/ folder of parsing maps; use --regions grid or proposals")
        names = [n for n in names if (segm_dir / f"{Path(n).stem}_segm.png").is_file()]
        if not names:
            raise VillaError(f"no captioned image of {root} has a parsing map in {segm_dir}")
    fabric = read_label_file(root / "labels" / "fabric" / "fabric_ann.txt", 3)
    texture = read_label_file(root / "labels" / "color" / "color_ann.txt", 3)
    rows = ImportedRows(
        image_id=np.array([Path(n).stem for n in names]),
        filepath=[f"images/{n}" for n in names],
        text=[captions[n] for n in names],
        group=[(re.search(r"id_\d+", n) or [n])[0] for n in names],
    )
    if segm_dir is not None:
        paths = [segm_dir / f"{Path(n).stem}_segm.png" for n in names]
        with ThreadPoolExecutor(8) as ex:
            found = list(
                ex.map(
                    lambda p: mask_boxes(p) if p.is_file() else (np.zeros((0, 4), np.float32), np.zeros(0, int)), paths
                )
            )
        boxes, labels = [], []
        for n, (b, lab) in zip(names, found):
            boxes.append(b)
            f, t = fabric.get(n), texture.get(n)
            for part in lab:
                names_of = [PARTS[part]]
                slot = GARMENT_SLOT.get(int(part))
                if slot is not None and f and FABRICS[f[slot]] in vocab.index:
                    names_of.append(FABRICS[f[slot]])
                if slot is not None and t and TEXTURES[t[slot]] in vocab.index:
                    names_of.append(TEXTURES[t[slot]])
                labels.append([x for x in names_of if x in vocab.index])
        rows.box_offsets = np.concatenate([[0], np.cumsum([len(b) for b in boxes])]).astype(np.int64)
        rows.boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
        rows.box_labels = labels
    return write_dataset(rows, root, vocab, regions, Path(out_dir) if out_dir else None, source="deepfashion", **kw)


@exit_on_error
def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = importer_parser("villa.data.importers.deepfashion", __doc__)
    p.add_argument("--root", required=True, help="the DeepFashion-MultiModal folder")
    a, vocab, spec, kw = parse_importer_args(p, argv, "masks", "deepfashion")
    return import_deepfashion(a.root, vocab, spec, a.out_dir, **kw)


if __name__ == "__main__":
    main()
