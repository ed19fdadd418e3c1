"""Region sources on DocMNIST: proposal recall at IoU 0.5 against the ground-truth regions, and throughput on this
machine; plus the padding that size-bucketed preprocessing saves on images of mixed sizes.

    python -m benchmarks.bench_regions [--detector detector.pt] [--json out.json]

Without ``--detector`` a villa-tiny-frcnn is trained first on the training split's boxes (``python -m
villa.models.detector train``'s defaults, about a minute). Recall and images/s are measured on the test split: grid
cells (3x3, 1+2+3), a proposals file in COCO results format (written from the detector, then read back), and the
detector itself (its RPN and its detections, top 10/20/100). The padding figure compares batches of 64 images
in file order against batches of one size each, over COCO-like sizes (640x480, 480x640, 640x427, 500x375, ...).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from docmnist.generate_docmnist import generate
from villa.data.annotations import load_annotations
from villa.data.images import padded_pixels, size_buckets
from villa.data.regions import RegionSpec, detector_proposals, grid_boxes, proposals_from_file, recall_at_iou
from villa.data.vocab import load_vocab
from villa.models.detector import train_detector


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_regions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--detector", default=None, help="a villa detector checkpoint (default: train one)")
    p.add_argument("--budget", type=int, default=6000, help="DocMNIST training budget")
    p.add_argument("--test_budget", type=int, default=6000, help="DocMNIST test budget (the measured images)")
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args()
    vocab = load_vocab("docmnist")
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(a.budget, 16, seed=23, out_dir=tmp, val_budget=1000, test_budget=a.test_budget, progress=False)
        ann = load_annotations(data, vocab)
        det = a.detector
        if det is None:
            t = time.perf_counter()
            det = str(train_detector(data, Path(tmp) / "det.pt", progress=False))
            res["detector_train_s"] = round(time.perf_counter() - t, 1)
        rows = np.flatnonzero(ann.split == "test")
        ref_off = np.concatenate([[0], np.cumsum(ann.n_regions[rows])])
        ref = np.concatenate([ann.boxes[ann.region_offsets[r] : ann.region_offsets[r + 1]] for r in rows])
        sizes, files, ids = ann.image_size[rows], [ann.filepath[r] for r in rows], ann.image_id[rows]
        res["test_images"], res["test_regions"] = int(len(rows)), int(len(ref))
        table = []
        for levels in ([3], [1, 2, 3]):
            t = time.perf_counter()
            off, boxes = grid_boxes(sizes, levels)
            secs = time.perf_counter() - t
            table.append(
                (
                    f"grid {'+'.join(map(str, levels))}",
                    np.diff(off).mean(),
                    recall_at_iou(off, boxes, ref_off, ref),
                    len(rows) / max(secs, 1e-9),
                )
            )
        for kind in ("rpn", "detections"):
            for k in (10, 20, 100):
                spec = RegionSpec("proposals", detector_weights=det, proposal_kind=kind, top_k=k)
                t = time.perf_counter()
                off, boxes, scores, _ = detector_proposals(ann.root, files, sizes, spec, progress=False)
                secs = time.perf_counter() - t
                table.append(
                    (
                        f"detector {kind} top {k}",
                        np.diff(off).mean(),
                        recall_at_iou(off, boxes, ref_off, ref),
                        len(rows) / secs,
                    )
                )
                if kind == "rpn" and k == 100:  # the same proposals as a COCO results file, read back
                    owner = np.repeat(np.arange(len(rows)), np.diff(off))
                    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
                    f = Path(tmp) / "proposals.json"
                    f.write_text(
                        json.dumps(
                            [
                                {"image_id": int(ids[o]), "bbox": [float(v) for v in b], "score": float(s)}
                                for o, b, s in zip(owner, xywh, scores)
                            ]
                        )
                    )
                    t = time.perf_counter()
                    off2, boxes2, _ = proposals_from_file(str(f), ids, sizes, top_k=100)
                    secs = time.perf_counter() - t
                    table.append(
                        (
                            "proposals file (RPN top 100)",
                            np.diff(off2).mean(),
                            recall_at_iou(off2, boxes2, ref_off, ref),
                            len(rows) / secs,
                        )
                    )
    res["sources"] = [
        {
            "source": n,
            "regions_per_image": round(float(r), 2),
            "recall_at_0.5": round(float(c), 4),
            "images_per_s": round(float(s), 1),
        }
        for n, r, c, s in table
    ]
    print(f"{'regions':<30}{'per image':>10}{'recall@0.5':>12}{'images/s':>12}")
    for row in res["sources"]:
        print(
            f"{row['source']:<30}{row['regions_per_image']:>10.1f}{100 * row['recall_at_0.5']:>11.1f}%{row['images_per_s']:>12.0f}"
        )
    rng = np.random.default_rng(0)
    common = np.array([[640, 480], [480, 640], [640, 427], [427, 640], [500, 375], [640, 360], [612, 612], [640, 512]])
    sizes = common[rng.choice(len(common), 5000, p=[0.4, 0.15, 0.15, 0.05, 0.1, 0.05, 0.05, 0.05])]
    rows = np.arange(len(sizes))
    padded, real = padded_pixels(sizes, rows, size_buckets(sizes, rows, 64, bucket=False))
    bucketed, _ = padded_pixels(sizes, rows, size_buckets(sizes, rows, 64, bucket=True))
    res["padding"] = {
        "images": len(sizes),
        "batch": 64,
        "pixels_in_file_order": padded,
        "pixels_bucketed": bucketed,
        "image_pixels": real,
        "saved_fraction": round(1 - bucketed / padded, 4),
    }
    print(
        f"padding: batches in file order process {padded / real:.2f}x the image pixels, bucketed {bucketed / real:.2f}x "
        f"({100 * res['padding']['saved_fraction']:.0f}% fewer pixels)"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
