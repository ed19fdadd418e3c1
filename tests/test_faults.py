"""Faults that used to lose data or pass silently: a crash between an epoch's writes, runs sharing a checkpoint
folder, foreign mappings, stale caches, non-finite input, unknown keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pytest
import torch
from conftest import compose_config

import villa.core.engine as training
from villa.core.errors import VillaError
from villa.stage1.train import train_stage1


def s1(data: Path, emb: Path, tmp: Path, *extra: str):
    return compose_config(
        "stage1",
        [
            f"data_dir={data}",
            f"embeddings_dir={emb}",
            f"mapping_path={tmp / 'mapping.feather'}",
            f"checkpoint_dir={tmp / 'ckpt'}",
            "device=cpu",
            "progress=false",
            "batch_size=16",
            "lr=1e-3",
            *extra,
        ],
    )


def test_crash_between_an_epochs_writes_resumes_to_the_same_run(synthetic_stage1, tmp_path, monkeypatch):
    """Killed after best.pt and the metrics line of epoch 2, before its last.pt: the rerun redoes epoch 2 and ends
    as an uninterrupted run, with one metrics line per epoch and a best.pt that last.pt agrees with."""
    data, emb = synthetic_stage1
    train_stage1(s1(data, emb, tmp_path / "a", "epochs=3"))
    real, real_link, saving = training.save_checkpoint, training.link_checkpoint, {}

    def crash_on_last_of_epoch_2(path, state):  # last.pt written anew (an epoch that did not improve)
        saving["epoch"] = state["epoch"]
        if Path(path).name == "last.pt" and state["epoch"] == 2:
            raise KeyboardInterrupt("killed")
        real(path, state)

    def crash_on_link_of_epoch_2(src, dst):  # last.pt linked to the best.pt just written (an improving epoch)
        if Path(dst).name == "last.pt" and saving.get("epoch") == 2:
            raise KeyboardInterrupt("killed")
        real_link(src, dst)

    monkeypatch.setattr(training, "save_checkpoint", crash_on_last_of_epoch_2)
    monkeypatch.setattr(training, "link_checkpoint", crash_on_link_of_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_stage1(s1(data, emb, tmp_path / "b", "epochs=3"))
    monkeypatch.setattr(training, "save_checkpoint", real)
    monkeypatch.setattr(training, "link_checkpoint", real_link)
    ck = tmp_path / "b" / "ckpt"
    assert torch.load(ck / "last.pt", weights_only=True)["epoch"] == 1
    assert [json.loads(x)["epoch"] for x in (ck / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    train_stage1(s1(data, emb, tmp_path / "b", "epochs=3"))
    assert [json.loads(x)["epoch"] for x in (ck / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    a = torch.load(tmp_path / "a" / "ckpt" / "best.pt", weights_only=True)
    b = torch.load(ck / "best.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] and a["best_val"] == pytest.approx(b["best_val"], abs=1e-7)
    assert not list(ck.glob(".*.tmp-*"))


def test_resume_refuses_a_missing_best_model(synthetic_stage1, tmp_path):
    data, emb = synthetic_stage1
    train_stage1(s1(data, emb, tmp_path, "epochs=1"))
    (tmp_path / "ckpt" / "best.pt").unlink()
    with pytest.raises(VillaError, match=r"records a best model .*best.pt is missing; set resume=false"):
        train_stage1(s1(data, emb, tmp_path, "epochs=2"))


def test_a_checkpoint_folder_is_locked_by_its_run(synthetic_stage1, tmp_path):
    data, emb = synthetic_stage1
    ck = tmp_path / "ckpt"
    ck.mkdir()
    other = os.fork()
    if other == 0:  # a live process that holds the lock
        import time

        time.sleep(30)
        os._exit(0)
    try:
        (ck / ".lock").write_text(json.dumps({"pid": other}))
        with pytest.raises(VillaError, match=rf"{ck} is in use by process {other}"):
            train_stage1(s1(data, emb, tmp_path, "epochs=1"))
    finally:
        os.kill(other, 9)
        os.waitpid(other, 0)
    train_stage1(s1(data, emb, tmp_path, "epochs=1"))  # a dead holder's lock is taken over
    assert not (ck / ".lock").exists()  # and released at the end


def test_epsilon_rule_in_float64():
    from villa.stage1.mapping import assign

    best = np.float32(0.7)
    near = np.nextafter(np.float32(0.5), np.float32(1))  # just above 0.7 - 0.2 in float64, not in float32
    scores = np.array([[best], [near]], np.float32)
    got = assign(scores, np.array([0, 2]), np.array([[True]]), 0.2)
    assert got[:, 0].tolist() == [True, float(near) > float(best) - 0.2]


@pytest.mark.parametrize(
    "column,value,match",
    [
        ("region_coord", [[float("nan"), 0, 10, 10]], "not finite"),
        ("image_id", float("nan"), "image_id is not finite"),
        ("text", "  ", "text is empty"),
    ],
)
def test_non_finite_and_empty_input_is_refused(tiny_docmnist, tmp_path, column, value, match):
    from villa.data.annotations import load_annotations
    from villa.data.vocab import load_vocab

    t = feather.read_table(tiny_docmnist / "annotations.feather").to_pandas()
    if column == "image_id":
        t["image_id"] = t["image_id"].astype(float)
        t.loc[2, "image_id"] = value
    elif column == "region_coord":
        t.at[2, "region_coord"] = [np.array(b, np.float64) for b in value * t.at[2, "num_regions"]]
    else:
        t.at[2, column] = value
    (tmp_path / "d").mkdir()
    feather.write_feather(pa.Table.from_pandas(t, preserve_index=False), tmp_path / "d" / "annotations.feather")
    with pytest.raises(VillaError, match=match):
        load_annotations(tmp_path / "d", load_vocab("docmnist"), check_images=False)


@pytest.mark.parametrize(
    "name,override,match",
    [
        ("stage2", "+batchsize=4", "unknown key 'batchsize'"),
        ("evaluate", "precision_at=[0,10]", "precision_at"),
        ("stage2", "betas=[1.5,0.9]", "betas"),
        ("stage2", "pretrain.crop=content", "pretrain.crop=content is for objective=pretrain"),
    ],
)
def test_overrides_that_would_be_ignored_or_wrong(name, override, match):
    from villa.core.config import check_overrides

    with pytest.raises(VillaError, match=match):
        check_overrides(name, [override])


def test_stage2_refuses_a_mapping_without_provenance(tiny_docmnist, tiny_mapping, tmp_path):
    from villa.stage2.train import train_stage2

    t = feather.read_table(tiny_mapping)
    feather.write_feather(t.replace_schema_metadata({}), tmp_path / "m.feather")
    over = [
        f"data_dir={tiny_docmnist}",
        f"mapping_path={tmp_path / 'm.feather'}",
        f"checkpoint_dir={tmp_path / 'ck'}",
        "model.name=villa-tiny-rn",
        "model.pretrained=none",
        "device=cpu",
        "num_workers=0",
        "progress=false",
        "epochs=1",
        "batch_size=16",
        "amp=false",
    ]
    with pytest.raises(VillaError, match="records no provenance .* trust_mapping=true"):
        train_stage2(compose_config("stage2", over))
    res = train_stage2(compose_config("stage2", over + ["trust_mapping=true"]))
    assert torch.load(res["last_checkpoint"], weights_only=True)["config"]["trust_mapping"] is True


def test_text_cache_depends_on_the_text_tower(tmp_path):
    """Two random inits (other seeds) never share cached text embeddings; a corrupt cache file is rebuilt."""
    from villa.core.runtime import get_runtime, seed_everything
    from villa.models.clip import create_clip
    from villa.models.text import embed_sentences_cached

    rt = get_runtime("cpu")
    seed_everything(1)
    a = create_clip("villa-tiny-rn", "none", device="cpu")
    seed_everything(2)
    b = create_clip("villa-tiny-rn", "none", device="cpu")
    cache = tmp_path / "text_cache"
    ea = embed_sentences_cached(a, ["a red digit", "a circle"], rt, cache)
    eb = embed_sentences_cached(b, ["a red digit", "a circle"], rt, cache)
    assert not torch.allclose(ea, eb)
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 2
    for f in files:
        f.write_bytes(b"garbage")
    again = embed_sentences_cached(a, ["a red digit", "a circle"], rt, cache)
    torch.testing.assert_close(again, ea)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root can mount one; skipped where it cannot)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_is_one_line_and_leaves_nothing(small_disk, tiny_docmnist, mnist, tmp_path):
    import subprocess
    import sys

    from villa.preprocess import embed_dataset

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "docmnist.generate_docmnist",
            "--attribute_budget=300",
            "--quiet",
            f"--out_dir={small_disk}",
            f"--mnist_dir={mnist}",
            "--val_budget=150",
            "--test_budget=150",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().startswith("error: ") and "no space left on the device" in r.stderr
    assert r.stderr.strip().count("\n") == 0 or "left on the device" in r.stderr.strip().splitlines()[-1]
    assert list(small_disk.iterdir()) == []
    with pytest.raises(VillaError, match="no space left on the device writing .*emb"):
        embed_dataset(
            tiny_docmnist,
            "docmnist",
            model="villa-tiny-rn",
            pretrained="none",
            device="cpu",
            num_workers=0,
            progress=False,
            dtype="float32",
            out_dir=small_disk / "emb",
        )
    assert list(small_disk.iterdir()) == []
    with pytest.raises(VillaError, match="no space left on the device writing .*last.pt|best.pt|metrics"):
        from villa.stage2.train import train_stage2

        train_stage2(
            compose_config(
                "stage2",
                [
                    f"data_dir={tiny_docmnist}",
                    f"checkpoint_dir={small_disk / 'ck'}",
                    "objective=one_to_one",
                    "model.name=villa-tiny-rn",
                    "model.pretrained=none",
                    "device=cpu",
                    "num_workers=0",
                    "progress=false",
                    "epochs=1",
                    "batch_size=16",
                    "amp=false",
                ],
            )
        )
    ck = small_disk / "ck"
    assert not ck.exists() or not [p for p in ck.iterdir() if p.name.endswith(".pt") or ".tmp-" in p.name]


@pytest.mark.parametrize(
    "module,override,match",
    [
        ("villa.stage2", "~lr", "error: lr is missing .*set it with lr=... instead"),
        ("villa.stage1", "model._target_=foo.Bar", "error: model._target_='foo.Bar' is not a class villa can import"),
    ],
)
def test_deleted_keys_and_bad_targets_are_one_line_before_hydra_starts(module, override, match, tmp_path):
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(
        [sys.executable, "-m", module, override, f"data_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and re.search(match, r.stderr), r.stderr
    assert not (tmp_path / "outputs").exists()  # Hydra never started: no output folder


@pytest.mark.parametrize("name", ["regions.npy", "attributes.npy", "index.feather", "meta.json"])
def test_truncated_embeddings_are_one_line(synthetic_stage1, tmp_path, name):
    import shutil

    from villa.data.embeddings import open_embeddings

    _, emb = synthetic_stage1
    e = shutil.copytree(emb, tmp_path / "e")
    raw = (e / name).read_bytes()
    (e / name).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VillaError, match="truncated or corrupt|is corrupt|is not villa-embeddings"):
        open_embeddings(e)


def test_stage2_fingerprint_sees_the_images_contents(tiny_docmnist, tmp_path, monkeypatch):
    import shutil

    from villa.core.provenance import images_digest

    monkeypatch.setenv("VILLA_CACHE_DIR", str(tmp_path / "cache"))
    data = shutil.copytree(tiny_docmnist, tmp_path / "d", ignore=shutil.ignore_patterns("embeddings", "text_cache"))
    paths = feather.read_table(data / "annotations.feather").column("image_filepath").to_pylist()
    a = images_digest(data, paths)
    assert images_digest(data, paths) == a and (tmp_path / "cache" / "image_digests").is_dir()
    img = data / paths[5]
    raw = bytearray(img.read_bytes())
    from PIL import Image

    with Image.open(img) as im:
        px = np.asarray(im).copy()
    px[0, 0] = 255 - px[0, 0]
    Image.fromarray(px).save(img)
    assert bytes(raw) != img.read_bytes() and images_digest(data, paths) != a


def test_captions_without_sentences_are_flagged(tiny_docmnist, tmp_path, caplog):
    from villa.data.annotations import load_annotations
    from villa.data.synthetic import write_synthetic_embeddings
    from villa.data.vocab import load_vocab

    t = feather.read_table(tiny_docmnist / "annotations.feather")
    text = [x.replace(" . ", " and ") for x in t.column("text").to_pylist()]
    d = tmp_path / "d"
    d.mkdir()
    feather.write_feather(t.set_column(t.column_names.index("text"), "text", pa.array(text)), d / "annotations.feather")
    (d / "images").symlink_to(tiny_docmnist / "images")
    vocab = load_vocab("docmnist")
    ann = load_annotations(d, vocab, check_images=False)
    emb = write_synthetic_embeddings(ann, vocab, tmp_path / "emb", dim=16)
    res = train_stage1(s1(d, emb, tmp_path, "epochs=1"))
    assert res["one_sentence_captions"] == ann.n_images
    assert f"{ann.n_images} captions name several attributes in one sentence" in caplog.text


def _cli(*args: str, cwd: Path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(root)}
    )


@pytest.mark.parametrize(
    "args,match",
    [
        (["-m", "experiments.demo", "--stage2_epochs", "0"], "error: --stage2_epochs=0: must be an integer >= 1"),
        (["-m", "experiments.demo", "--budget", "10"], "error: --budget=10 is below two images at --target=16"),
        (["-m", "docmnist.generate_docmnist", "--workers", "-3"], "error: --workers=-3: must be >= 1"),
    ],
)
def test_settings_refused_before_any_work(tmp_path, args, match):
    r = _cli(*args, "--out" if "experiments.demo" in args else "--out_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert not (tmp_path / "out").exists()  # nothing generated, no folder


def test_every_flag_has_help_and_commands_name_themselves(tmp_path):
    """Each script's --help names the command as it is run and gives every flag a description."""
    import re

    for module in ("experiments.demo", "experiments.complexity", "preprocess"):
        r = _cli("-m", module, "--help", cwd=Path(__file__).resolve().parent.parent)
        assert r.returncode == 0, r.stderr[-1500:]
        if module == "preprocess":  # villa's keys, each with its description, as the stages' --help
            assert "  model.pretrained " in r.stdout and "Environment variables" in r.stdout
            continue
        assert r.stdout.startswith(f"usage: python -m {module}") or r.stdout.startswith("usage: ")
        lines = r.stdout.splitlines()
        start = next(i for i, ln in enumerate(lines) if ln.startswith("options:"))
        for i, ln in enumerate(lines[start + 1 :], start + 1):
            m = re.match(r"  (--?[\w-]+)(.*)$", ln)
            if not m:
                continue
            described = re.search(r"\S\s{2,}\S", ln.strip()) or (
                i + 1 < len(lines) and lines[i + 1].startswith(" " * 10) and not lines[i + 1].strip().startswith("-")
            )
            assert described, f"{module}: {m.group(1)} has no help text"


def test_a_checkpoint_of_another_model_names_the_key_to_set(tmp_path):
    from villa.core.checkpoint import save_checkpoint
    from villa.models.clip import clip_checkpoint_state, create_clip

    clip = create_clip("villa-tiny-rn", "none", device="cpu")
    save_checkpoint(tmp_path / "c.pt", clip_checkpoint_state(clip.model, clip.model_name, clip.model_cfg))
    with pytest.raises(VillaError, match="set model.name=villa-tiny-rn"):
        create_clip("villa-small-rn", str(tmp_path / "c.pt"), device="cpu")


def test_a_load_failure_reason_is_never_cut_mid_word(tmp_path, monkeypatch):
    from villa.core.checkpoint import load_checkpoint

    (tmp_path / "x.pt").write_bytes(b"x")
    long = " ".join(f"word{i:02d}" for i in range(60))  # 419 characters

    def fail(*a, **k):
        raise RuntimeError(long)

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(VillaError) as e:
        load_checkpoint(tmp_path / "x.pt")
    reason = str(e.value).split("cannot be read (")[1].split("): it is")[0]
    assert reason.endswith(" ...") and len(reason) <= 164
    words = reason[: -len(" ...")].split()
    assert words == long.split()[: len(words)] and len(words) >= 15  # whole words only


def test_stage2_refuses_to_resume_on_changed_images(tiny_docmnist, tmp_path, monkeypatch):
    """Every image changed in place (same names, sizes and annotations): the resume is refused, naming the images."""
    import shutil

    from PIL import Image

    from villa.stage2.train import train_stage2

    monkeypatch.setenv("VILLA_CACHE_DIR", str(tmp_path / "cache"))
    data = shutil.copytree(tiny_docmnist, tmp_path / "d", ignore=shutil.ignore_patterns("embeddings", "text_cache"))
    over = [
        f"data_dir={data}",
        f"checkpoint_dir={tmp_path / 'ck'}",
        "objective=one_to_one",
        "model.name=villa-tiny-rn",
        "model.pretrained=none",
        "device=cpu",
        "num_workers=0",
        "progress=false",
        "batch_size=16",
        "amp=false",
    ]
    train_stage2(compose_config("stage2", over + ["epochs=1"]))
    for p in (data / "images").rglob("*.png"):
        with Image.open(p) as im:
            px = 255 - np.asarray(im)
        Image.fromarray(px).save(p)
    with pytest.raises(VillaError, match=r"is from another run \(images: "):
        train_stage2(compose_config("stage2", over + ["epochs=2"]))
