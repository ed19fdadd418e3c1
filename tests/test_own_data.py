"""A user's own data end to end (raw images + free-text captions, no boxes, no attribute lists), Stage 1 on
unlabelled data, evaluation without region labels, dataset=<yaml path>, and preprocessing at scale (sharded
over processes, images bucketed by size)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pytest
import torch
from conftest import compose_config

from villa.data.annotations import load_annotations
from villa.data.images import padded_pixels, size_buckets
from villa.data.vocab import load_vocab
from villa.evaluate.retrieval import image_text_metrics
from villa.preprocess import embed_dataset
from villa.stage1.mapping import mapping_degeneracy
from villa.stage1.train import train_stage1

ROOT = Path(__file__).resolve().parent.parent
DOCMNIST_YAML = str(ROOT / "configs" / "dataset" / "docmnist.yaml")


def run(*args: str, cwd: Path, names: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run a command; with ``names``, its last output lines must say where that output is."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    if names is not None:
        tail = "\n".join((r.stdout + "\n" + r.stderr).strip().splitlines()[-3:])
        assert str(names) in tail, tail
    return r


def _mixed_sizes(tmp_path: Path, n: int, size_of, seed: int):
    """``n`` random images of the sizes ``size_of(i)`` (width, height), one caption each, imported with a 1+2 grid:
    the annotations and their vocabulary."""
    from PIL import Image

    from villa.data.annotations import load_annotations
    from villa.data.importers.generic import import_generic
    from villa.data.regions import RegionSpec
    from villa.data.vocab import vocab_from_dict

    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        w, h = size_of(i)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": "a square", "split": "train"}))
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    vocab = vocab_from_dict({"name": "v", "groups": [{"name": "g", "attributes": ["square"], "templates": ["{}"]}]})
    import_generic(tmp_path, tmp_path / "c.jsonl", vocab, RegionSpec("grid", grid=[1, 2]), progress=False)
    return load_annotations(tmp_path, vocab), vocab


def test_raw_images_and_captions_end_to_end(tiny_docmnist, tmp_path):
    """Import (grid regions, attributes from the text), preprocess, Stage 1, Stage 2, evaluate: the README's
    "Your own data" commands, with the vocabulary given by path to every command."""
    plain = tmp_path / "plain"
    run(
        "-m",
        "villa.data.importers.docmnist_plain",
        f"--data_dir={tiny_docmnist}",
        f"--out_dir={plain}",
        "--no_split",
        cwd=tmp_path,
        names=plain,
    )
    rec = json.loads((plain / "captions.jsonl").read_text().splitlines()[0])
    assert set(rec) == {"id", "image", "caption"}  # no boxes, no attribute lists, no split
    data = tmp_path / "mine"
    run(
        "-m",
        "villa.data.importers.generic",
        f"--root={plain}",
        f"--captions={plain / 'captions.jsonl'}",
        f"--dataset_config={DOCMNIST_YAML}",
        "--regions=grid",
        "--grid",
        "3",
        f"--out_dir={data}",
        "--quiet",
        cwd=tmp_path,
        names=data / "annotations.feather",
    )
    run(
        "-m",
        "preprocess",
        f"--data_dir={data}",
        f"--dataset_config={DOCMNIST_YAML}",
        "--model=villa-tiny-rn",
        "--pretrained=none",
        "--num_workers=0",
        "--quiet",
        cwd=tmp_path,
        names=data / "embeddings",
    )
    meta = json.loads((data / "embeddings" / "meta.json").read_text())
    assert meta["regions_from"] == {"source": "grid", "grid": [[3, 3]]}
    ds = f"dataset={DOCMNIST_YAML}"
    r1 = run(
        "-m",
        "villa.stage1",
        ds,
        f"data_dir={data}",
        "epochs=2",
        "batch_size=16",
        "lr=1e-3",
        "device=cpu",
        "progress=false",
        f"checkpoint_dir={tmp_path / 'ck1'}",
        f"hydra.run.dir={tmp_path / 'h1'}",
        cwd=tmp_path,
        names=tmp_path / "ck1",
    )
    tail = (r1.stdout + "\n" + r1.stderr).strip().splitlines()[-3:]
    assert any(str(data / "mapping.feather") in line for line in tail), tail
    assert "mapping (labelled)" not in r1.stdout  # nothing labelled: no mapping quality printed
    q = json.loads((data / "mapping_quality.json").read_text())
    assert "quality" not in q and q["regions"] == 9 * q["images"] and "degeneracy" in q
    run(
        "-m",
        "villa.stage2",
        ds,
        f"data_dir={data}",
        "epochs=1",
        "batch_size=16",
        "model.name=villa-tiny-rn",
        "model.pretrained=none",
        "device=cpu",
        "num_workers=0",
        "progress=false",
        f"checkpoint_dir={tmp_path / 'ck2'}",
        f"hydra.run.dir={tmp_path / 'h2'}",
        cwd=tmp_path,
        names=tmp_path / "ck2" / "best.pt",
    )
    r3 = run(
        "-m",
        "villa.evaluate",
        ds,
        f"data_dir={data}",
        "model.name=auto",
        f"model.pretrained={tmp_path / 'ck2' / 'best.pt'}",
        f"output={tmp_path / 'ev.json'}",
        "num_workers=0",
        f"hydra.run.dir={tmp_path / 'h3'}",
        cwd=tmp_path,
        names=tmp_path / "ev.json",
    )
    ev = json.loads((tmp_path / "ev.json").read_text())
    n_test = int((load_annotations(data, load_vocab("docmnist"), check_images=False).split == "test").sum())
    assert "text_to_region" not in ev and ev["image_text"]["images"] == n_test
    assert "I2T R@1" in r3.stdout
    assert 1 <= ev["image_text"]["text_to_image"]["median_rank"] <= n_test
    assert ev["image_text"]["chance"] == {
        "R@1": 1 / n_test,
        "R@5": 5 / n_test,
        "R@10": 10 / n_test,
        "median_rank": (n_test + 1) / 2,
    }
    chance_row = next(ln for ln in r3.stdout.splitlines() if ln.startswith("(chance)"))
    assert f"{100 / n_test:.1f}" in chance_row
    assert ev["mapping"]["regions"] == q["regions"] and ev["mapping"]["degeneracy"] == q["degeneracy"]  # not null


def test_image_text_recall_by_hand():
    img = torch.eye(4)
    txt = torch.eye(4)[[0, 1, 3, 2]]  # images 2 and 3 have each other's texts
    m = image_text_metrics(img, txt, ks=(1, 2))
    assert m["image_to_text"]["R@1"] == 0.5 and m["text_to_image"]["R@1"] == 0.5
    # image 2's own text scores 0, like texts 0 and 1 (ties count against the query: listed before it)
    assert m["image_to_text"]["R@2"] == 0.5
    assert image_text_metrics(torch.eye(3), torch.eye(3))["image_to_text"]["R@1"] == 1.0
    assert m["chance"] == {"R@1": 0.25, "R@2": 0.5, "median_rank": 2.5}


def test_degenerate_mapping_is_flagged():
    offsets = np.array([0, 3, 6])
    attrs = np.array([[1, 1, 0], [1, 0, 1]], bool)
    every = np.repeat(attrs, 3, axis=0)
    d = mapping_degeneracy(every, attrs, offsets)
    assert d["degenerate"] and d["all_attributes_share"] == 1.0 and d["attributes_per_region"] == 2.0
    one = np.zeros_like(every)
    one[0, 0] = one[1, 1] = one[3, 0] = one[4, 2] = True
    d = mapping_degeneracy(one, attrs, offsets)
    assert not d["degenerate"] and d["all_attributes_share"] == 0.0 and d["regions_without_attribute"] == 2 / 6
    # a grid of 5 regions per image: one of five given both attributes (20%) is enough to flag
    offsets5, attrs5 = np.array([0, 5, 10]), attrs
    part = np.zeros((10, 3), bool)
    part[0, [0, 1]] = part[1, 0] = part[5, 0] = part[6, 2] = True
    d = mapping_degeneracy(part, attrs5, offsets5)
    assert d["all_attributes_share"] == 0.1 and not d["degenerate"]
    part[5, 2] = True
    d = mapping_degeneracy(part, attrs5, offsets5)
    assert d["all_attributes_share"] == 0.2 and d["degenerate"]
    # nothing for most regions: 9 of 10 regions of captioned images get none
    empty = np.zeros((10, 3), bool)
    empty[0, 0] = True
    d = mapping_degeneracy(empty, attrs5, offsets5)
    assert d["no_attribute_share"] == 0.9 and d["all_attributes_share"] == 0.0 and d["degenerate"]


def _s1(data, emb, tmp, *extra):
    return compose_config(
        "stage1",
        [
            f"data_dir={data}",
            f"embeddings_dir={emb}",
            f"mapping_path={tmp / 'mapping.feather'}",
            f"checkpoint_dir={tmp / 'ck'}",
            "device=cpu",
            "progress=false",
            "batch_size=16",
            "lr=1e-3",
            "epochs=2",
            *extra,
        ],
    )


def test_epsilon_remaps_without_retraining_and_warns_when_degenerate(synthetic_stage1, tmp_path, caplog):
    data, emb = synthetic_stage1
    a = train_stage1(_s1(data, emb, tmp_path))
    last = tmp_path / "ck" / "last.pt"
    stamp = last.stat().st_mtime_ns
    b = train_stage1(_s1(data, emb, tmp_path, "epsilon=2.5"))  # every caption attribute to every region
    assert last.stat().st_mtime_ns == stamp  # not retrained
    assert b["assigned_pairs"] > a["assigned_pairs"] and b["degeneracy"]["degenerate"]
    assert not a["degeneracy"]["degenerate"]
    assert "get every attribute of their caption" in caplog.text and "lower epsilon (now 2.5)" in caplog.text
    with pytest.raises(Exception, match="another run"):  # a training key still refuses the checkpoint
        train_stage1(_s1(data, emb, tmp_path, "lr=5e-4"))


def test_mapping_quality_per_split_over_labelled_rows_only(synthetic_stage1, tmp_path):
    data, emb = synthetic_stage1
    # a copy of the dataset where the val images and half the train images have no region labels
    t = feather.read_table(data / "annotations.feather")
    split = np.asarray(t.column("split").to_pylist())
    unl = (split == "val") | ((split == "train") & (np.arange(len(split)) % 2 == 1))
    lab = t.column("reg_to_attr").to_pylist()
    col = pa.array([None if u else x for u, x in zip(unl, lab)], t.schema.field("reg_to_attr").type)
    t = t.set_column(t.column_names.index("reg_to_attr"), "reg_to_attr", col)
    copy = tmp_path / "data"
    copy.mkdir()
    feather.write_feather(t, copy / "annotations.feather")
    (copy / "images").symlink_to(Path(data) / "images")
    ann = load_annotations(copy, load_vocab("docmnist"), check_images=False)
    assert ann.labelled.tolist() == (~unl).tolist()
    assert ann.region_attribute_matrix(20)[np.repeat(unl, ann.n_regions)].sum() == 0
    res = train_stage1(_s1(copy, emb, tmp_path))
    q = res["quality"]["stage1"]
    assert "val" not in q and set(q) == {"all", "train", "test"}
    n_train_lab = int(ann.n_regions[(split == "train") & ~unl].sum())
    assert res["labelled_regions"] == {
        "train": n_train_lab,
        "val": 0,
        "test": int(ann.n_regions[split == "test"].sum()),
    }
    assert q["train"]["all"]["gold"] == int(
        ann.region_attribute_matrix(20)[np.repeat((split == "train") & ~unl, ann.n_regions)].sum()
    )


def test_dataset_config_by_path_for_every_command(tmp_path):
    from villa.data.vocab import vocab_from_config

    for name in ("stage1", "stage2", "evaluate"):
        cfg = compose_config(name, [f"dataset={DOCMNIST_YAML}"])
        assert (
            cfg.dataset.path == DOCMNIST_YAML and vocab_from_config(cfg).attributes == load_vocab("docmnist").attributes
        )
    bad = tmp_path / "empty.yaml"
    bad.write_text("")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "villa.stage1", f"dataset={bad}", f"data_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"error: dataset config {bad} is empty or not a mapping" in r.stderr


def test_size_buckets_save_padding_and_keep_outputs(tmp_path):
    """Images of two sizes: bucketed batches hold one size each; embeddings equal one-image-at-a-time ones."""

    ann, vocab = _mixed_sizes(tmp_path, 12, lambda i: (64, 40) if i % 3 else (32, 48), seed=0)
    rows = np.arange(12)
    plain, bucketed = size_buckets(ann.image_size, rows, 8, False), size_buckets(ann.image_size, rows, 8, True)
    assert all(len(np.unique(ann.image_size[batch], axis=0)) == 1 for batch in bucketed)
    assert padded_pixels(ann.image_size, rows, bucketed) == (padded_pixels(ann.image_size, rows, bucketed)[1],) * 2
    assert padded_pixels(ann.image_size, rows, plain)[0] > padded_pixels(ann.image_size, rows, plain)[1]
    huge = np.array([[6000, 6000], [84, 84], [6000, 6000], [84, 84]])
    assert [b.tolist() for b in size_buckets(huge, np.arange(4), 64)] == [[1, 3], [0], [2]]  # a huge image goes alone
    kw = dict(model="villa-tiny-rn", pretrained="none", device="cpu", num_workers=0, progress=False, dtype="float32")
    a = np.load(embed_dataset(tmp_path, vocab=vocab, batch_size=8, out_dir=tmp_path / "e8", **kw) / "regions.npy")
    b = np.load(embed_dataset(tmp_path, vocab=vocab, batch_size=1, out_dir=tmp_path / "e1", **kw) / "regions.npy")
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_sharded_preprocessing_equals_one_process(tiny_docmnist, tmp_path):
    """torchrun with 2 gloo processes writes the same regions.npy as one process (each rank its slice)."""
    common = [
        f"--data_dir={tiny_docmnist}",
        "--dataset_config=docmnist",
        "--model=villa-tiny-rn",
        "--pretrained=none",
        "--num_workers=0",
        "--quiet",
        "--dtype=float32",
        "--device=cpu",
    ]
    run("-m", "preprocess", *common, f"--out_dir={tmp_path / 'one'}", cwd=tmp_path)
    run(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        "-m",
        "preprocess",
        *common,
        f"--out_dir={tmp_path / 'two'}",
        cwd=tmp_path,
    )
    a, b = np.load(tmp_path / "one" / "regions.npy"), np.load(tmp_path / "two" / "regions.npy")
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-5
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["world_size"] == 2
    assert feather.read_table(tmp_path / "one" / "index.feather").equals(
        feather.read_table(tmp_path / "two" / "index.feather")
    )
    assert not list(tmp_path.glob(".two.tmp-*"))


def test_image_paths_outside_the_dataset_are_refused(tiny_docmnist, tmp_path):
    from villa.core.errors import VillaError

    t = feather.read_table(tiny_docmnist / "annotations.feather")
    for bad in ("/etc/passwd", "images/../../outside.png"):
        paths = t.column("image_filepath").to_pylist()
        paths[3] = bad
        copy = tmp_path / f"d{len(bad)}"
        copy.mkdir()
        feather.write_feather(
            t.set_column(t.column_names.index("image_filepath"), "image_filepath", pa.array(paths)),
            copy / "annotations.feather",
        )
        with pytest.raises(VillaError, match=f"has image_filepath '{bad}', which leaves the dataset folder"):
            load_annotations(copy, load_vocab("docmnist"), check_images=False)


def test_decoded_images_equal_decoding_every_read(tmp_path):
    """image_cache: memory and disk give the items decoding gives (images of two sizes); the disk cache is reused by
    a second run, rebuilt when cut short, and leaves no temporary file; a wrong-sized image still stops in one line."""
    from PIL import Image

    from villa.core.errors import VillaError
    from villa.data.images import DecodedImages, ImageDataset

    ann, _ = _mixed_sizes(tmp_path, 7, lambda i: (30, 20) if i % 2 else (16, 24), seed=1)
    rows = np.array([5, 0, 3, 6, 1])
    plain = ImageDataset(ann, rows)
    cache = tmp_path / "cache"
    for mode in ("memory", "disk", "disk"):
        decoded = DecodedImages(ann, rows, mode, cache_root=cache)
        assert len(decoded) == len(plain) == 5
        for i in range(5):
            (a, ra), (b, rb) = plain[i], decoded[i]
            assert ra == rb == rows[i] and a.dtype == b.dtype == torch.uint8
            assert torch.equal(a, b)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".u8" and files[0].stat().st_size == 3 * (3 * 600 + 2 * 384)
    with open(files[0], "r+b") as f:  # a file cut short (a run killed while writing it, renamed by hand): rebuilt
        f.truncate(100)
    assert torch.equal(DecodedImages(ann, rows, "disk", cache_root=cache)[4][0], plain[4][0])
    assert files[0].stat().st_size == 3 * (3 * 600 + 2 * 384) and list(cache.iterdir()) == files
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(tmp_path / "3.png")  # not its annotated size
    with pytest.raises(VillaError, match=r"3.png is 9x9 but annotations.feather says image_size"):
        DecodedImages(ann, rows, "memory")


def test_own_data_experiment_runs_every_region_source(tmp_path):
    """python -m experiments.own_data end to end at a tiny budget: each region source (given boxes, two grids, a
    trained detector's proposals) through Stage 1 and Stage 2, the one-to-one baseline and zero-shot for reference,
    evaluated on the held-out split; its table is its results file's rendering."""
    out = tmp_path / "out"
    run(
        "-m",
        "experiments.own_data",
        "--budget=1500",
        "--stage1_epochs=1",
        "--stage2_epochs=1",
        "--detector_epochs=1",
        f"--out={out}",
        f"--work={tmp_path / 'work'}",
        "--quiet",
        cwd=tmp_path,
    )
    res = json.loads((out / "results.json").read_text())
    assert list(res["variants"]) == ["given", "grid 3x3", "grid 1+2+3", "proposals (RPN top 20)"]
    assert set(res["reference"]) == {"one-to-one baseline", "zero-shot"}
    for v in res["variants"].values():
        assert 0 < v["recall_at_0.5"] <= 1 and 0 < v["mapping"]["stage1"]["all"]["all"]["f1"] <= 1
    assert res["variants"]["grid 3x3"]["regions_per_image"] == 9
    assert res["reference"]["zero-shot"]["split"] == "test"
    table = subprocess.run(
        [sys.executable, "-m", "experiments.own_data", "--render", str(out / "results.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    assert table == (out / "table.md").read_text()
