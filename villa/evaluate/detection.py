"""Zero-shot object detection scored by pycocotools: the RegionCLIP / OVR-CNN protocol that the paper follows.

    python -m villa.evaluate.detection gt=coco/annotations/instances_val2017.json images=coco/val2017 \
        model.pretrained=checkpoints/stage2/coco/best.pt [regions=proposals proposals_file=props.json] \
        [split=coco_48_17] [output=outputs/detection/villa.json]

Every box (the ground-truth boxes: the "GT boxes" setting; or proposals with their objectness: the "RPN" setting) is
embedded by the model's region path, classified against each category name's prompt-averaged text embedding
(CLIP's 80 ImageNet templates by default), softmax over categories at a temperature, optionally multiplied by the
objectness; then per-class NMS and the best ``max_dets`` per image, written as a COCO results file and scored by
pycocotools' ``COCOeval``: AP and AP50 overall and per category group of a base/novel split
(configs/splits/coco_48_17.yaml, or ``split=lvis`` for LVIS's rare/common/frequent from its own annotation
file), AP50 per category. docs/evaluation.md defines each number.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from omegaconf import DictConfig

from villa.core.config import hydra_entry
from villa.core.env import config_dir
from villa.core.errors import VillaError
from villa.core.io import read_text, write_json_atomic
from villa.core.runtime import Runtime
from villa.data.annotations import boxes_only, check_image_files, path_inside
from villa.models.clip import Clip
from villa.models.region_encoder import RegionEncoder
from villa.models.text import encode_texts
from villa.preprocess import embed_regions

log = logging.getLogger(__name__)


def _quiet():
    """pycocotools prints to stdout; keep it off the user's screen."""
    return contextlib.redirect_stdout(io.StringIO())


def load_gt(path: str | Path):
    """A pycocotools ``COCO`` of a ground-truth file; a missing or malformed file is one line."""
    from pycocotools.coco import COCO

    p = Path(path)
    if not p.is_file():
        raise VillaError(f"ground truth not found: {p}; pass gt=<instances_*.json> (COCO or LVIS format)")
    try:
        with _quiet():
            return COCO(str(p))
    except Exception as e:  # JSON errors, missing keys
        raise VillaError(f"{p} is not a COCO-format ground truth ({type(e).__name__}: {str(e)[:120]})") from e


def category_groups(gt, split: Optional[str], source: str = "") -> dict[str, list[int]]:
    """Category id groups to score apart: ``{"all": [...], "base": [...], "novel": [...]}`` from a split file
    (a name under configs/splits/ or a YAML path with ``groups: {name: [category names]}``), or LVIS's
    ``frequency`` field (``split=lvis``: rare / common / frequent)."""
    cats = gt.loadCats(gt.getCatIds())
    by_name = {c["name"]: c["id"] for c in cats}
    out = {"all": sorted(by_name.values())}
    if not split:
        return out
    if split == "lvis":
        if not all("frequency" in c for c in cats):
            raise VillaError(f"split=lvis needs LVIS categories with a 'frequency' field; {source} has none")
        for key, name in (("r", "rare"), ("c", "common"), ("f", "frequent")):
            out[name] = sorted(c["id"] for c in cats if c["frequency"] == key)
        return out
    p = Path(split)
    if p.suffix not in (".yaml", ".yml"):
        p = config_dir() / "splits" / f"{split}.yaml"
    if not p.is_file():
        raise VillaError(f"split file not found: {p}; pass a name under configs/splits/ or a YAML path")
    spec = yaml.safe_load(read_text(p)) or {}
    groups = spec.get("groups")
    if not isinstance(groups, dict) or not groups:
        raise VillaError(f"{p}: needs 'groups: {{name: [category names]}}'")
    for g, names in groups.items():
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise VillaError(
                f"{p}: group {g!r} names {len(unknown)} categories the ground truth does not have (e.g. "
                f"{unknown[0]!r}); use the split file of this dataset"
            )
        out[str(g)] = sorted(by_name[n] for n in names)
    return out


def class_embeddings(clip: Clip, names: Sequence[str], runtime: Runtime, templates: Optional[Sequence[str]] = None):
    """(C, D): each name's L2-normalised mean over prompt templates (CLIP's 80 ImageNet ones by default)."""
    if templates:
        prompts = [[t.format(n) for t in templates] for n in names]
    else:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        prompts = [[t(n) for t in OPENAI_IMAGENET_TEMPLATES] for n in names]
    flat = [p for ps in prompts for p in ps]
    emb = F.normalize(encode_texts(clip, flat, runtime).float(), dim=-1).view(len(names), -1, clip.embed_dim)
    return F.normalize(emb.mean(1), dim=-1).cpu()


def detect(
    scores: torch.Tensor,
    boxes: np.ndarray,
    offsets: np.ndarray,
    image_ids: np.ndarray,
    cat_ids: Sequence[int],
    nms: float = 0.5,
    max_dets: int = 100,
    score_thresh: float = 1e-3,
) -> list[dict[str, Any]]:
    """COCO results from per-box class scores (R, C): every (box, class) above ``score_thresh``, per-class NMS at
    ``nms`` within each image, the best ``max_dets`` per image; by image, best first. One NMS call for all images
    (each (image, class) pair is its own NMS group)."""
    from torchvision.ops import batched_nms

    r, c = torch.nonzero(scores > score_thresh, as_tuple=True)
    if not len(r):
        return []
    owner = torch.from_numpy(np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)))[r]
    bx = torch.from_numpy(boxes).float()[r]
    sc = scores[r, c]
    keep = batched_nms(bx, sc, owner * scores.shape[1] + c, nms)  # best first
    keep = keep[np.lexsort((np.arange(len(keep)), owner[keep].numpy()))]  # by image, best first within it
    img = owner[keep].numpy()
    first = np.searchsorted(img, img, side="left")
    keep = keep[np.arange(len(keep)) - first < max_dets]
    bk, sk, ck, ik = bx[keep].numpy(), sc[keep].numpy(), c[keep].numpy(), owner[keep].numpy()
    cat = np.asarray(cat_ids)
    return [
        {
            "image_id": int(image_ids[i]),
            "category_id": int(cat[k]),
            "bbox": [
                round(float(b[0]), 2),
                round(float(b[1]), 2),
                round(float(b[2] - b[0]), 2),
                round(float(b[3] - b[1]), 2),
            ],
            "score": round(float(v), 6),
        }
        for b, v, k, i in zip(bk, sk, ck, ik)
    ]


def coco_ap(gt, results: list[dict[str, Any]], groups: dict[str, list[int]], img_ids: Sequence[int]) -> dict[str, Any]:
    """pycocotools' COCOeval (bbox): AP and AP50 per group of category ids, and AP50 per category (percent)."""
    from pycocotools.cocoeval import COCOeval

    known = set(gt.getImgIds())
    unknown = sorted({r["image_id"] for r in results} - known)
    if unknown:
        raise VillaError(
            f"results name {len(unknown)} images the ground truth lacks (e.g. {unknown[0]}); "
            "score them against their own ground truth"
        )
    out: dict[str, Any] = {}
    if not results:
        return {g: {"AP": 0.0, "AP50": 0.0, "categories": len(ids)} for g, ids in groups.items()} | {
            "per_category_AP50": {}
        }
    with _quiet():
        dt = gt.loadRes(results)
    per_cat: dict[str, float] = {}
    for g, ids in groups.items():
        with _quiet():
            E = COCOeval(gt, dt, "bbox")
            E.params.imgIds = list(img_ids)
            E.params.catIds = list(ids)
            E.evaluate()
            E.accumulate()
            E.summarize()
        out[g] = {
            "AP": 100 * max(float(E.stats[0]), 0.0),
            "AP50": 100 * max(float(E.stats[1]), 0.0),
            "categories": len(ids),
        }
        if g == "all":
            prec = E.eval["precision"][0, :, :, 0, 2]  # IoU 0.5, all recalls, categories, area all, 100 dets
            for k, cid in enumerate(E.params.catIds):
                p = prec[:, k]
                per_cat[gt.cats[cid]["name"]] = 100 * float(p[p > -1].mean()) if (p > -1).any() else None
    out["per_category_AP50"] = per_cat
    return out


@torch.no_grad()
def gt_images(gt, gt_path: str | Path, images: str | Path, img_ids: list) -> tuple[Path, list, np.ndarray, np.ndarray]:
    """The ground truth's images: their folder, relative file names (inside it, readable), sizes (I, 2) and ids."""
    imgs = gt.loadImgs(img_ids)
    files = [im["file_name"] for im in imgs]
    bad = [f for f in files if not path_inside(f)]
    if bad:
        raise VillaError(f"{gt_path}: file_name {bad[0]!r} leaves the images folder; names must be relative")
    root = Path(images)
    check_image_files(root, files, img_ids)
    sizes = np.array([[im["width"], im["height"]] for im in imgs], np.int64).reshape(-1, 2)
    return root, files, sizes, np.asarray(img_ids)


def boxes_to_classify(
    gt, img_ids: list, ids: np.ndarray, sizes: np.ndarray, regions: str, proposals_file: Optional[str], top_k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets (I + 1,), boxes (R, 4) xyxy, objectness (R,)): the ground-truth boxes but crowds (the GT-box
    setting, objectness 1) or the top-k proposals of a COCO results file (the RPN setting)."""
    from villa.data.regions import proposals_from_file

    if regions == "gt":
        per = [[a for a in gt.imgToAnns.get(i, []) if not a.get("iscrowd", 0)] for i in img_ids]
        counts = np.array([len(p) for p in per])
        xywh = np.array([a["bbox"] for p in per for a in p], np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1).astype(np.float32)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return offsets, boxes, np.ones(len(boxes), np.float32)
    if not proposals_file:
        raise VillaError("regions=proposals needs proposals_file=<COCO results JSON of boxes and objectness>")
    return proposals_from_file(proposals_file, ids, sizes, top_k=top_k)


def zero_shot_detection(
    clip: Clip,
    opts: dict[str, Any],
    runtime: Runtime,
    gt_path: str | Path,
    images: str | Path,
    regions: str = "gt",
    proposals_file: Optional[str] = None,
    split: Optional[str] = None,
    templates: Optional[Sequence[str]] = None,
    temperature: float = 0.01,
    objectness: bool = True,
    nms: float = 0.5,
    max_dets: int = 100,
    score_thresh: float = 1e-3,
    top_k: int = 1000,
    batch_size: int = 64,
    num_workers: int = 2,
    results_path: Optional[str | Path] = None,
) -> dict[str, Any]:
    """Detect every category of ``gt_path`` in its images zero-shot and score the detections (module docs)."""
    if regions not in ("gt", "proposals"):
        raise VillaError(f"regions={regions!r}: use gt (ground-truth boxes) or proposals (with proposals_file)")
    gt = load_gt(gt_path)
    groups = category_groups(gt, split, str(gt_path))
    cats = gt.loadCats(gt.getCatIds())
    if not cats:
        raise VillaError(f"{gt_path} lists no categories; a detection ground truth names its categories")
    cat_ids = [c["id"] for c in cats]
    img_ids = sorted(gt.getImgIds())
    root, files, sizes, ids = gt_images(gt, gt_path, images, img_ids)
    offsets, boxes, objness = boxes_to_classify(gt, img_ids, ids, sizes, regions, proposals_file, top_k)
    keep_img = np.diff(offsets) > 0
    t0 = time.perf_counter()
    ann = boxes_only(root, ids, files, sizes, offsets, boxes)
    rows = np.flatnonzero(keep_img)
    emb = np.zeros((len(boxes), clip.embed_dim), np.float32)
    encoder = RegionEncoder(clip.model.visual, normalize=opts["normalize"], input_size=opts["input_size"])
    encoder = encoder.to(runtime.device).eval()
    embed_regions(encoder, ann, runtime, emb, batch_size, num_workers, progress=False, rows=rows)
    t1 = time.perf_counter()
    text = class_embeddings(clip, [c["name"] for c in cats], runtime, templates)
    probs = torch.softmax(F.normalize(torch.from_numpy(emb), dim=-1) @ text.t() / temperature, dim=-1)
    if objectness and regions == "proposals":
        probs = probs * torch.from_numpy(objness)[:, None]
    results = detect(probs, boxes, offsets, ids, cat_ids, nms, max_dets, score_thresh)
    t2 = time.perf_counter()
    if results_path is not None:
        write_json_atomic(results_path, results)
    t3 = time.perf_counter()
    res = coco_ap(gt, results, groups, img_ids)
    res["seconds"] = {
        "embed_regions": round(t1 - t0, 3),
        "classify_and_nms": round(t2 - t1, 3),
        "pycocotools": round(time.perf_counter() - t3, 3),
    }
    res.update(
        {
            "images": len(img_ids),
            "boxes": int(len(boxes)),
            "regions": regions,
            "detections": len(results),
            "temperature": temperature,
            "objectness": bool(objectness and regions == "proposals"),
            "templates": "dataset config" if templates else "CLIP's 80 ImageNet templates",
        }
    )
    return res


def run_detection(cfg: DictConfig) -> dict[str, Any]:
    from villa.core.schemas import validate_config
    from villa.evaluate.retrieval import model_from_config

    validate_config(cfg, "detection")
    runtime, clip, opts = model_from_config(cfg)
    out = Path(cfg.output)
    res = zero_shot_detection(
        clip,
        opts,
        runtime,
        cfg.gt,
        cfg.images,
        cfg.regions,
        cfg.proposals_file,
        cfg.split,
        list(cfg.templates) if cfg.templates else None,
        cfg.temperature,
        cfg.objectness,
        cfg.nms,
        cfg.max_dets,
        cfg.score_thresh,
        cfg.top_k,
        cfg.batch_size,
        cfg.num_workers,
        out.with_name(out.stem + "_results.json"),
    )
    res.update({"label": cfg.label, "model": clip.source})
    write_json_atomic(out, res)
    groups = [g for g in res if isinstance(res[g], dict) and "AP50" in res[g]]
    print(f"{'zero-shot detection':<22}" + "".join(f"{g + ' AP50':>14}{g + ' AP':>12}" for g in groups))
    print(f"{cfg.label:<22}" + "".join(f"{res[g]['AP50']:>14.1f}{res[g]['AP']:>12.1f}" for g in groups))
    log.info("wrote %s", out)
    return res


main = hydra_entry("detection", run_detection, __doc__)


if __name__ == "__main__":
    main()
