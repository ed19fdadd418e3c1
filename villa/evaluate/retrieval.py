"""Evaluation: text-to-region and region-to-text retrieval on held-out regions, image-text retrieval on held-out
images, and Stage 1's mapping quality.

    python -m villa.evaluate model.pretrained=checkpoints/docmnist_stage2/best.pt label=villa
    python -m villa.evaluate model.name=RN50 model.pretrained=openai label=zero_shot

Definitions (docs/evaluation.md). Queries are the vocabulary's attributes, each embedded as the L2-normalised mean
of its prompt templates by the model's text tower; the gallery is every ground-truth region of the split,
embedded by the model's region path. A region is relevant to an attribute when its ``reg_to_attr`` contains it.
Image-text retrieval needs no region labels, so any imported dataset can be evaluated: each held-out image (the
whole image as one box through the same region path, as the one-to-one pairs train it) against every held-out
text (its sentences' mean embedding, as training embeds captions), Recall@1/5/10 both ways.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from villa.core.checkpoint import load_checkpoint
from villa.core.env import resolve_weights
from villa.core.errors import VillaError
from villa.core.io import write_json_atomic
from villa.core.runtime import Runtime, get_runtime
from villa.core.schemas import check_inputs, validate_config
from villa.data.annotations import Annotations, load_annotations
from villa.data.images import boxes_of, region_batches
from villa.data.vocab import Vocabulary, vocab_from_config
from villa.evaluate.metrics import precision_at_k, r_precision
from villa.models.clip import Clip, create_clip
from villa.models.grain_head import GrainHead, GrainSpec, normalized_targets, query_readout
from villa.models.region_encoder import RegionEncoder
from villa.models.text import encode_attributes
from villa.preprocess import embed_regions

log = logging.getLogger(__name__)


def region_options(pretrained: Optional[str], normalize: Optional[bool], input_size: Optional[int]) -> dict[str, Any]:
    """The region-path options a checkpoint was trained with (overridable), so evaluation sees what training saw."""
    opts = {"normalize": False, "input_size": None}
    state: dict[str, Any] = {}
    pretrained = resolve_weights(pretrained)
    folder_config = Path(str(pretrained)) / "open_clip_config.json" if pretrained else None
    if folder_config is not None and folder_config.is_file():  # villa.export --format open_clip: its JSON only
        try:
            recorded = (json.loads(folder_config.read_text()).get("villa") or {}).get("region_options") or {}
        except ValueError as e:
            raise VillaError(f"{folder_config} is not JSON ({e}); export the folder again") from None
        state = {"config": {"model": recorded}}
    elif pretrained and Path(str(pretrained)).is_file():
        try:
            state = load_checkpoint(pretrained, "pretrained checkpoint")
        except VillaError:  # a format only open_clip reads: no villa region options recorded
            state = {}
    model_cfg = (state.get("config") or {}).get("model") or {}
    opts.update({k: model_cfg[k] for k in ("normalize", "input_size") if k in model_cfg})
    if normalize is not None:
        opts["normalize"] = bool(normalize)
    if input_size is not None:
        opts["input_size"] = int(input_size)
    return opts


def _mean_or_none(x: np.ndarray) -> Optional[float]:
    """Mean over the non-NaN entries; None when there are none (e.g. a group with no relevant region in the split)."""
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else None


def _pct(v: Optional[float], width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{100 * v:>{width}.1f}"


def retrieval_metrics(
    region_emb: torch.Tensor, attr_emb: torch.Tensor, gold: np.ndarray, vocab: Vocabulary, ks: Sequence[int] = (10,)
) -> dict[str, Any]:
    """All retrieval numbers from (R, D) region and (A, D) attribute embeddings and (R, A) bool relevance."""
    sim = (F.normalize(region_emb.float(), dim=-1) @ F.normalize(attr_emb.float(), dim=-1).t()).numpy()  # (R, A)
    t2r = r_precision(sim.T, gold.T)  # per attribute query
    ag = np.asarray(vocab.attribute_group)
    chance = gold.mean(0)  # expected R-Precision of a random ranking = R / N
    out: dict[str, Any] = {"regions": int(len(gold)), "queries": int((gold.sum(0) > 0).sum())}
    out["text_to_region"] = {
        "r_precision": float(np.nanmean(t2r)),
        "chance": float(np.mean(chance[gold.sum(0) > 0])),
        "per_group": {g: _mean_or_none(t2r[ag == gi]) for gi, g in enumerate(vocab.groups)},
        "chance_per_group": {
            g: _mean_or_none(chance[(ag == gi) & (gold.sum(0) > 0)]) for gi, g in enumerate(vocab.groups)
        },
        "per_attribute": {a: (None if np.isnan(v) else float(v)) for a, v in zip(vocab.attributes, t2r)},
        "precision_at": {
            str(k): float(np.nanmean(np.where(gold.sum(0) > 0, precision_at_k(sim.T, gold.T, k), np.nan))) for k in ks
        },
        "chance_precision_at": {str(k): float(np.mean(chance[gold.sum(0) > 0])) for k in ks},  # R / N, as R-Precision
    }
    r2t = r_precision(sim, gold)  # per region query over the attribute texts
    per_group = {}
    for gi, g in enumerate(vocab.groups):
        cols = ag == gi
        has = gold[:, cols].any(1)
        per_group[g] = float(np.nanmean(r_precision(sim[has][:, cols], gold[has][:, cols]))) if has.any() else None
    has_any = gold.any(1)
    out["region_to_text"] = {
        "r_precision": float(np.nanmean(r2t)),
        "chance": float(np.mean(gold[has_any].sum(1) / gold.shape[1])) if has_any.any() else None,
        "per_group": per_group,
    }
    return out


def image_text_metrics(
    image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, Any]:
    """Recall@K both ways for N images and their N texts (image i's text is text i). Ties count against the
    query (an item scoring the same as the true one and listed before it ranks above it)."""
    sim = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).t()  # (N, N)
    n = len(sim)
    idx = torch.arange(n)

    def ranks(m: torch.Tensor) -> torch.Tensor:  # 0-based rank of the true item per row
        true = m[idx, idx][:, None]
        before = (m > true) | ((m == true) & (idx[None, :] < idx[:, None]))
        return before.sum(1)

    out: dict[str, Any] = {"images": int(n)}
    for name, r in (("image_to_text", ranks(sim)), ("text_to_image", ranks(sim.t()))):
        out[name] = {f"R@{k}": float((r < k).float().mean()) for k in ks}
        out[name]["median_rank"] = float(r.float().median() + 1)
    out["chance"] = {**{f"R@{k}": min(1.0, k / n) for k in ks}, "median_rank": (n + 1) / 2}  # a random ranking
    trivial = [k for k in ks if k >= n]
    if trivial:
        log.warning(
            "image-text Recall@%s with %d candidates: every model scores 1.0 there (chance is K / %d)",
            "/".join(map(str, trivial)),
            n,
            n,
        )
    return out


def region_encoder(clip: Clip, runtime: Runtime, opts: dict[str, Any]) -> RegionEncoder:
    """The region path with the options the checkpoint was trained with, in eval mode on the device."""
    enc = RegionEncoder(clip.model.visual, normalize=opts["normalize"], input_size=opts["input_size"])
    return enc.to(runtime.device).eval()


@torch.no_grad()
def embed_split_regions(
    clip: Clip,
    ann: Annotations,
    rows: np.ndarray,
    runtime: Runtime,
    opts: dict[str, Any],
    batch_size: int = 256,
    num_workers: int = 2,
) -> torch.Tensor:
    encoder = region_encoder(clip, runtime, opts)
    n = int(ann.n_regions[rows].sum())
    out = np.zeros((n, clip.embed_dim), np.float32)
    embed_regions(encoder, ann, runtime, out, batch_size, num_workers, progress=False, rows=rows)
    return torch.from_numpy(out)


@torch.no_grad()
def embed_split_images(
    clip: Clip,
    ann: Annotations,
    rows: np.ndarray,
    runtime: Runtime,
    opts: dict[str, Any],
    batch_size: int = 256,
    num_workers: int = 2,
) -> torch.Tensor:
    """(N, D): each image of ``rows`` as one whole-image box through the region path."""
    from dataclasses import replace

    from villa.data.batches import whole_image_boxes

    whole = replace(ann, region_offsets=np.arange(ann.n_images + 1), boxes=whole_image_boxes(ann.image_size))
    return embed_split_regions(clip, whole, rows, runtime, opts, batch_size, num_workers)


def load_grain_head(clip: Clip, device: torch.device, state: Optional[dict[str, Any]] = None) -> GrainHead:
    """The GRAIN head a ``objective=grain`` checkpoint holds (for the query readout); ``state``: the checkpoint, when the
    caller has read it already."""
    if state is None:
        path = clip.pretrained
        state = load_checkpoint(path, "checkpoint") if path and Path(path).is_file() else {}
    if "grain_state" not in state:
        raise VillaError(
            f"readout=query needs a objective=grain checkpoint (with its decoder); {clip.source} has none: use readout=roi"
        )
    head = GrainHead(GrainSpec(**state["grain"]))
    head.load_state_dict(state["grain_state"])
    return head.to(device).eval()


@torch.no_grad()
def embed_split_queries(
    clip: Clip,
    ann: Annotations,
    rows: np.ndarray,
    runtime: Runtime,
    opts: dict[str, Any],
    batch_size: int = 256,
    num_workers: int = 2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRAIN's own readout: each ground-truth region's embedding is the region query matched to its box (box
    costs only, no text), batched over images; plus the matched queries' box quality (mean IoU)."""
    head = load_grain_head(clip, runtime.device)
    prep = region_encoder(clip, runtime, opts)
    outs, matched, ious = [], [], []
    for images, batch_rows in region_batches(ann, rows, batch_size, num_workers):
        boxes, box_image = boxes_of(ann, batch_rows)
        images = images.to(runtime.device, non_blocking=True).float().div_(255)
        target = normalized_targets(boxes, images.shape[-1], images.shape[-2]).to(runtime.device)
        with runtime.autocast():
            z, m, iou = query_readout(
                head, clip.model.visual, prep.prepare(images), target, box_image.to(runtime.device)
            )
        outs.append(z.float().cpu())
        matched.append(m.cpu())
        ious.append(iou.float().cpu())
    m_all, iou_all = torch.cat(matched), torch.cat(ious)
    quality = {
        "mean_iou": float(iou_all.mean()) if len(iou_all) else 0.0,
        "matched": float(m_all.float().mean()),
        "queries": head.spec.queries,
    }
    return torch.cat(outs), quality


def evaluate_model(
    clip: Clip,
    ann: Annotations,
    vocab: Vocabulary,
    split: str,
    runtime: Runtime,
    opts: dict[str, Any],
    ks=(10,),
    batch_size: int = 256,
    num_workers: int = 2,
    readout: str = "roi",
    image_text: bool = False,
) -> dict[str, Any]:
    """Retrieval on ``split``'s ground-truth regions (when the data has ``reg_to_attr``) and, with ``image_text``
    (always for data without region labels), image-text retrieval on its images. ``readout``: ``roi``, the region
    path of the image tower (every method); ``query``, a GRAIN checkpoint's matched region queries (and their box
    quality)."""
    if readout not in ("roi", "query"):
        raise VillaError(f"readout={readout!r}: use roi or query")
    rows = np.flatnonzero(ann.split == split)
    if len(rows) == 0:
        raise VillaError(f"split {split!r} is empty; evaluate another split (split=val)")
    gold_all = ann.region_attribute_matrix(len(vocab))
    res: dict[str, Any] = {"split": split, "model": clip.source, "region_path": opts, "readout": readout}
    if image_text or gold_all is None or (ann.labelled is not None and not ann.labelled[rows].any()):
        from villa.models.text import mean_text_embeddings

        img = embed_split_images(clip, ann, rows, runtime, opts, batch_size, num_workers)
        txt = mean_text_embeddings(clip, [ann.text[r] for r in rows], runtime)
        res["image_text"] = image_text_metrics(img, txt)
    if gold_all is not None and ann.labelled is not None:
        rows = rows[ann.labelled[rows]]  # region retrieval over the labelled images only
    if gold_all is None or len(rows) == 0:
        log.info("no region labels (reg_to_attr) in split %s: image-text retrieval only", split)
        return res
    from villa.data.batches import gather_index

    idx, _ = gather_index(ann.region_offsets, rows)
    too_many = [k for k in ks if k > len(idx)]
    if too_many:
        raise VillaError(
            f"precision_at={list(ks)}: K={too_many[0]} is above the {len(idx)} candidate regions of split {split!r}; "
            f"give every K at most {len(idx)}"
        )
    boxes = None
    if readout == "query":
        regions, boxes = embed_split_queries(clip, ann, rows, runtime, opts, batch_size, num_workers)
    else:
        regions = embed_split_regions(clip, ann, rows, runtime, opts, batch_size, num_workers)
    attrs = encode_attributes(clip, vocab, runtime)
    res.update(retrieval_metrics(regions, attrs, gold_all[idx], vocab, ks))
    if boxes is not None:
        res["boxes"] = boxes
    return res


def model_from_config(cfg: DictConfig) -> tuple[Runtime, Clip, dict[str, Any]]:
    """The runtime, the model under test and its region-path options, from an evaluation command's config
    (``device``, ``model.name``, ``model.pretrained``, ``model.normalize``, ``model.input_size``)."""
    runtime = get_runtime(cfg.device)
    clip = create_clip(cfg.model.name, cfg.model.pretrained, device=runtime.device)
    return runtime, clip, region_options(clip.pretrained, cfg.model.normalize, cfg.model.input_size)


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    validate_config(cfg, "evaluate")
    check_inputs(cfg, "evaluate")
    vocab = vocab_from_config(cfg)
    ann = load_annotations(Path(cfg.data_dir), vocab, required_splits=(cfg.split,))
    runtime, clip, opts = model_from_config(cfg)
    res = evaluate_model(
        clip,
        ann,
        vocab,
        cfg.split,
        runtime,
        opts,
        tuple(cfg.precision_at),
        cfg.batch_size,
        cfg.num_workers,
        cfg.readout,
        cfg.image_text,
    )
    res["label"] = cfg.label
    mq = Path(cfg.mapping_quality)
    if mq.is_file():  # Stage 1's record: the mapping's quality where regions are labelled, else its summary
        record = json.loads(mq.read_text())
        keep = ("assigned_pairs", "regions", "images", "epsilon", "degeneracy", "one_sentence_captions")
        res["mapping"] = record.get("quality") or {k: record[k] for k in keep if k in record}
    out = Path(cfg.output)
    write_json_atomic(out, res)
    if "text_to_region" in res:
        print(format_table({cfg.label: res}, vocab))
    if "image_text" in res:
        print(format_image_text({cfg.label: res}))
    log.info("wrote %s", out)
    return res


def format_table(results: dict[str, dict[str, Any]], vocab: Vocabulary) -> str:
    """One table: a row per model, text-to-region R-Precision overall and per group, region-to-text, P@10."""
    groups = list(vocab.groups)
    head = (
        f"{'model':<16}{'T2R R-Prec':>11}" + "".join(f"{g:>9}" for g in groups) + f"{'R2T R-Prec':>11}{'T2R P@10':>10}"
    )
    lines = [head]
    chance = None
    for name, r in results.items():
        t = r["text_to_region"]
        chance = t
        lines.append(
            f"{name:<16}{100 * t['r_precision']:>11.1f}"
            + "".join(_pct(t["per_group"][g], 9) for g in groups)
            + f"{100 * r['region_to_text']['r_precision']:>11.1f}{100 * t['precision_at'].get('10', float('nan')):>10.1f}"
        )
    if chance is not None:
        r2t_chance = results[name]["region_to_text"].get("chance")
        lines.append(
            f"{'(chance)':<16}{100 * chance['chance']:>11.1f}"
            + "".join(_pct(chance["chance_per_group"][g], 9) for g in groups)
            + _pct(r2t_chance, 11)
            + _pct(chance.get("chance_precision_at", {}).get("10"), 10)
        )
    return "\n".join(lines)


def format_image_text(results: dict[str, dict[str, Any]]) -> str:
    """Image-text retrieval: a row per model, Recall@1/5/10 both ways."""
    lines = [
        f"{'model':<16}{'images':>8}"
        + "".join(f"{'I2T R@' + k:>9}" for k in "1 5 10".split())
        + "".join(f"{'T2I R@' + k:>9}" for k in "1 5 10".split())
    ]
    it = None
    for name, r in results.items():
        it = r["image_text"]
        cells = [100 * it[d][f"R@{k}"] for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
        lines.append(f"{name:<16}{it['images']:>8}" + "".join(f"{c:>9.1f}" for c in cells))
    if it is not None and "chance" in it:
        cells = [100 * it["chance"][f"R@{k}"] for _ in range(2) for k in (1, 5, 10)]
        lines.append(f"{'(chance)':<16}{it['images']:>8}" + "".join(f"{c:>9.1f}" for c in cells))
    return "\n".join(lines)


def format_markdown_table(results: dict[str, dict[str, Any]], vocab: Vocabulary) -> str:
    """:func:`format_table` as a Markdown table (the README's form), with chance as the last row."""
    groups = list(vocab.groups)
    lines = [
        "| R-Precision % | text-to-region | " + " | ".join(groups) + " | region-to-text | T2R P@10 |",
        "| --- | ---: | " + " | ".join(["---:"] * len(groups)) + " | ---: | ---: |",
    ]
    t = None
    for name, r in results.items():
        t = r["text_to_region"]
        cells = [
            f"{100 * t['r_precision']:.1f}",
            *(_pct(t["per_group"][g], 0).strip() for g in groups),
            f"{100 * r['region_to_text']['r_precision']:.1f}",
            f"{100 * t['precision_at'].get('10', float('nan')):.1f}",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if t is not None:
        lines.append(
            f"| chance | {100 * t['chance']:.1f} | "
            + " | ".join(_pct(t["chance_per_group"][g], 0).strip() for g in groups)
            + " | | |"
        )
    return "\n".join(lines)
