"""Region proposals from a torchvision Faster R-CNN family detector: load one, train a small one, propose boxes.

    python -m villa.models.detector train --data_dir data/docmnist_6000_4.4 --out detector.pt [--epochs 3]

A detector is named and loaded the normal torchvision way where there is internet
(``--detector fasterrcnn_resnet50_fpn_v2 --detector_weights DEFAULT``), or from a local checkpoint: a villa
detector checkpoint (``kind: villa-detector``, self-describing: builder name, its arguments and the weights), or a
plain torchvision state dict with ``--detector NAME``. ``villa-tiny-frcnn`` is a small Faster R-CNN (a 4-stage
conv backbone, one feature map, an RPN and box head) that trains in about a minute on 2 CPU cores: what the tests
and the offline example use, since no detector weights can be downloaded there.

:func:`propose` keeps the RPN's top-K boxes after NMS with their objectness (``kind=rpn``, the region proposals of
RegionCLIP and the paper) or the detector's class-agnostic detections (``kind=detections``).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from villa.core.errors import VillaError, exit_on_error
from villa.core.io import PathLike, atomic_file

log = logging.getLogger(__name__)

KIND = "villa-detector"
PROPOSAL_KINDS = ("rpn", "detections")


def _tiny_backbone(width: int = 32) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    body = nn.Sequential(
        *block(3, width // 2),
        *block(width // 2, width),
        *block(width, width),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(inplace=True),
    )
    body.out_channels = width  # stride 8
    return body


def build_tiny_frcnn(num_classes: int = 2, min_size: int = 84, max_size: int = 84, width: int = 32) -> nn.Module:
    """``villa-tiny-frcnn``: torchvision's FasterRCNN around a small stride-8 backbone, anchors of 8-64 pixels."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    anchors = AnchorGenerator(sizes=((8, 16, 32, 64),), aspect_ratios=((0.5, 1.0, 2.0),))
    return FasterRCNN(
        _tiny_backbone(width),
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2),
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=600,
        rpn_post_nms_top_n_test=300,
        box_batch_size_per_image=128,
    )


BUILDERS = {"villa-tiny-frcnn": build_tiny_frcnn}


def build_detector(name: str, kwargs: Optional[dict[str, Any]] = None, weights: Optional[str] = None) -> nn.Module:
    """A detector by name: villa's (``villa-tiny-frcnn``) or any torchvision detection model
    (``torchvision.models.get_model``; ``weights`` a weights enum name such as ``DEFAULT``, downloaded by
    torchvision where there is internet)."""
    kwargs = dict(kwargs or {})
    if name in BUILDERS:
        if weights not in (None, "none"):
            raise VillaError(
                f"{name} has no published weights ({weights!r} is not a file); pass the path of a checkpoint "
                "python -m villa.models.detector train wrote"
            )
        return BUILDERS[name](**kwargs)
    import torchvision

    if name not in torchvision.models.list_models(torchvision.models.detection):
        raise VillaError(
            f"unknown detector {name!r}: use villa-tiny-frcnn or a torchvision detection model "
            "(e.g. fasterrcnn_resnet50_fpn_v2, fasterrcnn_mobilenet_v3_large_fpn)"
        )
    if weights not in (None, "none"):
        kwargs.setdefault("weights", weights)
    else:
        kwargs.setdefault("weights", None)
        kwargs.setdefault("weights_backbone", None)
    try:
        return torchvision.models.get_model(name, **kwargs)
    except Exception as e:  # no internet for the weights, or a bad weights name
        raise VillaError(
            f"cannot build detector {name} with weights={weights!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "offline, pass a local checkpoint path as detector_weights"
        ) from e


def load_detector(name: Optional[str], weights: Optional[str]) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, its identity). ``weights``: a checkpoint path (villa's or a torchvision state dict for
    ``name``) or a torchvision weights name; a file that is not a checkpoint is one VillaError line."""
    from villa.data.embeddings import weights_id

    looks_like_a_path = bool(weights) and (os.sep in str(weights) or str(weights).endswith((".pt", ".pth")))
    if looks_like_a_path and not Path(weights).is_file():
        raise VillaError(
            f"detector weights not found: {weights}; pass the checkpoint's path (python -m villa.models.detector train "
            "writes one), a torchvision weights name, or --regions proposals --proposals_file FILE"
        )
    if weights and Path(weights).exists():
        path = Path(weights)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise VillaError(
                f"{path} is not a detector checkpoint ({type(e).__name__}); pass a .pt file written by "
                "python -m villa.models.detector train or a torchvision state dict"
            ) from e
        if isinstance(state, dict) and state.get("kind") == KIND:
            name = state["name"]
            model = build_detector(name, state.get("kwargs"))
            sd = state["model"]
        elif isinstance(state, dict) and name:
            model = build_detector(name, None)
            sd = state.get("model", state)
        else:
            raise VillaError(
                f"{path} is not a villa detector checkpoint; for a torchvision state dict also pass "
                "its model name as detector"
            )
        try:
            model.load_state_dict(sd)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise VillaError(f"{path} does not hold {name}'s weights ({str(e).splitlines()[0][:160]})") from e
        ident = {"detector": name, "weights": str(path), "weights_id": weights_id(str(path))}
    else:
        if not name:
            raise VillaError("regions=proposals needs a detector: pass detector=NAME (and detector_weights)")
        if weights in (None, "", "none"):
            build_detector(name, None)  # an unknown name is named first
            raise VillaError(
                f"detector {name} has no weights: an untrained detector proposes random boxes; pass detector weights "
                "(a checkpoint from python -m villa.models.detector train, or a torchvision weights name such as "
                "DEFAULT) or a proposals file"
            )
        model = build_detector(name, None, weights)
        ident = {"detector": name, "weights": weights or "none", "weights_id": weights or "none"}
    return model.eval(), ident


@torch.no_grad()
def propose(
    model: nn.Module, images: Sequence[torch.Tensor], top_k: int = 100, nms: float = 0.7, kind: str = "rpn"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Boxes (K, 4) in the input images' pixels and their scores (K,) per image, at most ``top_k``, NMS at ``nms``.

    ``images``: float (3, H, W) tensors in [0, 1] (the detector's transform normalises and resizes them).
    ``kind=rpn``: the region proposal network's boxes and sigmoid objectness (no classification);
    ``kind=detections``: the detector's boxes of every class, merged class-agnostically.
    """
    from torchvision.models.detection.rpn import concat_box_prediction_layers
    from torchvision.ops import batched_nms
    from torchvision.ops import nms as box_nms

    if kind not in PROPOSAL_KINDS:
        raise VillaError(f"proposal kind {kind!r}: use rpn or detections")
    model.eval()
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    if kind == "detections":
        out = []
        for det in model(list(images)):
            keep = batched_nms(det["boxes"], det["scores"], torch.zeros_like(det["labels"]), nms)[:top_k]
            out.append((det["boxes"][keep], det["scores"][keep]))
        return out
    batch, _ = model.transform(list(images))
    features = model.backbone(batch.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    feats = list(features.values())
    rpn = model.rpn
    objectness, deltas = rpn.head(feats)
    anchors = rpn.anchor_generator(batch, feats)
    per_level = [o[0].numel() for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
    saved = rpn._post_nms_top_n, rpn.nms_thresh
    rpn._post_nms_top_n, rpn.nms_thresh = {"training": top_k, "testing": top_k}, nms
    try:
        boxes, scores = rpn.filter_proposals(proposals, objectness, batch.image_sizes, per_level)
    finally:
        rpn._post_nms_top_n, rpn.nms_thresh = saved
    results = model.transform.postprocess([{"boxes": b} for b in boxes], batch.image_sizes, sizes)
    out = []
    for r, s in zip(results, scores):
        b = r["boxes"]
        keep = box_nms(b, s, nms)[:top_k]  # boxes scaled back can coincide; scores stay sorted
        out.append((b[keep], s[keep]))
    return out


# --- training a small detector (tests, the offline example, open-vocabulary base categories) --------------------


def _targets(ann: Any, keep: np.ndarray, row: int) -> dict[str, torch.Tensor]:
    """One image's kept boxes as a torchvision detection target (one class: object)."""
    sl = slice(ann.region_offsets[row], ann.region_offsets[row + 1])
    b = torch.from_numpy(ann.boxes[sl][keep[sl]]).float()
    return {"boxes": b.reshape(-1, 4), "labels": torch.ones(len(b), dtype=torch.int64)}


def detector_training_boxes(
    data_dir: PathLike, dataset_config: str, max_images: Optional[int], keep_attributes: Optional[Sequence[str]]
) -> tuple[Any, np.ndarray, np.ndarray]:
    """The dataset, its training images (the first ``max_images``) and which boxes train the detector (those whose
    ``reg_to_attr`` holds one of ``keep_attributes``, else all)."""
    from villa.data.annotations import load_annotations
    from villa.data.vocab import load_vocab

    vocab = load_vocab(dataset_config)
    ann = load_annotations(data_dir, vocab, check_images=False)
    rows = np.flatnonzero(ann.split == "train")
    if max_images:
        rows = rows[:max_images]
    keep = np.ones(len(ann.boxes), bool)
    if keep_attributes is not None:
        gold = ann.region_attribute_matrix(len(vocab))
        if gold is None:
            raise VillaError(f"{data_dir} has no reg_to_attr: cannot select boxes by attribute")
        cols = [vocab.index[a] for a in keep_attributes if a in vocab.index]
        keep = gold[:, cols].any(1)
    return ann, rows, keep


def detector_optimizer(model: nn.Module, optimizer: str, lr: float, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (or SGD with momentum), decay 1e-4, under a one-cycle schedule. One-cycle needs a warm-up of >= 2 steps
    (pct_start * steps - 1 > 0, else torch divides by zero): shorter runs keep a constant learning rate (None)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (
        torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        if optimizer == "adamw"
        else torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    )
    sched = (
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1) if steps >= 20 else None
    )
    return opt, sched


def train_detector(
    data_dir: PathLike,
    out: PathLike,
    epochs: int = 3,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    max_images: Optional[int] = None,
    dataset_config: str = "docmnist",
    keep_attributes: Optional[Sequence[str]] = None,
    progress: bool = True,
    optimizer: str = "adamw",
) -> Path:
    """Train ``villa-tiny-frcnn`` class-agnostically (object vs background) on a dataset's train-split boxes
    (one-cycle schedule; ``optimizer``: adamw, or sgd with momentum).

    ``keep_attributes``: train only on boxes whose ``reg_to_attr`` holds one of these (the open-vocabulary
    protocol: a proposal model that never sees a box of a novel category)."""
    from tqdm import tqdm

    from villa.data.images import read_image

    ann, rows, keep = detector_training_boxes(data_dir, dataset_config, max_images, keep_attributes)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    w, h = ann.image_size[rows].max(0)
    kwargs = {"num_classes": 2, "min_size": int(min(w, h)), "max_size": int(max(w, h))}
    model = build_tiny_frcnn(**kwargs)
    steps = epochs * max(1, len(rows) // batch_size)
    opt, sched = detector_optimizer(model, optimizer, lr, steps)
    images = {int(r): read_image(ann.root / ann.filepath[r]).float().div_(255) for r in rows}
    targets_of = partial(_targets, ann, keep)
    model.train()
    t0 = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        order = rows[torch.randperm(len(rows), generator=g).numpy()]
        total = 0.0
        bar = tqdm(
            range(0, len(order) - batch_size + 1, batch_size),
            desc=f"detector epoch {epoch + 1}",
            disable=not progress,
            leave=False,
        )
        for s in bar:
            batch = order[s : s + batch_size]
            losses = model([images[int(r)] for r in batch], [targets_of(r) for r in batch])
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None and step < steps - 1:
                sched.step()
            step += 1
            total += float(loss.detach())
        log.info(
            "detector epoch %d/%d loss=%.4f (%.0fs)",
            epoch + 1,
            epochs,
            total / max(1, len(order) // batch_size),
            time.perf_counter() - t0,
        )
    state = {
        "kind": KIND,
        "name": "villa-tiny-frcnn",
        "kwargs": kwargs,
        "model": model.state_dict(),
        "trained_on": {
            "data_dir": str(data_dir),
            "images": int(len(rows)),
            "epochs": epochs,
            "keep_attributes": list(keep_attributes) if keep_attributes is not None else None,
        },
    }
    out = Path(out)
    with atomic_file(out) as tmp:
        torch.save(state, tmp)
    return out


@exit_on_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    from villa.core.log import setup_logging

    setup_logging()
    p = argparse.ArgumentParser(prog="python -m villa.models.detector", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train villa-tiny-frcnn on a dataset's train-split boxes")
    t.add_argument("--data_dir", required=True, help="a dataset in villa's schema with boxes (region_coord)")
    t.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    t.add_argument("--dataset_config", default="docmnist", help="vocabulary name or YAML path")
    t.add_argument("--epochs", type=int, default=3, help="passes over the train split")
    t.add_argument("--batch_size", type=int, default=16, help="images per step")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle schedule)")
    t.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"), help="AdamW, or SGD with momentum 0.9")
    t.add_argument("--max_images", type=int, default=None, help="train on the first N training images")
    t.add_argument("--keep_attributes", nargs="+", default=None, help="train only on boxes holding these")
    t.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batch order")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    for k in ("epochs", "batch_size"):
        if getattr(a, k) < 1:
            raise VillaError(f"--{k}={getattr(a, k)}: must be >= 1")
    out = train_detector(
        a.data_dir,
        a.out,
        a.epochs,
        a.batch_size,
        a.lr,
        a.seed,
        a.max_images,
        a.dataset_config,
        a.keep_attributes,
        not a.quiet,
        a.optimizer,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
