"""Experiment tracking (villa/tracking.py): metrics.csv, TensorBoard events and Weights & Biases (offline), read back
from the files and checked against the run's own history; a resumed run's files are the run's, once."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
from conftest import compose_config
from test_reliability import TINY_S2, s1

from villa.core.errors import VillaError
from villa.core.tracking import Tracker
from villa.stage1.train import train_stage1
from villa.stage2.train import train_stage2


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_wandb_history(run_dir: Path) -> list[dict]:
    """The history records of an offline run's transaction log (``run-*.wandb``: W&B's LevelDB-log framing of
    protobuf ``Record``s), read without the wandb service."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block, records, part = log.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 0:
            break
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            records.append(part)
    out = []
    for raw in records:
        r = pb.Record()
        r.ParseFromString(raw)
        if r.WhichOneof("record_type") == "history":
            out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return out


def test_stage2_writes_csv_tensorboard_and_wandb_offline(tiny_docmnist, tiny_mapping, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    ck = tmp_path / "s2"
    over = [
        f"data_dir={tiny_docmnist}",
        f"mapping_path={tiny_mapping}",
        f"checkpoint_dir={ck}",
        *TINY_S2,
        "epochs=2",
        "log_every=1",
        "logger=[csv,tensorboard,wandb]",
    ]
    res = train_stage2(compose_config("stage2", over))
    rows = read_csv(ck / "metrics.csv")
    epochs = [r for r in rows if r["kind"] == "epoch"]
    steps = [r for r in rows if r["kind"] == "step"]
    assert [int(r["epoch"]) for r in epochs] == [1, 2]
    for r, h in zip(epochs, res["history"]):
        assert float(r["val_loss"]) == pytest.approx(h["val_loss"], rel=1e-9)
        assert float(r["train_loss"]) == pytest.approx(h["train_loss"], rel=1e-9)
    per_epoch = len(steps) // 2
    assert per_epoch >= 1 and [int(r["step"]) for r in steps] == list(range(2 * per_epoch))
    assert all(float(r["images_per_s"]) > 0 and float(r["lr"]) > 0 and float(r["temperature"]) == 0.07 for r in steps)
    tb = read_tensorboard(ck / "tensorboard")
    assert [v for _, v in tb["epoch/val_loss"]] == pytest.approx([h["val_loss"] for h in res["history"]], rel=1e-6)
    assert [s for s, _ in tb["train/loss"]] == [int(r["step"]) for r in steps]
    assert [v for _, v in tb["train/loss"]] == pytest.approx([float(r["loss"]) for r in steps], rel=1e-6)
    hist = read_wandb_history(ck)
    val = [h["epoch/val_loss"] for h in hist if "epoch/val_loss" in h]
    assert val == pytest.approx([h["val_loss"] for h in res["history"]], rel=1e-9)
    assert sum("train/loss" in h for h in hist) == len(steps)


def test_stage1_resume_keeps_one_copy_of_each_epoch(synthetic_stage1, tmp_path):
    data, emb = synthetic_stage1
    train_stage1(s1(data, emb, tmp_path, "epochs=2", "log_every=5", "logger=[csv,tensorboard]"))
    first = read_csv(tmp_path / "ckpt" / "metrics.csv")
    m = train_stage1(s1(data, emb, tmp_path, "epochs=3", "log_every=5", "logger=[csv,tensorboard]"))
    rows = read_csv(tmp_path / "ckpt" / "metrics.csv")
    epochs = [int(r["epoch"]) for r in rows if r["kind"] == "epoch"]
    assert epochs == [1, 2, 3]
    assert [r for r in rows if r["kind"] != "final" and int(r["epoch"]) <= 2] == [
        {**r, **{k: "" for k in rows[0] if k not in r}} for r in first if r["kind"] != "final"
    ]
    final = [r for r in rows if r["kind"] == "final"]
    assert len(final) == 1
    assert float(final[0]["quality/stage1/val/all/f1"]) == pytest.approx(m["quality"]["stage1"]["val"]["all"]["f1"])
    steps = [int(r["step"]) for r in rows if r["kind"] == "step"]
    assert steps == sorted(set(steps))  # no step twice after the resume
    tb = read_tensorboard(tmp_path / "ckpt" / "tensorboard")
    assert [s for s, _ in tb["train/loss"]] == steps
    assert len(tb["epoch/val_loss"]) == 3


def test_unknown_logger_is_one_line(synthetic_stage1, tmp_path):
    data, emb = synthetic_stage1
    with pytest.raises(VillaError, match=r"'mlflow' is not a logger; use a list of csv, tensorboard, wandb"):
        train_stage1(s1(data, emb, tmp_path, "logger=[csv,mlflow]"))
    with pytest.raises(VillaError, match="logger="):
        Tracker(tmp_path, ["neptune"])


def test_only_rank_zero_writes(tmp_path):
    t = Tracker(tmp_path / "r1", ["csv", "tensorboard"], enabled=False)
    t.step(1, 0, {"loss": 1.0})
    t.epoch(1, 1, {"val_loss": 1.0})
    t.close()
    assert not (tmp_path / "r1").exists()
