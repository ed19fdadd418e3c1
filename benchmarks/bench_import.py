"""Time the importers' vectorised parts: the COCO importer on a synthetic captions + instances file of 100,000
images, and the attribute extractor on 100,000 texts.

    python -m benchmarks.bench_import [--images 100000] [--repeats 3] [--json out.json]

The COCO files are written in the published layout (5 captions and about 7 boxes per image, COCO's 80 categories)
with ``image_size`` taken from the file (as the importer does: COCO states each image's width and height), so the
timing covers JSON reading, grouping captions and boxes by image, attribute extraction, the region arrays and the
Arrow write, not image decoding. The extractor is timed on report-like texts of random sentences (sizes, sides,
measurements) with negation and uncertainty on (CheXpert's vocabulary), on random COCO-like captions with plurals,
and on captions that are all different (a house number appended): the extractor reads each unique sentence once,
so the last row is its worst case; the number of unique sentences is recorded. Medians of the repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from villa.data.attributes import extract_attributes
from villa.data.importers.coco import import_coco
from villa.data.regions import RegionSpec
from villa.data.vocab import load_vocab

SUBJECTS = [
    "a man",
    "two women",
    "a young boy",
    "a dog",
    "three cats",
    "a giraffe",
    "a red bus",
    "people",
    "a chef",
    "a skateboarder",
    "an elephant",
    "a little girl",
    "a horse",
    "two zebras",
    "a surfer",
]
ACTIONS = [
    "sitting next to",
    "riding",
    "standing near",
    "holding",
    "looking at",
    "walking past",
    "playing with",
    "eating",
    "leaning on",
    "jumping over",
]
OBJECTS = [
    "a bike",
    "a dining table",
    "a frisbee",
    "an umbrella",
    "a laptop",
    "a fire hydrant",
    "a pizza",
    "a cake",
    "a parked car",
    "a bench",
    "a cell phone",
    "a teddy bear",
    "a suitcase",
    "some bananas",
    "a clock",
]
PLACES = ["on a sunny day", "in a kitchen", "at the beach", "on a busy street", "in a park", "in the snow", "", ""]
FINDINGS = [
    "pleural effusion",
    "pneumothorax",
    "consolidation",
    "atelectasis",
    "pulmonary edema",
    "cardiomegaly",
    "a nodule",
    "opacity",
    "pneumonia",
    "a fracture of the {n}th rib",
]
FRAMES = [
    "there is a {size} {side} {f}",
    "no {f}",
    "possible {side} basilar {f}",
    "{f} cannot be excluded",
    "{side} {f} has resolved",
    "interval increase in {size} {f} measuring {cm} cm",
    "no evidence of {f} or {g}",
    "the {side} PICC line terminates in the low SVC",
    "heart size is normal",
    "stable {size} {side} {f}",
]


def captions(n: int, rng: np.random.Generator) -> list[str]:
    """COCO-like captions, random compositions (few repeat)."""
    pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
    return [f"{pick(SUBJECTS)} {pick(ACTIONS)} {pick(OBJECTS)} {pick(PLACES)}".strip() for _ in range(n)]


def reports(n: int, rng: np.random.Generator) -> list[str]:
    """Report-like texts of 3-6 sentences with sizes, sides and measurements (most sentences are unique)."""
    pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
    out = []
    for _ in range(n):
        sents = []
        for _ in range(int(rng.integers(3, 7))):
            sents.append(
                pick(FRAMES)
                .format(
                    size=pick(["small", "moderate", "large", "trace"]),
                    side=pick(["left", "right", "bilateral"]),
                    f=pick(FINDINGS),
                    g=pick(FINDINGS),
                    cm=f"{rng.uniform(0.3, 9.9):.1f}",
                )
                .format(n=int(rng.integers(2, 12)))
            )
        out.append("FINDINGS: " + ". ".join(sents) + ".")
    return out


def write_coco(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    cats = [{"id": i + 1, "name": a, "supercategory": "x"} for i, a in enumerate(load_vocab("coco").attributes)]
    images = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": 640, "height": 480} for i in range(n)]
    caps = [{"id": k, "image_id": k // 5 + 1, "caption": c} for k, c in enumerate(captions(5 * n, rng))]
    n_box = 7 * n
    img = rng.integers(1, n + 1, n_box)
    xy = rng.uniform(0, 400, (n_box, 2))
    wh = rng.uniform(10, 200, (n_box, 2))
    cat = rng.integers(1, 81, n_box)
    inst = [
        {
            "id": k,
            "image_id": int(img[k]),
            "category_id": int(cat[k]),
            "iscrowd": 0,
            "bbox": [float(xy[k, 0]), float(xy[k, 1]), float(wh[k, 0]), float(wh[k, 1])],
        }
        for k in range(n_box)
    ]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps({"images": images, "annotations": caps}))
    (root / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": images, "annotations": inst, "categories": cats})
    )


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_import",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", type=int, default=100_000, help="synthetic COCO images")
    p.add_argument("--texts", type=int, default=100_000, help="texts for the extractor")
    p.add_argument("--repeats", type=int, default=3, help="runs of each; medians are reported")
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args()
    out = {"images": a.images, "texts": a.texts, "repeats": a.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "coco"
        t = time.perf_counter()
        write_coco(root, a.images)
        print(f"wrote the synthetic COCO files in {time.perf_counter() - t:.1f}s")
        vocab = load_vocab("coco")
        times = []
        for r in range(a.repeats):
            t = time.perf_counter()
            import_coco(
                root,
                vocab,
                RegionSpec("given"),
                Path(tmp) / f"ds{r}",
                splits=["train2017"],
                progress=False,
                no_attribute="keep",
            )
            times.append(time.perf_counter() - t)
        out["coco_import_s"] = {"median": statistics.median(times), "min": min(times), "max": max(times)}
    rng = np.random.default_rng(1)
    unique = [f"{c} next to house number {i}" for i, c in enumerate(captions(a.texts, rng))]  # every text new
    for name, vocab_name, items in (
        ("reports", "chexpert", reports(a.texts, rng)),
        ("captions", "coco", captions(a.texts, rng)),
        ("unique_captions", "coco", unique),
    ):
        vocab = load_vocab(vocab_name)
        out[f"unique_sentences_{name}"] = len({s.strip() for t in items for s in t.split(".") if s.strip()})
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            extract_attributes(items, vocab)
            times.append(time.perf_counter() - t)
        out[f"extract_{name}_s"] = {"median": statistics.median(times), "min": min(times), "max": max(times)}
    for k, v in out.items():
        if isinstance(v, dict):
            print(f"{k:<22} median {v['median']:.2f}s (min {v['min']:.2f}, max {v['max']:.2f})")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
