"""Region sources: grid cells, proposals from a COCO results file and from a torchvision detector the test trains,
labels and recall against reference boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from villa.core.errors import VillaError
from villa.data.annotations import load_annotations
from villa.data.images import read_image
from villa.data.regions import (
    RegionSpec,
    grid_boxes,
    grid_levels,
    label_regions,
    proposals_from_file,
    recall_at_iou,
    with_whole_image,
)
from villa.data.vocab import load_vocab
from villa.models.detector import load_detector, propose, train_detector


def test_grid_cells_tile_each_image():
    off, boxes = grid_boxes(np.array([[84, 84], [100, 50]]), [1, 2, "1x3"])
    assert off.tolist() == [0, 8, 16]
    assert boxes[:8].tolist() == [
        [0, 0, 84, 84],
        [0, 0, 42, 42],
        [42, 0, 84, 42],
        [0, 42, 42, 84],
        [42, 42, 84, 84],
        [0, 0, 28, 84],
        [28, 0, 56, 84],
        [56, 0, 84, 84],
    ]
    assert boxes[13].tolist() == [0, 0, 33, 50]  # 100 / 3 rounded
    assert grid_levels(["2x3"]) == [(2, 3)]
    for bad in (["0"], ["2y3"], []):
        with pytest.raises(VillaError, match="grid"):
            grid_levels(bad)


def _coco_results(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def test_proposals_file_top_k_and_errors(tmp_path):
    ids, size = np.array([7, 9]), np.array([[100, 80], [50, 50]])
    f = _coco_results(
        tmp_path / "p.json",
        [
            {"image_id": 9, "bbox": [0, 0, 10, 10], "score": 0.2},
            {"image_id": 7, "bbox": [10, 10, 20, 20], "score": 0.9},
            {"image_id": 7, "bbox": [90, 70, 30, 30], "score": 0.5},  # clipped to [90, 70, 100, 80]
            {"image_id": 7, "bbox": [0, 0, 5, 5], "score": 0.7},
            {"image_id": 7, "bbox": [0, 0, 1, 1], "score": 0.99},  # below min_size
        ],
    )
    off, boxes, scores = proposals_from_file(f, ids, size, top_k=2, min_size=2)
    assert off.tolist() == [0, 2, 3]
    assert boxes.tolist() == [[10, 10, 30, 30], [0, 0, 5, 5], [0, 0, 10, 10]]
    assert scores.tolist() == pytest.approx([0.9, 0.7, 0.2])
    with pytest.raises(VillaError, match="proposals for 1 images this dataset does not have"):
        proposals_from_file(
            _coco_results(tmp_path / "q.json", [{"image_id": 3, "bbox": [0, 0, 5, 5], "score": 1}]), ids, size
        )
    with pytest.raises(VillaError, match="holds no proposals"):
        proposals_from_file(_coco_results(tmp_path / "e.json", []), ids, size)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(VillaError, match="is not JSON"):
        proposals_from_file(str(tmp_path / "bad.json"), ids, size)
    with pytest.raises(VillaError, match=r"needs image_id \(or file_name\), bbox"):
        proposals_from_file(_coco_results(tmp_path / "k.json", [{"image_id": 7, "score": 1}]), ids, size)
    with pytest.raises(VillaError, match=r"\(e.g. image_id 3\)"):  # the id as written, never np.int64(3)
        proposals_from_file(
            _coco_results(tmp_path / "q.json", [{"image_id": 3, "bbox": [0, 0, 5, 5], "score": 1}]), ids, size
        )
    # keyed by the image's file name, as the captions file names it (docs/data_format.md's example)
    named = [
        {"file_name": "b/img.png", "bbox": [10, 10, 20, 20], "score": 0.9},
        {"file_name": "./a.png", "bbox": [0, 0, 10, 10], "score": 0.2},
    ]
    off2, boxes2, _ = proposals_from_file(
        _coco_results(tmp_path / "n.json", named), ids, size, filepath=["a.png", "b/img.png"]
    )
    assert off2.tolist() == [0, 1, 2] and boxes2.tolist() == [[0, 0, 10, 10], [10, 10, 30, 30]]
    with pytest.raises(VillaError, match="e.g. file_name 'c.png'"):
        proposals_from_file(
            _coco_results(tmp_path / "m.json", [{"file_name": "c.png", "bbox": [0, 0, 5, 5], "score": 1}]),
            ids,
            size,
            filepath=["a.png", "b/img.png"],
        )


def test_labels_and_recall_from_reference_boxes():
    ref_off, ref = np.array([0, 2]), np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    off, boxes = np.array([0, 3]), np.array([[0, 0, 10, 11], [0, 0, 40, 40], [21, 21, 30, 30]], np.float32)
    labels = label_regions(off, boxes, ref_off, ref, [["a", "b"], ["c"]], iou=0.5)
    assert labels == [["a", "b"], [], ["c"]]
    assert recall_at_iou(off, boxes, ref_off, ref) == 1.0
    assert recall_at_iou(off, boxes[1:2], ref_off, ref) == 0.0


def test_images_without_regions_get_the_whole_image():
    off, boxes = with_whole_image(
        np.array([0, 1, 1, 2]), np.ones((2, 4), np.float32), np.array([[5, 6], [7, 8], [9, 9]])
    )
    assert off.tolist() == [0, 1, 2, 3] and boxes[1].tolist() == [0, 0, 7, 8]


def test_region_spec_checks():
    for spec, match in (
        (RegionSpec("boxes"), "regions='boxes'"),
        (RegionSpec("proposals"), "needs --proposals_file"),
        (RegionSpec("grid", nms=0), "nms=0"),
    ):
        with pytest.raises(VillaError, match=match):
            spec.check()


@pytest.fixture(scope="module")
def small_detector(tmp_path_factory, docmnist_16):
    """villa-tiny-frcnn trained by the test itself on DocMNIST's training boxes (50 steps, under a minute)."""
    out = tmp_path_factory.mktemp("det") / "detector.pt"
    return train_detector(docmnist_16, out, epochs=1, batch_size=8, lr=3e-3, max_images=400, progress=False)


def test_trained_detector_proposes_the_regions(small_detector, docmnist_16):
    vocab = load_vocab("docmnist")
    ann = load_annotations(docmnist_16, vocab, check_images=False)
    model, ident = load_detector(None, str(small_detector))
    assert ident["detector"] == "villa-tiny-frcnn" and ident["weights_id"].startswith("sha256:")
    rows = np.flatnonzero(ann.split == "test")[:60]
    images = [read_image(ann.root / ann.filepath[r]).float() / 255 for r in rows]
    for kind in ("rpn", "detections"):
        res = propose(model, images, top_k=20, kind=kind)
        off = np.concatenate([[0], np.cumsum([len(b) for b, _ in res])])
        boxes = np.concatenate([b.numpy() for b, _ in res])
        scores = torch.cat([s for _, s in res])
        assert all(len(b) <= 20 for b, _ in res) and ((scores >= 0) & (scores <= 1)).all()
        ref_off = np.concatenate([[0], np.cumsum(ann.n_regions[rows])])
        ref = np.concatenate([ann.boxes[ann.region_offsets[r] : ann.region_offsets[r + 1]] for r in rows])
        assert recall_at_iou(off, boxes, ref_off, ref) > 0.5, kind  # chance with 20 random boxes is near 0


def test_detector_checkpoint_that_is_not_one(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(VillaError, match="is not a detector checkpoint"):
        load_detector(None, str(tmp_path / "x.pt"))
    torch.save({"a": torch.zeros(1)}, tmp_path / "y.pt")
    with pytest.raises(VillaError, match="not a villa detector checkpoint"):
        load_detector(None, str(tmp_path / "y.pt"))
    with pytest.raises(VillaError, match="does not hold fasterrcnn_mobilenet_v3_large_320_fpn"):
        load_detector("fasterrcnn_mobilenet_v3_large_320_fpn", str(tmp_path / "y.pt"))
    with pytest.raises(VillaError, match="unknown detector"):
        load_detector("resnet50", None)


def test_a_detector_without_weights_is_refused(tmp_path):
    """An untrained detector's proposals are random boxes (objectness 0.5 everywhere): refused, not imported."""
    with pytest.raises(VillaError, match="detector villa-tiny-frcnn has no weights: an untrained detector proposes"):
        load_detector("villa-tiny-frcnn", None)
    with pytest.raises(
        VillaError, match="has no weights: an untrained detector proposes random boxes; pass --detector"
    ):
        RegionSpec("proposals", detector="villa-tiny-frcnn").check()
    RegionSpec("proposals", proposals_file=str(tmp_path / "p.json")).check()  # a proposals file needs no detector
