"""Zero-shot detection scored by pycocotools: AP50 on hand-made cases with known answers, the whole path on a tiny
COCO-format set, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from villa.core.errors import VillaError
from villa.evaluate.detection import category_groups, coco_ap, detect, load_gt, zero_shot_detection

ROOT = Path(__file__).resolve().parent.parent


def write_gt(tmp: Path, n_images: int = 4, size=(64, 48)) -> Path:
    """Images with one orange square (cat 1, "square") and one cyan square (cat 2, "disc") each."""
    images, anns = [], []
    for i in range(n_images):
        im = np.zeros((size[1], size[0], 3), np.uint8)
        im[4:20, 4:20] = (255, 128, 0)
        im[24:44, 30:50] = (0, 200, 200)
        (tmp / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(tmp / "images" / f"{i}.png")
        images.append({"id": 10 + i, "file_name": f"{i}.png", "width": size[0], "height": size[1]})
        anns.append(
            {"id": 2 * i + 1, "image_id": 10 + i, "category_id": 1, "bbox": [4, 4, 16, 16], "area": 256, "iscrowd": 0}
        )
        anns.append(
            {"id": 2 * i + 2, "image_id": 10 + i, "category_id": 2, "bbox": [30, 24, 20, 20], "area": 400, "iscrowd": 0}
        )
    cats = [{"id": 1, "name": "square", "supercategory": "shape"}, {"id": 2, "name": "disc", "supercategory": "shape"}]
    p = tmp / "gt.json"
    p.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return p


def test_perfect_detections_give_ap50_100_and_a_swap_gives_the_hand_value(tmp_path):
    gt = load_gt(write_gt(tmp_path, n_images=2))
    groups = {"all": [1, 2], "base": [1], "novel": [2]}
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt.dataset["annotations"]
    ]
    res = coco_ap(gt, perfect, groups, [10, 11])
    assert res["all"]["AP50"] == pytest.approx(100) and res["all"]["AP"] == pytest.approx(100)
    assert res["per_category_AP50"] == {"square": pytest.approx(100), "disc": pytest.approx(100)}
    # square: a false positive (image 11's disc box called square) scores above the true square of image 10, and
    # image 11's square is missed: precision 0.5 at recall 0.5, recall never reaches 1 -> AP50 = 50 * 51/101
    swapped = [
        {"image_id": 11, "category_id": 1, "bbox": [30, 24, 20, 20], "score": 0.9},
        {"image_id": 10, "category_id": 1, "bbox": [4, 4, 16, 16], "score": 0.8},
        {"image_id": 10, "category_id": 2, "bbox": [30, 24, 20, 20], "score": 0.7},
        {"image_id": 11, "category_id": 2, "bbox": [30, 24, 20, 20], "score": 0.6},
    ]
    res = coco_ap(gt, swapped, groups, [10, 11])
    assert res["per_category_AP50"]["square"] == pytest.approx(100 * 0.5 * 51 / 101)
    assert res["per_category_AP50"]["disc"] == pytest.approx(100)
    assert res["base"]["AP50"] == pytest.approx(100 * 0.5 * 51 / 101) and res["novel"]["AP50"] == pytest.approx(100)
    assert res["all"]["AP50"] == pytest.approx((100 * 0.5 * 51 / 101 + 100) / 2)
    with pytest.raises(VillaError, match="results name 1 images the ground truth lacks"):
        coco_ap(gt, [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}], groups, [10, 11])


def test_detect_nms_and_top_k():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], np.float32)
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    out = detect(scores, boxes, np.array([0, 3]), np.array([5]), [7, 8], nms=0.5, max_dets=3, score_thresh=0.15)
    got = [(r["category_id"], r["score"], r["bbox"]) for r in out]
    # class 7: box 1 suppressed by box 0 (IoU 0.81); class 8: box 2 (0.7), box 1 (0.2); box 0's 0.1 is below the
    # threshold; top 3 overall
    assert got == [(7, 0.9, [0, 0, 10, 10]), (8, 0.7, [20, 20, 10, 10]), (7, 0.3, [20, 20, 10, 10])]


def test_zero_shot_detection_end_to_end(tmp_path):
    gt_path = write_gt(tmp_path)
    from villa.core.runtime import get_runtime, seed_everything
    from villa.models.clip import create_clip

    seed_everything(0)
    clip = create_clip("villa-tiny-rn", "none", device="cpu")
    rt = get_runtime("cpu")
    opts = {"normalize": False, "input_size": None}
    split = tmp_path / "split.yaml"
    split.write_text("groups:\n  base: [square]\n  novel: [disc]\n")
    res = zero_shot_detection(
        clip,
        opts,
        rt,
        gt_path,
        tmp_path / "images",
        split=str(split),
        num_workers=0,
        templates=["a {}"],
        temperature=1.0,
        results_path=tmp_path / "dets.json",
    )
    assert res["images"] == 4 and res["boxes"] == 8 and set(res) >= {"all", "base", "novel", "per_category_AP50"}
    dets = json.loads((tmp_path / "dets.json").read_text())
    assert len(dets) == res["detections"] and {d["image_id"] for d in dets} == {10, 11, 12, 13}
    assert all(0 <= res[g]["AP50"] <= 100 for g in ("all", "base", "novel"))
    # two classes at temperature 1, no overlapping boxes: every GT box is a detection of both classes
    assert len(dets) == 16
    again = coco_ap(load_gt(gt_path), dets, {"all": [1, 2]}, [10, 11, 12, 13])
    assert again["all"]["AP50"] == pytest.approx(res["all"]["AP50"])
    props = [{"image_id": 10 + i, "bbox": [4, 4, 16, 16], "score": 0.9} for i in range(4)]
    (tmp_path / "p.json").write_text(json.dumps(props))
    res = zero_shot_detection(
        clip,
        opts,
        rt,
        gt_path,
        tmp_path / "images",
        regions="proposals",
        proposals_file=str(tmp_path / "p.json"),
        num_workers=0,
        templates=["a {}"],
    )
    assert res["boxes"] == 4 and res["objectness"] is True
    with pytest.raises(VillaError, match="names 1 categories the ground truth does not have"):
        category_groups(load_gt(gt_path), str(_yaml(tmp_path / "s2.yaml", "groups:\n  novel: [triangle]\n")))
    with pytest.raises(VillaError, match="proposals for 1 images this dataset does not have"):
        (tmp_path / "q.json").write_text(json.dumps([{"image_id": 99, "bbox": [0, 0, 4, 4], "score": 1}]))
        zero_shot_detection(
            clip,
            opts,
            rt,
            gt_path,
            tmp_path / "images",
            regions="proposals",
            proposals_file=str(tmp_path / "q.json"),
            num_workers=0,
        )
    with pytest.raises(VillaError, match="holds no proposals"):
        (tmp_path / "e.json").write_text("[]")
        zero_shot_detection(
            clip,
            opts,
            rt,
            gt_path,
            tmp_path / "images",
            regions="proposals",
            proposals_file=str(tmp_path / "e.json"),
            num_workers=0,
        )


def _yaml(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_coco_split_file_and_lvis_groups(tmp_path):
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(["airplane", "person", "dog"])]
    (tmp_path / "gt.json").write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    with pytest.raises(VillaError, match="group 'base' names 47 categories the ground truth does not have"):
        category_groups(load_gt(tmp_path / "gt.json"), "coco_48_17")
    lvis = [{"id": 1, "name": "a", "frequency": "r"}, {"id": 2, "name": "b", "frequency": "f"}]
    (tmp_path / "l.json").write_text(json.dumps({"images": [], "annotations": [], "categories": lvis}))
    g = category_groups(load_gt(tmp_path / "l.json"), "lvis")
    assert g == {"all": [1, 2], "rare": [1], "common": [], "frequent": [2]}


def test_cli_bad_ground_truth_is_one_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "villa.detection",
            f"gt={tmp_path / 'none.json'}",
            f"images={tmp_path}",
            "model.name=villa-tiny-rn",
            "model.pretrained=none",
            f"output={tmp_path / 'o.json'}",
            f"hydra.run.dir={tmp_path / 'h'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: ground truth not found" in r.stderr


def test_classification_accuracy_by_hand_and_end_to_end(tmp_path):
    from villa.core.runtime import get_runtime, seed_everything
    from villa.evaluate.classification import accuracy, zero_shot_classification
    from villa.models.clip import create_clip

    sim = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    res = accuracy(sim, np.array([0, 1, 1, 1]), 2)
    assert res["accuracy"] == 50.0 and res["per_class"] == [100.0, 100 / 3] and res["confusion"] == [[1, 0], [2, 1]]
    write_gt(tmp_path)  # images/0..3.png
    rows = ["image,label"] + [f"{i}.png,{'Edema' if i % 2 else 'Atelectasis'}" for i in range(4)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    seed_everything(0)
    clip = create_clip("villa-tiny-rn", "none", device="cpu")
    opts = {"normalize": False, "input_size": None}
    for readout in ("image", "region"):
        r = zero_shot_classification(
            clip, opts, get_runtime("cpu"), tmp_path / "labels.csv", tmp_path / "images", readout=readout, num_workers=0
        )
        assert r["images"] == 4 and r["classes"] == ["Atelectasis", "Edema"] and r["accuracy"] in (0, 25, 50, 75, 100)
        assert sum(map(sum, r["confusion"])) == 4
    (tmp_path / "bad.csv").write_text("image,label\n0.png,Pneumonia\n")
    with pytest.raises(VillaError, match=r"labels \['Pneumonia'\] are not among the classes"):
        zero_shot_classification(
            clip,
            opts,
            get_runtime("cpu"),
            tmp_path / "bad.csv",
            tmp_path / "images",
            classes=["Atelectasis", "Edema"],
            num_workers=0,
        )


def test_docmnist_as_coco_ground_truth(tiny_docmnist, tmp_path):
    """DocMNIST's test split exported as a COCO ground truth (a digit per region) loads in pycocotools and its own
    boxes as detections score AP50 = 100 there."""
    from villa.data.importers.docmnist_coco import export_coco

    out = export_coco(tiny_docmnist, tmp_path / "gt.json")
    gt = load_gt(out)
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())][:3] == ["zero", "one", "two"]
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt.dataset["annotations"]
    ]
    res = coco_ap(gt, dets, category_groups(gt, None), gt.getImgIds())
    assert res["all"]["AP50"] == pytest.approx(100)
    assert len(gt.dataset["annotations"]) == sum(len(gt.imgToAnns[i]) for i in gt.getImgIds()) > 0
