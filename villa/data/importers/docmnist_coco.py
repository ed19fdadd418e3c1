"""A DocMNIST split as a COCO-format detection ground truth: one category per attribute of a group (digits by
default: each region is one digit), so villa.evaluate.detection can score zero-shot detection on DocMNIST (the offline
analogue of the paper's COCO evaluation).

    python -m villa.data.importers.docmnist_coco --data_dir data/docmnist_6000_15.2 --split test --group digit \
        --out data/docmnist_6000_15.2/instances_test.json
    python -m villa.evaluate.detection gt=data/docmnist_6000_15.2/instances_test.json images=data/docmnist_6000_15.2 ...

Images keep their paths relative to the dataset folder (``file_name``); a region's category is its ground-truth
attribute of the group (``reg_to_attr``); regions without one are left out.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from villa.core.errors import VillaError, exit_on_error
from villa.core.io import write_json_atomic
from villa.data.annotations import load_annotations
from villa.data.vocab import load_vocab


def export_coco(
    data_dir: str | Path, out: str | Path, split: str = "test", group: str = "digit", dataset_config: str = "docmnist"
) -> Path:
    vocab = load_vocab(dataset_config)
    if group not in vocab.groups:
        raise VillaError(f"--group {group!r}: use one of {', '.join(vocab.groups)}")
    ann = load_annotations(data_dir, vocab, required_splits=(split,), check_images=False)
    gold = ann.region_attribute_matrix(len(vocab))
    if gold is None:
        raise VillaError(f"{data_dir} has no reg_to_attr: no ground truth to export")
    names = vocab.group_attributes(group)
    cols = [vocab.index[n] for n in names]
    cat_of = {c: k + 1 for k, c in enumerate(cols)}
    images, anns = [], []
    for i in (int(r) for r in range(ann.n_images) if ann.split[r] == split):
        w, h = (int(v) for v in ann.image_size[i])
        images.append({"id": int(i), "file_name": ann.filepath[i], "width": w, "height": h})
        for r in range(int(ann.region_offsets[i]), int(ann.region_offsets[i + 1])):
            hit = [c for c in cols if gold[r, c]]
            if not hit:
                continue
            x0, y0, x1, y1 = (float(v) for v in ann.boxes[r])
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": int(i),
                    "category_id": cat_of[hit[0]],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    cats = [{"id": k + 1, "name": n, "supercategory": group} for k, n in enumerate(names)]
    return write_json_atomic(
        out,
        {
            "info": {"description": f"DocMNIST {Path(data_dir).name} {split}, {group}s"},
            "images": images,
            "annotations": anns,
            "categories": cats,
        },
    )


@exit_on_error
def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m villa.data.importers.docmnist_coco", description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", required=True, help="a DocMNIST folder (with reg_to_attr)")
    p.add_argument("--out", required=True, help="the COCO instances JSON to write")
    p.add_argument("--split", default="test", help="which split's images")
    p.add_argument("--group", default="digit", help="the attribute group whose attributes are the categories")
    p.add_argument("--dataset_config", default="docmnist", help="vocabulary name or YAML path")
    a = p.parse_args(argv)
    out = export_coco(a.data_dir, a.out, a.split, a.group, a.dataset_config)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
