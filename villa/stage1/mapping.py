"""Stage 1's output: assign each caption attribute to regions, give each region its sentences, write mapping.feather.

Everything is batched over all images of all splits: scores come from the heads in large region chunks, the
assignment rule is a segment max, and sentences are matched through a table of the unique caption sentences.
(The original runs this image by image with batch size 1 and pandas ``iterrows``.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from villa.core.errors import VillaError
from villa.core.io import atomic_file, write_json_atomic
from villa.core.provenance import file_sha256
from villa.core.runtime import Runtime
from villa.data.annotations import Annotations
from villa.data.attributes import AttributeMatcher
from villa.data.batches import RegionBank
from villa.data.embeddings import EmbeddingSet
from villa.data.vocab import SENTENCE_SEP, Vocabulary, split_sentences
from villa.models.projection import MultiHeadProjection
from villa.stage1.loss import segment_max

log = logging.getLogger(__name__)
MAPPING_META = "villa_mapping"


@torch.no_grad()
def score_regions(
    bank: RegionBank,
    attr_emb: torch.Tensor,
    runtime: Runtime,
    model: Optional[MultiHeadProjection] = None,
    chunk: int = 8192,
    amp: bool = False,
    pairs: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Cosine similarity of regions with attributes, (R, A) float32.

    With ``model``: each attribute's head applied to the region (Stage 1). Without: the raw region embedding
    against the attribute embedding (the paper's zero-shot mapping). In fp32 unless ``amp`` (the original maps in
    fp32; bf16 scores flip 26-34 of 20,053 assignment decisions at epsilon 0.2).

    ``pairs`` (R, A) bool: score only these (region, attribute) pairs, e.g. each region with the attributes of its
    image's caption, the only ones the assignment rule uses; each head then runs on just the regions that need it,
    batched over all images. The other entries are -inf.
    """
    n = len(bank.memmap)
    e = F.normalize(attr_emb.to(runtime.device).float(), dim=-1)
    ctx = runtime.autocast if amp else contextlib.nullcontext

    def rows_of(idx: np.ndarray) -> torch.Tensor:
        if bank.tensor is not None:
            return bank.tensor.index_select(0, torch.from_numpy(idx).to(bank.tensor.device))
        return torch.from_numpy(np.asarray(bank.memmap[idx], np.float32)).to(runtime.device)

    if pairs is not None and model is not None:
        out = np.full((n, attr_emb.shape[0]), -np.inf, dtype=np.float32)
        for a in np.flatnonzero(pairs.any(0)):
            rows = np.flatnonzero(pairs[:, a])
            head = torch.tensor([a], device=runtime.device)
            for s in range(0, len(rows), chunk):
                idx = rows[s : s + chunk]
                with ctx():
                    z = model(rows_of(idx), heads=head)[0]
                out[idx, a] = (F.normalize(z.float(), dim=-1) @ e[a]).cpu().numpy()
        return out
    out = np.empty((n, attr_emb.shape[0]), dtype=np.float32)
    for s in range(0, n, chunk):
        idx = np.arange(s, min(s + chunk, n))
        x = bank.tensor[s : s + chunk] if bank.tensor is not None else rows_of(idx)
        with ctx():
            sc = model.scores(x, e) if model is not None else F.normalize(x.float(), dim=-1) @ e.t()
        out[s : s + len(idx)] = sc.float().cpu().numpy()
    return out


def assign(scores: np.ndarray, offsets: np.ndarray, image_attributes: np.ndarray, epsilon: float = 0.2) -> np.ndarray:
    """For every image and every attribute its text mentions: the regions scoring > (max - epsilon). (R, A) bool."""
    counts = np.diff(offsets)
    region_image = np.repeat(np.arange(len(counts)), counts)
    valid = image_attributes[region_image]  # (R, A)
    s = torch.from_numpy(np.where(valid, scores, -np.inf).astype(np.float32))
    best = segment_max(s, torch.from_numpy(region_image), len(counts)).numpy()  # (I, A), exact float32 maxima
    # the threshold in float64, as the original's ``max - epsilon`` (float32 would move scores at the threshold)
    return valid & (scores.astype(np.float64) > best[region_image].astype(np.float64) - float(epsilon))


def _sentence_table(texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Split captions on '.' into (stripped, non-empty) sentences: per-image offsets, unique-sentence ids, uniques."""
    sents = [split_sentences(text) for text in texts]
    counts = np.fromiter((len(s) for s in sents), dtype=np.int64, count=len(sents))
    flat = [t for s in sents for t in s]
    uniq, inv = (
        np.unique(np.array(flat, dtype=object), return_inverse=True) if flat else (np.array([]), np.array([], int))
    )
    return np.concatenate([[0], np.cumsum(counts)]), inv.astype(np.int64), list(uniq)


SENTENCE_CHOICES = ("image", "region")
TEXT_UNITS = ("phrase", "sentence")


def assign_text(
    texts: list[str],
    offsets: np.ndarray,
    assigned: np.ndarray,
    vocab: Vocabulary,
    rng: np.random.Generator,
    per: str = "image",
    unit: str = "phrase",
) -> list[str]:
    """Each region's text: for each of its attributes, a caption sentence that names it (chosen at random among
    matches, seeded), joined with " . " in vocabulary order.

    ``unit="phrase"`` (default) gives each attribute only the phrase around it in that sentence
    (:meth:`AttributeMatcher.phrases`: split at , ; : and, but, or, while, whereas, with, plus), and a region's
    identical phrases once: "a red bus and a blue boat" gives the bus's region "a red bus", not the sentence twice.
    ``unit="sentence"`` is the original's: the whole sentence per attribute, repeats kept. On DocMNIST, whose
    sentences each name one attribute, the two are the same (tested).

    ``per="image"`` (the original's): one sentence is drawn per (image, attribute) and every region assigned that
    attribute gets it. ``per="region"``: one is drawn per (region, attribute), so two regions sharing an attribute
    may get different sentences.

    A sentence names an attribute when :class:`villa.attributes.AttributeMatcher` finds it there: the attribute or
    one of its aliases, case-insensitive whole words, not negated (the matcher that wrote the dataset's
    ``attributes``). The original tests substring containment of the attribute word, which is the same on DocMNIST
    but would match e.g. "red" inside "covered" on other data (docs/differences.md).
    """
    if per not in SENTENCE_CHOICES:
        raise VillaError(f"sentence_choice={per!r}: use image (the original's) or region")
    if unit not in TEXT_UNITS:
        raise VillaError(f"region_text={unit!r}: use phrase or sentence (the original's)")
    sent_off, sent_id, uniq = _sentence_table(texts)
    matcher = AttributeMatcher(vocab)
    match = matcher.sentence_matrix(uniq)  # (unique sentences, A)
    counts = np.diff(offsets)
    region_image = np.repeat(np.arange(len(counts)), counts)
    pr, pa_ = np.nonzero(assigned)  # region-attribute pairs, sorted by region then attribute
    # the units a sentence is drawn for: (region, attribute) pairs, or their (image, attribute) groups
    if per == "region":
        unit_of_pair = np.arange(len(pr))
    else:
        _, unit_of_pair = np.unique(region_image[pr] * assigned.shape[1] + pa_, return_inverse=True)
        unit_of_pair = unit_of_pair.reshape(-1)
    n_units = int(unit_of_pair.max()) + 1 if len(pr) else 0
    first_pair = np.full(n_units, len(pr))
    np.minimum.at(first_pair, unit_of_pair, np.arange(len(pr)))
    u_img, u_attr = region_image[pr[first_pair]], pa_[first_pair]
    n_sent = sent_off[u_img + 1] - sent_off[u_img]
    rep = np.repeat(np.arange(n_units), n_sent)  # candidate (unit, sentence) rows
    within = np.arange(len(rep)) - np.repeat(np.cumsum(n_sent) - n_sent, n_sent)
    cand = sent_id[sent_off[u_img[rep]] + within]
    ok = match[cand, u_attr[rep]]
    rep, cand = rep[ok], cand[ok]
    key = rng.random(len(rep))
    order = np.lexsort((key, rep))
    rep, cand = rep[order], cand[order]
    first = np.ones(len(rep), bool)
    first[1:] = rep[1:] != rep[:-1]
    unit_choice = np.full(n_units, -1)
    unit_choice[rep[first]] = cand[first]
    chosen = unit_choice[unit_of_pair] if len(pr) else np.zeros(0, int)
    has = chosen >= 0
    uniq_arr = np.array(uniq, dtype=object)
    out = [""] * len(region_image)
    pr_has, sent_has = pr[has], uniq_arr[chosen[has]] if has.any() else np.array([], dtype=object)
    if unit == "phrase" and has.any():
        phrases = {int(sid): matcher.phrases(uniq[sid]) for sid in np.unique(chosen[has])}
        sent_has = [phrases[int(sid)][int(a)] for sid, a in zip(chosen[has], pa_[has])]
    bounds = np.searchsorted(pr_has, np.arange(len(region_image) + 1))
    for r in np.flatnonzero(np.diff(bounds)):
        parts = sent_has[bounds[r] : bounds[r + 1]]
        out[r] = SENTENCE_SEP.join(dict.fromkeys(parts) if unit == "phrase" else parts)
    return out


def write_mapping(
    annotations: pa.Table,
    offsets: np.ndarray,
    assigned: np.ndarray,
    region_text: list[str],
    vocab: Vocabulary,
    path: Path,
    made_by: Optional[dict] = None,
    scores: Optional[np.ndarray] = None,
) -> None:
    """The annotations plus ``assigned_attributes`` and ``assigned_text`` per region (and, given the (R, A)
    ``scores``, ``assigned_scores``: each assigned attribute's score, in the same order); written atomically.
    ``made_by`` (the Stage 1 checkpoint, encoder and dataset hash) goes into the schema metadata as JSON
    (``villa_mapping``; read it with :func:`mapping_record`)."""
    names = np.array(vocab.attributes, dtype=object)
    pr, pa_ = np.nonzero(assigned)
    attr_off = np.concatenate([[0], np.cumsum(assigned.sum(1))]).astype(np.int64)
    reg_off = pa.array(offsets.astype(np.int32))
    per_region_attrs = pa.ListArray.from_arrays(pa.array(attr_off.astype(np.int32)), pa.array(names[pa_], pa.string()))
    table = annotations
    for name in ("assigned_attributes", "assigned_text", "assigned_scores"):
        if name in table.column_names:
            table = table.drop_columns([name])
    table = table.append_column("assigned_attributes", pa.ListArray.from_arrays(reg_off, per_region_attrs))
    table = table.append_column("assigned_text", pa.ListArray.from_arrays(reg_off, pa.array(region_text, pa.string())))
    if scores is not None:
        per_region_scores = pa.ListArray.from_arrays(
            pa.array(attr_off.astype(np.int32)), pa.array(scores[pr, pa_].astype(np.float32))
        )
        table = table.append_column("assigned_scores", pa.ListArray.from_arrays(reg_off, per_region_scores))
    if made_by is not None:
        meta = dict(table.schema.metadata or {})
        meta[MAPPING_META] = json.dumps(made_by).encode()
        table = table.replace_schema_metadata(meta)
    with atomic_file(path) as tmp:
        feather.write_feather(table, str(tmp), compression="zstd")


def read_assigned(path: Path, vocab: Vocabulary) -> np.ndarray:
    """A mapping.feather's ``assigned_attributes`` as the (R, A) bool matrix :func:`write_mapping` wrote."""
    table = feather.read_table(str(path), columns=["assigned_attributes"])
    per_region = table.column("assigned_attributes").combine_chunks().flatten()
    lens = np.diff(per_region.offsets.to_numpy())
    flat = per_region.flatten().to_pylist()
    unknown = sorted(set(flat) - set(vocab.index))
    if unknown:
        raise VillaError(f"{path} assigns {unknown[0]!r}, not in the dataset config {vocab.name!r}; pass its dataset=")
    assigned = np.zeros((len(lens), len(vocab)), bool)
    assigned[np.repeat(np.arange(len(lens)), lens), [vocab.index[x] for x in flat]] = True
    return assigned


def mapping_record(path: Path) -> Optional[dict]:
    """What :func:`write_mapping` recorded about the run that made ``path`` (None for a mapping without a record)."""
    try:
        with pa.memory_map(str(path)) as f:
            meta = pa.ipc.open_file(f).schema.metadata or {}
    except (OSError, pa.ArrowInvalid) as e:
        raise VillaError(f"cannot read {path}: {e}; re-run Stage 1 to write it again") from e
    raw = meta.get(MAPPING_META.encode())
    return json.loads(raw) if raw else None


def write_oracle_mapping(data_dir: Path, vocab: Vocabulary, path: Path, seed: int = 23, per: str = "image") -> Path:
    """The ablation's "perfect Stage 1": a mapping.feather whose pairs are the ground truth (``reg_to_attr``),
    with sentences chosen by the same rule as Stage 1's (:func:`assign_text`). Stage 2 trained on it separates what
    mapping errors cost from what the data (budget, complexity) costs."""
    from villa.core.provenance import file_sha256
    from villa.data.annotations import load_annotations

    ann = load_annotations(data_dir, vocab, required_splits=("train", "val"), check_images=False)
    gold = ann.region_attribute_matrix(len(vocab))
    if gold is None:
        raise VillaError(f"{data_dir}: the oracle mapping needs ground-truth regions (a reg_to_attr column)")
    texts = assign_text(ann.text, ann.region_offsets, gold, vocab, np.random.default_rng(seed), per=per)
    made_by = {
        "oracle": True,
        "annotations": file_sha256(Path(data_dir) / "annotations.feather"),
        "sentence_choice": per,
    }
    write_mapping(ann.table, ann.region_offsets, gold, texts, vocab, path, made_by)
    return path


def prf(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Micro precision, recall and F1 over the True entries of two bool arrays of the same shape."""
    tp = int(np.logical_and(pred, gold).sum())
    n_pred, n_gold = int(pred.sum()), int(gold.sum())
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f, "tp": tp, "predicted": n_pred, "gold": n_gold}


def mapping_quality(
    pred: np.ndarray, gold: np.ndarray, attribute_group: Sequence[int], groups: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Micro P/R/F1 over region-attribute pairs, overall and per attribute group. pred, gold: (R, A) bool."""
    out = {"all": prf(pred, gold)}
    ag = np.asarray(attribute_group)
    for gi, g in enumerate(groups):
        cols = ag == gi
        out[g] = prf(pred[:, cols], gold[:, cols])
    return out


def make_mapping(
    cfg: DictConfig,
    model: MultiHeadProjection,
    vocab: Vocabulary,
    ann: Annotations,
    emb: EmbeddingSet,
    bank: RegionBank,
    runtime: Runtime,
) -> dict[str, Any]:
    """Assign attributes to regions for every split, write mapping.feather, score it and the zero-shot rule."""
    log.info("mapping %d images (every split, epsilon=%s)", ann.n_images, cfg.epsilon)
    model.eval()
    attr_emb = torch.from_numpy(emb.attributes)
    image_attrs = ann.attribute_matrix(len(vocab))
    t0 = time.perf_counter()
    caption_pairs = image_attrs[np.repeat(np.arange(ann.n_images), ann.n_regions)]  # what the rule can assign
    scores = score_regions(
        bank, attr_emb, runtime, model, cfg.mapping_batch_regions, amp=cfg.mapping_amp, pairs=caption_pairs
    )
    assigned = assign(scores, ann.region_offsets, image_attrs, cfg.epsilon)
    texts = assign_text(
        ann.text,
        ann.region_offsets,
        assigned,
        vocab,
        np.random.default_rng(cfg.seed),
        per=cfg.sentence_choice,
        unit=cfg.region_text,
    )
    out = Path(cfg.mapping_path)
    made_by = {
        "stage1_checkpoint": str(Path(cfg.checkpoint_dir) / "last.pt"),
        "encoder": emb.encoder,
        "annotations": file_sha256(Path(cfg.data_dir) / "annotations.feather"),
        "epsilon": cfg.epsilon,
        "sentence_choice": cfg.sentence_choice,
        "region_text": cfg.region_text,
    }
    write_mapping(ann.table, ann.region_offsets, assigned, texts, vocab, out, made_by, scores=scores)
    secs = time.perf_counter() - t0
    zero_shot_scores = score_regions(bank, attr_emb, runtime, None, cfg.mapping_batch_regions, amp=cfg.mapping_amp)
    zs = assign(zero_shot_scores, ann.region_offsets, image_attrs, cfg.epsilon)
    result: dict[str, Any] = {
        "mapping": str(out),
        "images": int(ann.n_images),
        "regions": int(len(ann.boxes)),
        "assigned_pairs": int(assigned.sum()),
        "mapping_seconds": round(secs, 3),
        "encoder": emb.encoder,
        "epsilon": cfg.epsilon,
    }
    result.update(mapping_warnings(ann, vocab, image_attrs, assigned, cfg.region_text, cfg.epsilon))
    gold = ann.region_attribute_matrix(len(vocab))
    if gold is not None:
        result["quality"], result["labelled_regions"] = quality_per_split(
            ann, vocab, gold, {"stage1": assigned, "zero_shot": zs}
        )
        print_quality(result["quality"], vocab)
    qpath = out.with_name(out.stem + "_quality.json")
    write_json_atomic(qpath, result)
    log.info("wrote %s (%d regions, %d pairs, %.2fs) and %s", out, len(ann.boxes), assigned.sum(), secs, qpath.name)
    return result


def mapping_warnings(
    ann: Annotations,
    vocab: Vocabulary,
    image_attrs: np.ndarray,
    assigned: np.ndarray,
    unit: str = "phrase",
    epsilon: Optional[float] = None,
) -> dict[str, Any]:
    """What a user should look at before Stage 2, each with examples: captions whose attributes cannot be given
    apart (``region_text=sentence``: several in one sentence; ``phrase``: two of one group in one phrase), and a
    mapping that gives a large share of regions all, or none, of their caption's attributes."""
    shared = shared_text_captions(ann, vocab, image_attrs, unit)
    if shared["captions"]:
        if unit == "sentence":
            log.warning(
                "%d captions name several attributes in one sentence: with region_text=sentence each of them gets "
                "the whole sentence (e.g. %s); region_text=phrase gives each the phrase around it",
                shared["captions"],
                "; ".join(shared["examples"]),
            )
        else:
            log.warning(
                "%d captions name two attributes of one group in one phrase, so both go to any region given either "
                "(e.g. %s); separate them with ',' or 'and', or check the dataset config's aliases",
                shared["captions"],
                "; ".join(shared["examples"]),
            )
    degeneracy = mapping_degeneracy(assigned, image_attrs, ann.region_offsets)
    if degeneracy["all_attributes_share"] >= ALL_SHARE_WARN:
        log.warning(
            "%.0f%% of the regions of images with several regions and attributes get every attribute of their "
            "caption (%.1f attributes per region): the mapping barely separates regions; lower epsilon (now %s), "
            "train Stage 1 longer, or use smaller regions",
            100 * degeneracy["all_attributes_share"],
            degeneracy["attributes_per_region"],
            epsilon,
        )
    if degeneracy["no_attribute_share"] >= NONE_SHARE_WARN:
        log.warning(
            "%.0f%% of the regions of images whose caption has attributes get none of them: raise epsilon, or "
            "use fewer, larger regions (a grid finer than the objects leaves most cells empty)",
            100 * degeneracy["no_attribute_share"],
        )
    return {"shared_text_captions": shared, "degeneracy": degeneracy}


def shared_text_captions(ann: Annotations, vocab: Vocabulary, image_attrs: np.ndarray, unit: str) -> dict[str, Any]:
    """Captions with text two attributes must share (see :func:`mapping_warnings`): how many, and up to three
    examples by image file and sentence."""
    matcher = AttributeMatcher(vocab)
    group = np.asarray(vocab.attribute_group)
    sent_off, sent_id, uniq = _sentence_table(list(ann.text))
    flagged = np.zeros(len(uniq), bool)
    for u, sentence in enumerate(uniq):
        phrases = matcher.phrases(sentence)
        if unit == "sentence":
            flagged[u] = len(phrases) >= 2
            continue
        by_phrase: dict[str, list[int]] = {}
        for a, ph in phrases.items():
            by_phrase.setdefault(ph, []).append(a)
        flagged[u] = any(len(set(group[a])) < len(a) for a in map(np.array, by_phrase.values()))
    n_sent = np.diff(sent_off)
    hit = np.zeros(len(n_sent), bool)
    np.logical_or.at(hit, np.repeat(np.arange(len(n_sent)), n_sent), flagged[sent_id])
    hit &= image_attrs.sum(1) >= 2
    examples = []
    for row in np.flatnonzero(hit)[:3]:
        sid = next(i for i in sent_id[sent_off[row] : sent_off[row + 1]] if flagged[i])
        examples.append(f"{ann.filepath[row]}: {uniq[sid]!r}")
    return {"captions": int(hit.sum()), "examples": examples}


# mapping_warnings' thresholds: a working mapping gives each attribute to about one region of an image with several
ALL_SHARE_WARN = 0.2  # share of regions (images with >= 2 regions and >= 2 attributes) given every attribute
NONE_SHARE_WARN = 0.8  # share of regions (images whose caption has attributes) given none


def mapping_degeneracy(assigned: np.ndarray, image_attrs: np.ndarray, offsets: np.ndarray) -> dict[str, Any]:
    """How close a mapping is to "every attribute to every region" or to "nothing anywhere": among regions of images
    with at least two regions and two attributes, the share that receive all their image's attributes; among
    regions of images with attributes, the share that receive none; attributes per region. ``degenerate`` when the
    first is at least ``ALL_SHARE_WARN`` or the second at least ``NONE_SHARE_WARN``."""
    counts = np.diff(offsets)
    region_image = np.repeat(np.arange(len(counts)), counts)
    n_attr = image_attrs.sum(1)[region_image]
    got = assigned.sum(1)
    eligible = (counts[region_image] >= 2) & (n_attr >= 2)
    share = float((got[eligible] == n_attr[eligible]).mean()) if eligible.any() else 0.0
    with_attrs = n_attr >= 1
    none_share = float((got[with_attrs] == 0).mean()) if with_attrs.any() else 0.0
    return {
        "all_attributes_share": share,
        "no_attribute_share": none_share,
        "attributes_per_region": float(got.mean()) if len(got) else 0.0,
        "regions_without_attribute": float((got == 0).mean()) if len(got) else 0.0,
        "eligible_regions": int(eligible.sum()),
        "degenerate": bool((eligible.any() and share >= ALL_SHARE_WARN) or none_share >= NONE_SHARE_WARN),
    }


def quality_per_split(
    ann: Annotations, vocab: Vocabulary, gold: np.ndarray, predictions: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, int]]:
    """Each prediction's P/R/F1 against ``reg_to_attr`` over labelled regions: ``all`` (every split) and per split;
    and how many labelled regions each split has."""
    labelled = np.repeat(ann.labelled if ann.labelled is not None else np.ones(ann.n_images, bool), ann.n_regions)
    region_split = np.repeat(ann.split, ann.n_regions)
    quality: dict[str, Any] = {}
    for name, pred in predictions.items():
        quality[name] = {}
        if labelled.any():  # "all": every labelled region of every split
            quality[name]["all"] = mapping_quality(pred[labelled], gold[labelled], vocab.attribute_group, vocab.groups)
        for split in ("train", "val", "test"):
            m = (region_split == split) & labelled
            if m.any():
                quality[name][split] = mapping_quality(pred[m], gold[m], vocab.attribute_group, vocab.groups)
    counts = {s: int(((region_split == s) & labelled).sum()) for s in ("train", "val", "test")}
    return quality, counts


def print_quality(quality: dict[str, Any], vocab: Vocabulary) -> None:
    """Mapping P/R/F1 per split over labelled regions only (unlabelled images are not scored)."""
    groups = list(vocab.groups)
    head = f"{'mapping (labelled)':<26}{'P':>7}{'R':>7}{'F1':>7}" + "".join(f"{'F1 ' + g:>10}" for g in groups)
    print(head)
    for name, q in quality.items():
        for split in ("train", "val", "test"):
            if split not in q:
                continue
            a = q[split]["all"]
            row = f"{name + ' ' + split:<26}{100 * a['precision']:>7.1f}{100 * a['recall']:>7.1f}{100 * a['f1']:>7.1f}"
            print(row + "".join(f"{100 * q[split][g]['f1']:>10.1f}" for g in groups))
