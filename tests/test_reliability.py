"""Reliability, in one place: resume never mixes runs, configs and inputs are checked first, bad input is one line, a
crash or a full disk leaves nothing half-written, and the faults that once lost data or passed silently stay fixed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pytest
import torch
from conftest import compose_config, mnist_test_files_only
from PIL import Image

import villa.core.engine as training
from villa.core.checkpoint import load_checkpoint, save_checkpoint
from villa.core.errors import VillaError
from villa.core.io import atomic_dir, atomic_file, remove_stale_temporaries
from villa.core.provenance import file_sha256
from villa.core.schemas import validate_config
from villa.stage1.mapping import mapping_record
from villa.stage1.train import train_stage1
from villa.stage2.train import train_stage2

ROOT = Path(__file__).resolve().parent.parent
TINY_S2 = [
    "model.name=villa-tiny-rn",
    "model.pretrained=none",
    "device=cpu",
    "num_workers=0",
    "progress=false",
    "precision=fp32",
    "batch_size=16",
]


def s1(data: Path, emb: Path, tmp: Path, *extra: str):
    """A tiny Stage 1 run that validates and checkpoints every epoch (the write order these tests check)."""
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
            "checkpoint_every=1",
            "val_every=1",
            *extra,
        ],
    )


def s2(data: Path, ckpt: Path, *extra: str):
    return compose_config("stage2", [f"data_dir={data}", f"checkpoint_dir={ckpt}", *TINY_S2, *extra])


def cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd, env=env)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("[")]  # log lines start with a time
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    return lines[0]


# --- resume never mixes runs ------------------------------------------------------------------------------------


def _other_dataset(data: Path, emb: Path, tmp: Path) -> tuple[Path, Path]:
    """A copy of ``data`` with one caption changed (same images and embeddings, other annotations)."""
    b = shutil.copytree(data, tmp / "other_data", ignore=shutil.ignore_patterns("embeddings", "images"))
    os.symlink(Path(data) / "images", b / "images")
    df = pd.read_feather(b / "annotations.feather")
    df.at[0, "text"] = df.at[0, "text"] + " . the image shows a digit"
    df.to_feather(b / "annotations.feather")
    return b, emb


def test_stage1_resume_refuses_another_run(synthetic_stage1, tmp_path):
    data, emb = synthetic_stage1
    train_stage1(s1(data, emb, tmp_path, "epochs=1"))
    last = tmp_path / "ckpt" / "last.pt"
    fp = load_checkpoint(last)["fingerprint"]
    assert fp["inputs"]["annotations"] == file_sha256(data / "annotations.feather") and fp["config"]["lr"] == 1e-3
    other, _ = _other_dataset(data, emb, tmp_path)
    with pytest.raises(VillaError, match=r"is from another run \(annotations: .*resume=false"):
        train_stage1(s1(other, emb, tmp_path, "epochs=2"))
    with pytest.raises(VillaError, match=r"is from another run \(lr: 0.001 -> 10000000000.0\)"):
        train_stage1(s1(data, emb, tmp_path, "epochs=2", "lr=1e10"))
    with pytest.raises(VillaError, match=r"made from other prompt templates"):  # templates changed in the config
        train_stage1(s1(data, emb, tmp_path, "epochs=2", 'dataset.groups.0.templates.0="a photo of a {}"'))
    before = load_checkpoint(last)
    assert before["epoch"] == 1  # nothing was trained or written by the refused runs
    train_stage1(s1(data, emb, tmp_path, "epochs=2"))  # only epochs changed: resumes
    after = load_checkpoint(last)
    assert after["epoch"] == 2 and after["config"]["epochs"] == 2
    train_stage1(s1(other, emb, tmp_path, "epochs=1", "resume=false"))  # the way out
    assert load_checkpoint(last)["fingerprint"]["inputs"]["annotations"] == file_sha256(other / "annotations.feather")


def test_checkpoint_without_fingerprint_is_refused(synthetic_stage1, tmp_path):
    data, emb = synthetic_stage1
    train_stage1(s1(data, emb, tmp_path, "epochs=1"))
    last = tmp_path / "ckpt" / "last.pt"
    state = load_checkpoint(last)
    del state["fingerprint"]
    save_checkpoint(last, state)
    with pytest.raises(VillaError, match="records no run fingerprint.*new checkpoint_dir, or resume=false"):
        train_stage1(s1(data, emb, tmp_path, "epochs=2"))


def test_stage2_resume_refuses_another_mode_or_dataset(tiny_docmnist, tiny_mapping, tmp_path):
    ck = tmp_path / "ck"
    train_stage2(s2(tiny_docmnist, ck, "objective=one_to_one", "epochs=1"))
    state = load_checkpoint(ck / "last.pt")
    assert state["inputs"]["annotations"] == file_sha256(tiny_docmnist / "annotations.feather")
    assert state["data_pools"] and {p["split"] for p in state["data_pools"]} == {"train", "val"}
    with pytest.raises(VillaError, match=r"another run \(.*objective: 'one_to_one' -> 'villa'"):
        train_stage2(s2(tiny_docmnist, ck, "objective=villa", f"mapping_path={tiny_mapping}", "epochs=2"))
    other, _ = _other_dataset(tiny_docmnist, None, tmp_path)
    with pytest.raises(VillaError, match=r"another run \(annotations: "):
        train_stage2(s2(other, ck, "objective=one_to_one", "epochs=2"))
    assert load_checkpoint(ck / "last.pt")["epoch"] == 1


def test_mapping_records_its_run_and_stage2_checks_it(tiny_docmnist, tiny_mapping, tmp_path):
    rec = mapping_record(tiny_mapping)
    assert rec["annotations"] == file_sha256(tiny_docmnist / "annotations.feather")
    assert rec["stage1_checkpoint"].endswith("last.pt") and rec["encoder"]["model"] == "synthetic"
    assert rec["sentence_choice"] == "image" and rec["epsilon"] == 0.2
    other, _ = _other_dataset(tiny_docmnist, None, tmp_path)
    with pytest.raises(VillaError, match="made by Stage 1 for another dataset"):
        train_stage2(s2(other, tmp_path / "ck", "objective=villa", f"mapping_path={tiny_mapping}", "epochs=1"))


def test_stage2_checks_data_before_weights(tiny_docmnist, tmp_path):
    """A missing mapping is reported before pretrained=openai would try to load (or download) anything."""
    cfg = s2(
        tiny_docmnist,
        tmp_path / "ck",
        "objective=villa",
        "model.name=RN50",
        "model.pretrained=openai",
        f"mapping_path={tmp_path / 'none.feather'}",
    )
    with pytest.raises(VillaError, match="mapping not found"):
        train_stage2(cfg)


def test_default_checkpoint_dir_names_the_dataset():
    a = compose_config("stage1", ["data_dir=data/set_a"])
    b = compose_config("stage1", ["data_dir=data/set_b"])
    assert a.checkpoint_dir == "checkpoints/stage1/set_a" and b.checkpoint_dir != a.checkpoint_dir
    c = compose_config("stage2", ["experiment=pretrain", "data_dir=/x/docmnist_9_3.5/"])
    assert c.checkpoint_dir == "checkpoints/pretrain/docmnist_9_3.5"


# --- configs validated before any work --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,override,match",
    [
        ("stage2", "batch_size=0", "batch_size=0: must be > 0"),
        ("stage2", "temperature=0", "temperature=0.0: must be > 0"),
        ("stage2", "epochs=-1", "epochs=-1: must be > 0"),
        ("stage2", "epochs=0", "epochs=0: must be > 0"),
        ("stage2", "loss_average=mean", "loss_average='mean': use one of batch, image"),
        ("stage1", "epsilon=-1", "epsilon=-1.0: must be >= 0"),
        ("stage1", "sentence_choice=caption", "use one of image, region"),
        ("evaluate", "batch_size=-3", "batch_size=-3: must be > 0"),
    ],
)
def test_ranges_and_choices(name, override, match):
    with pytest.raises(VillaError, match=match):
        validate_config(compose_config(name, [override]), name)


@pytest.mark.parametrize(
    "override,match",
    [
        ("epochs=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("lr=fast", "could not be converted to Float"),
        ("batch_size=0", "batch_size=0: must be > 0"),
        ("nosuchkey=1", "Key 'nosuchkey' not in 'Stage2Config'"),
    ],
)
def test_cli_bad_override_is_one_line_and_leaves_nothing(tmp_path, override, match):
    r = cli("villa.stage2", override, cwd=tmp_path)
    assert match in one_error_line(r)
    assert list(tmp_path.iterdir()) == []  # no outputs/ folder, no checkpoints


def test_help_describes_keys_without_the_vocabulary(tmp_path):
    r = cli("villa.stage2", "--help", cwd=tmp_path)
    assert r.returncode == 0
    out = r.stdout
    assert out.startswith("Stage 2: a CLIP-style trainer")
    for line in ("batch_size ", "images per step", "loss_average", "[batch|image]", "(int; default 256)"):
        assert line in out
    assert "seven" not in out and "the digit appears to be" not in out  # the vocabulary is not dumped


# --- one line for each bad input --------------------------------------------------------------------------------


class Payload:
    """Any Python object in a pickle: what a crafted checkpoint carries."""


def test_corrupt_and_wrong_checkpoints(tmp_path, synthetic_stage1):
    from villa.models.clip import create_clip

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(VillaError, match=r"notes.pt is not a torch checkpoint \(neither a zip archive nor a pickle\)"):
        load_checkpoint(text)
    with pytest.raises(VillaError, match=r"checkpoint .* is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path)
    objects = tmp_path / "objects.pt"
    torch.save({"state_dict": {}, "hook": Payload()}, objects)  # an object weights_only refuses to unpickle
    with pytest.raises(
        VillaError,
        match="holds Python objects villa will not unpickle, so it is not a checkpoint villa or open_clip wrote",
    ):
        create_clip("RN50", str(objects))
    good = tmp_path / "good.pt"
    torch.save({"format": "villa-clip", "state_dict": {"w": torch.zeros(1000)}}, good)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(VillaError, match="trunc.pt is corrupt or truncated"):
        load_checkpoint(trunc)
    with pytest.raises(VillaError, match=r"notes.pt is not a torch checkpoint .*; pass a villa checkpoint"):
        create_clip("villa-tiny-rn", str(text))
    with pytest.raises(VillaError, match="is a folder without open_clip_config.json, not a model"):
        create_clip("auto", str(tmp_path))
    import villa

    with pytest.raises(VillaError, match="is a folder without open_clip_config.json"):
        villa.load(str(tmp_path))
    data, emb = synthetic_stage1
    train_stage1(s1(data, emb, tmp_path, "epochs=1"))
    with pytest.raises(VillaError, match="is a villa-stage1 checkpoint, not a CLIP model"):
        create_clip("auto", str(tmp_path / "ckpt" / "last.pt"))
    # resuming a corrupt last.pt
    (tmp_path / "ckpt" / "last.pt").write_bytes(trunc.read_bytes())
    with pytest.raises(VillaError, match="last.pt is corrupt or truncated .*; delete it, or set resume=false"):
        train_stage1(s1(data, emb, tmp_path, "epochs=2"))


def test_cli_checkpoint_errors_are_one_line(tmp_path, tiny_docmnist):
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    r = cli(
        "villa.evaluate",
        f"data_dir={tiny_docmnist}",
        f"model.pretrained={text}",
        "model.name=villa-tiny-rn",
        "device=cpu",
        f"output={tmp_path / 'r.json'}",
        cwd=tmp_path,
    )
    assert "notes.pt" in one_error_line(r)
    r = cli(
        "preprocess",
        f"--data_dir={tiny_docmnist}",
        "--dataset_config=docmnist",
        "--model=villa-tiny-rn",
        f"--pretrained={text}",
        f"--out_dir={tmp_path / 'emb'}",
        "--device=cpu",
        cwd=tmp_path,
    )
    assert "notes.pt" in one_error_line(r)
    assert not (tmp_path / "emb").exists() and not list(tmp_path.glob(".emb.*"))


def test_docmnist_bad_input(tmp_path, mnist):
    from docmnist.generate_docmnist import generate

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(VillaError, match="afile is a file, not a folder"):
        generate(1000, 16, out_dir=str(afile), mnist_dir=mnist, progress=False)
    with pytest.raises(VillaError, match="must be in 2..36"):
        generate(1000, 37, out_dir=str(tmp_path), mnist_dir=mnist, progress=False)
    with pytest.raises(VillaError, match=r"need at least .* GiB of PNGs.*lower --attribute_budget"):
        generate(10**20, 16, out_dir=str(tmp_path), mnist_dir=mnist, progress=False)
    with pytest.raises(VillaError, match=r"--attribute_budget=1 too small"):
        generate(1, 16, out_dir=str(tmp_path), mnist_dir=mnist, val_budget=100, test_budget=100, progress=False)
    with pytest.raises(VillaError, match=r"--val_budget=1 too small"):
        generate(100, 16, out_dir=str(tmp_path), mnist_dir=mnist, val_budget=1, test_budget=100, progress=False)
    # a labels file that holds image data
    bad = tmp_path / "mnist_bad"
    bad.mkdir()
    src = Path(mnist)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        found = next(p for p in (src / name, src / f"{name}.gz") if p.exists())
        shutil.copy(found, bad / found.name)
    images = next(bad.glob("t10k-images*"))
    labels = next(bad.glob("t10k-labels*"))
    labels.unlink()
    shutil.copy(images, bad / labels.name.replace("images", "labels"))
    with pytest.raises(VillaError, match=r"holds \(10000, 28, 28\) data, not a label vector"):
        generate(
            100, 16, out_dir=str(tmp_path / "o"), mnist_dir=str(bad), val_budget=50, test_budget=50, progress=False
        )
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes everywhere: an unwritable folder cannot be made")
def test_docmnist_unwritable_out_dir(tmp_path, mnist):
    from docmnist.generate_docmnist import generate

    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(VillaError, match="not writable"):
        generate(1000, 16, out_dir=str(ro), mnist_dir=mnist, progress=False)


def test_losing_writer_gets_one_line_and_leaves_nothing(tmp_path):
    final = tmp_path / "dataset"
    with pytest.raises(VillaError, match="created by another process while this one ran; pass --overwrite"):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("mine")
            final.mkdir()  # the other generator finished first
            (final / "a.txt").write_text("theirs")
    assert (final / "a.txt").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


def test_image_size_must_match_annotation(tiny_docmnist, tmp_path):
    from villa.preprocess import embed_dataset

    data = shutil.copytree(tiny_docmnist, tmp_path / "d", ignore=shutil.ignore_patterns("embeddings", "text_cache"))
    df = pd.read_feather(data / "annotations.feather")
    first = data / df.image_filepath.iloc[0]
    Image.new("RGB", (80, 84)).save(first)
    with pytest.raises(VillaError, match=r"is 80x84 but annotations.feather says image_size \[84, 84\]"):
        embed_dataset(data, model="villa-tiny-rn", pretrained="none", device="cpu", num_workers=0, progress=False)
    assert not (data / "embeddings").exists()


def test_embeddings_of_another_vocabulary_order_or_templates(synthetic_stage1, tmp_path):
    from villa.data.embeddings import open_embeddings
    from villa.data.vocab import load_vocab, vocab_from_dict

    data, emb = synthetic_stage1
    vocab = load_vocab("docmnist")
    e = shutil.copytree(emb, tmp_path / "e")
    meta = json.loads((e / "meta.json").read_text())
    meta["attribute_names"] = meta["attribute_names"][::-1]
    (e / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(VillaError, match=r"in another order \(#0: 'large' there, 'zero' in the dataset config\)"):
        open_embeddings(e, vocab)
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "dataset" / "docmnist.yaml").read_text())
    raw["groups"][0]["templates"][0] = "a photo of the number {}"
    with pytest.raises(VillaError, match="other prompt templates"):
        open_embeddings(emb, vocab_from_dict(raw))


# --- no litter --------------------------------------------------------------------------------------------------


def test_output_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale_dir = tmp_path / f".dataset.tmp-{dead_pid}-abcd1234"
    stale_dir.mkdir()
    (stale_dir / "img.png").write_bytes(b"x" * 100)
    stale_file = tmp_path / f".last.pt.tmp-{dead_pid}-00000000"
    stale_file.write_bytes(b"x")
    live = tmp_path / f".dataset.tmp-{os.getppid()}-live0000"  # a process that is alive: kept
    live.mkdir()
    with atomic_dir(tmp_path / "dataset") as tmp:
        (tmp / "a").write_text("1")
    with atomic_file(tmp_path / "last.pt") as tmp:
        tmp.write_bytes(b"ok")
    assert not stale_dir.exists() and not stale_file.exists() and live.exists()
    assert remove_stale_temporaries(tmp_path / "dataset") == []


def test_held_out_check_refuses_shared_digits(tmp_path, mnist):
    from docmnist.generate_docmnist import generate
    from villa.core.provenance import check_held_out, checkpoint_pools, dataset_pools

    full = generate(
        200, 8, out_dir=str(tmp_path / "full"), mnist_dir=mnist, val_budget=100, test_budget=100, progress=False
    )
    old = generate(
        200,
        8,
        out_dir=str(tmp_path / "old"),
        mnist_dir=str(mnist_test_files_only(mnist, tmp_path / "m")),
        val_budget=100,
        test_budget=100,
        progress=False,
    )
    ok = check_held_out(full, {"training data": dataset_pools(full, ("train", "val"))})
    assert ok["overlap"] == {"training data": 0} and ok["test_pool"]["scheme"] == "full-v1"
    # an encoder pretrained on the test-only folder's train pool (6,000 MNIST test digits): refused
    ck = tmp_path / "enc.pt"
    torch.save({"format": "villa-clip", "data_pools": dataset_pools(old, ("train", "val"))}, ck)
    assert len(checkpoint_pools(str(ck))) == 2
    with pytest.raises(VillaError, match=r"shares 8000 of its 10000 digits with what trained the starting encoder"):
        check_held_out(full, {"the starting encoder": checkpoint_pools(str(ck))})
    assert checkpoint_pools("none") == [] and checkpoint_pools("openai") == []
    torch.save({"format": "villa-clip"}, ck)  # a checkpoint from before the record: unknown, warned about
    assert checkpoint_pools(str(ck)) is None
    assert check_held_out(full, {"an old encoder": None})["overlap"] == {"an old encoder": "unrecorded"}


def test_hydra_multirun_gives_each_job_its_folder_and_resumes_each(tiny_docmnist, tiny_mapping, tmp_path):
    """python -m villa.stage2 -m lr=...,... : one checkpoint folder per job (named by its overrides); the same sweep
    run again resumes each job from its own folder (no job resumes another, which the fingerprint would refuse)."""
    args = [
        "-m",
        "lr=1e-4,5e-5",
        "seed=1",
        f"data_dir={tiny_docmnist}",
        f"mapping_path={tiny_mapping}",
        f"paths.checkpoint_dir={tmp_path / 'ck'}",
        f"paths.output_dir={tmp_path / 'out'}",
        "epochs=1",
        *TINY_S2,
    ]
    r = cli("villa.stage2", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    root = tmp_path / "ck" / "stage2" / tiny_docmnist.name
    jobs = sorted(p.name for p in root.iterdir())
    assert jobs == ["lr=0.0001", "lr=5e-05"]  # the swept key's value of each job
    lrs = [load_checkpoint(root / j / "last.pt")["config"]["lr"] for j in jobs]
    assert lrs == [1e-4, 5e-5]
    again = cli("villa.stage2", *[a.replace("epochs=1", "epochs=2") for a in args], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("resumed from") == 2
    assert [load_checkpoint(root / j / "last.pt")["epoch"] for j in jobs] == [2, 2]


def test_improved_epoch_links_last_to_best(tmp_path):
    """An epoch that improves writes best.pt once and makes last.pt a second name of it (same bytes, one write);
    an epoch that does not writes last.pt anew and leaves best.pt as it was."""
    from villa.core.engine import commit_epoch

    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    commit_epoch(ckpt, {"epoch": 1, "w": torch.ones(3)}, True, "epoch 1/2", {"epoch": 1})
    assert os.path.samefile(ckpt / "best.pt", ckpt / "last.pt")
    assert load_checkpoint(ckpt / "last.pt")["epoch"] == 1
    commit_epoch(ckpt, {"epoch": 2, "w": torch.zeros(3)}, False, "epoch 2/2", {"epoch": 2})
    assert not os.path.samefile(ckpt / "best.pt", ckpt / "last.pt")
    assert load_checkpoint(ckpt / "best.pt")["epoch"] == 1 and load_checkpoint(ckpt / "last.pt")["epoch"] == 2
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]


# --- faults that used to lose data or pass silently: crashes between writes, shared folders, foreign mappings,
# stale caches, non-finite input, unknown keys, a full disk -------------------------------------------------------


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
        "precision=fp32",
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
                    "precision=fp32",
                ],
            )
        )
    ck = small_disk / "ck"
    assert not ck.exists() or not [p for p in ck.iterdir() if p.name.endswith(".pt") or ".tmp-" in p.name]
    from villa.core.env import SHIPPED_WEIGHTS
    from villa.export import main as export_main

    with pytest.raises(SystemExit) as stop:  # the open_clip folder of a 0.6 MB checkpoint does not fit in 64 KiB
        export_main(["--format", "open_clip", str(SHIPPED_WEIGHTS["villa-small-rn-docmnist"]), str(small_disk / "oc")])
    assert stop.value.code == 2 and not (small_disk / "oc").exists()
    assert not [p for p in small_disk.iterdir() if ".tmp-" in p.name]


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


@pytest.mark.parametrize(
    "joiner,unit,flagged", [(" and ", "sentence", True), (" and ", "phrase", False), (" ", "phrase", True)]
)
def test_captions_whose_attributes_share_text_are_flagged(tiny_docmnist, tmp_path, caplog, joiner, unit, flagged):
    """DocMNIST captions with their sentences joined by "and" (or by nothing): with region_text=sentence every
    caption is flagged; with phrase, "and" separates them again and nothing is flagged, while no separator leaves
    attributes of one group (two digits, two colours) in one phrase. The warning names image files and sentences."""
    from villa.data.annotations import load_annotations
    from villa.data.synthetic import write_synthetic_embeddings
    from villa.data.vocab import load_vocab

    t = feather.read_table(tiny_docmnist / "annotations.feather")
    text = [x.replace(" . ", joiner) for x in t.column("text").to_pylist()]
    d = tmp_path / "d"
    d.mkdir()
    feather.write_feather(t.set_column(t.column_names.index("text"), "text", pa.array(text)), d / "annotations.feather")
    (d / "images").symlink_to(tiny_docmnist / "images")
    vocab = load_vocab("docmnist")
    ann = load_annotations(d, vocab, check_images=False)
    emb = write_synthetic_embeddings(ann, vocab, tmp_path / "emb", dim=16)
    res = train_stage1(s1(d, emb, tmp_path, "epochs=1", f"region_text={unit}"))
    shared = res["shared_text_captions"]
    multi = int((ann.attribute_matrix(len(vocab)).sum(1) >= 2).sum())
    if not flagged:
        assert shared == {"captions": 0, "examples": []} and "captions name" not in caplog.text
        return
    attrs, group = ann.attribute_matrix(len(vocab)), np.asarray(vocab.attribute_group)
    two_of_a_group = sum(1 for row in attrs if np.bincount(group[row], minlength=len(vocab.groups)).max() >= 2)
    assert shared["captions"] == (multi if unit == "sentence" else two_of_a_group) > 0
    assert len(shared["examples"]) == 3 and shared["examples"][0].startswith(f"{ann.filepath[0]}: ")
    assert f"{shared['captions']} captions name" in caplog.text and shared["examples"][0] in caplog.text


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

    (tmp_path / "x.pt").write_bytes(b"PK\x03\x04")  # a zip archive's start: torch.load is tried
    long = " ".join(f"word{i:02d}" for i in range(60))  # 419 characters

    def fail(*a, **k):
        raise RuntimeError(long)

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(VillaError) as e:
        load_checkpoint(tmp_path / "x.pt")
    reason = str(e.value).split("is corrupt or truncated (")[1].split("); ")[0]
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
        "precision=fp32",
    ]
    train_stage2(compose_config("stage2", over + ["epochs=1"]))
    for p in (data / "images").rglob("*.png"):
        with Image.open(p) as im:
            px = 255 - np.asarray(im)
        Image.fromarray(px).save(p)
    with pytest.raises(VillaError, match=r"is from another run \(images: "):
        train_stage2(compose_config("stage2", over + ["epochs=2"]))


def test_a_sweep_checks_every_job_first_and_survives_a_failing_one(synthetic_stage1, tmp_path):
    """-m: a bad value in any job is one line naming the job, before anything runs or is created; a job that fails
    while it runs is reported, the next one still runs, and a summary with a non-zero exit ends the sweep."""
    data, emb = synthetic_stage1
    common = [
        f"data_dir={data}",
        f"embeddings_dir={emb}",
        f"paths.checkpoint_dir={tmp_path / 'ck'}",
        f"paths.output_dir={tmp_path / 'out'}",
        "device=cpu",
        "progress=false",
        "epochs=1",
    ]
    for sweep, message in (
        (["lr=1e-3,-1,2e-3"], "error: sweep job 1 (lr=-1): lr=-1.0: must be > 0"),
        (
            ["epochs=abc,1"],
            "error: sweep job 0 (epochs=abc): Error merging override epochs=abc: "
            "Value 'abc' of type 'str' could not be converted to Integer",
        ),
    ):
        r = cli(
            "villa.stage1", "-m", *sweep, *[c for c in common if not c.startswith(sweep[0].split("=")[0])], cwd=tmp_path
        )
        line = one_error_line(r)
        assert line.startswith(message) and line.endswith("nothing was run"), line
        assert not (tmp_path / "ck").exists() and not (tmp_path / "out").exists()
    r = cli("villa.stage1", "-m", "batch_size=100000,16", *common, cwd=tmp_path)  # the first fails at run time
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "error: sweep job 0: the train split has" in r.stderr
    assert "sweep: 2 jobs, 1 done, 1 failed" in r.stdout
    assert "job 0 (batch_size=100000" in r.stdout and "job 1 (batch_size=16" in r.stdout
    assert (tmp_path / "ck" / "stage1" / data.name / "batch_size=16" / "last.pt").is_file()


@pytest.mark.parametrize(
    "old,new",
    [
        ("villa.detection", "villa.evaluate.detection"),
        ("villa.datasets.generic", "villa.data.importers.generic"),
        ("villa.finegrained", "villa.evaluate.finegrained"),
    ],
)
def test_old_module_paths_still_run_and_name_the_new_one(old, new, tmp_path):
    r = cli(old, "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"note: {old} is now {new}" in r.stderr
    assert r.stdout.splitlines()[:3] == cli(new, "--help", cwd=tmp_path).stdout.splitlines()[:3]  # the same command
    import importlib

    import villa  # noqa: F401 - installs the hook

    assert importlib.import_module(old) is importlib.import_module(new)  # one module, two names


# --- every file checked where it enters -------------------------------------------------------------------------

SHAPES_VOCAB = {"name": "shapes", "groups": [{"name": "form", "attributes": ["square", "disc"], "templates": ["a {}"]}]}


def _png(path: Path, size=(48, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(path)


def _import(root: Path, captions: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    (tmp_path / "v.yaml").write_text(json.dumps(SHAPES_VOCAB))
    return cli(
        "villa.data.importers.generic",
        f"--root={root}",
        f"--captions={captions}",
        f"--dataset_config={tmp_path / 'v.yaml'}",
        "--regions=grid",
        f"--out_dir={tmp_path / 'ds'}",
        "--quiet",
        *extra,
        cwd=tmp_path,
    )


def test_text_that_is_not_utf8_is_one_line_naming_the_file_line_and_byte(tmp_path):
    root = tmp_path / "imgs"
    for i in range(4):
        _png(root / f"{i}.png")
    lines = [json.dumps({"image": f"{i}.png", "caption": "a square"}).encode() for i in range(4)]
    lines[2] = '{"image": "2.png", "caption": "a disc, caf\u00e9 au lait"}'.encode("latin-1")
    (root / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    line = one_error_line(_import(root, root / "c.jsonl", tmp_path))
    offset = len(b"\n".join(lines[:2])) + 1 + lines[2].index(b"\xe9")
    assert f"c.jsonl:3: byte 0xe9 at byte offset {offset} is not valid utf-8" in line and "--encoding" in line
    assert not (tmp_path / "ds").exists()
    r = _import(root, root / "c.jsonl", tmp_path, "--encoding=latin-1")
    assert r.returncode == 0, r.stderr[-1500:]
    assert "café" in feather.read_table(tmp_path / "ds" / "annotations.feather").column("text").to_pylist()[2]
    csv_file = root / "c.csv"  # the same for a CSV
    csv_file.write_bytes(b"image,caption\n0.png,a square\n1.png,a \xff disc\n")
    assert "c.csv:3: byte 0xff at byte offset 37" in one_error_line(_import(root, csv_file, tmp_path))
    bad_vocab = tmp_path / "bad.yaml"  # and a vocabulary for every command
    bad_vocab.write_bytes(b"name: x\ngroups:\n  - name: g\n    attributes: [caf\xe9]\n    templates: ['{}']\n")
    line = one_error_line(cli("villa.stage1", f"dataset={bad_vocab}", f"data_dir={tmp_path}", cwd=tmp_path))
    assert f"{bad_vocab}:4: byte 0xe9 at byte offset" in line


def test_images_and_boxes_are_checked_at_import(tmp_path):
    """A truncated PNG (whose header reads) and boxes outside their image are refused at import, all named."""
    root = tmp_path / "imgs"
    for i in range(3):
        _png(root / f"{i}.png")
    whole = (root / "1.png").read_bytes()
    (root / "1.png").write_bytes(whole[: len(whole) // 2])
    recs = [{"image": f"{i}.png", "caption": "a square"} for i in range(3)]
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    line = one_error_line(_import(root, root / "c.jsonl", tmp_path))
    assert "1 images cannot be read:" in line and "1.png unreadable" in line
    (root / "1.png").write_bytes(whole)
    recs[0]["boxes"], recs[1]["boxes"], recs[2]["boxes"] = [[-3, 0, 10, 10]], [[5, 5, 60, 20]], [[10, 10, 4, 20]]
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    line = one_error_line(_import(root, root / "c.jsonl", tmp_path, "--regions=given"))
    assert line.startswith(
        "error: 3 boxes are outside their image, empty or inverted: '0.png' box [-3.0, 0.0, 10.0, 10.0]"
    )
    assert not (tmp_path / "ds").exists()


def test_a_worker_error_is_its_own_line_and_index_columns_are_checked(tiny_docmnist, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_docmnist, data)
    img = data / feather.read_table(data / "annotations.feather").column("image_filepath").to_pylist()[0]
    img.write_bytes(img.read_bytes()[:200])  # truncated after the import: read by a DataLoader worker
    r = cli(
        "preprocess",
        f"data_dir={data}",
        "model.name=villa-tiny-rn",
        "model.pretrained=none",
        "num_workers=1",
        "progress=false",
        cwd=tmp_path,
    )
    line = one_error_line(r)
    assert line.startswith(f"error: cannot read image {img}") and "DataLoader worker" not in r.stderr
    from villa.data.embeddings import open_embeddings

    emb = tmp_path / "emb"
    shutil.copytree(tiny_docmnist / "embeddings", emb) if (tiny_docmnist / "embeddings").is_dir() else None
    if not emb.is_dir():
        from villa.data.annotations import load_annotations
        from villa.data.synthetic import write_synthetic_embeddings
        from villa.data.vocab import load_vocab

        vocab = load_vocab("docmnist")
        write_synthetic_embeddings(load_annotations(tiny_docmnist, vocab, check_images=False), vocab, emb, dim=8)
    idx = feather.read_table(emb / "index.feather")
    feather.write_feather(idx.drop_columns(["start"]), emb / "index.feather")
    with pytest.raises(VillaError, match=r"index.feather lacks the column\(s\) start .*run preprocessing again"):
        open_embeddings(emb)


def test_missing_inputs_create_nothing_and_an_import_appears_whole(tmp_path, tiny_docmnist):
    for module, args in (
        ("villa.stage1", ["dataset=docmnist", f"data_dir={tmp_path / 'missing'}"]),
        ("villa.stage2", [f"data_dir={tmp_path / 'missing'}"]),
        ("villa.stage1", [f"data_dir={tiny_docmnist}", f"embeddings_dir={tmp_path / 'none'}"]),
    ):
        line = one_error_line(cli(module, *args, cwd=tmp_path))
        assert "not found" in line
        assert sorted(p.name for p in tmp_path.iterdir()) == [], module  # no checkpoints/, no outputs/
    from villa.data.importers import common

    root = tmp_path / "imgs"
    for i in range(3):
        _png(root / f"{i}.png")
    (root / "c.jsonl").write_text(
        "".join(json.dumps({"image": f"{i}.png", "caption": "a disc"}) + "\n" for i in range(3))
    )
    real = common.atomic_file

    def killed(final):  # the process dies while writing annotations.feather
        if Path(final).name == "annotations.feather":
            raise KeyboardInterrupt("killed")
        return real(final)

    from villa.data.importers.generic import import_generic
    from villa.data.regions import RegionSpec
    from villa.data.vocab import vocab_from_dict

    common.atomic_file = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            import_generic(
                root,
                root / "c.jsonl",
                vocab_from_dict(SHAPES_VOCAB),
                RegionSpec("grid"),
                tmp_path / "out",
                progress=False,
            )
    finally:
        common.atomic_file = real
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))  # no half-made dataset folder


def test_links_inside_a_dataset_are_followed_but_paths_never_leave_it(tiny_docmnist, tmp_path):
    """The rule (docs/reliability.md): a symlink the user placed inside the dataset folder is followed (a cluster's
    shared image store); a path written in annotations.feather never leaves the folder ('..', absolute)."""
    from villa.data.annotations import load_annotations
    from villa.data.vocab import load_vocab

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_docmnist / "annotations.feather", data / "annotations.feather")
    images = feather.read_table(data / "annotations.feather").column("image_filepath").to_pylist()
    top = images[0].split("/")[0]
    (data / top).symlink_to(tiny_docmnist / top, target_is_directory=True)  # the images live elsewhere
    ann = load_annotations(data, load_vocab("docmnist"))  # every image read through the link
    assert ann.n_images == len(images)
    t = feather.read_table(data / "annotations.feather")
    paths = t.column("image_filepath").to_pylist()
    paths[0] = f"../{tiny_docmnist.name}/{paths[0]}"
    col = t.column_names.index("image_filepath")
    feather.write_feather(t.set_column(col, "image_filepath", pa.array(paths)), data / "annotations.feather")
    with pytest.raises(VillaError, match="which leaves the dataset folder"):
        load_annotations(data, load_vocab("docmnist"))


def test_missing_detector_weights_say_so(tmp_path):
    from villa.models.detector import load_detector

    for name in ("villa-tiny-frcnn", "fasterrcnn_mobilenet_v3_large_fpn"):
        with pytest.raises(VillaError, match=f"detector weights not found: {tmp_path / 'missing.pt'}; pass the"):
            load_detector(name, str(tmp_path / "missing.pt"))
