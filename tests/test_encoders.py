"""Encoders: the factory, villa's tiny configs, the batched region path and attribute embeddings."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from villa.core.checkpoint import save_checkpoint
from villa.core.errors import VillaError
from villa.core.runtime import get_runtime
from villa.data.vocab import load_vocab
from villa.models import clip as clip_module
from villa.models.clip import clip_checkpoint_state, create_clip
from villa.models.region_encoder import CLIP_MEAN, CLIP_STD, RegionEncoder, roi_features
from villa.models.text import encode_attributes, encode_texts

CPU = get_runtime("cpu")


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return create_clip("villa-tiny-rn", pretrained=None)


def _images(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 84, 84, generator=g)
    boxes, owner = [], []
    for i in range(n):
        for k in range(1 + i % 3):
            x0, y0 = 28 * k, 28 * (i % 3)
            boxes.append([x0, y0, x0 + 28, y0 + 28])
            owner.append(i)
    boxes.append([0, 0, 83, 83])  # the whole image of the last one
    owner.append(n - 1)
    return images, torch.tensor(boxes, dtype=torch.float32), torch.tensor(owner)


def test_tiny_config_is_rn50_structure(tiny):
    from open_clip.modified_resnet import ModifiedResNet

    assert isinstance(tiny.model.visual, ModifiedResNet) and tiny.embed_dim == 64
    enc = RegionEncoder(tiny.model.visual)
    assert enc.roi_size == 4  # 2 x the attention pool's 2x2 grid (RN50: 14)
    rn50 = RegionEncoder(create_clip("RN50", pretrained=None).model.visual)
    assert rn50.roi_size == 14 and rn50.embed_dim == 1024


def test_region_shapes_and_batched_equals_per_image(tiny):
    enc = RegionEncoder(tiny.model.visual).eval()
    images, boxes, owner = _images()
    with torch.no_grad():
        batched = enc(images, boxes, owner)
        single = torch.cat(
            [
                enc(images[i : i + 1], boxes[owner == i], torch.zeros(int((owner == i).sum()), dtype=torch.long))
                for i in range(len(images))
            ]
        )
    assert batched.shape == (len(boxes), 64)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    # the whole-image box differs from a cell box
    assert not torch.allclose(batched[-1], batched[-2])


def test_normalize_option_applies_clip_mean_and_std(tiny):
    images, boxes, owner = _images(2)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        plain = RegionEncoder(tiny.model.visual, normalize=False).eval()
        a = plain(images, boxes, owner)
        b = RegionEncoder(tiny.model.visual, normalize=True).eval()(images, boxes, owner)
        by_hand = plain((images - mean) / std, boxes, owner)
    torch.testing.assert_close(b, by_hand, rtol=1e-5, atol=1e-6)
    assert (a - b).abs().max() > 1e-3


def test_separable_roi_align_is_torchvisions():
    """roi_align_separable computes torchvision's roi_align (sampling ratio 0, aligned), forward and backward, on
    boxes inside, across and past the border, empty and reversed ones, at two feature-map sizes."""
    from torchvision.ops import roi_align

    g = torch.Generator().manual_seed(0)
    for b, c, size, image, k in ((6, 16, 6, 84, 80), (3, 8, 14, 224, 40)):
        feat = torch.randn(b, c, size, size, generator=g, requires_grad=True)
        owner = torch.randint(0, b, (k,), generator=g)
        xy = torch.rand(k, 2, generator=g) * (image + 20) - 10
        boxes = torch.cat([xy, xy + torch.rand(k, 2, generator=g) * image * 0.7], 1)
        edge = [[0, 0, image, image], [0, 0, 28, 28], [10, 10, 10, 10], [-60, -60, -30, -30], [50, 60, 40, 20]]
        boxes[: len(edge)] = torch.tensor(edge, dtype=torch.float32)
        scale = size / image
        ref = roi_align(feat, torch.cat([owner[:, None].float(), boxes], 1), 14, scale, 0, True)
        got = roi_features(feat, boxes, owner, 14, scale, kernel="separable")
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert float(ref[3:5].detach().abs().max()) == float(got[3:5].detach().abs().max()) == 0  # outside, reversed
        up = torch.randn(ref.shape, generator=g)
        (g_ref,) = torch.autograd.grad((ref * up).sum(), feat)
        (g_got,) = torch.autograd.grad((got * up).sum(), feat)
        torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(roi_features(feat, boxes, owner, 14, scale), got, rtol=0, atol=0)  # auto on CPU
    with pytest.raises(VillaError, match="use auto, separable or torchvision"):
        roi_features(feat, boxes, owner, 14, scale, kernel="fast")


def test_roi_boxes_stay_fp32_under_autocast():
    """A box at 150.7 px must not be rounded to bf16 (151) when the features are bf16."""
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 8, 21, 21, generator=g).to(torch.bfloat16)  # a bf16 feature map of a 168-px image
    boxes = torch.tensor([[10.3, 20.6, 150.7, 97.45], [0.4, 0.9, 83.3, 61.7]])
    owner = torch.tensor([0, 1])
    ref = roi_features(feat.float(), boxes, owner, 4, 21 / 168)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_features(feat, boxes, owner, 4, 21 / 168)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.to(torch.bfloat16).float(), rtol=0, atol=0)
    rounded = roi_features(feat.float(), boxes.to(torch.bfloat16).float(), owner, 4, 21 / 168)
    assert (rounded - ref).abs().max() > 1e-2  # what rounding the boxes did


def _fake_hub_weights(cache: Path, repo: str, state_dict: dict) -> Path:
    """A Hugging Face cache holding ``repo``'s open_clip weights, as a finished download leaves it."""
    commit = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    torch.save(state_dict, snap / "open_clip_pytorch_model.bin")
    return snap


def test_tagged_weights_get_the_tags_activation(tmp_path, monkeypatch):
    """OpenAI's weights were trained with QuickGELU: a tag that says so is built with it (open_clip #771)."""
    import open_clip
    from open_clip.transformer import QuickGELU

    assert open_clip.get_pretrained_cfg("RN50", "openai")["quick_gelu"] is True
    torch.manual_seed(1)
    weights = create_clip("villa-tiny-rn", pretrained=None).model.state_dict()
    _fake_hub_weights(tmp_path, "villa-test/tiny-openai", weights)
    tags = {
        "openai": {"hf_hub": "villa-test/tiny-openai/", "quick_gelu": True},
        "plain": {"hf_hub": "villa-test/tiny-openai/"},
    }
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "villa-tiny-rn", tags)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip = create_clip("villa-tiny-rn", pretrained="openai", cache_dir=str(tmp_path))
    acts = {type(m) for m in clip.model.transformer.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}
    assert acts == {QuickGELU}
    assert clip.quick_gelu and clip.source["quick_gelu"] is True
    loaded = clip.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    plain = create_clip("villa-tiny-rn", pretrained="plain", cache_dir=str(tmp_path))
    assert not plain.quick_gelu and not any(isinstance(m, QuickGELU) for m in plain.model.modules())
    with pytest.raises(VillaError, match="neither a file nor a tag of villa-tiny-rn .*openai, plain"):
        create_clip("villa-tiny-rn", pretrained="laion9b", cache_dir=str(tmp_path))


def test_missing_tag_weights_offline_fail_fast(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(VillaError, match="not downloaded and no network is reachable; pass a local checkpoint path"):
        create_clip("auto", pretrained="openai", cache_dir=str(tmp_path))  # auto without a checkpoint: RN50
    assert time.perf_counter() - t0 < 20


def test_attribute_embedding_is_normalised_prompt_mean(tiny):
    vocab = load_vocab("docmnist")
    emb = encode_attributes(tiny, vocab, CPU)
    assert emb.shape == (20, 64)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(20))
    for a in ("seven", "purple", "circle", "large"):
        z = encode_texts(tiny, vocab.prompts(a), CPU, batch_size=1, normalize=False)
        torch.testing.assert_close(emb[vocab.index[a]], F.normalize(z.mean(0), dim=0), rtol=1e-4, atol=1e-5)


def test_checkpoint_round_trip(tiny, tmp_path):
    path = tmp_path / "ckpt" / "clip.pt"
    save_checkpoint(path, clip_checkpoint_state(tiny.model, tiny.model_name, tiny.model_cfg, epoch=3))
    loaded = create_clip("villa-tiny-rn", pretrained=str(path))
    assert loaded.pretrained == str(path) and loaded.model_name == "villa-tiny-rn"
    images, boxes, owner = _images(3)
    with torch.no_grad():
        a = RegionEncoder(tiny.model.visual).eval()(images, boxes, owner)
        b = RegionEncoder(loaded.model.visual).eval()(images, boxes, owner)
    assert torch.equal(a, b)
    assert torch.equal(encode_texts(tiny, ["the color is red"], CPU), encode_texts(loaded, ["the color is red"], CPU))
    # the model name may be omitted: the checkpoint says it
    assert create_clip("auto", pretrained=str(path)).model_name == "villa-tiny-rn"
    with pytest.raises(
        VillaError, match="holds a 'villa-tiny-rn' model but the model name is 'RN50'; set model.name=villa-tiny-rn"
    ):
        create_clip("RN50", pretrained=str(path))


def test_random_init_warns_once(caplog, monkeypatch):
    monkeypatch.setattr(clip_module, "_warned_random", set())
    with caplog.at_level(logging.WARNING):
        create_clip("villa-tiny-rn", pretrained=None)
        create_clip("villa-tiny-rn", pretrained="none")
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(msgs) == 1 and "random init" in msgs[0]


def test_bad_model_and_weights(tmp_path):
    with pytest.raises(VillaError, match="unknown model 'RN51'"):
        create_clip("RN51", pretrained=None)
    with pytest.raises(VillaError, match="checkpoint not found"):
        create_clip("villa-tiny-rn", pretrained=str(tmp_path / "missing" / "x.pt"))


def test_vit_rejected_by_region_path():
    clip = create_clip("ViT-B-32", pretrained=None)
    with pytest.raises(VillaError, match="needs a ModifiedResNet"):
        RegionEncoder(clip.model.visual)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_cuda_autocast_matches_fp32(tiny):
    rt = get_runtime("cuda")
    enc = RegionEncoder(tiny.model.visual).to(rt.device).eval()
    images, boxes, owner = _images()
    with torch.no_grad():
        ref = enc(images.to(rt.device), boxes.to(rt.device), owner.to(rt.device)).float()
        with rt.autocast():
            amp = enc(images.to(rt.device), boxes.to(rt.device), owner.to(rt.device)).float()
    assert F.cosine_similarity(ref, amp).min() > 0.99
    assert np.isfinite(amp.cpu().numpy()).all()


def test_class_token_attention_pool_equals_open_clips():
    """villa's attention pool attends the class token's query only (as OpenAI's CLIP and the original ViLLA code);
    open_clip's attends every position's and keeps the first; villa's folds the key and value projections into the
    query. Same outputs and gradients (input and every parameter) to float rounding; the
    models create_clip builds and every region path use it; copies and pickles keep it."""
    import copy
    import pickle

    from open_clip.modified_resnet import AttentionPool2d

    from villa.models.region_encoder import ClassTokenAttentionPool2d, RegionEncoder

    torch.manual_seed(0)
    ref = AttentionPool2d(7, 64, 4, 32)
    ours = copy.deepcopy(ref)
    ours.__class__ = ClassTokenAttentionPool2d
    x = torch.randn(5, 64, 7, 7)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = ref(xa), ours(xb)
    assert b.shape == a.shape == (5, 32)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    (a * torch.arange(32.0)).sum().backward()
    (b * torch.arange(32.0)).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-6)
    for (name, pa), pb in zip(ref.named_parameters(), ours.parameters()):
        assert pb.grad is not None, name  # every parameter used (DDP requires it), k_proj.bias's gradient ~0
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-5, msg=name)
    clip = create_clip("villa-tiny-rn", "none")
    assert type(clip.model.visual.attnpool) is ClassTokenAttentionPool2d
    assert type(pickle.loads(pickle.dumps(clip.model)).visual.attnpool) is ClassTokenAttentionPool2d
    import open_clip

    plain = open_clip.create_model("villa-tiny-rn")
    assert type(plain.visual.attnpool) is AttentionPool2d
    RegionEncoder(plain.visual)
    assert type(plain.visual.attnpool) is ClassTokenAttentionPool2d
