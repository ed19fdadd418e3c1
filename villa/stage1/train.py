"""Stage 1: learn, without region labels, which region each caption attribute belongs to; write mapping.feather.

    python -m villa.stage1 experiment=docmnist_stage1 [epochs=10 batch_size=16 model.one_proj=true data_dir=...]

Trains :class:`villa.models.MultiHeadProjection` on frozen region/attribute embeddings (from preprocessing) with
the original's loss (:func:`villa.losses.stage1_loss`), then assigns every attribute of every image to regions
(:mod:`villa.mapping`) and scores the mapping against ``reg_to_attr`` next to the zero-shot rule.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

from villa.core.checkpoint import (
    check_best_on_resume,
    checkpoint_lock,
    config_dict,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from villa.core.config import hydra_entry, vocab_from_config
from villa.core.engine import check_finite, commit_epoch
from villa.core.errors import VillaError
from villa.core.io import write_json_atomic
from villa.core.provenance import check_resume, file_sha256, run_fingerprint
from villa.core.runtime import Runtime, get_runtime, seed_everything
from villa.core.schemas import validate_config
from villa.core.tracking import Tracker, flat_scalars, make_tracker
from villa.data.annotations import Annotations, load_annotations
from villa.data.batches import RegionBank, image_batches
from villa.data.embeddings import EmbeddingSet, open_embeddings
from villa.data.vocab import Vocabulary, split_sentences
from villa.models.projection import MultiHeadProjection
from villa.stage1.loss import stage1_loss
from villa.stage1.mapping import assign, assign_text, mapping_quality, score_regions, write_mapping

log = logging.getLogger(__name__)


def load_inputs(cfg: DictConfig) -> tuple[Vocabulary, Annotations, EmbeddingSet]:
    """The vocabulary, validated annotations and matching embeddings; bad input is one VillaError line."""
    vocab = vocab_from_config(cfg)
    ann = load_annotations(Path(cfg.data_dir), vocab, required_splits=("train", "val"), check_images=False)
    emb = open_embeddings(Path(cfg.embeddings_dir), vocab)
    if len(emb.image_id) != ann.n_images or not np.array_equal(emb.image_id, ann.image_id):
        raise VillaError(
            f"embeddings in {cfg.embeddings_dir} were made for another annotations.feather than {cfg.data_dir} "
            f"({len(emb.image_id)} vs {ann.n_images} images); re-run preprocessing on this dataset"
        )
    return vocab, ann, emb


def run_epoch(
    model: MultiHeadProjection,
    bank: RegionBank,
    attrs: torch.Tensor,
    attr_emb: torch.Tensor,
    rows: np.ndarray,
    cfg: DictConfig,
    runtime: Runtime,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    generator: torch.Generator | None = None,
    epoch: int = 0,
    last_ckpt: Path | None = None,
    tracker: Tracker | None = None,
) -> float:
    """One pass over ``rows``: trains when an optimizer is given, else evaluates. Returns the mean loss."""
    train = optimizer is not None
    model.train(train)
    total, n = 0.0, 0
    batches = list(
        image_batches(rows, cfg.batch_size, shuffle=train, generator=generator, drop_last=train and cfg.drop_last)
    )
    t_log, seen = time.perf_counter(), 0
    for step, batch in enumerate(
        tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, disable=not (cfg.progress and train))
    ):
        x, region_image = bank.gather(batch)
        with torch.set_grad_enabled(train), runtime.autocast():
            scores = model.scores(x, attr_emb)
            loss = stage1_loss(scores, region_image, attrs[batch], cfg.temperature, original=cfg.original_loss)
        if train:
            check_finite(loss, step, epoch + 1, last_ckpt)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            seen += len(batch)
            if cfg.log_every and step % cfg.log_every == 0:
                log.info("epoch %d step %d/%d loss=%.4f", epoch + 1, step, len(batches), loss.item())
                if tracker is not None:
                    now = time.perf_counter()
                    tracker.step(epoch + 1, epoch * len(batches) + step, {"loss": loss.item(),
                                 "lr": optimizer.param_groups[0]["lr"], "images_per_s": seen / max(now - t_log, 1e-9)})  # fmt: skip
                    t_log, seen = now, 0
        total += loss.item() * len(batch)
        n += len(batch)
    return total / max(n, 1)


def stage1_inputs(cfg: DictConfig) -> dict[str, str]:
    """What a Stage 1 run reads, by content (the resume fingerprint's inputs)."""
    emb = Path(cfg.embeddings_dir)
    return {
        "annotations": file_sha256(Path(cfg.data_dir) / "annotations.feather"),
        "embeddings": file_sha256(emb / "meta.json") + file_sha256(emb / "index.feather"),
    }


def train_stage1(cfg: DictConfig) -> dict[str, Any]:
    """Train Stage 1, write mapping.feather and mapping_quality.json; return the metrics."""
    validate_config(cfg, "stage1")
    with checkpoint_lock(Path(cfg.checkpoint_dir)):
        return _train_stage1(cfg)


def _train_stage1(cfg: DictConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    vocab, ann, emb = load_inputs(cfg)
    runtime = get_runtime(cfg.device, cfg.amp)
    generator = seed_everything(cfg.seed)
    bank = RegionBank(emb, runtime.device)
    attrs = torch.from_numpy(ann.attribute_matrix(len(vocab))).to(runtime.device)
    attr_emb = torch.from_numpy(emb.attributes).to(runtime.device)
    model: MultiHeadProjection = instantiate(cfg.model, dim=emb.dim, n_heads=len(vocab)).to(runtime.device)
    # fused: one pass over each parameter per step; the heads' stacked (H, D, D) weights are too large for the
    # step-by-step implementation's passes to stay in cache (on 2 CPU cores its AdamW step took 1/3 of the epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scaler = torch.amp.GradScaler("cuda") if runtime.amp_dtype == torch.float16 else None
    ckpt_dir = Path(cfg.checkpoint_dir)
    last = ckpt_dir / "last.pt"
    start_epoch, best_val = 0, float("inf")
    fingerprint = run_fingerprint(cfg, stage1_inputs(cfg))
    if cfg.resume and last.exists():
        state = load_checkpoint(last)
        check_resume(state.get("fingerprint"), fingerprint, last)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise VillaError(
                f"{last} holds a different Stage 1 model ({str(e).splitlines()[0]}); set resume=false or delete it"
            ) from e
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], generator)
        start_epoch, best_val = state["epoch"], state["best_val"]
        check_best_on_resume(state, ckpt_dir)
        if start_epoch >= cfg.epochs:
            log.info("%s finished training (epoch %d): re-mapping only (epsilon=%s)", last, start_epoch, cfg.epsilon)
        else:
            log.info("resumed from %s at epoch %d", last, start_epoch)
    train_rows = np.flatnonzero(ann.split == "train")
    val_rows = np.flatnonzero(ann.split == "val")
    if cfg.drop_last and len(train_rows) < cfg.batch_size:
        raise VillaError(
            f"the train split has {len(train_rows)} images, fewer than one batch ({cfg.batch_size}) with "
            "drop_last=true; lower batch_size or set drop_last=false"
        )
    log.info(
        "stage1: %d train / %d val images, D=%d, %d heads%s, %s",
        len(train_rows), len(val_rows), emb.dim, len(vocab), " (one shared)" if cfg.model.one_proj else "", runtime.device,
    )  # fmt: skip
    steps = len(train_rows) // cfg.batch_size if cfg.drop_last else -(-len(train_rows) // cfg.batch_size)
    with make_tracker(cfg, start_epoch) as tracker:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            train_loss = run_epoch(
                model,
                bank,
                attrs,
                attr_emb,
                train_rows,
                cfg,
                runtime,
                optimizer,
                scaler,
                generator,
                epoch,
                last,
                tracker,
            )
            with torch.no_grad():
                val_loss = run_epoch(model, bank, attrs, attr_emb, val_rows, cfg, runtime, epoch=epoch)
            improved = val_loss < best_val
            best_val = min(best_val, val_loss)
            state = {
                "kind": "villa-stage1",
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "model_args": {
                    "dim": emb.dim,
                    "n_heads": len(vocab),
                    "one_proj": bool(cfg.model.one_proj),
                    "adapter": bool(cfg.model.adapter),
                },
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_state(generator),
                "best_val": best_val,
                "encoder": emb.encoder,
                "vocab": list(vocab.attributes),
                "config": config_dict(cfg),
                "fingerprint": fingerprint,
            }
            commit_epoch(
                ckpt_dir, state, improved, f"epoch {epoch + 1}/{cfg.epochs}",
                {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "best_val": best_val, "seconds": round(time.perf_counter() - t0, 2)},
                tracker, (epoch + 1) * steps,
            )  # fmt: skip
        metrics = make_mapping(cfg, model, vocab, ann, emb, bank, runtime)
        metrics["seconds"] = round(time.perf_counter() - t_start, 2)
        tracker.final(cfg.epochs * steps, flat_scalars({"quality": metrics.get("quality", {})}))
    return metrics


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
        ann.text, ann.region_offsets, assigned, vocab, np.random.default_rng(cfg.seed), per=cfg.sentence_choice
    )
    out = Path(cfg.mapping_path)
    made_by = {
        "stage1_checkpoint": str(Path(cfg.checkpoint_dir) / "last.pt"),
        "encoder": emb.encoder,
        "annotations": file_sha256(Path(cfg.data_dir) / "annotations.feather"),
        "epsilon": cfg.epsilon,
        "sentence_choice": cfg.sentence_choice,
    }
    write_mapping(ann.table, ann.region_offsets, assigned, texts, vocab, out, made_by)
    secs = time.perf_counter() - t0
    zs = assign(
        score_regions(bank, attr_emb, runtime, None, cfg.mapping_batch_regions, amp=cfg.mapping_amp),
        ann.region_offsets,
        image_attrs,
        cfg.epsilon,
    )
    result: dict[str, Any] = {
        "mapping": str(out),
        "images": int(ann.n_images),
        "regions": int(len(ann.boxes)),
        "assigned_pairs": int(assigned.sum()),
        "mapping_seconds": round(secs, 3),
        "encoder": emb.encoder,
        "epsilon": cfg.epsilon,
    }
    one_sentence = int(sum(1 for t, n in zip(ann.text, image_attrs.sum(1)) if n >= 2 and len(split_sentences(t)) == 1))
    result["one_sentence_captions"] = one_sentence
    if one_sentence:
        log.warning(
            "%d captions name several attributes in one sentence (no '.' between them): each of their regions gets "
            "the whole caption as its text; separate sentences with '.' so regions get their own",
            one_sentence,
        )
    result["degeneracy"] = degeneracy = mapping_degeneracy(assigned, image_attrs, ann.region_offsets)
    if degeneracy["degenerate"]:
        log.warning(
            "the mapping looks degenerate: %.0f%% of the regions of images with several regions and attributes get "
            "every attribute of their image (%.1f attributes per region); the heads may not separate regions: lower "
            "epsilon, train longer, or check the regions",
            100 * degeneracy["all_attributes_share"], degeneracy["attributes_per_region"],
        )  # fmt: skip
    gold = ann.region_attribute_matrix(len(vocab))
    if gold is not None:
        labelled = np.repeat(ann.labelled if ann.labelled is not None else np.ones(ann.n_images, bool), ann.n_regions)
        region_split = np.repeat(ann.split, ann.n_regions)
        quality: dict[str, Any] = {}
        for name, pred in (("stage1", assigned), ("zero_shot", zs)):
            quality[name] = {}
            if labelled.any():  # "all": every labelled region of every split
                quality[name]["all"] = mapping_quality(
                    pred[labelled], gold[labelled], vocab.attribute_group, vocab.groups
                )
            for split in ("train", "val", "test"):
                m = (region_split == split) & labelled
                if m.any():
                    quality[name][split] = mapping_quality(pred[m], gold[m], vocab.attribute_group, vocab.groups)
        result["quality"] = quality
        result["labelled_regions"] = {s: int(((region_split == s) & labelled).sum()) for s in ("train", "val", "test")}
        print_quality(quality, vocab)
    qpath = out.with_name(out.stem + "_quality.json")
    write_json_atomic(qpath, result)
    log.info("wrote %s (%d regions, %d pairs, %.2fs) and %s", out, len(ann.boxes), assigned.sum(), secs, qpath.name)
    return result


def mapping_degeneracy(assigned: np.ndarray, image_attrs: np.ndarray, offsets: np.ndarray) -> dict[str, Any]:
    """How close a mapping is to "every attribute to every region": among regions of images with at least two
    regions and two attributes, the share that receive all their image's attributes, and attributes per region.
    ``degenerate`` when that share is above one half (a working mapping on such images gives each attribute to
    about one region)."""
    counts = np.diff(offsets)
    region_image = np.repeat(np.arange(len(counts)), counts)
    n_attr = image_attrs.sum(1)[region_image]
    got = assigned.sum(1)
    eligible = (counts[region_image] >= 2) & (n_attr >= 2)
    share = float((got[eligible] == n_attr[eligible]).mean()) if eligible.any() else 0.0
    return {
        "all_attributes_share": share,
        "attributes_per_region": float(got.mean()) if len(got) else 0.0,
        "regions_without_attribute": float((got == 0).mean()) if len(got) else 0.0,
        "eligible_regions": int(eligible.sum()),
        "degenerate": bool(eligible.any() and share > 0.5),
    }


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


main = hydra_entry("stage1", train_stage1, __doc__)


if __name__ == "__main__":
    main()
