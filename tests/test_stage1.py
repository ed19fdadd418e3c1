"""Stage 1: batched heads, the original's loss, the mapping rule, mapping.feather, quality, resume, bad input."""

from __future__ import annotations

import json
import math
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

from villa.core.errors import VillaError
from villa.data.vocab import load_vocab
from villa.models.projection import MultiHeadProjection, separate_heads
from villa.stage1.loss import stage1_loss
from villa.stage1.mapping import assign, assign_text
from villa.stage1.train import train_stage1

ROOT = Path(__file__).resolve().parent.parent
VOCAB = load_vocab("docmnist")


def stage1_cfg(data: Path, emb: Path, tmp: Path, *extra: str):
    return compose_config(
        "stage1",
        [
            "experiment=docmnist_stage1",
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


@pytest.mark.parametrize("kernel", ["bmm", "loop", "auto"])
def test_heads_equal_separate_heads(kernel):
    """Either kernel (one batched matmul, or one GEMM per head) computes the original's separate heads."""
    torch.manual_seed(0)
    heads = separate_heads(16, 5)
    x = torch.randn(7, 16)
    e = torch.randn(5, 16)
    for adapter in (False, True):
        m = MultiHeadProjection.from_heads(list(heads), adapter=adapter)
        m.kernel = kernel
        assert m.uses_loop(x) == (kernel != "bmm")  # auto on CPU: the loop
        out = m(x)
        ref = torch.stack([h(x) for h in heads])
        if adapter:
            ref = 0.2 * ref + 0.8 * x
        assert out.shape == (5, 7, 16)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        ref_scores = torch.stack([F.normalize(ref[a], dim=-1) @ F.normalize(e[a], dim=0) for a in range(5)], 1)
        torch.testing.assert_close(m.scores(x, e), ref_scores, rtol=1e-5, atol=1e-6)
        if kernel == "loop" and not adapter:
            torch.testing.assert_close(out, ref, rtol=0, atol=0)  # nn.Linear's own computation
    torch.testing.assert_close(m(x, heads=torch.tensor([3, 1])), m(x)[[3, 1]])
    loss = m.scores(x, e).sum()
    loss.backward()
    assert m.w1.grad is not None and m.w1.grad.abs().sum() > 0


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="kernel='gemm'"):
        MultiHeadProjection(8, 2, kernel="gemm")


def test_one_proj_shares_a_head():
    m = MultiHeadProjection(8, 4, one_proj=True)
    assert m.w1.shape == (1, 8, 8)
    out = m(torch.randn(3, 8))
    assert out.shape == (4, 3, 8) and torch.equal(out[0], out[3])


def _loss_by_hand(scores, region_image, attrs, t, original):
    b, a = attrs.shape
    s = torch.full((b, a), -math.inf)
    for r, i in enumerate(region_image.tolist()):
        s[i] = torch.maximum(s[i], scores[r] / t)
    terms = []
    for k in range(a):
        pos = [i for i in range(b) if attrs[i, k]]
        neg = [j for j in range(b) if not attrs[j, k]]
        for i in pos:
            den = math.exp(s[i, k]) + sum(math.exp(s[j, k]) for j in neg) + (len(pos) if original else 0)
            terms.append(-math.log(math.exp(s[i, k]) / den))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("original", [True, False])
def test_loss_matches_hand_computation(original):
    g = torch.Generator().manual_seed(1)
    region_image = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    scores = torch.rand(7, 5, generator=g) * 2 - 1
    attrs = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 0, 0], [1, 1, 0, 0, 1], [0, 0, 1, 0, 1]], dtype=torch.bool)
    got = stage1_loss(scores, region_image, attrs, 0.07, original=original)
    assert got.item() == pytest.approx(_loss_by_hand(scores, region_image, attrs, 0.07, original), rel=1e-5)


@pytest.mark.parametrize(
    "kernel,one_proj,adapter",
    [("loop", False, False), ("bmm", False, False), ("loop", False, True), ("bmm", True, False)],
)
def test_sparse_backward_equals_full_backward(kernel, one_proj, adapter):
    """image_scores (autograd through each image's best region per head) gives segment_max's value and gradient,
    also where an image's best region is tied with its copy (a repeated embedding) and for a subset of heads."""
    from villa.stage1.loss import image_loss, segment_max

    g = torch.Generator().manual_seed(3)
    d, a, counts = 16, 6, torch.tensor([3, 5, 2, 4])
    ri = torch.repeat_interleave(torch.arange(4), counts)
    x = torch.randn(len(ri), d, generator=g)
    x[4] = x[3]  # image 1's first two regions are the same embedding: tied scores under every head
    emb = torch.randn(a, d, generator=g)
    attrs = torch.rand(4, a, generator=g) < 0.5
    attrs[:, 0] = False  # an attribute no image has: its head is left out
    attrs[0, 1] = attrs[1, 2] = True
    heads = attrs.any(0).nonzero().squeeze(1)
    m = MultiHeadProjection(d, a, one_proj=one_proj, adapter=adapter, kernel=kernel)
    grads = []
    for sparse in (False, True):
        m.zero_grad()
        if sparse:
            best = m.image_scores(x, emb, ri, 4, heads)
        else:
            best = segment_max(m.scores(x, emb, heads), ri, 4)
        loss = image_loss(best, attrs[:, heads])
        loss.backward()
        grads.append((best.detach(), loss.detach(), [p.grad.clone() for p in m.parameters()]))
    (b0, l0, g0), (b1, l1, g1) = grads
    torch.testing.assert_close(b1, b0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    for full, sparse in zip(g0, g1):
        torch.testing.assert_close(sparse, full, rtol=1e-5, atol=1e-6)  # float rounding: summed in another order
    assert float(g0[0].abs().sum()) > 0
    if not one_proj:
        assert float(g0[0][0].abs().sum()) == 0  # the left-out head gets no gradient either way
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast (precision=bf16) the heads run in bf16
        low = m.image_scores(x, emb, ri, 4, heads)
    low.float().sum().backward()
    torch.testing.assert_close(low.float(), b0, rtol=0, atol=0.05)
    # the loss of the full (R, A) scores is the same number: leaving out heads no image has changes nothing
    all_heads = stage1_loss(m.scores(x, emb), ri, attrs)
    torch.testing.assert_close(all_heads.detach(), l0, rtol=1e-6, atol=1e-6)


def test_original_denominator_adds_one_per_positive_image():
    """All scores 0: each (i, a) term is log(1 + #negatives) clean, log(1 + #negatives + #positives) original."""
    scores, ri = torch.zeros(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    attrs = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    ri = torch.tensor([0, 0, 1, 1, 2, 3])
    n_pos = attrs.sum(0).float()  # [3, 2, 2] positive images per attribute
    n_neg = 4 - n_pos
    terms_clean = torch.cat([torch.log(1 + n_neg[a]).repeat(int(n_pos[a])) for a in range(3)])
    terms_orig = torch.cat([torch.log(1 + n_neg[a] + n_pos[a]).repeat(int(n_pos[a])) for a in range(3)])
    assert stage1_loss(scores, ri, attrs, original=False).item() == pytest.approx(terms_clean.mean().item(), rel=1e-6)
    assert stage1_loss(scores, ri, attrs, original=True).item() == pytest.approx(terms_orig.mean().item(), rel=1e-6)


def test_assignment_rule():
    offsets = np.array([0, 3, 5])
    scores = np.array([[0.9, 0.1], [0.75, 0.5], [0.2, 0.45], [0.3, 0.9], [0.4, 0.2]], dtype=np.float32)
    attrs = np.array([[True, True], [False, True]])
    got = assign(scores, offsets, attrs, epsilon=0.2)
    expected = np.array([[1, 0], [1, 1], [0, 1], [0, 1], [0, 0]], dtype=bool)
    np.testing.assert_array_equal(got, expected)


def test_assign_text_picks_matching_sentences():
    texts = ["the color is red . the image is red . the number is a one . there is a circle"]
    assigned = np.zeros((2, len(VOCAB)), bool)
    assigned[0, [VOCAB.index["red"], VOCAB.index["one"]]] = True
    assigned[1, VOCAB.index["circle"]] = True
    picks = {assign_text(texts, np.array([0, 2]), assigned, VOCAB, np.random.default_rng(s))[0] for s in range(20)}
    assert picks == {"the number is a one . the color is red", "the number is a one . the image is red"}
    assert assign_text(texts, np.array([0, 2]), assigned, VOCAB, np.random.default_rng(0))[1] == "there is a circle"


def test_sentence_choice_per_image_is_shared_by_its_regions():
    """The original draws one sentence per (image, attribute) for every region given that attribute."""
    texts = ["the color is red . the image is red . the number is a one"]
    assigned = np.zeros((3, len(VOCAB)), bool)
    assigned[:2, VOCAB.index["red"]] = True
    assigned[2, VOCAB.index["one"]] = True
    off = np.array([0, 3])
    per_image = [assign_text(texts, off, assigned, VOCAB, np.random.default_rng(s), per="image") for s in range(30)]
    assert all(t[0] == t[1] for t in per_image) and {t[0] for t in per_image} == {
        "the color is red",
        "the image is red",
    }
    per_region = [assign_text(texts, off, assigned, VOCAB, np.random.default_rng(s), per="region") for s in range(30)]
    assert any(t[0] != t[1] for t in per_region) and all(t[2] == "the number is a one" for t in per_region)
    with pytest.raises(VillaError, match="sentence_choice='pixel'"):
        assign_text(texts, off, assigned, VOCAB, np.random.default_rng(0), per="pixel")


def test_image_batches_drop_last():
    from villa.data.batches import image_batches

    rows = np.arange(10)
    assert [len(b) for b in image_batches(rows, 4)] == [4, 4, 2]
    kept = list(image_batches(rows, 4, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True))
    assert [len(b) for b in kept] == [4, 4] and len(set(np.concatenate(kept))) == 8


def test_mapping_scores_fp32_unless_asked():
    """Scores for the mapping stay fp32 under a mixed-precision runtime (the original maps in fp32)."""
    from types import SimpleNamespace

    from villa.core.runtime import Runtime
    from villa.data.batches import RegionBank
    from villa.stage1.mapping import score_regions

    g = torch.Generator().manual_seed(0)
    regions = torch.randn(50, 32, generator=g).numpy()
    bank = RegionBank(SimpleNamespace(regions=regions, offsets=np.array([0, 50])), torch.device("cpu"))
    model = MultiHeadProjection(32, 4)
    attr = torch.randn(4, 32, generator=g)
    bf16 = Runtime(torch.device("cpu"), torch.bfloat16)
    ref = model.scores(torch.from_numpy(regions), attr).detach().numpy()
    fp32 = score_regions(bank, attr, bf16, model, chunk=16)
    low = score_regions(bank, attr, bf16, model, chunk=16, amp=True)
    np.testing.assert_allclose(fp32, ref, rtol=1e-5, atol=1e-6)
    assert np.abs(low - ref).max() > 1e-4  # what bf16 scoring changes


def test_stage1_learns_synthetic_mapping(synthetic_stage1, tmp_path):
    data, emb = synthetic_stage1
    metrics = train_stage1(stage1_cfg(data, emb, tmp_path, "epochs=8"))
    q = metrics["quality"]
    assert q["stage1"]["all"]["all"]["f1"] >= 0.95
    assert q["stage1"]["test"]["all"]["f1"] >= 0.95
    assert q["stage1"]["all"]["all"]["f1"] > q["zero_shot"]["all"]["all"]["f1"] + 0.3
    saved = json.loads((tmp_path / "mapping_quality.json").read_text())
    assert saved["quality"]["stage1"]["all"]["digit"]["f1"] == pytest.approx(q["stage1"]["all"]["digit"]["f1"])
    df = pd.read_feather(tmp_path / "mapping.feather")
    assert {"assigned_attributes", "assigned_text", "split", "reg_to_attr"} <= set(df.columns)
    assert set(df.split) == {"train", "val", "test"}
    for row in df.head(50).itertuples():
        assert len(row.assigned_attributes) == len(row.assigned_text) == row.num_regions
        caption = {s.strip() for s in row.text.split(".")}
        for attrs, text in zip(row.assigned_attributes, row.assigned_text):
            assert set(attrs) <= set(row.attributes)
            sentences = text.split(" . ") if len(attrs) else []
            assert len(sentences) == len(attrs) and set(sentences) <= caption
            for a, s in zip(attrs, sentences):
                assert a in s.split()
    lines = (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]  # val_every=5: a val loss at epochs 5 and 8 (the last)
    assert [r["epoch"] for r in recs] == list(range(1, 9)) and recs[-1]["train_loss"] < recs[0]["train_loss"]
    assert [r["epoch"] for r in recs if "val_loss" in r] == [5, 8] and recs[-1]["val_loss"] < recs[4]["val_loss"]


def test_resume_equals_uninterrupted(synthetic_stage1, tmp_path):
    data, emb = synthetic_stage1
    train_stage1(stage1_cfg(data, emb, tmp_path / "a", "epochs=3"))
    train_stage1(stage1_cfg(data, emb, tmp_path / "b", "epochs=1"))
    train_stage1(stage1_cfg(data, emb, tmp_path / "b", "epochs=3"))  # resumes from b/ckpt/last.pt
    a = torch.load(tmp_path / "a" / "ckpt" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
    assert a["config"]["epochs"] == 3 and a["encoder"]["model"] == "synthetic"


def test_resume_between_checkpoints_redoes_the_epochs_after_the_last(synthetic_stage1, tmp_path, monkeypatch):
    """checkpoint_every=2: a run that dies in epoch 3 resumes from epoch 2's last.pt, redoes epoch 3, and ends as the
    uninterrupted run (weights, metrics.jsonl); val_every=2 validates at epochs 2 and 4 only."""
    import villa.stage1.train as s1

    data, emb = synthetic_stage1
    opts = ("epochs=4", "checkpoint_every=2", "val_every=2")
    train_stage1(stage1_cfg(data, emb, tmp_path / "a", *opts))
    real, calls = s1.train_one_epoch, []

    def dies_in_epoch_3(run, epoch, tracker):
        calls.append(epoch)
        if epoch == 2:
            raise RuntimeError("killed")
        return real(run, epoch, tracker)

    monkeypatch.setattr(s1, "train_one_epoch", dies_in_epoch_3)
    with pytest.raises(RuntimeError, match="killed"):
        train_stage1(stage1_cfg(data, emb, tmp_path / "b", *opts))
    assert torch.load(tmp_path / "b" / "ckpt" / "last.pt", weights_only=True)["epoch"] == 2
    monkeypatch.setattr(s1, "train_one_epoch", real)
    train_stage1(stage1_cfg(data, emb, tmp_path / "b", *opts))
    assert calls == [0, 1, 2]
    a = torch.load(tmp_path / "a" / "ckpt" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    rec_a = [json.loads(x) for x in (tmp_path / "a" / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    rec_b = [json.loads(x) for x in (tmp_path / "b" / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rec_b] == [1, 2, 3, 4]
    assert [("val_loss" in r) for r in rec_a] == [False, True, False, True]
    for ra, rb in zip(rec_a, rec_b):
        assert ra["train_loss"] == rb["train_loss"] and ra.get("val_loss") == rb.get("val_loss")


def test_overrides_one_proj_and_adapter(synthetic_stage1, tmp_path):
    """The overrides reach the model and the loss: one shared head, the adapter's residual mix, the clean loss."""
    from villa.data.annotations import load_annotations
    from villa.data.batches import RegionBank, image_batches
    from villa.data.embeddings import open_embeddings

    data, emb = synthetic_stage1
    cfg = stage1_cfg(
        data, emb, tmp_path, "epochs=1", "model.one_proj=true", "model.adapter=true", "original_loss=false"
    )
    train_stage1(cfg)
    state = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert state["model"]["w1"].shape[0] == 1 and state["model_args"] == {
        **state["model_args"],
        "one_proj": True,
        "adapter": True,
    }
    m = MultiHeadProjection(**state["model_args"])
    m.load_state_dict(state["model"])
    plain = MultiHeadProjection(state["model_args"]["dim"], state["model_args"]["n_heads"], one_proj=True)
    plain.load_state_dict(state["model"])
    x = torch.randn(5, state["model_args"]["dim"])
    with torch.no_grad():
        out, head = m(x), plain(x)
    torch.testing.assert_close(out, 0.2 * head + 0.8 * x[None].expand_as(head))
    assert torch.equal(out[0], out[-1])
    # the recorded val loss is the clean loss (original_loss=false), not the original's
    ann = load_annotations(data, VOCAB, check_images=False)
    e = open_embeddings(emb, VOCAB)
    bank, attrs = RegionBank(e, torch.device("cpu")), torch.from_numpy(ann.attribute_matrix(len(VOCAB)))
    attr_emb = torch.from_numpy(e.attributes)
    losses = {True: [], False: []}
    with torch.no_grad():
        for batch in image_batches(np.flatnonzero(ann.split == "val"), 16):
            xb, ri = bank.gather(batch)
            for orig in losses:
                losses[orig].append(
                    stage1_loss(m.scores(xb, attr_emb), ri, attrs[batch], 0.07, original=orig).item() * len(batch)
                )
    n = int((ann.split == "val").sum())
    val = json.loads((tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()[0])["val_loss"]
    assert val == pytest.approx(sum(losses[False]) / n, rel=1e-5) and val != pytest.approx(
        sum(losses[True]) / n, rel=1e-3
    )


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_inputs(synthetic_stage1, tmp_path):
    data, emb = synthetic_stage1
    with pytest.raises(VillaError, match="embeddings folder not found"):
        train_stage1(stage1_cfg(data, tmp_path / "none", tmp_path, "epochs=1"))
    mixed = _copy(emb, tmp_path / "mixed")
    meta = json.loads((mixed / "meta.json").read_text())
    meta["attribute_encoder"]["model"] = "RN50"
    (mixed / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(VillaError, match="attribute embeddings from RN50"):
        train_stage1(stage1_cfg(data, mixed, tmp_path, "epochs=1"))
    d2 = _copy(data, tmp_path / "noval")
    df = pd.read_feather(d2 / "annotations.feather")
    df[df.split != "val"].reset_index(drop=True).to_feather(d2 / "annotations.feather")
    with pytest.raises(VillaError, match="split 'val' is empty"):
        train_stage1(stage1_cfg(d2, emb, tmp_path, "epochs=1"))
    d3 = _copy(data, tmp_path / "unknown")
    df = pd.read_feather(d3 / "annotations.feather")
    df.at[0, "attributes"] = ["mauve"]
    df.to_feather(d3 / "annotations.feather")
    with pytest.raises(VillaError, match="unknown attribute 'mauve'"):
        train_stage1(stage1_cfg(d3, emb, tmp_path, "epochs=1"))


def test_cli_reports_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "villa.stage1", f"data_dir={tmp_path / 'missing'}", "device=cpu"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: dataset folder not found")


def test_scores_are_cosines():
    m = MultiHeadProjection(8, 3)
    x, e = torch.randn(5, 8), torch.randn(3, 8)
    s = m.scores(x, e)
    ref = torch.stack([F.cosine_similarity(m(x)[a], e[a][None], dim=-1) for a in range(3)], 1)
    torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-6)


def test_mapping_scores_only_caption_pairs(synthetic_stage1):
    """Scoring only each region's caption attributes gives the same scores there, and the same assignment."""
    from villa.core.runtime import get_runtime
    from villa.data.annotations import load_annotations
    from villa.data.batches import RegionBank
    from villa.data.embeddings import open_embeddings
    from villa.stage1.mapping import score_regions

    data, emb_dir = synthetic_stage1
    ann = load_annotations(data, VOCAB, check_images=False)
    e = open_embeddings(emb_dir, VOCAB)
    rt = get_runtime("cpu")
    torch.manual_seed(0)
    model = MultiHeadProjection(e.dim, len(VOCAB))
    bank, attr = RegionBank(e, rt.device), torch.from_numpy(e.attributes)
    image_attrs = ann.attribute_matrix(len(VOCAB))
    pairs = image_attrs[np.repeat(np.arange(ann.n_images), ann.n_regions)]
    full = score_regions(bank, attr, rt, model, chunk=500)
    part = score_regions(bank, attr, rt, model, chunk=500, pairs=pairs)
    assert pairs.mean() < 0.8 and np.isneginf(part[~pairs]).all()
    np.testing.assert_allclose(part[pairs], full[pairs], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        assign(part, ann.region_offsets, image_attrs), assign(full, ann.region_offsets, image_attrs)
    )
