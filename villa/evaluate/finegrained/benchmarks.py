"""Public fine-grained benchmarks, read from local copies in their published layouts, and their metrics.

Each loader returns a list of items (plain dicts) and raises one :class:`VillaError` line that says which files it
expected and where to get them. Each ``score_*`` function takes the items and a :class:`~villa.evaluate.finegrained.scorer.Scorer`
and returns the benchmark's metrics; the metric definitions are pure functions of the similarity scores
(``*_metrics``), tested on hand-made score tables.

Layouts (``data_dir``):
- Winoground (huggingface.co/datasets/facebook/winoground): ``examples.jsonl`` (``id``, ``caption_0``,
  ``caption_1``, ``image_0``, ``image_1``, ``tag``...) and ``images/<image_0>.png``; either at the top or under ``data/``.
- VALSE (github.com/Heidelberg-NLP/VALSE): one JSON per piece (``<piece>.json``: ``{id: {dataset, image_file, caption,
  foil, mturk, ...}}``) at the top or under ``data/``, images under ``images/<dataset>/<image_file>`` or
  ``images/<image_file>``. ``valid_only`` keeps the samples with ``mturk.caption >= 2`` (VALSE's valid set).
- VSR (github.com/cambridgeltl/visual-spatial-reasoning): a jsonl (``image``, ``caption``, ``label``, ``relation``),
  images under ``images/``. A contrastive model gives a score, not a decision: the threshold is fitted on
  ``dev.jsonl`` when it is beside the evaluated file, else it is the median score of the evaluated file (label-free).
  Only zero-shot scoring is possible here (no VSR training).
- SVO-Probes (github.com/deepmind/svo_probes): ``svo_probes.csv`` (``sentence``, ``pos_image_id``,
  ``neg_image_id``, ``subj_neg``, ``verb_neg``, ``obj_neg``; or ``pos_url`` / ``neg_url`` whose file names key the
  images), images under ``images/`` as ``<id>.<ext>`` or the URL's file name.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from villa.core.errors import VillaError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _need(path: Path, what: str, where: str) -> Path:
    if not path.exists():
        raise VillaError(f"{what} not found: {path}; {where}")
    return path


def _first(data_dir: Path, *names: str) -> Optional[Path]:
    for n in names:
        for base in (data_dir, data_dir / "data"):
            if (base / n).exists():
                return base / n
    return None


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    items = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise VillaError(f"{path} line {i} is not JSON ({e.msg}); re-download the file") from e
            missing = [k for k in required if k not in obj]
            if missing:
                raise VillaError(f"{path} line {i} lacks {', '.join(missing)}; expected fields {', '.join(required)}")
            items.append(obj)
    if not items:
        raise VillaError(f"{path} holds no examples; re-download the file")
    return items


def read_json(path: Path, benchmark: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise VillaError(f"{benchmark}: {path} is not JSON ({e.msg}); re-download it") from e


def _image(folder: Path, stem: str, benchmark: str) -> Path:
    p = folder / stem
    if p.suffix.lower() in IMAGE_EXTS and p.is_file():
        return p
    for ext in IMAGE_EXTS:
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    raise VillaError(
        f"{benchmark}: image {stem!r} not found in {folder} (tried {', '.join(IMAGE_EXTS)}); "
        "unpack the benchmark's images there"
    )


# --- Winoground -------------------------------------------------------------------------------------------------

WINOGROUND_WHERE = "download examples.jsonl and images.zip from huggingface.co/datasets/facebook/winoground"


def load_winoground(data_dir: Path) -> list[dict[str, Any]]:
    path = _first(data_dir, "examples.jsonl")
    if path is None:
        raise VillaError(f"Winoground: {data_dir}/examples.jsonl not found; {WINOGROUND_WHERE} (images/ beside it)")
    items = _read_jsonl(path, ("caption_0", "caption_1", "image_0", "image_1"))
    images = _need(path.parent / "images", "Winoground images folder", WINOGROUND_WHERE)
    for it in items:
        it["image_path_0"] = _image(images, it["image_0"], "Winoground")
        it["image_path_1"] = _image(images, it["image_1"], "Winoground")
    return items


def winoground_metrics(s: np.ndarray) -> dict[str, float]:
    """``s`` (N, 2, 2): s[n, c, i] = score of caption c with image i. Text score: each image prefers its caption;
    image score: each caption prefers its image; group: both (Thrush et al., 2022)."""
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    return {
        "text": float(text.mean()),
        "image": float(image.mean()),
        "group": float((text & image).mean()),
        "examples": int(len(s)),
    }


def score_winoground(items: list[dict[str, Any]], scorer) -> dict[str, Any]:
    keys = [str(it[f"image_path_{k}"]) for it in items for k in (0, 1)]
    scorer.embed_images(keys, keys)
    scorer.embed_texts([it[f"caption_{c}"] for it in items for c in (0, 1)])
    s = np.zeros((len(items), 2, 2))
    for c in (0, 1):
        for i in (0, 1):
            s[:, c, i] = scorer.pair_scores(
                [str(it[f"image_path_{i}"]) for it in items], [it[f"caption_{c}"] for it in items]
            )
    out = winoground_metrics(s)
    tags = sorted({it.get("collapsed_tag") or it.get("tag") for it in items} - {None})
    out["per_tag"] = {
        t: winoground_metrics(s[[(it.get("collapsed_tag") or it.get("tag")) == t for it in items]]) for t in tags
    }
    return out


# --- VALSE ------------------------------------------------------------------------------------------------------

VALSE_WHERE = "get the piece JSONs from github.com/Heidelberg-NLP/VALSE (data/) and each source dataset's images"


def load_valse(data_dir: Path, valid_only: bool = True) -> dict[str, list[dict[str, Any]]]:
    folder = data_dir / "data" if (data_dir / "data").is_dir() else data_dir
    files = sorted(folder.glob("*.json"))
    if not files:
        raise VillaError(f"VALSE: no <piece>.json in {folder}; {VALSE_WHERE}")
    images = _need(data_dir / "images", "VALSE images folder", VALSE_WHERE)
    pieces = {}
    for f in files:
        try:
            raw = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise VillaError(f"VALSE: {f} is not JSON ({e.msg}); re-download it") from e
        if not isinstance(raw, dict):
            raise VillaError(f"VALSE: {f} is not a mapping of sample id -> sample; re-download it")
        items = []
        for key, it in raw.items():
            missing = [k for k in ("image_file", "caption", "foil") if k not in it]
            if missing:
                raise VillaError(f"VALSE: {f} sample {key!r} lacks {', '.join(missing)}")
            if valid_only and it.get("mturk", {}).get("caption", 3) < 2:
                continue
            sub = images / str(it.get("dataset", ""))
            it = {**it, "id": key, "image_path": _image(sub if sub.is_dir() else images, it["image_file"], "VALSE")}
            items.append(it)
        pieces[f.stem] = items
    return pieces


def pairwise_accuracy(caption_scores: np.ndarray, foil_scores: np.ndarray) -> float:
    """VALSE's acc_r: how often the caption scores above its foil for the same image."""
    return float((caption_scores > foil_scores).mean()) if len(caption_scores) else float("nan")


def score_valse(pieces: dict[str, list[dict[str, Any]]], scorer) -> dict[str, Any]:
    out: dict[str, Any] = {"per_piece": {}}
    cap_all, foil_all = [], []
    for name, items in pieces.items():
        keys = [str(it["image_path"]) for it in items]
        scorer.embed_images(keys, keys)
        scorer.embed_texts([it["caption"] for it in items] + [it["foil"] for it in items])
        c = scorer.pair_scores(keys, [it["caption"] for it in items])
        f = scorer.pair_scores(keys, [it["foil"] for it in items])
        out["per_piece"][name] = {"pairwise_accuracy": pairwise_accuracy(c, f), "examples": len(items)}
        cap_all.append(c)
        foil_all.append(f)
    out["pairwise_accuracy"] = pairwise_accuracy(np.concatenate(cap_all), np.concatenate(foil_all))
    out["examples"] = int(sum(len(v) for v in pieces.values()))
    return out


# --- VSR --------------------------------------------------------------------------------------------------------

VSR_WHERE = "get the jsonl splits and images from github.com/cambridgeltl/visual-spatial-reasoning"


def load_vsr(data_dir: Path, split: str = "test") -> dict[str, list[dict[str, Any]]]:
    path = _first(data_dir, f"{split}.jsonl")
    if path is None:
        raise VillaError(f"VSR: {data_dir}/{split}.jsonl not found; {VSR_WHERE}")
    images = _need(data_dir / "images", "VSR images folder", VSR_WHERE)
    out = {}
    for name, p in ((split, path), ("dev", path.parent / "dev.jsonl")):
        if name in out or not p.is_file():
            continue
        items = _read_jsonl(p, ("image", "caption", "label", "relation"))
        for it in items:
            it["image_path"] = _image(images, it["image"], "VSR")
        out[name] = items
    return out


def threshold_accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    return float(((scores > threshold) == labels.astype(bool)).mean())


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold (midpoint between sorted scores) with the highest accuracy on these labelled scores."""
    s = np.sort(scores)
    cands = np.concatenate([[s[0] - 1e-6], (s[1:] + s[:-1]) / 2, [s[-1] + 1e-6]])
    accs = [threshold_accuracy(scores, labels, t) for t in cands]
    return float(cands[int(np.argmax(accs))])


def score_vsr(splits: dict[str, list[dict[str, Any]]], scorer, split: str = "test") -> dict[str, Any]:
    scores = {}
    for name, items in splits.items():
        keys = [str(it["image_path"]) for it in items]
        scorer.embed_images(keys, keys)
        scorer.embed_texts([it["caption"] for it in items])
        scores[name] = scorer.pair_scores(keys, [it["caption"] for it in items])
    items, s = splits[split], scores[split]
    labels = np.array([int(it["label"]) for it in items])
    if "dev" in splits and split != "dev":
        t = best_threshold(scores["dev"], np.array([int(it["label"]) for it in splits["dev"]]))
        how = "fitted on dev.jsonl"
    else:
        t, how = float(np.median(s)), "median score of the evaluated file (no dev.jsonl)"
    rel = np.array([it["relation"] for it in items])
    per = {r: threshold_accuracy(s[rel == r], labels[rel == r], t) for r in sorted(set(rel))}
    return {
        "accuracy": threshold_accuracy(s, labels, t),
        "threshold": t,
        "threshold_from": how,
        "per_relation": per,
        "examples": int(len(items)),
        "note": "zero-shot: a contrastive model is not trained on VSR",
    }


# --- SVO-Probes -------------------------------------------------------------------------------------------------

SVO_WHERE = "get svo_probes.csv from github.com/deepmind/svo_probes and download its images into images/"
SVO_KINDS = ("subj_neg", "verb_neg", "obj_neg")


def load_svo_probes(data_dir: Path) -> list[dict[str, Any]]:
    path = _first(data_dir, "svo_probes.csv")
    if path is None:
        raise VillaError(f"SVO-Probes: {data_dir}/svo_probes.csv not found; {SVO_WHERE}")
    images = _need(data_dir / "images", "SVO-Probes images folder", SVO_WHERE)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise VillaError(f"SVO-Probes: {path} holds no rows; re-download it")
    cols = set(rows[0])
    has_ids = {"pos_image_id", "neg_image_id"} <= cols
    need = {"sentence", *SVO_KINDS} | ({"pos_image_id", "neg_image_id"} if has_ids else {"pos_url", "neg_url"})
    if not need <= cols:
        raise VillaError(
            f"SVO-Probes: {path} lacks columns {', '.join(sorted(need - cols))}; expected the published CSV"
        )
    items = []
    for r in rows:
        keys = (r["pos_image_id"], r["neg_image_id"]) if has_ids else (Path(r["pos_url"]).name, Path(r["neg_url"]).name)
        kinds = [k for k in SVO_KINDS if str(r[k]).strip().lower() in ("true", "1")]
        items.append(
            {
                "sentence": r["sentence"],
                "pos": _image(images, keys[0], "SVO-Probes"),
                "neg": _image(images, keys[1], "SVO-Probes"),
                "kind": kinds[0] if kinds else "none",
            }
        )
    return items


def score_svo_probes(items: list[dict[str, Any]], scorer) -> dict[str, Any]:
    pos = [str(it["pos"]) for it in items]
    neg = [str(it["neg"]) for it in items]
    scorer.embed_images(pos + neg, pos + neg)
    sent = [it["sentence"] for it in items]
    scorer.embed_texts(sent)
    right = scorer.pair_scores(pos, sent) > scorer.pair_scores(neg, sent)
    kind = np.array([it["kind"] for it in items])
    return {
        "accuracy": float(right.mean()),
        "examples": int(len(items)),
        "per_kind": {k: float(right[kind == k].mean()) for k in SVO_KINDS if (kind == k).any()},
    }


# --- SugarCrepe -------------------------------------------------------------------------------------------------

SUGARCREPE_WHERE = (
    "get data/*.json from github.com/RAIVNLab/sugar-crepe and COCO's val2017 images (images/ or val2017/)"
)
SUGARCREPE_FILES = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")


def load_sugarcrepe(data_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """SugarCrepe (Hsieh et al., 2023): one JSON per add/replace/swap x att/obj/rel (``{id: {filename, caption,
    negative_caption}}``) at the top or under ``data/``; COCO val2017 images under ``images/`` or ``val2017/``."""
    folder = next((data_dir / d for d in ("images", "val2017") if (data_dir / d).is_dir()), None)
    if folder is None:
        raise VillaError(f"SugarCrepe: no images/ or val2017/ folder in {data_dir}; {SUGARCREPE_WHERE}")
    pieces = {}
    for name in SUGARCREPE_FILES:
        path = _first(data_dir, f"{name}.json")
        if path is None:
            continue
        raw = read_json(path, "SugarCrepe")
        items = []
        for key, it in raw.items() if isinstance(raw, dict) else enumerate(raw):
            missing = [k for k in ("filename", "caption", "negative_caption") if k not in it]
            if missing:
                raise VillaError(f"SugarCrepe: {path} item {key} lacks {', '.join(missing)}; re-download it")
            items.append({**it, "id": str(key), "image_path": _image(folder, it["filename"], "SugarCrepe")})
        pieces[name] = items
    if not pieces:
        raise VillaError(
            f"SugarCrepe: none of {', '.join(n + '.json' for n in SUGARCREPE_FILES)} in {data_dir}; {SUGARCREPE_WHERE}"
        )
    return pieces


def score_sugarcrepe(pieces: dict[str, list[dict[str, Any]]], scorer) -> dict[str, Any]:
    """Accuracy (the positive caption scores above the negative one for the image) per file, and the mean per
    operation (add, replace, swap) over its files, as the SugarCrepe paper reports."""
    out: dict[str, Any] = {"per_file": {}}
    for name, items in pieces.items():
        keys = [str(it["image_path"]) for it in items]
        scorer.embed_images(keys, keys)
        scorer.embed_texts([it["caption"] for it in items] + [it["negative_caption"] for it in items])
        acc = pairwise_accuracy(
            scorer.pair_scores(keys, [it["caption"] for it in items]),
            scorer.pair_scores(keys, [it["negative_caption"] for it in items]),
        )
        out["per_file"][name] = {"accuracy": acc, "examples": len(items)}
    for op in ("add", "replace", "swap"):
        accs = [v["accuracy"] for k, v in out["per_file"].items() if k.startswith(op + "_")]
        if accs:
            out[op] = float(np.mean(accs))
    out["examples"] = int(sum(len(v) for v in pieces.values()))
    return out


# --- ARO (VG-Relation, VG-Attribution) --------------------------------------------------------------------------

ARO_WHERE = (
    "get visual_genome_relation.json / visual_genome_attribution.json and their images/ from "
    "github.com/mertyg/vision-language-models-are-bows"
)
ARO_FILES = {"vg_relation": "visual_genome_relation.json", "vg_attribution": "visual_genome_attribution.json"}


def load_aro(data_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """ARO's Visual Genome tasks (Yuksekgonul et al., ICLR 2023): lists of ``{image_path, bbox_x, bbox_y, bbox_w,
    bbox_h, true_caption, false_caption, relation_name | attributes}``; images under ``images/`` (the file name of
    ``image_path``). As ARO's code, each image is cropped to the box before scoring. COCO-Order and Flickr30k-Order
    are in :mod:`villa.evaluate.finegrained.order`."""
    images = _need(data_dir / "images", "ARO images folder", ARO_WHERE)
    tasks = {}
    for task, fname in ARO_FILES.items():
        path = _first(data_dir, fname)
        if path is None:
            continue
        raw = read_json(path, "ARO")
        items = []
        for i, it in enumerate(raw):
            missing = [
                k
                for k in ("image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption")
                if k not in it
            ]
            if missing:
                raise VillaError(f"ARO: {path} item {i} lacks {', '.join(missing)}; re-download it")
            group = it.get("relation_name") or " ".join(it.get("attributes") or []) or "all"
            items.append({**it, "image": _image(images, Path(it["image_path"]).name, "ARO"), "group": group})
        tasks[task] = items
    if not tasks:
        raise VillaError(f"ARO: neither {' nor '.join(ARO_FILES.values())} in {data_dir}; {ARO_WHERE}")
    return tasks


def score_aro(tasks: dict[str, list[dict[str, Any]]], scorer) -> dict[str, Any]:
    """Per task: accuracy (true caption above false) over items, and the macro mean over relations/attributes."""
    from villa.evaluate.finegrained.scorer import load_rgb

    out: dict[str, Any] = {}
    for task, items in tasks.items():
        keys, crops = [], []
        for k, it in enumerate(items):
            x, y, w, h = (float(it[c]) for c in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
            keys.append(f"{task}:{k}")
            crops.append(load_rgb(it["image"]).crop((x, y, x + w, y + h)))
        scorer.embed_images(keys, crops)
        t, f = [it["true_caption"] for it in items], [it["false_caption"] for it in items]
        scorer.embed_texts(t + f)
        right = scorer.pair_scores(keys, t) > scorer.pair_scores(keys, f)
        group = np.array([it["group"] for it in items])
        per = {g: float(right[group == g].mean()) for g in sorted(set(group.tolist()))}
        out[task] = {
            "accuracy": float(right.mean()),
            "macro_accuracy": float(np.mean(list(per.values()))),
            "examples": len(items),
            "per_group": per,
        }
    return out
