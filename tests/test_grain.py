"""GRAIN-style mode: Hungarian matching and box losses on hand-computed cases, query-permutation invariance, a tiny
run that trains, resumes to identical weights and evaluates with both readouts, and DDP against one process."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_stage2 import _even_subset, ddp_and_single, s2cfg

from villa.core.errors import VillaError
from villa.models.grain_head import (
    GrainHead,
    GrainSpec,
    box_loss_sums,
    hungarian_match,
    image_tokens,
    normalized_targets,
    permute_queries,
    sine_positions,
)
from villa.stage2.objectives.grain import grain_losses
from villa.stage2.train import train_stage2


def _giou(a, b):
    """Generalised IoU of two xyxy boxes, by hand, as GRAIN's box_ops computes it (1e-4 added to the IoU's union)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / (union + 1e-4) - (hull - union) / hull


def _xyxy(c):
    cx, cy, w, h = c
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def test_hungarian_match_and_box_loss_by_hand():
    # image 0: 3 queries, 2 targets; the cheap assignment is crossed (query 2 -> target 0, query 0 -> target 1)
    pred = torch.tensor([[[0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9], [0.2, 0.2, 0.2, 0.2]]])
    target = torch.tensor([[0.25, 0.2, 0.2, 0.2], [0.7, 0.75, 0.2, 0.1]])
    img, qry, tgt = hungarian_match(pred, target, torch.tensor([0, 0]), 1)
    # all 6 assignments of 2 targets to distinct queries, costs by hand: 5 L1 - 2 GIoU
    cost = [
        [
            5 * sum(abs(p - t) for p, t in zip(pred[0, q].tolist(), target[j].tolist()))
            - 2 * _giou(_xyxy(pred[0, q].tolist()), _xyxy(target[j].tolist()))
            for j in range(2)
        ]
        for q in range(3)
    ]
    best = min(
        ((q0, q1) for q0 in range(3) for q1 in range(3) if q0 != q1), key=lambda p: cost[p[0]][0] + cost[p[1]][1]
    )
    assert best == (2, 0)
    assert img.tolist() == [0, 0] and sorted(zip(tgt.tolist(), qry.tolist())) == [(0, 2), (1, 0)]
    l1, giou = box_loss_sums(pred, target, (img, qry, tgt))
    want_l1 = sum(abs(p - t) for q, j in ((2, 0), (0, 1)) for p, t in zip(pred[0, q].tolist(), target[j].tolist()))
    want_giou = sum(1 - _giou(_xyxy(pred[0, q].tolist()), _xyxy(target[j].tolist())) for q, j in ((2, 0), (0, 1)))
    assert l1.item() == pytest.approx(want_l1, rel=1e-6) and giou.item() == pytest.approx(want_giou, rel=1e-5)


def test_match_per_image_and_more_targets_than_queries():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(3, 2, 4, generator=g) * 0.5 + 0.25
    target = torch.rand(4, 4, generator=g) * 0.5 + 0.25
    target_image = torch.tensor([0, 2, 2, 2])  # image 1 has none, image 2 more targets than queries
    img, qry, tgt = hungarian_match(pred, target, target_image, 3)
    assert (target_image[tgt] == img).all()  # never across images
    assert (img == 0).sum() == 1 and (img == 2).sum() == 2 and (img == 1).sum() == 0
    assert len({(i, q) for i, q in zip(img.tolist(), qry.tolist())}) == len(img)  # each query at most once


def test_query_permutation_leaves_the_loss_unchanged():
    g = torch.Generator().manual_seed(1)
    layers, b, q, e = 2, 3, 5, 8
    boxes = torch.rand(layers, b, q, 4, generator=g) * 0.5 + 0.25
    region = torch.randn(b, q, e, generator=g)
    target = normalized_targets(
        torch.tensor([[0, 0, 28, 28], [28, 0, 56, 28], [0, 28, 28, 56.0], [56, 56, 84, 84]]), 84, 84
    )
    target_image = torch.tensor([0, 0, 1, 2])
    desc = F.normalize(torch.randn(4, e, generator=g), dim=-1)
    args = (target, target_image, desc, 0, torch.tensor(1 / 0.07), torch.tensor(4.0))
    ref = grain_losses(boxes, region, *args)
    perm = torch.randperm(q, generator=g)
    out = grain_losses(*permute_queries(boxes, region, perm), *args)
    for k in ("rd_sum", "matched", "l1", "giou"):
        assert out[k].item() == pytest.approx(ref[k].item(), rel=1e-6), k
    assert ref["l1"] > 0 and ref["rd_sum"] > 0 and ref["matched"] == 4
    every = grain_losses(boxes, region, *args, aux=True)  # the auxiliary sum adds the first layer's terms
    first = grain_losses(boxes[:1], region, *args)
    assert every["l1"].item() == pytest.approx(ref["l1"].item() + first["l1"].item(), rel=1e-6)


def test_head_shapes_and_tokens():
    from villa.models.clip import create_clip

    clip = create_clip("villa-tiny-rn", None)
    feat, positions = image_tokens(clip.model.visual, torch.rand(2, 3, 84, 84))
    assert positions and feat.dim() == 4
    head = GrainHead(GrainSpec(feat.shape[1], clip.embed_dim, queries=4, width=32, heads=4, layers=2, ffn=64))
    boxes, region, image = head(feat, positions)
    assert boxes.shape == (2, 2, 4, 4) and region.shape == (2, 4, clip.embed_dim) and image.shape == (2, clip.embed_dim)
    assert ((boxes > 0) & (boxes < 1)).all()
    with pytest.raises(VillaError, match="grain.width=30 must be a multiple of grain.heads=4"):
        GrainHead(GrainSpec(feat.shape[1], clip.embed_dim, width=30, heads=4))
    pos = sine_positions(3, 2, 8, torch.device("cpu"))
    assert pos.shape == (6, 8) and not torch.equal(pos[0], pos[1]) and not torch.equal(pos[0], pos[2])


def test_vit_tokens_through_forward_intermediates():
    """A ViT tower gives its last block's patch tokens (no class token, no added position code)."""
    from open_clip.transformer import VisionTransformer

    from villa.models.grain_head import tower_width

    vit = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2.0, output_dim=16)
    feat, positions = image_tokens(vit, torch.rand(2, 3, 32, 32))
    assert feat.shape == (2, 16, 32) and not positions and tower_width(vit) == 32
    head = GrainHead(GrainSpec(32, 16, queries=3, width=32, heads=4, layers=1, ffn=64))
    boxes, region, image = head(feat, positions)
    assert boxes.shape == (1, 2, 3, 4) and region.shape == (2, 3, 16) and image.shape == (2, 16)


def _grain_cfg(tmp, data, *extra):
    return s2cfg(
        tmp,
        data,
        "objective=grain",
        "grain.boxes=gold",
        "batch_size=16",
        "grain.queries=9",
        "grain.width=32",
        "grain.heads=4",
        "grain.layers=2",
        "grain.ffn=64",
        *extra,
    )


def test_grain_trains_resumes_and_evaluates(tiny_docmnist, tmp_path):
    from villa.core.runtime import get_runtime, seed_everything
    from villa.data.annotations import load_annotations
    from villa.data.vocab import load_vocab
    from villa.evaluate.retrieval import evaluate_model, region_options
    from villa.models.clip import create_clip

    full = train_stage2(_grain_cfg(tmp_path / "full", tiny_docmnist, "epochs=2"))
    assert full["epochs_run"] == 2 and all(math.isfinite(h["train_loss"]) for h in full["history"])
    train_stage2(_grain_cfg(tmp_path / "half", tiny_docmnist, "epochs=1"))
    resumed = train_stage2(_grain_cfg(tmp_path / "half", tiny_docmnist, "epochs=2"))
    assert resumed["checksum"] == full["checksum"]
    a = torch.load(tmp_path / "full" / "ckpt" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "half" / "ckpt" / "last.pt", weights_only=True)
    for k, v in a["grain_state"].items():
        assert torch.equal(v, b["grain_state"][k]), k
    assert a["grain"]["queries"] == 9 and a["history"][1]["val_loss"] == b["history"][1]["val_loss"]
    # CLIP's attention pool is not reached by GRAIN's objective: it stays as it started
    seed_everything(23)  # the run's seed, before its model is built: the same random init
    start = create_clip("villa-tiny-rn", None).model.state_dict()
    assert torch.equal(a["state_dict"]["visual.attnpool.c_proj.weight"], start["visual.attnpool.c_proj.weight"])
    vocab = load_vocab("docmnist")
    ann = load_annotations(tiny_docmnist, vocab, required_splits=("test",))
    ckpt = str(tmp_path / "full" / "ckpt" / "best.pt")
    clip = create_clip("auto", ckpt)
    rt = get_runtime("cpu")
    opts = region_options(ckpt, None, None)
    roi = evaluate_model(clip, ann, vocab, "test", rt, opts, num_workers=0)
    query = evaluate_model(clip, ann, vocab, "test", rt, opts, num_workers=0, readout="query")
    assert roi["regions"] == query["regions"] == int(ann.n_regions[ann.split == "test"].sum())
    assert query["readout"] == "query" and 0 <= query["boxes"]["mean_iou"] <= 1
    assert query["boxes"]["matched"] == 1.0  # 9 queries: every region has one
    assert query["text_to_region"]["r_precision"] != roi["text_to_region"]["r_precision"]
    with pytest.raises(VillaError, match="readout=query needs a objective=grain checkpoint"):
        evaluate_model(create_clip("villa-tiny-rn", None), ann, vocab, "test", rt, opts, num_workers=0, readout="query")
    # the global readout of the fine-grained benchmarks: GRAIN's image query, as its L_ic trained it
    from PIL import Image

    from villa.evaluate.finegrained.scorer import Scorer
    from villa.models.grain_head import GrainHead, GrainSpec, image_tokens

    scorer = Scorer(clip, rt)
    assert scorer.mode == "grain_query"
    files = [tiny_docmnist / f for f in ann.filepath[:2]]
    scorer.embed_images(["a", "b"], files)
    head = GrainHead(GrainSpec(**a["grain"]))
    head.load_state_dict(torch.load(ckpt, weights_only=True)["grain_state"])
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1) for f in files])
    with torch.no_grad():
        z = head.eval()(*image_tokens(clip.model.visual, scorer.region_encoder.prepare(x.float() / 255)))[2]
    torch.testing.assert_close(scorer.images(["a", "b"]), F.normalize(z, dim=-1))


def test_head_learning_rate_is_its_own_group(tiny_docmnist, tmp_path):
    from villa.models.clip import create_clip
    from villa.stage2.model import Stage2Model
    from villa.stage2.objectives import build_objective
    from villa.stage2.optim import build_optimizer

    cfg = _grain_cfg(tmp_path, tiny_docmnist, "grain.head_lr=0.01", "lr=0.0002", "grain.optimizer=trainer")
    objective = build_objective(cfg)
    model = Stage2Model(create_clip("villa-tiny-rn", None), cfg, objective)
    opt = build_optimizer(cfg, model, objective)
    head = {id(p) for p in model.head.parameters()}
    lrs = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert set(lrs) == {0.0002, 0.01} and lrs[0.01] == head and not (lrs[0.0002] & head)
    assert not any(p.requires_grad for p in model.clip.visual.attnpool.parameters())
    assert objective.optimizers(model, 10) == ({}, {})


def test_head_optimiser_and_schedule_are_grains(tiny_docmnist, tmp_path):
    """grain.optimizer=grain (default): GRAIN's AdamW (betas 0.9/0.98, decay 0.1 but not on biases and norms) in its
    own optimiser, one warm-up epoch from 1e-6 to the head's lr, then a cosine to 1e-5 at the epoch cap (GRAIN's
    cosine_scheduler, computed here as its code does)."""
    import numpy as np

    from villa.models.clip import create_clip
    from villa.stage2.model import Stage2Model
    from villa.stage2.objectives import build_objective
    from villa.stage2.optim import build_optimizer

    cfg = _grain_cfg(tmp_path, tiny_docmnist, "lr=0.0002", "epochs=4", "grain.image_embedding=attnpool")
    objective = build_objective(cfg)
    model = Stage2Model(create_clip("villa-tiny-rn", None), cfg, objective)
    head = {id(p) for p in model.head.parameters()}
    tower = build_optimizer(cfg, model, objective)
    assert not any(id(p) in head for g in tower.param_groups for p in g["params"])
    assert all(p.requires_grad for p in model.clip.visual.attnpool.parameters())  # image_embedding=attnpool
    boxes, region, image, _ = model(torch.rand(2, 3, 84, 84), None, None, None)
    assert boxes.shape[1:] == (2, 9, 4) and region.shape[:2] == (2, 9) and image.shape == (2, region.shape[-1])
    image.square().sum().backward()  # the image side of L_ic now reaches CLIP's attention pool
    assert model.clip.visual.attnpool.c_proj.weight.grad.abs().sum() > 0
    opts, schedules = objective.optimizers(model, steps_per_epoch=5)
    opt, sched = opts["head_optimizer"], schedules["head_scheduler"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.98)
    decay = {g["weight_decay"]: g["params"] for g in opt.param_groups}
    assert set(decay) == {0.0, 0.1} and all(p.ndim >= 2 for p in decay[0.1])
    assert {id(p) for ps in decay.values() for p in ps} == head
    biases = [p for n, p in model.head.named_parameters() if n.endswith("bias")]
    assert biases and all(any(p is q for q in decay[0.0]) for p in biases)
    warm = np.linspace(1e-6, 1e-3, 5)  # GRAIN's utils/train_utils.py cosine_scheduler, 4 epochs of 5 steps
    iters = np.arange(20 - 5)
    want = np.concatenate([warm, 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + np.cos(np.pi * iters / len(iters)))])
    got = []
    for _ in range(20):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_grain_on_the_mapping_needs_the_mapping(tiny_docmnist, tmp_path):
    with pytest.raises(VillaError, match="mapping not found"):
        train_stage2(s2cfg(tmp_path, tiny_docmnist, "objective=grain", f"mapping_path={tmp_path / 'none.feather'}"))


def test_grain_ddp_gloo_matches_single_process(tiny_docmnist, tmp_path):
    """2 gloo processes against one process on the same global batch: losses and weights match (the box and
    region-description losses are local sums over a global count; the caption loss gathers features)."""
    data = _even_subset(tiny_docmnist, tmp_path / "data")
    common = [
        "objective=grain",
        "grain.boxes=gold",
        "batch_size=16",
        "epochs=2",
        "lr=1e-3",
        "model.freeze_bn=true",
        "seed=5",
        "grain.queries=9",
        "grain.width=32",
        "grain.heads=4",
        "grain.layers=2",
        "grain.ffn=64",
        "grain.dropout=0",
    ]
    ddp, one = ddp_and_single(data, tmp_path, common)
    for k, v in one["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][k], v, rtol=1e-3, atol=1e-4, msg=k)
    width = one["grain"]["width"]
    for k, v in one["grain_state"].items():
        a = ddp["grain_state"][k]
        if k.endswith("self_attn.in_proj_bias") or k.endswith("multihead_attn.in_proj_bias"):
            # the key bias has no gradient in exact arithmetic (softmax ignores a shift of every key); Adam turns
            # its rounding noise into steps of up to lr, so it is compared through the optimiser moments below
            a, v = torch.cat([a[:width], a[2 * width :]]), torch.cat([v[:width], v[2 * width :]])
        torch.testing.assert_close(a, v, rtol=1e-3, atol=1e-4, msg=k)
    for i, st in one["optimizer"]["state"].items():  # (key biases: rounding noise of a zero gradient, ~2e-6)
        torch.testing.assert_close(ddp["optimizer"]["state"][i]["exp_avg"], st["exp_avg"], rtol=1e-2, atol=1e-5)
    assert np.isfinite(one["best_val"])


def test_grain_fidelity_replays_grain_code_and_catches_a_changed_weight(tmp_path):
    """fidelity/grain_losses.py holds villa's GRAIN objective, built by Stage 2's config, against the losses GRAIN's
    own code computed on the recorded inputs (docs/results/grain_fidelity): they match, the committed results file
    reproduces, and a deliberately changed weight makes the check fail."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    folder = root / "docs" / "results" / "grain_fidelity"

    def replay(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "fidelity.grain_losses",
                "--reference",
                str(folder / "reference.pt"),
                "--json",
                str(tmp_path / "r.json"),
                *overrides,
            ],
            capture_output=True,
            text=True,
            cwd=root,
        )

    r = replay()
    assert r.returncode == 0, r.stderr[-2000:]
    got, committed = (json.loads(p.read_text()) for p in (tmp_path / "r.json", folder / "results.json"))
    drop = ("command", "seconds")
    assert {k: v for k, v in got.items() if k not in drop} == {k: v for k, v in committed.items() if k not in drop}
    assert committed["match"] and committed["identical_assignments"] == committed["trials"] >= 50
    for override, term in (
        ("grain.box_scale=1.0", "l_box"),
        ("grain.rd_weight=2.0", "l_rd"),
        ("grain.aux_loss=true", "l_box"),
    ):
        r = replay(override)
        assert r.returncode == 1 and f"differs from GRAIN's code in {term}" in r.stderr, (override, r.stderr[-500:])
