"""Zero-shot detection evaluation at COCO val2017's size: 5,000 images x 100 proposals through villa.evaluate.detection.

    python -m benchmarks.bench_detection [--images 5000] [--proposals 100] [--device cpu] [--json out.json]

The ground truth is the test split of a DocMNIST (84x84 images, digits as categories) exported to COCO format; the
proposals are ``--proposals`` boxes per image drawn at random around the image (seeded; their quality does not
change the work), each with a score. The model is the shipped small CLIP at its input size (168). Reported: the
total, regions/s of the batched region path, the classification and per-class NMS, and pycocotools' own time
(``COCO.loadRes`` + ``COCOeval``), apart.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from docmnist.generate_docmnist import generate
from experiments.demo import ASSET
from villa.core.io import write_json_atomic
from villa.core.runtime import get_runtime
from villa.data.importers.docmnist_coco import export_coco
from villa.evaluate.detection import zero_shot_detection
from villa.evaluate.retrieval import region_options
from villa.models.clip import create_clip


def random_proposals(gt: dict, per_image: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for im in gt["images"]:
        w, h = im["width"], im["height"]
        xy = rng.uniform(0, [w - 8, h - 8], size=(per_image, 2))
        wh = rng.uniform(8, [w, h], size=(per_image, 2))
        wh = np.minimum(wh, [w, h] - xy)
        score = rng.uniform(0, 1, per_image)
        rows += [
            {
                "image_id": im["id"],
                "category_id": 1,
                "bbox": [float(a), float(b), float(c), float(d)],
                "score": float(s),
            }
            for (a, b), (c, d), s in zip(xy, wh, score)
        ]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_detection",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", type=int, default=5000, help="test images (COCO val2017: 5,000)")
    p.add_argument("--proposals", type=int, default=100, help="proposals per image")
    p.add_argument("--batch_size", type=int, default=64, help="images per region-path batch")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args()
    runtime = get_runtime(a.device)
    clip = create_clip("auto", str(ASSET), device=runtime.device)
    opts = region_options(str(ASSET), None, None)
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(
            200, 16, seed=5, out_dir=tmp, val_budget=100, test_budget=int(a.images * 15.3) + 32, progress=False
        )
        gt_path = export_coco(data, Path(tmp) / "gt.json")
        gt = json.loads(gt_path.read_text())
        keep = {im["id"] for im in gt["images"][: a.images]}
        gt["images"] = [im for im in gt["images"] if im["id"] in keep]
        gt["annotations"] = [x for x in gt["annotations"] if x["image_id"] in keep]
        gt_path.write_text(json.dumps(gt))
        props = Path(tmp) / "proposals.json"
        props.write_text(json.dumps(random_proposals(gt, a.proposals)))
        t = time.perf_counter()
        res = zero_shot_detection(
            clip,
            opts,
            runtime,
            gt_path,
            data,
            regions="proposals",
            proposals_file=str(props),
            top_k=a.proposals,
            batch_size=a.batch_size,
            num_workers=0,
        )
        total = time.perf_counter() - t
    s = res["seconds"]
    out = {
        "images": len(gt["images"]),
        "proposals_per_image": a.proposals,
        "regions": res["boxes"],
        "device": str(runtime.device),
        "model": "villa-small-rn (shipped), input 168",
        "total_s": round(total, 1),
        "embed_regions_s": s["embed_regions"],
        "regions_per_s": round(res["boxes"] / s["embed_regions"], 1),
        "classify_and_nms_s": s["classify_and_nms"],
        "pycocotools_s": s["pycocotools"],
        "other_s": round(total - sum(s.values()), 1),
        "detections": res["detections"],
    }
    print(json.dumps(out, indent=2))
    if a.json:
        write_json_atomic(a.json, out)


if __name__ == "__main__":
    main()
