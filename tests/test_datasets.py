"""Importers, each on a fixture the test writes in the dataset's exact published layout, and each importer's output
through preprocessing, Stage 1, Stage 2 and evaluation unchanged."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pytest
from conftest import compose_config
from PIL import Image

from villa.core.errors import VillaError
from villa.data.annotations import load_annotations
from villa.data.importers.coco import import_coco
from villa.data.importers.common import assign_splits
from villa.data.importers.deepfashion import import_deepfashion
from villa.data.importers.generic import import_generic
from villa.data.importers.generic import main as generic_main
from villa.data.importers.mimic_cxr import import_mimic, report_sections
from villa.data.regions import REGIONS_META, RegionSpec, regions_record
from villa.data.vocab import load_vocab, vocab_from_dict

SHAPES = {
    "name": "shapes",
    "plurals": True,
    "negation": "default",
    "groups": [
        {
            "name": "form",
            "attributes": ["square", "disc"],
            "aliases": {"disc": ["circle", "round spot"]},
            "templates": ["a {}"],
        },
        {"name": "tint", "attributes": ["orange", "cyan"], "templates": ["it is {}"]},
    ],
}
COLOURS = {"orange": (255, 128, 0), "cyan": (0, 200, 200)}


def draw(path: Path, size=(64, 48), shapes=(), fmt="PNG") -> None:
    """An image with coloured squares/discs: ``shapes`` = [(kind, colour, (x0, y0, x1, y1))]."""
    im = np.zeros((size[1], size[0], 3), np.uint8)
    yy, xx = np.mgrid[: size[1], : size[0]]
    for kind, colour, (x0, y0, x1, y1) in shapes:
        if kind == "square":
            im[y0:y1, x0:x1] = COLOURS[colour]
        else:
            cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
            im[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = COLOURS[colour]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(im).save(path, fmt)


def photos(root: Path, n: int = 24, with_boxes: bool = False) -> Path:
    """A user's folder: images of two sizes and a captions.jsonl (image, caption, source group, optional boxes)."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        size = (64, 48) if i % 2 else (48, 48)
        kinds = rng.choice(["square", "disc"], 2)
        cols = rng.choice(["orange", "cyan"], 2)
        boxes = [(2, 2, 20, 20), (26, 26, 44, 44)]
        draw(root / "photos" / f"p{i}.png", size, list(zip(kinds, cols, boxes)))
        words = {"square": "squares" if i % 3 == 0 else "square", "disc": "circle" if i % 2 else "round spot"}
        cap = f"An {cols[0]} {words[kinds[0]]} at the top left. A {cols[1]} {words[kinds[1]]} below it."
        if i % 5 == 0:
            cap += " There is no disc here at all."
        rec = {"image": f"photos/p{i}.png", "caption": cap, "source": f"s{i // 2}"}
        if with_boxes:
            rec["boxes"] = [list(b) for b in boxes]
        lines.append(json.dumps(rec))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


# --- generic ----------------------------------------------------------------------------------------------------


def test_generic_jsonl_grid_sizes_splits_attributes(tmp_path):
    root = photos(tmp_path / "mine")
    vocab = vocab_from_dict(SHAPES)
    out = import_generic(
        root,
        root / "captions.jsonl",
        vocab,
        RegionSpec("grid", grid=[1, 2]),
        group_key="source",
        split_fractions=(0.5, 0.25, 0.25),
        progress=False,
    )
    assert out == root
    ann = load_annotations(out, vocab, required_splits=())
    assert ann.n_images == 24 and (ann.n_regions == 5).all()
    assert ann.image_size[:2].tolist() == [[48, 48], [64, 48]]
    assert ann.boxes[5:10].tolist() == [
        [0, 0, 64, 48],
        [0, 0, 32, 24],
        [32, 0, 64, 24],
        [0, 24, 32, 48],
        [32, 24, 64, 48],
    ]
    t = ann.table.to_pydict()
    # attributes from the text: plurals and aliases; "no disc" negated only in its own sentence
    for text, attrs in zip(t["text"], t["attributes"]):
        w = text.lower()
        want = {"square"} if "square" in w else set()  # "squares" too (plurals: true)
        if "circle" in w or "round spot" in w:  # aliases
            want.add("disc")
        want |= {c for c in ("orange", "cyan") if c in w}
        assert set(attrs) == want, text  # "There is no disc here" adds nothing (negated)
    assert any("squares" in x for x in t["text"]) and any("no disc" in x for x in t["text"])
    # splits: deterministic, and the two images of one source never straddle
    split = dict(zip(t["image_filepath"], t["split"]))
    for i in range(0, 24, 2):
        assert split[f"photos/p{i}.png"] == split[f"photos/p{i + 1}.png"]
    assert set(t["split"]) == {"train", "val", "test"}
    assert regions_record(ann.table) == {"source": "grid", "grid": [[1, 1], [2, 2]]}
    again = assign_splits([f"s{i // 2}" for i in range(24)], (0.5, 0.25, 0.25), 0)
    assert list(again) == t["split"]
    report = json.loads((out / "import_report.json").read_text())
    assert report["images"] == 24 and report["attributes"]["texts_without_attribute"] == 0


def test_generic_given_boxes_and_out_dir_link(tmp_path):
    root = photos(tmp_path / "mine", with_boxes=True)
    vocab = vocab_from_dict(SHAPES)
    out = import_generic(root, root / "captions.jsonl", vocab, RegionSpec("given"), tmp_path / "ds", progress=False)
    ann = load_annotations(out, vocab, required_splits=())  # images are read through the link
    assert (out / "source").is_symlink() and ann.filepath[0] == "source/photos/p0.png"
    assert ann.boxes[:2].tolist() == [[2, 2, 20, 20], [26, 26, 44, 44]]


def test_generic_reports_every_problem_at_once(tmp_path, capsys):
    root = tmp_path / "mine"
    draw(root / "a.png")
    lines = [
        '{"image": "a.png", "caption": "a square"}',
        "{broken",
        '{"image": "b.png"}',
        '["list"]',
        '{"image": "../etc/x.png", "caption": "a disc"}',
    ]
    (root / "c.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "v.yaml").write_text(json.dumps(SHAPES))
    with pytest.raises(SystemExit) as e:
        generic_main(
            ["--root", str(root), "--captions", str(root / "c.jsonl"), "--dataset_config", str(tmp_path / "v.yaml")]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: 2 malformed lines")
    assert "c.jsonl:2" in err and "c.jsonl:4" in err
    (root / "c.jsonl").write_text("\n".join([lines[0], lines[2], lines[4]]) + "\n")
    with pytest.raises(VillaError, match=r"1 problems in the captions file: .*c.jsonl:2: no 'caption'"):
        import_generic(root, root / "c.jsonl", vocab_from_dict(SHAPES), RegionSpec("grid"))
    (root / "c.jsonl").write_text("\n".join([lines[0], lines[4]]) + "\n")
    with pytest.raises(VillaError, match=r"image paths leave the dataset folder: '../etc/x.png'"):
        import_generic(root, root / "c.jsonl", vocab_from_dict(SHAPES), RegionSpec("grid"))
    rows = [json.dumps({"image": f"m{i}.png", "caption": "a square"}) for i in range(3)]
    (root / "c.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(VillaError, match=r"3 images cannot be read: .*m0.png missing"):
        import_generic(root, root / "c.jsonl", vocab_from_dict(SHAPES), RegionSpec("grid"))


def test_an_image_in_two_splits_is_refused_at_import_and_at_every_read(tmp_path, capsys):
    root = tmp_path / "mine"
    for i in range(3):
        draw(root / f"p{i}.png", shapes=[("square", "orange", (2, 2, 20, 20))])
    recs = [
        {"image": "p0.png", "caption": "an orange square", "split": "train"},
        {"image": "p1.png", "caption": "a cyan disc", "split": "train"},
        {"image": "./p0.png", "caption": "a square", "split": "test"},  # the same file, spelled otherwise
        {"image": "p2.png", "caption": "a disc", "split": "test"},
    ]
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "v.yaml").write_text(json.dumps(SHAPES))
    argv = [
        "--root",
        str(root),
        "--captions",
        str(root / "c.jsonl"),
        "--dataset_config",
        str(tmp_path / "v.yaml"),
        "--out_dir",
        str(tmp_path / "ds"),
        "--quiet",
    ]
    with pytest.raises(SystemExit) as e:
        generic_main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0
    assert "1 images are listed under more than one split: 'p0.png' (train, test)" in err
    assert not (tmp_path / "ds").exists()  # nothing written
    # a dataset written by hand (or by an older villa) with the leak is refused wherever its splits are read
    vocab = vocab_from_dict(SHAPES)
    recs[2]["image"] = "p3.png"
    draw(root / "p3.png")
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = import_generic(root, root / "c.jsonl", vocab, RegionSpec("grid"), tmp_path / "ds", progress=False)
    t = feather.read_table(out / "annotations.feather")
    paths = t.column("image_filepath").to_pylist()
    paths[2] = paths[0]
    feather.write_feather(t.set_column(1, "image_filepath", pa.array(paths)), out / "annotations.feather")
    with pytest.raises(
        VillaError,
        match=r"1 images are listed under more than one split, e.g. 'source/p0.png' "
        r"\(train, test\)",
    ):
        load_annotations(out, vocab, required_splits=())


def test_rows_of_one_image_in_one_split_are_joined_or_kept_apart(tmp_path):
    root = tmp_path / "mine"
    draw(root / "a.png", shapes=[("square", "orange", (2, 2, 20, 20)), ("disc", "cyan", (26, 26, 44, 44))])
    draw(root / "b.png")
    recs = [
        {"image": "a.png", "caption": "An orange square.", "id": 7, "boxes": [[2, 2, 20, 20]]},
        {"image": "b.png", "caption": "a disc", "id": 8, "boxes": [[0, 0, 10, 10]]},
        {"image": "a.png", "caption": "A cyan disc", "id": 9, "boxes": [[2, 2, 20, 20], [26, 26, 44, 44]]},
    ]
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    vocab = vocab_from_dict(SHAPES)
    out = import_generic(root, root / "c.jsonl", vocab, RegionSpec("given"), tmp_path / "j", progress=False)
    ann = load_annotations(out, vocab, required_splits=())
    assert ann.image_id.tolist() == [7, 8] and ann.text[0] == "An orange square . A cyan disc"
    assert ann.boxes[: ann.n_regions[0]].tolist() == [[2, 2, 20, 20], [26, 26, 44, 44]]  # the repeated box once
    assert sorted(ann.table.column("attributes").to_pylist()[0]) == ["cyan", "disc", "orange", "square"]
    assert json.loads((out / "import_report.json").read_text())["rows_joined"] == 1
    apart = import_generic(
        root, root / "c.jsonl", vocab, RegionSpec("given"), tmp_path / "s", progress=False, same_image="separate"
    )
    assert load_annotations(apart, vocab, required_splits=()).image_id.tolist() == [7, 8, 9]


def test_texts_without_attributes_error_drop_keep(tmp_path):
    root = tmp_path / "mine"
    draw(root / "a.png")
    draw(root / "b.png")
    (root / "c.csv").write_text('image,caption,split\na.png,"an orange square",train\nb.png,"a lighthouse",val\n')
    vocab = vocab_from_dict(SHAPES)
    with pytest.raises(VillaError, match=r"1 of 2 texts mention no attribute .*pass --no_attribute drop"):
        import_generic(root, root / "c.csv", vocab, RegionSpec("grid"))
    import_generic(root, root / "c.csv", vocab, RegionSpec("grid"), no_attribute="drop", progress=False)
    assert feather.read_table(root / "annotations.feather").num_rows == 1
    import_generic(root, root / "c.csv", vocab, RegionSpec("grid"), no_attribute="keep", progress=False)
    t = feather.read_table(root / "annotations.feather").to_pydict()
    assert t["attributes"] == [["square", "orange"], []] and t["split"] == ["train", "val"]


# --- COCO 2017 --------------------------------------------------------------------------------------------------

COCO_CATS = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 67, "name": "dining table", "supercategory": "furniture"},
]


def coco_fixture(root: Path, n_train: int = 16, n_val: int = 6, bad_caption_image: bool = False) -> Path:
    """annotations/captions_{train,val}2017.json, instances_{train,val}2017.json, train2017/ and val2017/ JPEGs."""
    rng = np.random.default_rng(1)
    img_id = 100
    for name, n in (("train2017", n_train), ("val2017", n_val)):
        images, caps, inst = [], [], []
        for _ in range(n):
            img_id += 7
            w, h = (64, 48) if img_id % 2 else (48, 64)
            fname = f"{img_id:012d}.jpg"
            draw(root / name / fname, (w, h), [("square", "orange", (4, 4, 24, 24))], fmt="JPEG")
            images.append({"id": img_id, "file_name": fname, "width": w, "height": h})
            for k in range(5):
                caps.append(
                    {
                        "id": len(caps) + 1000 * img_id,
                        "image_id": img_id,
                        "caption": [
                            "A man and his dog.",
                            "Two people at a table.",
                            "A puppy sleeps.",
                            "Someone sits near a dining table.",
                            "A dog on the floor",
                        ][(k + img_id) % 5],
                    }
                )
            inst.append(
                {
                    "id": len(inst) + 1,
                    "image_id": img_id,
                    "category_id": 18,
                    "bbox": [4.0, 4.0, 20.0, 20.0],
                    "area": 400.0,
                    "iscrowd": 0,
                }
            )
            inst.append(
                {
                    "id": len(inst) + 1,
                    "image_id": img_id,
                    "category_id": 1,
                    "bbox": [30.0, 10.0, 100.0, float(rng.integers(5, 20))],
                    "area": 99.0,
                    "iscrowd": 0,
                }
            )
            inst.append(
                {
                    "id": len(inst) + 1,
                    "image_id": img_id,
                    "category_id": 67,
                    "bbox": [0, 0, 10, 10],
                    "area": 100.0,
                    "iscrowd": 1,
                }
            )
        if bad_caption_image and name == "val2017":
            caps.append({"id": 1, "image_id": 999999, "caption": "a dog"})
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        info = {"description": "COCO 2017 Dataset"}
        (root / "annotations" / f"captions_{name}.json").write_text(
            json.dumps({"info": info, "licenses": [], "images": images, "annotations": caps})
        )
        (root / "annotations" / f"instances_{name}.json").write_text(
            json.dumps({"info": info, "licenses": [], "images": images, "annotations": inst, "categories": COCO_CATS})
        )
    return root


def test_coco_import(tmp_path):
    root = coco_fixture(tmp_path / "coco")
    vocab = load_vocab("coco")
    out = import_coco(root, vocab, RegionSpec("given"), tmp_path / "ds", val_fraction=0.25, progress=False)
    ann = load_annotations(out, vocab, required_splits=("train", "val", "test"))
    t = ann.table.to_pydict()
    assert ann.n_images == 22 and (ann.split == "test").sum() == 6
    assert t["image_filepath"][0] == "source/train2017/000000000107.jpg"
    assert t["text"][0].count(" . ") == 4  # five captions, one text
    assert set(t["attributes"][0]) <= {"person", "dog", "dining table"} and "dog" in t["attributes"][0]
    # crowd boxes left out; xywh -> xyxy, clipped to the image
    assert (ann.n_regions == 2).all()
    w = ann.image_size[0, 0]
    assert ann.boxes[0].tolist() == [4, 4, 24, 24] and ann.boxes[1][2] == w
    assert t["reg_to_attr"][0] == [["dog"], ["person"]]


def test_coco_bad_input(tmp_path):
    root = coco_fixture(tmp_path / "coco", bad_caption_image=True)
    with pytest.raises(VillaError, match=r"1 captions in captions_val2017.json name unknown image ids: 999999"):
        import_coco(root, load_vocab("coco"), RegionSpec("given"), tmp_path / "ds")
    with pytest.raises(VillaError, match=r"categories of instances_train2017.json are not in the 'shapes' vocab"):
        import_coco(coco_fixture(tmp_path / "c2"), vocab_from_dict(SHAPES), RegionSpec("given"), tmp_path / "ds2")
    with pytest.raises(VillaError, match="captions_train2017.json not found"):
        import_coco(tmp_path / "nothing", load_vocab("coco"), RegionSpec("given"))


def test_coco_with_a_proposals_file_labels_regions_by_overlap(tmp_path):
    root = coco_fixture(tmp_path / "coco", n_train=8, n_val=4)
    caps = json.loads((root / "annotations" / "captions_train2017.json").read_text())["images"]
    caps += json.loads((root / "annotations" / "captions_val2017.json").read_text())["images"]
    props = [{"image_id": im["id"], "bbox": [5, 5, 19, 19], "score": 0.9} for im in caps]
    props += [{"image_id": im["id"], "bbox": [0, 30, 10, 10], "score": 0.4} for im in caps]
    (tmp_path / "props.json").write_text(json.dumps(props))
    spec = RegionSpec("proposals", proposals_file=str(tmp_path / "props.json"))
    out = import_coco(root, load_vocab("coco"), spec, tmp_path / "ds", progress=False)
    t = feather.read_table(out / "annotations.feather")
    assert t.column("reg_to_attr").to_pylist()[0] == [["dog"], []]
    assert t.column("region_score").to_pylist()[0] == pytest.approx([0.9, 0.4])
    rec = json.loads(t.schema.metadata[REGIONS_META.encode()])
    assert rec["source"] == "proposals" and rec["labels_from"] == {"boxes": "given", "iou": 0.5}


# --- DeepFashion-MultiModal -------------------------------------------------------------------------------------


def deepfashion_fixture(root: Path, n: int = 12) -> Path:
    """images/, segm/<name>_segm.png, labels/{shape,fabric,color}/..., captions.json."""
    caps, fabric, color, shape = {}, [], [], []
    for i in range(n):
        name = f"{'MEN' if i % 2 else 'WOMEN'}-Denim-id_{i // 2:08d}-0{i % 2 + 1}_1_front.jpg"
        draw(root / "images" / name, (48, 64), [("square", "cyan", (10, 4, 38, 30))], fmt="JPEG")
        seg = np.zeros((64, 48), np.uint8)
        seg[4:30, 10:38] = 1  # top
        seg[30:60, 12:36] = 5  # pants
        seg[0:4, 18:30] = 13  # hair
        (root / "segm").mkdir(parents=True, exist_ok=True)
        Image.fromarray(seg).save(root / "segm" / name.replace(".jpg", "_segm.png"))
        caps[name] = (
            "The lady wears a short-sleeve T-shirt with pure color patterns. She wears long denim pants. "
            "There is no hat."
        )
        fabric.append(f"{name} 1 0 7")
        color.append(f"{name} 3 3 7")
        shape.append(f"{name} " + " ".join(["0"] * 12))
    for sub, fname, lines in (
        ("fabric", "fabric_ann.txt", fabric),
        ("color", "color_ann.txt", color),
        ("shape", "shape_anno_all.txt", shape),
    ):
        (root / "labels" / sub).mkdir(parents=True, exist_ok=True)
        (root / "labels" / sub / fname).write_text("\n".join(lines) + "\n")
    (root / "captions.json").write_text(json.dumps(caps))
    return root


def test_deepfashion_import_regions_from_masks(tmp_path):
    root = deepfashion_fixture(tmp_path / "df")
    vocab = load_vocab("deepfashion")
    out = import_deepfashion(root, vocab, RegionSpec("masks"), tmp_path / "ds", progress=False)
    ann = load_annotations(out, vocab, required_splits=())
    t = ann.table.to_pydict()
    assert (ann.n_regions == 3).all()
    assert ann.boxes[:3].tolist() == [[10, 4, 38, 30], [12, 30, 36, 60], [18, 0, 30, 4]]  # top, pants, hair
    assert t["reg_to_attr"][0] == [["top", "cotton", "pure color"], ["pants", "denim", "pure color"], []]
    assert t["attributes"][0] == ["top", "pants", "denim", "pure color"]  # "no hat": headwear negated
    split = dict(zip(t["image_id"], t["split"]))  # the two views of an item stay together
    for i in range(0, 12, 2):
        a, b = (f"{p}-Denim-id_{i // 2:08d}-0{k}_1_front" for p, k in (("WOMEN", 1), ("MEN", 2)))
        assert split[a] == split[b]
    (root / "labels" / "fabric" / "fabric_ann.txt").write_text("x.jpg 1 2\n")
    with pytest.raises(VillaError, match=r"1 malformed label lines: .*fabric_ann.txt:1"):
        import_deepfashion(root, vocab, RegionSpec("masks"), tmp_path / "ds")


# --- MIMIC-CXR --------------------------------------------------------------------------------------------------

REPORTS = [
    "FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n FINDINGS: \n There is a small left pleural effusion.  No\n "
    "pneumothorax.  Heart size is normal.\n\n IMPRESSION: \n Small left effusion.  Possible right basilar atelectasis.\n",
    "FINAL REPORT\n INDICATION:  Cough.\n\n FINDINGS:  Lungs are clear without consolidation, effusion, or edema.\n\n "
    "IMPRESSION:  No acute cardiopulmonary process.\n",
    "FINAL REPORT\n IMPRESSION:  Enlarged heart.  Pulmonary edema is seen.  Right PICC line in place.\n",
]


def mimic_fixture(root: Path, n_subjects: int = 8) -> tuple[Path, Path]:
    """mimic-cxr-reports files/pXX/pN/sM.txt; MIMIC-CXR-JPG files/pXX/pN/sM/<dicom>.jpg and the CSVs."""
    reports, images = root / "reports", root / "jpg"
    meta, split = [], []
    for s in range(n_subjects):
        subject = 10000000 + s * 1111
        study = 50000000 + s
        rep = reports / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}.txt"
        rep.parent.mkdir(parents=True, exist_ok=True)
        rep.write_text(REPORTS[s % 3])
        for k, view in enumerate(("PA", "LATERAL")):
            dicom = f"{s:08x}-{k:08x}-aaaaaaaa-bbbbbbbb-cccccccc"
            draw(
                images / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg",
                (40, 48),
                [("disc", "cyan", (8, 8, 32, 32))],
                fmt="JPEG",
            )
            meta.append(
                {
                    "dicom_id": dicom,
                    "subject_id": subject,
                    "study_id": study,
                    "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
                    "ViewPosition": view,
                    "Rows": 48,
                    "Columns": 40,
                    "StudyDate": 21800506,
                    "StudyTime": 213014.531,
                }
            )
            split.append(
                {
                    "dicom_id": dicom,
                    "study_id": study,
                    "subject_id": subject,
                    "split": ["train", "train", "validate", "test"][s % 4],
                }
            )
    for name, rows in (("metadata", meta), ("split", split)):
        with gzip.open(images / f"mimic-cxr-2.0.0-{name}.csv.gz", "wt") as f:
            pd.DataFrame(rows).to_csv(f, index=False)
    return reports, images


def test_report_sections():
    sec = report_sections(REPORTS[0])
    assert sec["findings"] == "There is a small left pleural effusion. No pneumothorax. Heart size is normal."
    assert sec["impression"].startswith("Small left effusion.")


def test_mimic_import(tmp_path):
    reports, images = mimic_fixture(tmp_path)
    vocab = load_vocab("chexpert")
    out = import_mimic(
        reports, images, vocab, RegionSpec("grid", grid=[1, 2]), tmp_path / "ds", no_attribute="keep", progress=False
    )
    ann = load_annotations(out, vocab, required_splits=())
    t = ann.table.to_pydict()
    assert ann.n_images == 8  # frontal (PA) views only
    assert t["split"][:4] == ["train", "train", "val", "test"]
    assert t["attributes"][0] == ["atelectasis", "pleural effusion", "left", "right", "basilar"]
    assert t["attributes"][1] == ["no finding"]  # consolidation, effusion, edema negated
    assert t["attributes"][2] == ["cardiomegaly", "edema", "support devices", "right"]
    assert t["image_filepath"][0].startswith("source/files/p10/p10000000/s50000000/")
    assert (ann.n_regions == 5).all() and ann.image_size[0].tolist() == [40, 48]


# --- every importer's output runs through the pipeline unchanged ------------------------------------------------


def _pipeline(data: Path, dataset_config: str, tmp: Path) -> dict:
    from villa.evaluate.retrieval import run_evaluation
    from villa.preprocess import embed_dataset
    from villa.stage1.train import train_stage1
    from villa.stage2.train import train_stage2

    emb = embed_dataset(
        data,
        dataset_config,
        model="villa-tiny-rn",
        pretrained="none",
        device="cpu",
        num_workers=0,
        progress=False,
        batch_size=8,
    )
    ds = f"dataset={dataset_config}"
    s1 = train_stage1(
        compose_config(
            "stage1",
            [
                ds,
                f"data_dir={data}",
                f"embeddings_dir={emb}",
                f"checkpoint_dir={tmp / 's1'}",
                "epochs=1",
                "batch_size=4",
                "drop_last=false",
                "device=cpu",
                "progress=false",
            ],
        )
    )
    s2 = train_stage2(
        compose_config(
            "stage2",
            [
                ds,
                f"data_dir={data}",
                f"checkpoint_dir={tmp / 's2'}",
                "epochs=1",
                "batch_size=4",
                "model.name=villa-tiny-rn",
                "model.pretrained=none",
                "device=cpu",
                "num_workers=0",
                "progress=false",
                "precision=fp32",
            ],
        )
    )
    ev = run_evaluation(
        compose_config(
            "evaluate",
            [
                ds,
                f"data_dir={data}",
                f"model.pretrained={s2['best_checkpoint']}",
                "model.name=auto",
                f"output={tmp / 'ev.json'}",
                "num_workers=0",
                "batch_size=8",
                "device=cpu",
                "precision_at=[1]",  # a handful of test regions
            ],
        )
    )
    return {"stage1": s1, "eval": ev}


@pytest.mark.parametrize("importer", ["generic", "coco", "deepfashion", "mimic_cxr"])
def test_every_importer_runs_through_the_pipeline(importer, tmp_path):
    if importer == "generic":
        root = photos(tmp_path / "mine", n=16)
        cfg = tmp_path / "shapes.yaml"
        cfg.write_text(json.dumps(SHAPES))
        data = import_generic(
            root,
            root / "captions.jsonl",
            vocab_from_dict(SHAPES),
            RegionSpec("grid", grid=[2]),
            split_fractions=(0.5, 0.25, 0.25),
            progress=False,
        )
        config = str(cfg)
    elif importer == "coco":
        data = import_coco(
            coco_fixture(tmp_path / "coco"),
            load_vocab("coco"),
            RegionSpec("given"),
            tmp_path / "ds",
            val_fraction=0.25,
            progress=False,
        )
        config = "coco"
    elif importer == "deepfashion":
        data = import_deepfashion(
            deepfashion_fixture(tmp_path / "df", n=16),
            load_vocab("deepfashion"),
            RegionSpec("masks"),
            tmp_path / "ds",
            split_fractions=(0.5, 0.25, 0.25),
            progress=False,
        )
        config = "deepfashion"
    else:
        reports, images = mimic_fixture(tmp_path, n_subjects=12)
        data = import_mimic(
            reports,
            images,
            load_vocab("chexpert"),
            RegionSpec("grid", grid=[2]),
            tmp_path / "ds",
            progress=False,
            no_attribute="keep",
        )
        config = "chexpert"
    out = _pipeline(data, config, tmp_path)
    ev = out["eval"]
    assert ev["image_text"]["images"] == int(
        (
            load_annotations(
                data, load_vocab(config) if "/" not in config else vocab_from_dict(SHAPES), required_splits=()
            ).split
            == "test"
        ).sum()
    )
    assert 0 <= ev["image_text"]["image_to_text"]["R@1"] <= 1
    assert ("text_to_region" in ev) == (importer in ("coco", "deepfashion"))  # region labels where the data has them
    assert "degeneracy" in out["stage1"]
