"""DocMNIST as a user's own data: plain PNG images plus a JSONL of free-text captions, boxes and attribute lists
removed. The example that the README's "Your own data" commands import (villa.data.importers.generic).

    python -m villa.data.importers.docmnist_plain --data_dir data/docmnist_15000_15.2 --out_dir data/mine

Writes ``OUT/images/<split>/<id>.png`` (hard links where the file system allows, else copies) and
``OUT/captions.jsonl`` with ``id``, ``image``, ``caption`` and ``split`` (kept, so that the test images stay the
DocMNIST test split's digits). ``--no_split`` leaves the split out (the importer then draws one); ``--with_boxes`` keeps the boxes (``boxes``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import pyarrow.feather as feather

from villa.core.errors import VillaError, exit_on_error
from villa.core.io import atomic_dir
from villa.data.importers.common import check_inside


def export_plain(
    data_dir: str | Path,
    out_dir: str | Path,
    keep_split: bool = True,
    overwrite: bool = False,
    with_boxes: bool = False,
) -> Path:
    data_dir, out = Path(data_dir), Path(out_dir)
    ann = data_dir / "annotations.feather"
    if not ann.is_file():
        raise VillaError(f"{ann} not found; generate DocMNIST first (python -m docmnist.generate_docmnist ...)")
    if out.exists() and not overwrite:
        raise VillaError(f"{out} exists; pass --overwrite or choose another --out_dir")
    t = feather.read_table(
        str(ann), columns=["image_id", "image_filepath", "split", "text", "region_coord"]
    ).to_pydict()
    check_inside(t["image_filepath"], str(ann))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        lines = []
        for i, path, split, text, boxes in zip(
            t["image_id"], t["image_filepath"], t["split"], t["text"], t["region_coord"]
        ):
            rel = f"images/{split}/{i}.png"
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(data_dir / path, dst)
            except OSError:
                shutil.copyfile(data_dir / path, dst)
            rec = {"id": i, "image": rel, "caption": text}
            if keep_split:
                rec["split"] = split
            if with_boxes:
                rec["boxes"] = boxes
            lines.append(json.dumps(rec))
        (tmp / "captions.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}: {len(lines)} images and captions.jsonl (no boxes, no attribute lists)")
    return out


@exit_on_error
def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = argparse.ArgumentParser(
        prog="python -m villa.data.importers.docmnist_plain", description=__doc__.split("\n")[0]
    )
    p.add_argument("--data_dir", required=True, help="a generated DocMNIST folder")
    p.add_argument("--out_dir", required=True, help="where to write images/ and captions.jsonl")
    p.add_argument("--no_split", action="store_true", help="leave the split out of the captions")
    p.add_argument("--with_boxes", action="store_true", help="keep the region boxes (a 'boxes' field)")
    p.add_argument("--overwrite", action="store_true", help="replace --out_dir")
    a = p.parse_args(argv)
    return export_plain(a.data_dir, a.out_dir, not a.no_split, a.overwrite, a.with_boxes)


if __name__ == "__main__":
    main()
