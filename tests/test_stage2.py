"""Stage 2: InfoNCE, pairs per mode, pretrain checkpoints, end to end, resume, non-finite stop, DDP (gloo)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config

import villa.stage2.objectives.base as objective_base
from villa.core.errors import VillaError
from villa.core.runtime import get_runtime
from villa.data.batches import gather_index
from villa.models.clip import create_clip
from villa.models.region_encoder import RegionEncoder
from villa.stage2.objectives.base import infonce
from villa.stage2.pairs import build_pairs
from villa.stage2.train import pair_data, train_stage2

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model.name=villa-tiny-rn",
    "model.pretrained=none",
    "device=cpu",
    "num_workers=0",
    "progress=false",
    "precision=fp32",
]


def s2cfg(tmp: Path, data: Path, *extra: str, mapping: Path | None = None):
    over = [f"data_dir={data}", f"checkpoint_dir={tmp / 'ckpt'}", *TINY, *extra]
    if mapping is not None:
        over.append(f"mapping_path={mapping}")
    return compose_config("stage2", over)


def test_infonce_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    s = (img @ txt.t() / 0.07).tolist()
    i2t = -sum(s[i][i] - math.log(sum(math.exp(v) for v in s[i])) for i in range(4)) / 4
    t2i = -sum(s[i][i] - math.log(sum(math.exp(s[j][i]) for j in range(4))) for i in range(4)) / 4
    assert infonce(img, txt, 1 / 0.07).item() == pytest.approx(0.5 * i2t + 0.5 * t2i, rel=1e-5)


def test_build_pairs():
    size = np.array([[84, 84], [84, 84]])
    offsets = np.array([0, 2, 5])
    boxes = np.arange(20, dtype=np.float32).reshape(5, 4)
    text = ["the color is red", "", "a . b", "", "c"]
    p = build_pairs(size, ["cap0", "cap1"], offsets, boxes, text)
    assert list(p.offsets) == [0, 2, 5]
    assert p.text == ["the color is red", "cap0", "a . b", "c", "cap1"]
    np.testing.assert_array_equal(p.boxes[[0, 2, 3]], boxes[[0, 2, 4]])
    np.testing.assert_array_equal(p.boxes[[1, 4]], [[0, 0, 83, 83]] * 2)
    base = build_pairs(size, ["cap0", "cap1"])
    assert base.text == ["cap0", "cap1"] and list(base.offsets) == [0, 1, 2]


def test_modes_see_their_pairs(tiny_docmnist, tiny_mapping, tmp_path):
    from villa.core.distributed import Dist

    rt = get_runtime("cpu")
    clip = create_clip("villa-tiny-rn", None)
    obj, tr, va = pair_data(s2cfg(tmp_path, tiny_docmnist, "objective=one_to_one"), clip, rt, Dist())
    assert (np.diff(tr.pairs.offsets) == 1).all()  # one pair per image: the whole image and its caption
    np.testing.assert_array_equal(tr.pairs.boxes, [[0, 0, 83, 83]] * len(tr.pairs.boxes))
    assert tr.pairs.text == tr.ann.text and obj.targets_.embeddings.shape == (tr.ann.n_images, 64)
    vobj, vtr, _ = pair_data(s2cfg(tmp_path, tiny_docmnist, "objective=villa", mapping=tiny_mapping), clip, rt, Dist())
    df = pd.read_feather(tiny_mapping)
    n_assigned = df.assigned_attributes.map(lambda r: sum(len(a) > 0 for a in r)).to_numpy()
    np.testing.assert_array_equal(np.diff(vtr.pairs.offsets), n_assigned + 1)
    assert vobj.targets_.embeddings.shape == (vtr.pairs.n_pairs, 64)
    torch.testing.assert_close(vobj.targets_.embeddings.norm(dim=1), torch.ones(vtr.pairs.n_pairs))
    from villa.models.text import text_tower_digest

    cache = tiny_docmnist / "text_cache" / f"{clip.model_name}-{text_tower_digest(clip)}.pt"  # one file per text tower
    assert cache.is_file()  # sentences embedded once, cached on disk
    cached = torch.load(cache, weights_only=True)
    assert len(cached["sentences"]) == len(set(cached["sentences"])) == cached["embeddings"].shape[0]
    with pytest.raises(VillaError, match="mapping not found"):
        pair_data(
            s2cfg(tmp_path, tiny_docmnist, "objective=villa", mapping=tmp_path / "none.feather"), clip, rt, Dist()
        )


def test_pretrain_checkpoint_loads_and_reproduces(tiny_docmnist, tmp_path):
    res = train_stage2(
        s2cfg(tmp_path, tiny_docmnist, "experiment=pretrain", "model.name=villa-tiny-rn", "epochs=1", "batch_size=32")
    )
    ckpt = Path(res["best_checkpoint"])
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["format"] == "villa-clip" and state["kind"] == "villa-stage2-pretrain"
    assert {"optimizer", "scheduler", "rng", "epoch", "config", "best_val", "bad_epochs"} <= set(state)
    loaded = create_clip("villa-tiny-rn", pretrained=str(ckpt))
    import open_clip

    ref = open_clip.create_model("villa-tiny-rn")
    ref.load_state_dict(state["state_dict"])
    ref.eval()
    x, boxes, owner = torch.rand(2, 3, 84, 84), torch.tensor([[0, 0, 83, 83], [0, 0, 28, 28.0]]), torch.tensor([0, 1])
    with torch.no_grad():
        a = RegionEncoder(loaded.model.visual)(x, boxes, owner)
        b = RegionEncoder(ref.visual)(x, boxes, owner)
    assert torch.equal(a, b)
    # the text tower was trained too (both towers in pretraining), and the temperature is learned
    init = create_clip("villa-tiny-rn", None)
    assert not torch.equal(init.model.token_embedding.weight, loaded.model.token_embedding.weight)
    assert state["history"][0]["temperature"] != pytest.approx(0.07, abs=1e-6)


def test_end_to_end_lowers_val_loss(tiny_docmnist, tmp_path):
    """DocMNIST -> preprocess -> Stage 1 -> Stage 2 (ViLLA), all real, tiny config."""
    from villa.preprocess import embed_dataset as preprocess
    from villa.stage1.train import train_stage1

    emb = preprocess(
        tiny_docmnist,
        "docmnist",
        model="villa-tiny-rn",
        pretrained="none",
        device="cpu",
        num_workers=0,
        progress=False,
        out_dir=tmp_path / "emb",
    )
    train_stage1(
        compose_config(
            "stage1",
            [
                f"data_dir={tiny_docmnist}",
                f"embeddings_dir={emb}",
                f"mapping_path={tmp_path / 'm.feather'}",
                f"checkpoint_dir={tmp_path / 's1'}",
                "epochs=2",
                "device=cpu",
                "progress=false",
            ],
        )
    )
    res = train_stage2(
        s2cfg(
            tmp_path,
            tiny_docmnist,
            "objective=villa",
            "epochs=4",
            "batch_size=16",
            "lr=1e-3",
            mapping=tmp_path / "m.feather",
        )
    )
    vals = [h["val_loss"] for h in res["history"]]
    assert len(vals) == 4 and vals[-1] < vals[0] - 0.05, vals


def test_resume_equals_uninterrupted(tiny_docmnist, tmp_path):
    extra = ["objective=one_to_one", "batch_size=32", "lr=1e-3", "seed=3"]
    train_stage2(s2cfg(tmp_path / "a", tiny_docmnist, *extra, "epochs=2"))
    train_stage2(s2cfg(tmp_path / "b", tiny_docmnist, *extra, "epochs=1"))  # "interrupted" after its first epoch
    res = train_stage2(s2cfg(tmp_path / "b", tiny_docmnist, *extra, "epochs=2"))
    assert res["epochs_run"] == 2
    a = torch.load(tmp_path / "a" / "ckpt" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt" / "last.pt", weights_only=True)
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=1e-6, msg=k)
    assert a["scheduler"] == b["scheduler"] and a["history"][1]["val_loss"] == pytest.approx(
        b["history"][1]["val_loss"]
    )


def nan_at_call(monkeypatch, n: int) -> dict[str, int]:
    """Make Stage 2's n-th loss (from now on) NaN; returns the call counter."""
    calls = {"n": 0}
    real = objective_base.infonce

    def flaky(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == n else out

    monkeypatch.setattr(objective_base, "infonce", flaky)
    return calls


def test_non_finite_loss_stops_and_keeps_checkpoint(tiny_docmnist, tmp_path, monkeypatch):
    cfg = ["objective=one_to_one", "batch_size=32"]
    train_stage2(s2cfg(tmp_path, tiny_docmnist, *cfg, "epochs=1"))
    before = (tmp_path / "ckpt" / "last.pt").read_bytes()
    nan_at_call(monkeypatch, 2)
    with pytest.raises(
        VillaError, match=r"non-finite loss \(nan\) at epoch 2 step 1; the last good checkpoint is .*last.pt"
    ):
        train_stage2(s2cfg(tmp_path, tiny_docmnist, *cfg, "epochs=2"))
    assert (tmp_path / "ckpt" / "last.pt").read_bytes() == before


def test_non_finite_stop_within_one_sync_interval(tiny_docmnist, tmp_path, monkeypatch):
    """Losses are checked every log_every steps (no host sync per step): a NaN at step 0 stops the run at the
    interval's end (step 1 with log_every=2), the error names step 0, and no checkpoint is written."""
    calls = nan_at_call(monkeypatch, 1)
    cfg = s2cfg(tmp_path, tiny_docmnist, "objective=one_to_one", "batch_size=16", "epochs=1", "log_every=2")
    with pytest.raises(VillaError, match=r"non-finite loss \(nan\) at epoch 1 step 0;"):
        train_stage2(cfg)
    assert calls["n"] == 2
    assert not (tmp_path / "ckpt" / "last.pt").exists()


def test_pair_collate_gathers_the_pairs_of_its_images(tiny_docmnist, tmp_path):
    from villa.core.distributed import Dist
    from villa.stage2.pairs import PairCollate, make_loader

    cfg = s2cfg(tmp_path, tiny_docmnist, "objective=one_to_one", "batch_size=8")
    _, train, _ = pair_data(cfg, create_clip("villa-tiny-rn", None), get_runtime("cpu"), Dist())
    loader, _ = make_loader(train, cfg, Dist(), train=True)
    assert isinstance(loader.collate_fn, PairCollate)
    batch = next(iter(loader))
    pair_idx, box_image = gather_index(train.pairs.offsets, batch.rows.numpy())
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (8, 3, 84, 84)
    assert batch.pair_idx.tolist() == pair_idx.tolist() and batch.box_image.tolist() == box_image.tolist()
    assert torch.equal(batch.boxes, torch.from_numpy(train.pairs.boxes[pair_idx]))


def test_compiled_region_path_trains_the_same(tiny_docmnist, tmp_path):
    """compile=true (traced by dynamo and AOT autograd; aot_eager generates no code, so the test is quick) trains
    to the same weights as eager, and its checkpoint keys are the eager model's."""
    common = ["objective=one_to_one", "batch_size=16", "epochs=1"]
    eager = train_stage2(s2cfg(tmp_path / "e", tiny_docmnist, *common))
    compiled = train_stage2(s2cfg(tmp_path / "c", tiny_docmnist, *common, "compile=true", "compile_backend=aot_eager"))
    assert compiled["checksum"] == pytest.approx(eager["checksum"], rel=1e-9)
    assert compiled["history"][0]["val_loss"] == pytest.approx(eager["history"][0]["val_loss"], rel=1e-6)
    a = torch.load(tmp_path / "e" / "ckpt" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "c" / "ckpt" / "last.pt", weights_only=True)["state_dict"]
    assert list(a) == list(b)


def _even_subset(src: Path, dst: Path, n_train: int = 16, n_val: int = 8) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("embeddings", "text_cache"))
    df = pd.read_feather(dst / "annotations.feather")
    df = pd.concat([df[df.split == "train"].head(n_train), df[df.split == "val"].head(n_val)]).reset_index(drop=True)
    df.to_feather(dst / "annotations.feather")
    return dst


def ddp_and_single(data: Path, tmp_path: Path, overrides: list[str]) -> tuple[dict, dict]:
    """The same run on 2 gloo ranks and on one process; their last checkpoints, after checking that the per-epoch
    train and val losses match."""
    torchrun_two_ranks(data, tmp_path, overrides)
    single = train_stage2(s2cfg(tmp_path / "single", data, *overrides))
    ddp = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert len(ddp["history"]) == len(single["history"])
    for h_ddp, h_one in zip(ddp["history"], single["history"]):
        assert h_ddp["train_loss"] == pytest.approx(h_one["train_loss"], rel=1e-4)
        assert h_ddp["val_loss"] == pytest.approx(h_one["val_loss"], rel=1e-4)
    return ddp, torch.load(tmp_path / "single" / "ckpt" / "last.pt", weights_only=True)


def torchrun_two_ranks(data: Path, tmp_path: Path, overrides: list[str]) -> None:
    """Stage 2 under torchrun with 2 CPU processes (gloo), checkpoints in ``tmp_path / "ddp"``; both ranks must
    finish with identical weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [
            str(Path(sys.executable).with_name("torchrun")),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "villa.stage2",
            f"data_dir={data}",
            f"checkpoint_dir={tmp_path / 'ddp'}",
            *TINY,
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    sums = re.findall(r"rank (\d)/2 finished: trainable parameter checksum (\S+)", r.stdout + r.stderr)
    assert sorted(s[0] for s in sums) == ["0", "1"]
    assert sums[0][1] == sums[1][1]  # identical weights on both ranks


@pytest.mark.parametrize("mode", ["one_to_one", "pretrain"])
def test_ddp_gloo_matches_single_process(tiny_docmnist, tmp_path, mode):
    """torchrun, 2 CPU processes (gloo): runs, ranks end with identical weights, and the losses, weights and
    optimiser moments match a single process on the same global batch. ``pretrain`` trains both towers and the
    learnable temperature, whose gradient must not be multiplied by the world size (Adam's update hides such a
    factor; its first moment does not)."""
    data = _even_subset(tiny_docmnist, tmp_path / "data")
    common = [f"objective={mode}", "batch_size=16", "epochs=2", "lr=1e-3", "model.freeze_bn=true", "seed=5"]
    if mode == "pretrain":
        common += ["learn_temperature=true", "optimizer=adamw", "weight_decay_all=false", "pretrain.crop=none"]
    ddp, one = ddp_and_single(data, tmp_path, common)
    # pretrain: undecayed AdamW turns the rounding noise of near-zero gradients (key biases, whose gradient is 0 in
    # exact arithmetic) into steps of up to lr; the gradients themselves are compared tightly through exp_avg below
    atol = 2e-3 if mode == "pretrain" else 1e-4
    for k, v in one["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][k], v, rtol=1e-3, atol=atol, msg=k)
    assert ddp["optimizer"]["state"].keys() == one["optimizer"]["state"].keys()
    for i, st in one["optimizer"]["state"].items():
        torch.testing.assert_close(ddp["optimizer"]["state"][i]["exp_avg"], st["exp_avg"], rtol=1e-2, atol=1e-6)
    if mode == "pretrain":
        assert one["state_dict"]["logit_scale"] != math.log(1 / 0.07)  # the temperature did train


def test_content_crop_boxes(tiny_docmnist):
    from villa.data.annotations import load_annotations
    from villa.data.vocab import load_vocab
    from villa.stage2.objectives.pretrain import content_boxes, jitter_boxes

    ann = load_annotations(tiny_docmnist, load_vocab("docmnist"), check_images=False)
    cb = content_boxes(ann)
    for i in range(20):
        b = ann.boxes[ann.region_offsets[i] : ann.region_offsets[i + 1]]
        np.testing.assert_array_equal(cb[i], [b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()])
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[28.0, 28, 56, 56], [0, 0, 28, 28]])
    j = jitter_boxes(boxes, torch.tensor([[84, 84], [84, 84]]), 10.0, g)
    assert (j[:, :2] <= boxes[:, :2]).all() and (j[:, 2:] >= boxes[:, 2:]).all()  # the content stays inside
    assert (j >= 0).all() and (j <= 83).all() and (j[0, :2] >= 18).all()


def test_export_is_compact_and_loads(tiny_docmnist, tmp_path):
    from villa.export import export_checkpoint

    res = train_stage2(
        s2cfg(tmp_path, tiny_docmnist, "experiment=pretrain", "model.name=villa-tiny-rn", "epochs=1", "batch_size=32")
    )
    src = Path(res["best_checkpoint"])
    dst = export_checkpoint(src, tmp_path / "small.pt")
    assert dst.stat().st_size < src.stat().st_size / 2
    state = torch.load(dst, weights_only=True)
    assert "optimizer" not in state and state["kind"] == "villa-stage2-pretrain"
    a, b = create_clip("auto", str(src)), create_clip("auto", str(dst))
    x, boxes, owner = torch.rand(2, 3, 84, 84), torch.tensor([[0, 0, 83, 83], [0, 0, 28, 28.0]]), torch.tensor([0, 1])
    with torch.no_grad():
        za, zb = RegionEncoder(a.model.visual)(x, boxes, owner), RegionEncoder(b.model.visual)(x, boxes, owner)
    assert F.cosine_similarity(za, zb).min() > 0.999  # fp16 weights


def test_loss_average_per_batch_is_the_originals():
    from villa.core.engine import LossMeter

    batch, image = LossMeter("batch"), LossMeter("image")
    for loss, n in ((2.0, 32), (4.0, 8)):
        batch.add(loss, n)
        image.add(loss, n)
    assert batch.mean == 3.0 and image.mean == pytest.approx((2 * 32 + 4 * 8) / 40)
    with pytest.raises(VillaError, match="loss_average='mean'"):
        LossMeter("mean")


def test_train_loader_drops_the_last_partial_batch(tiny_docmnist, tmp_path):
    from villa.core.distributed import Dist
    from villa.stage2.pairs import make_loader

    cfg = s2cfg(tmp_path, tiny_docmnist, "objective=one_to_one", "batch_size=32")
    clip = create_clip("villa-tiny-rn", None)
    _, train, val = pair_data(cfg, clip, get_runtime("cpu"), Dist())
    assert len(train.rows) % 32 and len(val.rows) % 32  # both have a partial last batch
    tl, _ = make_loader(train, cfg, Dist(), train=True)
    vl, _ = make_loader(val, cfg, Dist(), train=False)
    assert len(tl) == len(train.rows) // 32 and len(vl) == -(-len(val.rows) // 32)
    cfg.drop_last = False
    assert len(make_loader(train, cfg, Dist(), train=True)[0]) == -(-len(train.rows) // 32)
    cfg.drop_last, cfg.batch_size = True, 10_000
    with pytest.raises(VillaError, match="fewer than one batch .*lower batch_size or set drop_last=false"):
        make_loader(train, cfg, Dist(), train=True)


def test_pretraining_does_not_decay_gains_biases_temperature_embeddings(tiny_docmnist, tmp_path):
    from villa.stage2.model import Stage2Model
    from villa.stage2.objectives import build_objective
    from villa.stage2.optim import build_optimizer

    def groups(*over):
        cfg = s2cfg(tmp_path, tiny_docmnist, *over)
        model = Stage2Model(create_clip("villa-tiny-rn", None), cfg, build_objective(cfg))
        names = {id(p): n for n, p in model.named_parameters()}
        opt = build_optimizer(cfg, model, model.objective[0])
        return {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}

    pre = groups("experiment=pretrain", "model.name=villa-tiny-rn")
    assert set(pre) == {0.1, 0.0}
    assert {
        "clip.logit_scale",
        "clip.token_embedding.weight",
        "clip.positional_embedding",
        "clip.ln_final.weight",
        "clip.visual.bn1.weight",
        "clip.visual.attnpool.positional_embedding",
    } <= pre[0.0]
    assert "clip.visual.conv1.weight" in pre[0.1] and "clip.text_projection" in pre[0.1]
    assert not any(n.endswith(".bias") for n in pre[0.1])
    orig = groups("objective=one_to_one")  # the original's: Adam decays every trainable parameter
    assert set(orig) == {0.2} and "clip.visual.bn1.bias" in orig[0.2]


def test_a_fifth_objective_is_one_file_and_one_config(tiny_docmnist, tiny_mapping, tmp_path, monkeypatch):
    """The example of docs/stage2.md: a new objective in a module of its own, named by objective=, trains through
    the one loop (checkpoint, resume, history); its loss is the text-to-region direction alone."""
    code = re.search(r"```python\n# my_objectives.py\n(.*?)```", (ROOT / "docs" / "stage2.md").read_text(), re.S)
    (tmp_path / "my_objectives.py").write_text(code.group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = s2cfg(
        tmp_path,
        tiny_docmnist,
        "objective=my_objectives.TextToRegion",
        "epochs=1",
        "batch_size=16",
        "model.freeze_bn=true",
        mapping=tiny_mapping,
    )
    res = train_stage2(cfg)
    state = torch.load(tmp_path / "ckpt" / "last.pt", map_location="cpu", weights_only=True)
    assert res["objective"] == "text_to_region" and state["kind"] == "villa-stage2-text_to_region"
    assert res["epochs_run"] == 1 and np.isfinite(res["history"][0]["train_loss"])
    from my_objectives import TextToRegion

    from villa.data.vocab import load_vocab

    objective = TextToRegion(cfg, load_vocab("docmnist"))
    img, txt = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    one_way = objective.contrast(img, txt, torch.tensor(10.0))
    both = infonce(img, txt, torch.tensor(10.0))
    logits = 10.0 * txt @ img.t()
    assert one_way == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.arange(3))))
    assert float(one_way) != pytest.approx(float(both))  # not the symmetric loss
    with pytest.raises(VillaError, match="objective='no_such.Thing' is neither one of villa, one_to_one"):
        train_stage2(s2cfg(tmp_path, tiny_docmnist, "objective=no_such.Thing"))
