"""Public fine-grained benchmarks, read from local copies in their published layouts, and their metrics.

Each loader returns a list of items (plain dicts) and raises one :class:`VillaError` line that says which files it
expected and where to get them. Each ``score_*`` function takes the items and a :class:`~villa.finegrained.scorer.Scorer`
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

from villa.errors import VillaError

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


def _image(folder: Path, stem: str, benchmark: str) -> Path:
    p = folder / stem
    if p.suffix.lower() in IMAGE_EXTS and p.is_file():
        return p
    for ext in IMAGE_EXTS:
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    raise VillaError(f"{benchmark}: image {stem!r} not found in {folder} (tried {', '.join(IMAGE_EXTS)}); "
                     "unpack the benchmark's images there")  # fmt: skip


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
    return {"text": float(text.mean()), "image": float(image.mean()), "group": float((text & image).mean()),
            "examples": int(len(s))}  # fmt: skip


def score_winoground(items: list[dict[str, Any]], scorer) -> dict[str, Any]:
    keys = [str(it[f"image_path_{k}"]) for it in items for k in (0, 1)]
    scorer.embed_images(keys, keys)
    scorer.embed_texts([it[f"caption_{c}"] for it in items for c in (0, 1)])
    s = np.zeros((len(items), 2, 2))
    for c in (0, 1):
        for i in (0, 1):
            s[:, c, i] = scorer.pair_scores([str(it[f"image_path_{i}"]) for it in items],
                                            [it[f"caption_{c}"] for it in items])  # fmt: skip
    out = winoground_metrics(s)
    tags = sorted({it.get("collapsed_tag") or it.get("tag") for it in items} - {None})
    out["per_tag"] = {t: winoground_metrics(s[[(it.get("collapsed_tag") or it.get("tag")) == t for it in items]])
                      for t in tags}  # fmt: skip
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
    return {"accuracy": threshold_accuracy(s, labels, t), "threshold": t, "threshold_from": how,
            "per_relation": per, "examples": int(len(items)), "note": "zero-shot: a contrastive model is not trained on VSR"}  # fmt: skip


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
        items.append({"sentence": r["sentence"], "pos": _image(images, keys[0], "SVO-Probes"),
                      "neg": _image(images, keys[1], "SVO-Probes"), "kind": kinds[0] if kinds else "none"})  # fmt: skip
    return items


def score_svo_probes(items: list[dict[str, Any]], scorer) -> dict[str, Any]:
    pos = [str(it["pos"]) for it in items]
    neg = [str(it["neg"]) for it in items]
    scorer.embed_images(pos + neg, pos + neg)
    sent = [it["sentence"] for it in items]
    scorer.embed_texts(sent)
    right = scorer.pair_scores(pos, sent) > scorer.pair_scores(neg, sent)
    kind = np.array([it["kind"] for it in items])
    return {"accuracy": float(right.mean()), "examples": int(len(items)),
            "per_kind": {k: float(right[kind == k].mean()) for k in SVO_KINDS if (kind == k).any()}}  # fmt: skip
