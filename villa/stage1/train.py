"""Stage 1: learn, without region labels, which region each caption attribute belongs to; write mapping.feather.

    python -m villa.stage1 experiment=docmnist_stage1 [epochs=10 batch_size=16 model.one_proj=true data_dir=...]

Trains :class:`villa.models.projection.MultiHeadProjection` on frozen region/attribute embeddings (from
preprocessing) with the original's loss (villa/stage1/loss.py), then assigns every attribute of every image to
regions (villa/stage1/mapping.py) and scores the mapping against ``reg_to_attr`` next to the zero-shot rule. The
optimisation step, the non-finite guard, resume and checkpoint commits are the engine's (villa/core/engine.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

from villa.core.checkpoint import checkpoint_lock, config_dict
from villa.core.engine import (
    Cadence,
    FiniteGuard,
    LossMeter,
    Progress,
    Stepper,
    commit_epoch,
    load_module_state,
    restore,
    resume_state,
    training_state,
)
from villa.core.errors import VillaError
from villa.core.provenance import file_sha256, run_fingerprint
from villa.core.runtime import Runtime, get_runtime, seed_everything
from villa.core.schemas import check_inputs, validate_config
from villa.core.tracking import Tracker, flat_scalars, make_tracker
from villa.data.annotations import Annotations, load_annotations
from villa.data.batches import RegionBank, image_batches
from villa.data.embeddings import EmbeddingSet, open_embeddings
from villa.data.vocab import Vocabulary, vocab_from_config
from villa.models.projection import MultiHeadProjection
from villa.stage1.loss import image_loss, segment_max
from villa.stage1.mapping import make_mapping

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


def stage1_inputs(cfg: DictConfig) -> dict[str, str]:
    """What a Stage 1 run reads, by content (the resume fingerprint's inputs)."""
    emb = Path(cfg.embeddings_dir)
    return {
        "annotations": file_sha256(Path(cfg.data_dir) / "annotations.feather"),
        "embeddings": file_sha256(emb / "meta.json") + file_sha256(emb / "index.feather"),
    }


@dataclass
class Run:
    """Everything one Stage 1 run holds while it trains."""

    cfg: DictConfig
    vocab: Vocabulary
    ann: Annotations
    emb: EmbeddingSet
    runtime: Runtime
    generator: torch.Generator
    bank: RegionBank
    attrs: torch.Tensor  # (I, A) bool: the attributes each image's caption mentions
    attr_emb: torch.Tensor  # (A, D)
    model: MultiHeadProjection
    stepper: Stepper
    progress: Progress
    fingerprint: dict[str, Any]
    train_rows: np.ndarray
    val_rows: np.ndarray
    checkpoints: Cadence
    validations: Cadence

    @property
    def last(self) -> Path:
        return Path(self.cfg.checkpoint_dir) / "last.pt"

    @property
    def steps_per_epoch(self) -> int:
        n, b = len(self.train_rows), self.cfg.batch_size
        return n // b if self.cfg.drop_last else -(-n // b)


def train_stage1(cfg: DictConfig) -> dict[str, Any]:
    """Train Stage 1, write mapping.feather and mapping_quality.json; return the metrics."""
    validate_config(cfg, "stage1")
    check_inputs(cfg, "stage1")  # before the checkpoint folder is made
    with checkpoint_lock(Path(cfg.checkpoint_dir)):
        t_start = time.perf_counter()
        run = setup(cfg)
        with make_tracker(cfg, run.progress.epoch) as tracker:
            for epoch in range(run.progress.epoch, cfg.epochs):
                fit_epoch(run, epoch, tracker)
            metrics = make_mapping(cfg, run.model, run.vocab, run.ann, run.emb, run.bank, run.runtime)
            metrics["seconds"] = round(time.perf_counter() - t_start, 2)
            tracker.final(cfg.epochs * run.steps_per_epoch, flat_scalars({"quality": metrics.get("quality", {})}))
    log.info("outputs: %s (mapping), %s (checkpoints, metrics)", cfg.mapping_path, cfg.checkpoint_dir)
    return metrics


def setup(cfg: DictConfig) -> Run:
    """Inputs checked, the model and its optimiser built, resumed from ``last.pt`` when it is the same run."""
    vocab, ann, emb = load_inputs(cfg)
    runtime = get_runtime(cfg.device, cfg.precision)
    generator = seed_everything(cfg.seed)
    bank = RegionBank(emb, runtime.device)
    attrs = torch.from_numpy(ann.attribute_matrix(len(vocab))).to(runtime.device)
    attr_emb = torch.from_numpy(emb.attributes).to(runtime.device)
    model: MultiHeadProjection = instantiate(cfg.model, dim=emb.dim, n_heads=len(vocab)).to(runtime.device)
    # fused: one pass over each parameter per step; the heads' stacked (H, D, D) weights are too large for the
    # step-by-step implementation's passes to stay in cache (on 2 CPU cores its AdamW step took 1/3 of the epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    stepper = Stepper({"optimizer": optimizer}, runtime, cfg.grad_clip)
    ckpt_dir = Path(cfg.checkpoint_dir)
    last = ckpt_dir / "last.pt"
    fingerprint = run_fingerprint(cfg, stage1_inputs(cfg))
    state = resume_state(last, fingerprint, cfg.resume)
    progress = Progress()
    if state is not None:
        load_module_state(model, state["model"], last, "a different Stage 1 model")
        progress = restore(state, stepper, generator, ckpt_dir)
        if progress.epoch >= cfg.epochs:
            log.info("%s finished training (epoch %d): re-mapping only (epsilon=%s)", last, progress.epoch, cfg.epsilon)
        else:
            log.info("resumed from %s at epoch %d", last, progress.epoch)
    train_rows, val_rows = np.flatnonzero(ann.split == "train"), np.flatnonzero(ann.split == "val")
    if cfg.drop_last and len(train_rows) < cfg.batch_size:
        raise VillaError(
            f"the train split has {len(train_rows)} images, fewer than one batch ({cfg.batch_size}) with "
            "drop_last=true; lower batch_size or set drop_last=false"
        )
    log.info(
        "stage1: %d train / %d val images, D=%d, %d heads%s, %s",
        len(train_rows),
        len(val_rows),
        emb.dim,
        len(vocab),
        " (one shared)" if cfg.model.one_proj else "",
        runtime.device,
    )
    return Run(
        cfg,
        vocab,
        ann,
        emb,
        runtime,
        generator,
        bank,
        attrs,
        attr_emb,
        model,
        stepper,
        progress,
        fingerprint,
        train_rows,
        val_rows,
        Cadence(cfg.checkpoint_every, cfg.checkpoint_minutes),
        Cadence(cfg.val_every),
    )


def batch_loss(run: Run, rows: np.ndarray) -> torch.Tensor:
    """The original's loss on the images ``rows``: every region under every head against the caption's attributes.

    Only the heads of attributes some image of the batch has are run (the others add nothing to the loss and get
    a zero gradient either way). With ``sparse_backward`` (default) a training step backpropagates through each
    image's best region per head only, the only region the loss's max passes a gradient to
    (``MultiHeadProjection.image_scores``); ``sparse_backward=false`` runs autograd over every region, as the
    original does (the same loss and gradient, to float rounding; docs/stage1.md).
    """
    x, region_image = run.bank.gather(rows)
    attrs = run.attrs[rows]
    heads = attrs.any(0).nonzero().squeeze(1)
    with run.runtime.autocast():
        if run.cfg.sparse_backward and torch.is_grad_enabled():
            best = run.model.image_scores(x, run.attr_emb, region_image, len(rows), heads)
        else:
            best = segment_max(run.model.scores(x, run.attr_emb, heads).float(), region_image, len(rows))
        return image_loss(best, attrs[:, heads], run.cfg.temperature, original=run.cfg.original_loss)


def train_one_epoch(run: Run, epoch: int, tracker: Tracker) -> float:
    """One shuffled pass over the training images; returns the mean loss (weighted by images)."""
    cfg = run.cfg
    run.model.train()
    meter, guard = LossMeter("image"), FiniteGuard(cfg.log_every, epoch + 1, run.last)
    batches = list(
        image_batches(run.train_rows, cfg.batch_size, shuffle=True, generator=run.generator, drop_last=cfg.drop_last)
    )
    t_log, seen = time.perf_counter(), 0
    for step, rows in enumerate(tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, disable=not cfg.progress)):
        loss = batch_loss(run, rows)
        run.stepper.step(loss)
        meter.add(loss, len(rows))
        seen += len(rows)
        if guard.add(loss, step):  # a host sync only every log_every steps
            now = time.perf_counter()
            log.info("epoch %d step %d/%d loss=%.4f", epoch + 1, step, len(batches), guard.last)
            tracker.step(
                epoch + 1,
                epoch * len(batches) + step,
                {
                    "loss": guard.last,
                    "lr": run.stepper.first.param_groups[0]["lr"],
                    "images_per_s": seen / max(now - t_log, 1e-9),
                },
            )
            t_log, seen = now, 0
    guard.flush()
    return meter.mean


@torch.no_grad()
def validate(run: Run) -> float:
    run.model.eval()
    meter = LossMeter("image")
    for rows in image_batches(run.val_rows, run.cfg.batch_size):
        meter.add(batch_loss(run, rows), len(rows))
    return meter.mean


def fit_epoch(run: Run, epoch: int, tracker: Tracker) -> None:
    """Train; validate and commit a checkpoint when their cadences say (``val_every``, ``checkpoint_every`` /
    ``checkpoint_minutes``, always at the last epoch): ``best.pt`` when the val loss improved, ``last.pt`` last."""
    cfg, t0 = run.cfg, time.perf_counter()
    train_loss = train_one_epoch(run, epoch, tracker)
    val_loss = validate(run) if run.validations.due(epoch + 1, cfg.epochs) else None
    improved = run.progress.update(val_loss)
    state = {
        "kind": "villa-stage1",
        "model": run.model.state_dict(),
        "model_args": {
            "dim": run.emb.dim,
            "n_heads": len(run.vocab),
            "one_proj": bool(cfg.model.one_proj),
            "adapter": bool(cfg.model.adapter),
        },
        "encoder": run.emb.encoder,
        "vocab": list(run.vocab.attributes),
        "config": config_dict(cfg),
        "fingerprint": run.fingerprint,
        **training_state(run.stepper, run.generator, run.progress),
    }
    rec = {"epoch": epoch + 1, "train_loss": train_loss}
    if val_loss is not None:
        rec.update(val_loss=val_loss, best_val=run.progress.best_val)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    commit_epoch(
        Path(cfg.checkpoint_dir),
        state,
        improved,
        f"epoch {epoch + 1}/{cfg.epochs}",
        rec,
        tracker,
        (epoch + 1) * run.steps_per_epoch,
        checkpoint=run.checkpoints.due(epoch + 1, cfg.epochs),
    )
