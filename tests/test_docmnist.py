"""DocMNIST generator: the original's semantics, statistics, determinism and bad input."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import mnist_test_files_only
from PIL import Image

from docmnist.generate_docmnist import CELL, generate, main, shape_mask_bank
from villa.core.errors import VillaError
from villa.data.vocab import load_vocab

ROOT = Path(__file__).resolve().parent.parent
VOCAB = load_vocab("docmnist")


def _ann(path: Path) -> pd.DataFrame:
    return pd.read_feather(path / "annotations.feather")


def test_columns_and_folder(docmnist_16):
    assert docmnist_16.name == "docmnist_30000_15.2"  # the original reports ~15.2 for target 16, budget 30000
    df = _ann(docmnist_16)
    assert list(df.columns) == [
        "image_id",
        "image_size",
        "image_filepath",
        "region_coord",
        "num_regions",
        "split",
        "text",
        "digit_label",
        "color_label",
        "shape_label",
        "size_label",
        "reg_to_attr",
        "attributes",
    ]
    assert set(df.split) == {"train", "val", "test"}
    assert df.image_id.is_unique
    info = json.loads((docmnist_16 / "generation.json").read_text())
    assert info["args"]["seed"] == 23 and info["splits"]["train"]["pairs"] <= 30000
    for p in df.image_filepath.iloc[:5]:
        assert not Path(p).is_absolute() and (docmnist_16 / p).is_file()


def test_complexity_and_budget(docmnist_16, tmp_path, mnist):
    df = _ann(docmnist_16)
    pairs = df.reg_to_attr.map(lambda r: sum(len(a) for a in r)).to_numpy()
    assert pairs.max() <= 16
    tr = df.split.to_numpy() == "train"
    c16 = pairs[tr].sum() / tr.sum()
    assert 14.5 <= c16 <= 16.0
    # the split stops at the first image that would exceed the budget; no image has more than 16 pairs
    assert 30000 - 16 < pairs[tr].sum() <= 30000
    p4 = generate(30000, 4, out_dir=str(tmp_path), mnist_dir=mnist, val_budget=10, test_budget=10, progress=False)
    d4 = _ann(p4)
    d4 = d4[d4.split == "train"]
    pairs4 = d4.reg_to_attr.map(lambda r: sum(len(a) for a in r)).to_numpy()
    assert pairs4.max() <= 4 and 3.0 <= pairs4.sum() / len(d4) <= 4.0


def test_attribute_distributions(docmnist_16):
    df = _ann(docmnist_16)
    colors = pd.Series(np.concatenate(df.color_label.to_numpy())).value_counts(normalize=True) * 100
    assert set(colors.index) == set(VOCAB.group_attributes("color"))
    assert (colors - 20).abs().max() < 3
    shapes = pd.Series(np.concatenate(df.shape_label.to_numpy())).fillna("none").value_counts(normalize=True) * 100
    assert set(shapes.index) == {"circle", "rectangle", "none"}
    assert (shapes - 100 / 3).abs().max() < 4.5
    sizes = pd.Series([s for r in df.size_label for s in r if s is not None]).value_counts(normalize=True) * 100
    assert (sizes - 100 / 3).abs().max() < 4.5


def test_captions_match_attributes(docmnist_16):
    df = _ann(docmnist_16)
    for text, attrs, r2a in zip(df.text, df.attributes, df.reg_to_attr):
        sentences = text.split(" . ")
        assert len(sentences) == len(set(sentences))  # duplicates removed
        prompts = {a: set(VOCAB.prompts(a)) for a in attrs}
        for s in sentences:
            assert any(s in p for p in prompts.values()), s
        for a in attrs:
            assert prompts[a] & set(sentences), a
        assert set(attrs) == {a for r in r2a for a in r}
        assert list(attrs) == sorted(attrs, key=VOCAB.index.get)


def test_boxes_cells_and_colors(docmnist_16):
    df = _ann(docmnist_16).head(300)
    rgb = {c: np.array(v) for c, v in VOCAB.extra["docmnist"]["color_rgb"].items()}
    for row in df.itertuples():
        boxes = np.stack(row.region_coord)
        assert len(boxes) == row.num_regions <= 9
        assert np.all(boxes[:, 0] % CELL == 0) and np.all(boxes[:, 1] % CELL == 0)
        assert np.all(boxes[:, 2] - boxes[:, 0] == CELL) and np.all(boxes[:, 3] - boxes[:, 1] == CELL)
        cells = boxes[:, 1] // CELL * 3 + boxes[:, 0] // CELL
        assert len(set(cells)) == len(cells) and list(cells) == sorted(cells)  # distinct, in cell order
        img = np.asarray(Image.open(docmnist_16 / row.image_filepath))
        assert img.shape == (84, 84, 3)
        occupied = np.zeros((3, 3), bool)
        occupied.flat[cells] = True
        for (x0, y0, x1, y1), color in zip(boxes, row.color_label):
            tile = img[y0:y1, x0:x1].reshape(-1, 3)
            painted = ~((tile[:, 0] == tile[:, 1]) & (tile[:, 1] == tile[:, 2]))
            assert painted.sum() > 10
            assert np.all(tile[painted] == rgb[color])
        for r in range(3):
            for c in range(3):
                if not occupied[r, c]:
                    assert img[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL].max() == 0


def test_shapes_drawn_white(docmnist_16):
    df = _ann(docmnist_16).head(100)
    for row in df.itertuples():
        img = np.asarray(Image.open(docmnist_16 / row.image_filepath))
        for (x0, y0, x1, y1), shape in zip(row.region_coord, row.shape_label):
            white = (img[y0:y1, x0:x1] == 255).all(-1).sum()
            assert (white >= 4) if shape is not None else True


def test_colors_are_matplotlib_hsv():
    matplotlib = pytest.importorskip("matplotlib")
    cmap = matplotlib.colormaps["hsv"]
    for x, name in zip([0, 0.2, 0.4, 0.6, 0.8], VOCAB.group_attributes("color")):
        assert VOCAB.extra["docmnist"]["color_rgb"][name] == [int(v * 255) for v in cmap(x)[:3]]


def test_shape_bank_matches_skimage():
    """The bank (outlines drawn once and shifted) equals skimage's drawing at every position, call by call."""
    from skimage.draw import circle_perimeter, rectangle_perimeter

    bank = shape_mask_bank(VOCAB)
    assert bank.shape == (2 * 3 * 15 * 15, 28, 28)
    radius = VOCAB.extra["docmnist"]["circle_radius"]
    offset = VOCAB.extra["docmnist"]["rectangle_offset"]
    for zi, z in enumerate(("small", "medium", "large")):
        for r in range(5, 20):
            for c in range(5, 20):
                circle = np.zeros((28, 28), bool)
                circle[circle_perimeter(r, c, radius[z], shape=(28, 28))] = True
                rect = np.zeros((28, 28), bool)
                d = offset[z]
                rect[rectangle_perimeter((r, c), end=(r + d, c + d), shape=(28, 28), clip=True)] = True
                assert np.array_equal(bank[((0 * 3 + zi) * 15 + r - 5) * 15 + c - 5], circle), (z, r, c)
                assert np.array_equal(bank[((1 * 3 + zi) * 15 + r - 5) * 15 + c - 5], rect), (z, r, c)


# Content digests (annotation table + decoded pixels) of two small datasets as the generator wrote them before its
# speed-up (2026-11-26, full MNIST): a faster generator must write the same data.
PINNED_DIGESTS = {
    (500, 16, 5, 50, 50): "60f6e40d8677c59948640f08ee1f91f87abd2ad0250c0fa8417b04594dc807c8",
    (300, 7, 9, 40, 40): "b7933c129dab111025623d094d7268d11ea7f8f42e8909249606706292e2e005",
}


def _content_digest(root: Path) -> str:
    import hashlib

    import pyarrow.feather as feather

    h = hashlib.sha256()
    table = feather.read_table(root / "annotations.feather")
    h.update(json.dumps(table.to_pydict(), sort_keys=True).encode())
    for p in table.column("image_filepath").to_pylist():
        h.update(p.encode())
        h.update(np.asarray(Image.open(root / p)).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("args", list(PINNED_DIGESTS))
def test_output_pinned(tmp_path, mnist, args):
    budget, target, seed, val, test = args
    out = generate(
        budget,
        target,
        seed=seed,
        out_dir=str(tmp_path),
        mnist_dir=mnist,
        val_budget=val,
        test_budget=test,
        progress=False,
        chunk_images=16,
    )
    if not json.loads((out / "generation.json").read_text())["mnist_full"]:
        pytest.skip("the pinned digests were taken with the full MNIST")
    assert _content_digest(out) == PINNED_DIGESTS[args]


def test_deterministic(tmp_path, mnist):
    kw = dict(mnist_dir=mnist, val_budget=50, test_budget=50, progress=False)
    a, b, c = (
        generate(500, 16, seed=seed, out_dir=str(tmp_path / name), **kw)
        for name, seed in (("a", 5), ("b", 5), ("c", 6))
    )
    fa, fb = (a / "annotations.feather").read_bytes(), (b / "annotations.feather").read_bytes()
    assert fa == fb
    assert (a / "images/train/0.png").read_bytes() == (b / "images/train/0.png").read_bytes()
    assert _ann(c).text.tolist() != _ann(a).text.tolist()


def _digit_keys(pools) -> dict:
    return {k: {v.tobytes() for v in pools.images[k]} for k in pools.images}


def test_disjoint_pools_from_test_split(mnist, tmp_path):
    from docmnist.mnist import load_digit_pools

    folder = mnist_test_files_only(mnist, tmp_path / "mnist_test_only")
    pools = load_digit_pools(str(folder))
    assert not pools.full and {k: len(v) for k, v in pools.images.items()} == {"train": 6000, "val": 2000, "test": 2000}
    keys = _digit_keys(pools)
    assert not (keys["train"] & keys["test"]) and not (keys["train"] & keys["val"]) and not (keys["val"] & keys["test"])
    # the partition never depends on the generator's seed: datasets of different seeds share no train/test digit
    a = generate(
        300,
        8,
        seed=1,
        out_dir=str(tmp_path / "a"),
        mnist_dir=str(folder),
        val_budget=50,
        test_budget=50,
        progress=False,
    )
    b = generate(
        300,
        8,
        seed=2,
        out_dir=str(tmp_path / "b"),
        mnist_dir=str(folder),
        val_budget=50,
        test_budget=50,
        progress=False,
    )
    pa_, pb = (json.loads((d / "generation.json").read_text())["digit_pools"] for d in (a, b))
    assert pa_ == pb and pa_["test"]["scheme"] == "test-only-v1" and pa_["test"]["digits"] == 2000


def test_full_mnist_pools_follow_the_original(mnist, tmp_path):
    from docmnist.mnist import load_digit_pools, pools_overlap

    pools = load_digit_pools(mnist)
    if not pools.full:
        pytest.skip("needs the full MNIST (training files)")
    assert {k: len(v) for k, v in pools.images.items()} == {"train": 48000, "val": 12000, "test": 10000}
    assert np.bincount(pools.labels["test"]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    keys = _digit_keys(pools)
    assert not (keys["val"] & keys["test"]) and len(keys["train"] & keys["test"]) < 20  # MNIST has a few duplicates
    info = {k: v.to_dict() for k, v in pools.info.items()}
    assert pools_overlap(info["train"], info["val"]) == 0 and pools_overlap(info["train"], info["test"]) == 0
    assert pools_overlap(info["test"], info["test"]) == 10000
    # a test-only layout's training pool is drawn from MNIST's test file: the overlap is found exactly
    small = load_digit_pools(str(mnist_test_files_only(mnist, tmp_path / "t")))
    overlap = pools_overlap(small.info["train"].to_dict(), info["test"])
    assert overlap == 6000 and pools_overlap(small.info["train"].to_dict(), info["train"]) == 0


def test_explicit_mnist_dir_never_falls_back(tmp_path, mnist, monkeypatch):
    monkeypatch.setenv("VILLA_MNIST_DIR", mnist)
    with pytest.raises(VillaError, match=r"--mnist_dir .*nowhere does not exist"):
        generate(100, 16, mnist_dir=str(tmp_path / "nowhere"), out_dir=str(tmp_path / "out"), progress=False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target_sample_complexity=1"], "must be in 2..36"),
        (["--attribute_budget=0"], "--attribute_budget=0"),
        (["--val_budget=-3"], "--val_budget=-3"),
    ],
)
def test_bad_arguments(args, message, tmp_path, mnist, capsys):
    with pytest.raises(SystemExit) as e:
        main(args + [f"--out_dir={tmp_path}", f"--mnist_dir={mnist}", "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert list(tmp_path.iterdir()) == []


def test_missing_and_unreadable_mnist(tmp_path, monkeypatch):
    monkeypatch.delenv("VILLA_MNIST_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VillaError, match="MNIST not found .*empty"):
        generate(100, 16, mnist_dir=str(tmp_path / "empty"), out_dir=str(tmp_path / "out"), progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03garbage"))
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(VillaError, match="cannot read MNIST file"):
        generate(100, 16, mnist_dir=str(bad), out_dir=str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_folder_needs_overwrite(tmp_path, mnist):
    kw = dict(out_dir=str(tmp_path), mnist_dir=mnist, val_budget=40, test_budget=40, progress=False)
    p = generate(200, 8, **kw)
    (p / "marker").write_text("x")
    with pytest.raises(VillaError, match="exists; pass --overwrite"):
        generate(200, 8, **kw)
    assert (p / "marker").exists()
    p2 = generate(200, 8, overwrite=True, **kw)
    assert p2 == p and not (p / "marker").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == [p.name]  # no temporary folders left


def test_cli_script_and_module(tmp_path, mnist):
    for cmd in (
        [sys.executable, str(ROOT / "docmnist" / "generate_docmnist.py")],
        [sys.executable, "-m", "docmnist.generate_docmnist"],
    ):
        out = tmp_path / cmd[-1].replace("/", "_")
        r = subprocess.run(
            cmd
            + [
                "--attribute_budget=100",
                "--target_sample_complexity=8",
                "--val_budget=20",
                "--test_budget=20",
                f"--out_dir={out}",
                f"--mnist_dir={mnist}",
                "--quiet",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert r.returncode == 0, r.stderr
        (folder,) = out.iterdir()
        assert folder.name.startswith("docmnist_100_") and (folder / "annotations.feather").is_file()


def test_notebook_executes(tiny_docmnist, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("VILLA_DOCMNIST_DIR", str(tiny_docmnist))
    nb = nbformat.read(ROOT / "notebooks" / "visualize_docmnist.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert f"{tiny_docmnist}:" in printed and "caption:" in printed


# --- MNIST on a fresh machine: downloaded with checksums, from a mirror of your choice --------------------------


@pytest.fixture
def mirror(mnist, tmp_path):
    """An HTTP server on 127.0.0.1 serving a folder of MNIST's four .gz files (a copy the test may corrupt)."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()
    for name in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        src = Path(mnist) / name
        if not src.is_file():
            pytest.skip(f"{src} missing")
        shutil.copy(src, folder / name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_mnist_downloads_from_a_mirror_and_checks_every_file(mirror, tmp_path, monkeypatch):
    from docmnist.mnist import CHECKSUMS, download_mnist, load_digit_pools

    folder, url = mirror
    dest = download_mnist(tmp_path / "m", mirror=url, progress=False)
    assert sorted(p.name for p in dest.iterdir()) == sorted(CHECKSUMS)
    assert all((dest / n).read_bytes() == (folder / n).read_bytes() for n in CHECKSUMS)
    assert load_digit_pools(str(dest)).full  # the downloaded files are MNIST itself
    # a generator that finds MNIST nowhere fetches it once into <data root>/mnist (VILLA_MNIST_MIRROR)
    monkeypatch.delenv("VILLA_MNIST_DIR", raising=False)
    monkeypatch.setenv("VILLA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("VILLA_MNIST_MIRROR", url)
    generate(300, 4, out_dir=str(tmp_path / "out"), val_budget=60, test_budget=60, progress=False)
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(CHECKSUMS)


def test_mnist_download_failures_are_one_line_and_leave_nothing(mirror, tmp_path):
    import socket

    folder, url = mirror
    data = bytearray((folder / "t10k-labels-idx1-ubyte.gz").read_bytes())
    data[100] ^= 0xFF  # a corrupted file on the mirror
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(data))
    env = {**os.environ, "VILLA_MNIST_MIRROR": url}
    run = [sys.executable, "-m", "docmnist.mnist", "--download", "--dir", str(tmp_path / "m"), "--quiet"]
    r = subprocess.run(run, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert f"{url}t10k-labels-idx1-ubyte.gz is not MNIST's t10k-labels-idx1-ubyte.gz" in r.stderr
    assert not (tmp_path / "m" / "t10k-labels-idx1-ubyte.gz").exists()
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]  # no temporary file left
    with socket.socket() as s:  # a port nothing listens on: no network
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"
    r = subprocess.run(
        run[:-2] + [str(tmp_path / "n"), "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "VILLA_MNIST_MIRROR": closed},
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "cannot download MNIST" in r.stderr and "VILLA_MNIST_DIR" in r.stderr and "VILLA_MNIST_MIRROR" in r.stderr
