"""Zero-shot image classification: the paper's chest X-ray evaluation (a model trained on MIMIC-CXR, tested on the
CheXpert 5x200 set), for any CSV of images and labels.

    python -m villa.evaluate.classification csv=chexpert_5x200.csv images=CheXpert-v1.0 model.pretrained=CKPT \
        [classes=[Atelectasis,Cardiomegaly,...]] [prompts=classes.yaml] [readout=image|region grid=[1,2,3]]

The CSV has a header with an image path column (``image``, or ``Path`` as CheXpert's) relative to ``images`` and a
label column (``label``); every label must be one of ``classes`` (default: the labels present, sorted). Each class
is embedded as the L2-normalised mean of its prompts (``prompts``: a YAML ``{class: [prompt, ...]}``; default
CLIP-style "a photo of {class}." templates). ``readout=image``: the whole image as one box through the region path
(as training's whole-image pairs); ``readout=region``: each class's best-matching cell of a grid (``grid`` levels),
the region-level readout. Top-1 accuracy overall (micro) and per class, and the confusion matrix.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from omegaconf import DictConfig

from villa.core.config import hydra_entry
from villa.core.errors import VillaError
from villa.core.io import read_text, write_json_atomic
from villa.core.runtime import Runtime
from villa.data.annotations import boxes_only, check_image_files, path_inside
from villa.data.regions import grid_boxes
from villa.models.clip import Clip
from villa.models.region_encoder import RegionEncoder
from villa.models.text import encode_texts
from villa.preprocess import embed_regions

log = logging.getLogger(__name__)
DEFAULT_TEMPLATES = ("a photo of {}.", "an image of {}.", "{}.")
CHEXPERT_5 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def read_labels(path: str | Path, classes: Optional[Sequence[str]]) -> tuple[list[str], list[str], list[str]]:
    """(image paths, labels, classes) from a CSV; unknown labels and bad rows are one line naming the file."""
    p = Path(path)
    if not p.is_file():
        raise VillaError(f"classification CSV not found: {p}")
    with io.StringIO(read_text(p), newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        img_col = next((c for c in ("image", "Path", "path", "filename") if c in cols), None)
        lab_col = next((c for c in ("label", "Label", "class") if c in cols), None)
        if img_col is None or lab_col is None:
            raise VillaError(f"{p}: the header needs an image column (image or Path) and a label column (label)")
        rows = [(r[img_col], r[lab_col]) for r in reader]
    if not rows:
        raise VillaError(f"{p} has no rows")
    paths, labels = [r[0] for r in rows], [r[1] for r in rows]
    classes = list(classes) if classes else sorted(set(labels))
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise VillaError(f"{p}: labels {unknown[:5]} are not among the classes {classes}; fix the CSV or the classes")
    bad = [x for x in paths if not path_inside(x)]
    if bad:
        raise VillaError(f"{p}: image path {bad[0]!r} leaves the images folder; give paths relative to it")
    return paths, labels, classes


def class_prompts(classes: Sequence[str], prompts: Optional[str]) -> list[list[str]]:
    if not prompts:
        return [[t.format(c) for t in DEFAULT_TEMPLATES] for c in classes]
    spec = yaml.safe_load(read_text(prompts)) if Path(prompts).is_file() else None
    if not isinstance(spec, dict):
        raise VillaError(f"prompts file {prompts} must be a YAML mapping {{class: [prompt, ...]}}")
    missing = [c for c in classes if not spec.get(c)]
    if missing:
        raise VillaError(f"{prompts} gives no prompt for {missing[:5]}; give every class at least one")
    return [[str(x) for x in spec[c]] for c in classes]


def accuracy(sim: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Top-1 accuracy (%) overall and per class, and the confusion matrix (rows: true class, columns: predicted),
    from (N, C) scores; ties go to the lower class index."""
    pred = sim.argmax(1)
    conf = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(conf, (labels, pred), 1)
    per = [100 * conf[c, c] / conf[c].sum() if conf[c].sum() else None for c in range(n_classes)]
    return {"accuracy": float(100 * (pred == labels).mean()), "per_class": per, "confusion": conf.tolist()}


@torch.no_grad()
def zero_shot_classification(
    clip: Clip,
    opts: dict[str, Any],
    runtime: Runtime,
    csv_path: str | Path,
    images: str | Path,
    classes: Optional[Sequence[str]] = None,
    prompts: Optional[str] = None,
    readout: str = "image",
    grid: Sequence[Any] = (1, 2, 3),
    batch_size: int = 64,
    num_workers: int = 2,
) -> dict[str, Any]:
    from villa.data.importers.common import image_sizes as read_sizes

    if readout not in ("image", "region"):
        raise VillaError(f"readout={readout!r}: use image (whole image) or region (best grid cell per class)")
    paths, labels, classes = read_labels(csv_path, classes)
    root = Path(images)
    check_image_files(root, paths, list(range(len(paths))))
    sizes = read_sizes(root, paths)
    n = len(paths)
    if readout == "image":
        offsets = np.arange(n + 1, dtype=np.int64)
        boxes = np.concatenate([np.zeros((n, 2)), sizes], 1).astype(np.float32)
    else:
        offsets, boxes = grid_boxes(sizes, grid)
    ann = boxes_only(root, np.arange(n), paths, sizes, offsets, boxes)
    emb = np.zeros((len(boxes), clip.embed_dim), np.float32)
    encoder = RegionEncoder(clip.model.visual, normalize=opts["normalize"], input_size=opts["input_size"])
    embed_regions(encoder.to(runtime.device).eval(), ann, runtime, emb, batch_size, num_workers, progress=False)
    prompt_lists = class_prompts(classes, prompts)
    flat = [p for ps in prompt_lists for p in ps]
    t = F.normalize(encode_texts(clip, flat, runtime).float().cpu(), dim=-1)
    owner = torch.repeat_interleave(torch.arange(len(classes)), torch.tensor([len(p) for p in prompt_lists]))
    text = F.normalize(torch.zeros(len(classes), t.shape[1]).index_add_(0, owner, t), dim=-1)
    sim = F.normalize(torch.from_numpy(emb), dim=-1) @ text.t()  # (R, C)
    if readout == "region":  # each class scores by its best cell of the image
        img = torch.repeat_interleave(torch.arange(n), torch.from_numpy(np.diff(offsets)))
        sim = torch.full((n, len(classes)), -2.0).scatter_reduce(0, img[:, None].expand_as(sim), sim, "amax")
    index = {c: i for i, c in enumerate(classes)}
    res = accuracy(sim.numpy(), np.array([index[x] for x in labels]), len(classes))
    res["per_class"] = dict(zip(classes, res["per_class"]))
    res.update({"images": n, "classes": list(classes), "readout": readout})
    return res


def run_classification(cfg: DictConfig) -> dict[str, Any]:
    from villa.core.schemas import validate_config
    from villa.evaluate.retrieval import model_from_config

    validate_config(cfg, "classification")
    runtime, clip, opts = model_from_config(cfg)
    res = zero_shot_classification(
        clip,
        opts,
        runtime,
        cfg.csv,
        cfg.images,
        list(cfg.classes) if cfg.classes else None,
        cfg.prompts,
        cfg.readout,
        list(cfg.grid),
        cfg.batch_size,
        cfg.num_workers,
    )
    res.update({"label": cfg.label, "model": clip.source})
    write_json_atomic(cfg.output, res)
    print(f"{'zero-shot classification':<26}{'top-1 %':>9}" + "".join(f"{c[:12]:>14}" for c in res["classes"]))
    per = [res["per_class"][c] for c in res["classes"]]
    print(f"{cfg.label:<26}{res['accuracy']:>9.1f}" + "".join(f"{'-' if v is None else f'{v:.1f}':>14}" for v in per))
    print(f"wrote {cfg.output}")
    return res


main = hydra_entry("classification", run_classification, __doc__)


if __name__ == "__main__":
    main()
