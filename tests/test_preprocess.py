"""Preprocessing: files, determinism, the validator's errors, a non-DocMNIST dataset, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.feather as feather
import pytest
import yaml
from PIL import Image, ImageDraw

from villa.core.errors import VillaError
from villa.data.annotations import load_annotations
from villa.data.embeddings import open_embeddings, write_meta
from villa.data.vocab import load_vocab
from villa.preprocess import embed_dataset as preprocess

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(model="villa-tiny-rn", pretrained="none", device="cpu", num_workers=0, batch_size=16, progress=False)


@pytest.fixture(scope="module")
def tiny_embeddings(tiny_docmnist, tmp_path_factory):
    return preprocess(tiny_docmnist, "docmnist", out_dir=tmp_path_factory.mktemp("emb") / "embeddings", **TINY)


def test_files_and_shapes(tiny_docmnist, tiny_embeddings):
    vocab = load_vocab("docmnist")
    emb = open_embeddings(tiny_embeddings, vocab)
    ann = load_annotations(tiny_docmnist, vocab)
    assert emb.regions.shape == (len(ann.boxes), 64) and emb.regions.dtype == np.float16
    assert isinstance(emb.regions, np.memmap)
    assert emb.attributes.shape == (20, 64) and emb.attribute_names == list(vocab.attributes)
    np.testing.assert_array_equal(emb.image_id, ann.image_id)
    np.testing.assert_array_equal(emb.count, ann.n_regions)
    np.testing.assert_array_equal(emb.start, ann.region_offsets[:-1])
    assert emb.encoder["model"] == "villa-tiny-rn" and emb.encoder["pretrained"] == "none"
    assert emb.meta["dim"] == 64 and emb.meta["region_path"]["roi_size"] == 4
    assert np.isfinite(emb.regions).all() and np.abs(np.asarray(emb.regions)).sum() > 0


def test_twice_identical_and_batch_size_invariant(tiny_docmnist, tiny_embeddings, tmp_path):
    again = preprocess(tiny_docmnist, "docmnist", out_dir=tmp_path / "again", **TINY)
    for name in ("regions.npy", "index.feather", "attributes.npy", "meta.json"):
        a, b = (tiny_embeddings / name).read_bytes(), (again / name).read_bytes()
        assert a == b or name == "meta.json" and json.loads(a)["encoder"] == json.loads(b)["encoder"], name
    other = preprocess(
        tiny_docmnist, "docmnist", out_dir=tmp_path / "b1", **{**TINY, "batch_size": 1, "dtype": "float32"}
    )
    assert np.load(tiny_embeddings / "regions.npy").dtype == np.float16  # the default: half the disk
    assert np.load(other / "regions.npy").dtype == np.float32  # dtype=float32: the original's
    np.testing.assert_allclose(
        np.load(other / "regions.npy"),
        np.load(tiny_embeddings / "regions.npy").astype(np.float32),
        rtol=2e-3,
        atol=2e-3,
    )


def test_mixed_encoders_refused(tiny_embeddings, tmp_path):
    import shutil

    bad = tmp_path / "mixed"
    shutil.copytree(tiny_embeddings, bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["attribute_encoder"] = {**meta["encoder"], "model": "RN50", "pretrained": "openai", "weights_id": "openai"}
    write_meta(bad / "meta.json", meta)
    with pytest.raises(
        VillaError, match="region embeddings come from villa-tiny-rn .* but attribute embeddings from RN50"
    ):
        open_embeddings(bad)
    with pytest.raises(VillaError, match="embeddings folder not found"):
        open_embeddings(tmp_path / "nothing")


def _copy_dataset(src: Path, dst: Path, mutate) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("embeddings"))
    df = pd.read_feather(dst / "annotations.feather")
    df = mutate(df, dst)
    feather.write_feather(df, str(dst / "annotations.feather"))
    return dst


def _drop_col(df, d):
    return df.drop(columns=["region_coord"])


def _box_outside(df, d):
    df.at[3, "region_coord"] = [[0, 0, 28, 28]] * (df.num_regions[3] - 1) + [[56, 56, 90, 84]]
    return df


def _unknown_attr(df, d):
    df.at[2, "attributes"] = list(df.attributes[2]) + ["turquoise"]
    return df


def _unreadable(df, d):
    (d / df.image_filepath[1]).write_bytes(b"not a png")
    return df


def _missing_image(df, d):
    (d / df.image_filepath[0]).unlink()
    return df


def _empty_split(df, d):
    return df[df.split != "val"].reset_index(drop=True)


def _count_mismatch(df, d):
    df.at[0, "num_regions"] = df.num_regions[0] + 1
    return df


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_drop_col, "missing column 'region_coord'"),
        (_box_outside, r"box \[56.0, 56.0, 90.0, 84.0\] .* is outside its 84x84 image"),
        (_unknown_attr, "unknown attribute 'turquoise' in 'attributes' of image 2"),
        (_unreadable, r"image 1: cannot read .*images/train/1.png"),
        (_missing_image, r"image 0: file .*images/train/0.png not found"),
        (_empty_split, "split 'val' is empty"),
        (_count_mismatch, "num_regions=.* but region_coord has"),
    ],
)
def test_validator_errors(tiny_docmnist, tmp_path, mutate, message):
    d = _copy_dataset(tiny_docmnist, tmp_path / "ds", mutate)
    with pytest.raises(VillaError, match=message):
        preprocess(d, "docmnist", required_splits=("train", "val"), out_dir=tmp_path / "emb", **TINY)
    assert not (tmp_path / "emb").exists()  # validation runs before any work


def test_missing_dataset_and_config(tmp_path):
    with pytest.raises(VillaError, match="dataset folder not found"):
        preprocess(tmp_path / "nope", "docmnist", **TINY)
    with pytest.raises(VillaError, match="dataset config not found"):
        preprocess(tmp_path, "no_such_vocab", **TINY)


def make_shapes_dataset(root: Path, n: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """A tiny non-DocMNIST dataset: PIL shapes of two colours on 64x48 canvases, in the documented schema."""
    rng = np.random.default_rng(seed)
    vocab = {
        "name": "shapes",
        "groups": [
            {"name": "form", "attributes": ["square", "disc"], "templates": ["a {}", "there is a {}"]},
            {"name": "tint", "attributes": ["orange", "cyan"], "templates": ["it is {}"]},
        ],
    }
    rgb = {"orange": (255, 140, 0), "cyan": (0, 200, 200)}
    rows = []
    (root / "img").mkdir(parents=True)
    for i in range(n):
        im = Image.new("RGB", (64, 48))
        draw = ImageDraw.Draw(im)
        boxes, r2a = [], []
        for k in range(1 + i % 2):
            form, tint = rng.choice(["square", "disc"]), rng.choice(["orange", "cyan"])
            x0, y0 = 4 + 30 * k, 10
            box = [x0, y0, x0 + 24, y0 + 24]
            (draw.rectangle if form == "square" else draw.ellipse)(box, fill=rgb[tint])
            boxes.append(box)
            r2a.append([str(form), str(tint)])
        im.save(root / "img" / f"{i}.png")
        attrs = sorted({a for r in r2a for a in r})
        rows.append(
            {
                "image_id": f"s{i}",
                "image_filepath": f"img/{i}.png",
                "image_size": [64, 48],
                "split": "train" if i < 8 else "val",
                "text": " . ".join(f"a {a}" for a in attrs),
                "region_coord": boxes,
                "num_regions": len(boxes),
                "attributes": attrs,
                "reg_to_attr": r2a,
            }
        )
    feather.write_feather(pd.DataFrame(rows), str(root / "annotations.feather"))
    cfg = root / "shapes.yaml"
    cfg.write_text(yaml.safe_dump(vocab))
    return root, cfg


def test_generic_dataset(tmp_path):
    data, cfg = make_shapes_dataset(tmp_path / "shapes")
    out = preprocess(data, str(cfg), **TINY)
    emb = open_embeddings(out, load_vocab(cfg))
    assert emb.attribute_names == ["square", "disc", "orange", "cyan"]
    assert emb.regions.shape == (18, 64) and list(emb.count[:2]) == [1, 2]
    assert emb.image_id[0] == "s0"


def test_cli_docmnist_script(tiny_docmnist, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "preprocess" / "preprocess_docmnist.py"),
            f"--data_dir={tiny_docmnist}",
            "--model=villa-tiny-rn",
            "--pretrained=none",
            "--device=cpu",
            "--num_workers=0",
            f"--out_dir={tmp_path / 'e'}",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "preprocess: " in r.stdout and "regions/s" in r.stdout and (tmp_path / "e" / "regions.npy").is_file()
    r = subprocess.run(
        [sys.executable, "-m", "preprocess", f"--data_dir={tmp_path / 'none'}", "--dataset_config=docmnist", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and r.stderr.strip().startswith("error: dataset folder not found")
    assert len(r.stderr.strip().splitlines()) == 1
