"""Stage 2: a CLIP-style trainer for region embeddings, one loop for every objective (villa/stage2/objectives/).

    python -m villa.stage2 experiment=docmnist_stage2      # ViLLA: Stage 1's region-attribute pairs + whole images
    python -m villa.stage2 experiment=docmnist_baseline    # one-to-one: whole image <-> whole caption only
    python -m villa.stage2 experiment=pretrain             # CLIP pretraining, both towers, learnable temperature
    python -m villa.stage2 experiment=docmnist_grain       # GRAIN: decoder queries, boxes, L_ic + L_rd + L_box
    torchrun --nproc_per_node=4 -m villa.stage2 experiment=docmnist_stage2    # multi-GPU (DDP)

The image tower is open_clip's ModifiedResNet through the region path (villa/models/region_encoder.py): backbone to
the third stage over the batch of images, one ROI-Align over all regions of the batch, last stage and attention
pool. The objective (``objective=``) decides the pairs, the targets, the loss and any head; this loop does the rest:
read top to bottom, :func:`train_stage2` sets a run up, then per epoch :func:`train_one_epoch`, :func:`validate`,
the plateau schedule, early stopping and one checkpoint commit (villa/core/engine.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from villa.core.checkpoint import checkpoint_lock, config_dict
from villa.core.distributed import Dist, cleanup, init_distributed
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
from villa.core.provenance import (
    checkpoint_pools,
    dataset_pools,
    file_sha256,
    images_digest,
    run_fingerprint,
    unique_pools,
)
from villa.core.runtime import Runtime, get_runtime, seed_everything
from villa.core.schemas import check_inputs, validate_config
from villa.core.tracking import Tracker, make_tracker
from villa.data.annotations import Annotations
from villa.data.embeddings import weights_id
from villa.models.clip import Clip, clip_checkpoint_state, create_clip
from villa.preprocess import calibrate_on_data
from villa.stage2.model import Stage2Model
from villa.stage2.objectives import build_objective
from villa.stage2.objectives.base import Objective, StepContext
from villa.stage2.optim import build_optimizer
from villa.stage2.pairs import SplitPairs, build_pairs, load_stage2_annotations, make_loader, split_pairs

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything one Stage 2 run holds while it trains."""

    cfg: DictConfig
    objective: Objective
    clip: Clip
    model: Stage2Model
    ddp: nn.Module
    ctx: StepContext
    stepper: Stepper
    plateau: torch.optim.lr_scheduler.ReduceLROnPlateau
    train_loader: DataLoader
    train_sampler: DistributedSampler
    val_loader: DataLoader
    progress: Progress
    record: dict[str, Any]  # what the checkpoint says about the run: fingerprint, inputs, data pools, ...
    checkpoints: Cadence

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.cfg.checkpoint_dir)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)


def train_stage2(cfg: DictConfig) -> dict[str, Any]:
    """Train with the configured objective; write best.pt / last.pt (villa-clip checkpoints); return the history."""
    validate_config(cfg, "stage2")
    check_inputs(cfg, "stage2")  # before the checkpoint folder is made
    d = init_distributed(cfg.device)
    try:
        with checkpoint_lock(Path(cfg.checkpoint_dir), enabled=d.is_main):
            t_start = time.perf_counter()
            run = setup(cfg, d)
            with make_tracker(cfg, run.progress.epoch, enabled=d.is_main) as tracker:
                for epoch in range(run.progress.epoch, cfg.epochs):
                    if run.progress.stopped:
                        break
                    fit_epoch(run, epoch, tracker)
            return summary(run, time.perf_counter() - t_start)
    finally:
        cleanup(d)


def stage2_inputs(cfg: DictConfig, reads_mapping: bool) -> dict[str, Any]:
    """What a Stage 2 run reads, by content: the resume fingerprint's inputs and the checkpoint's record."""
    ann_path = Path(cfg.data_dir) / "annotations.feather"
    import pyarrow.feather as pf

    paths = pf.read_table(str(ann_path), columns=["image_filepath"]).column("image_filepath").to_pylist()
    inputs = {
        "annotations": file_sha256(ann_path),
        "images": images_digest(cfg.data_dir, paths),  # a run that trained on other pixels is another run
        "pretrained": weights_id(None if cfg.model.pretrained == "none" else str(cfg.model.pretrained)),
    }
    if reads_mapping:
        inputs["mapping"] = file_sha256(cfg.mapping_path)
        inputs["mapping_path"] = str(cfg.mapping_path)
    return inputs


def objective_pairs(
    objective: Objective, ann: Annotations, clip: Clip, runtime: Runtime, d: Dist
) -> tuple[SplitPairs, SplitPairs]:
    """Each image's pairs as the objective makes them, split into train and val, with every pair's text target
    made once (sentence embeddings cached on disk per text tower, by the main process)."""
    region_text = objective.region_text(ann)
    regions = (ann.region_offsets, ann.boxes, region_text) if region_text is not None else (None, None, None)
    pairs = build_pairs(ann.image_size, ann.text, *regions, whole_boxes=objective.whole_image_boxes(ann))
    cache = Path(objective.cfg.data_dir) / "text_cache" if d.is_main else None
    objective.targets_ = objective.targets(pairs, clip, runtime, cache)
    return split_pairs(ann, pairs)


def pair_data(cfg: DictConfig, clip: Clip, runtime: Runtime, d: Dist) -> tuple[Objective, SplitPairs, SplitPairs]:
    """The objective of ``cfg`` with its train and val pairs and targets, as a run sets them up (for tools, tests)."""
    objective = build_objective(cfg)
    ann = load_stage2_annotations(cfg, objective.vocab, objective.reads_mapping, d)
    return (objective, *objective_pairs(objective, ann, clip, runtime, d))


def setup(cfg: DictConfig, d: Dist) -> Run:
    """Data and mapping checked, then weights, pairs, targets, model, optimisers, loaders; resumed when it is the
    same run. The order is the order of random draws, so a run is reproducible and a resumed run is the same run."""
    device = cfg.device
    if d.enabled and (device in ("auto", "cuda")) and torch.cuda.is_available():
        device = f"cuda:{d.local_rank}"
    runtime = get_runtime(device, cfg.precision)
    generator = seed_everything(cfg.seed)
    objective = build_objective(cfg)
    ann = load_stage2_annotations(cfg, objective.vocab, objective.reads_mapping, d)
    inputs = stage2_inputs(cfg, objective.reads_mapping)
    fingerprint = run_fingerprint(cfg, {k: v for k, v in inputs.items() if k != "mapping_path"})
    last = Path(cfg.checkpoint_dir) / "last.pt"
    state = resume_state(last, fingerprint, cfg.resume)
    started = checkpoint_pools(str(cfg.model.pretrained))
    data_pools = None if started is None else unique_pools(started + dataset_pools(cfg.data_dir, ("train", "val")))
    clip = create_clip(cfg.model.name, cfg.model.pretrained, device=runtime.device)
    train_pairs, val_pairs = objective_pairs(objective, ann, clip, runtime, d)
    model = Stage2Model(clip, cfg, objective).to(runtime.device)
    if clip.pretrained is None and state is None:
        # the same fixed batches on every rank, so the statistics do not depend on the world size
        calibrate_on_data(model.regions, ann, runtime, train_pairs.rows)
    if cfg.compile:
        # in place (state_dict keys unchanged); dynamic: the number of regions differs from batch to batch
        model.regions.compile(dynamic=True, backend=cfg.compile_backend)
    channels_last = bool(cfg.model.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if d.enabled and runtime.is_cuda and not cfg.model.freeze_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_loader, train_sampler = make_loader(train_pairs, cfg, d, train=True, cuda=runtime.is_cuda)
    val_loader, _ = make_loader(val_pairs, cfg, d, train=False, split="val", cuda=runtime.is_cuda)
    optimizer = build_optimizer(cfg, model, objective)
    own_opts, own_schedules = objective.optimizers(model, len(train_loader))
    stepper = Stepper({"optimizer": optimizer, **own_opts}, runtime, cfg.grad_clip, own_schedules)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=cfg.scheduler.factor,
        patience=cfg.scheduler.patience,
        threshold=cfg.scheduler.threshold,
        threshold_mode="abs",
    )
    progress = Progress()
    if state is not None:
        load_module_state(model.clip, state["state_dict"], last, "another model")
        objective.load_checkpoint_state(model, state)
        progress = restore(state, stepper, generator, Path(cfg.checkpoint_dir))
        plateau.load_state_dict(state["scheduler"])
        if d.is_main:
            log.info("resumed from %s at epoch %d", last, progress.epoch)
    ddp = (
        DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.is_cuda else None)
        if d.enabled
        else model
    )
    record = {
        "fingerprint": fingerprint,
        "inputs": inputs,
        "data_pools": data_pools,
        "started_from": {"model": cfg.model.name, "pretrained": str(cfg.model.pretrained)},
    }
    log.info("stage2: objective %s, %s", objective.describe(), runtime.device)
    return Run(
        cfg,
        objective,
        clip,
        model,
        ddp,
        StepContext(runtime, d, channels_last, generator),
        stepper,
        plateau,
        train_loader,
        train_sampler,
        val_loader,
        progress,
        record,
        Cadence(cfg.checkpoint_every, cfg.checkpoint_minutes),
    )


def train_one_epoch(run: Run, epoch: int, tracker: Tracker) -> float:
    """One pass over the training split; returns the epoch's mean loss."""
    cfg, d = run.cfg, run.ctx.dist
    run.train_sampler.set_epoch(epoch)
    run.ddp.train()
    meter = LossMeter(cfg.loss_average)
    guard = FiniteGuard(cfg.log_every, epoch + 1, run.ckpt_dir / "last.pt")
    t_log, seen = time.perf_counter(), 0
    bar = tqdm(
        run.train_loader,
        desc=f"{run.objective.name} epoch {epoch + 1}",
        leave=False,
        disable=not (cfg.progress and d.is_main),
    )
    for step, batch in enumerate(bar):
        loss = run.objective.loss(run.ddp, batch, run.ctx, train=True)
        run.stepper.step(loss * d.world_size)  # DDP averages gradients; see villa.core.distributed.gather_rows
        meter.add(loss, len(batch.rows))
        seen += len(batch.rows)
        if guard.add(loss, step):  # a host sync only every log_every steps
            bar.set_postfix(loss=f"{guard.last:.4f}")
            now = time.perf_counter()
            tracker.step(
                epoch + 1,
                epoch * run.steps_per_epoch + step,
                {
                    "loss": guard.last,
                    "lr": run.stepper.first.param_groups[0]["lr"],
                    "temperature": run.model.temperature(),
                    "images_per_s": seen * d.world_size / max(now - t_log, 1e-9),
                },
            )
            t_log, seen = now, 0
    guard.flush()
    return meter.mean


def validate(run: Run) -> float:
    """The objective's loss on the validation split (no augmentation)."""
    run.ddp.eval()
    meter = LossMeter(run.cfg.loss_average)
    with torch.no_grad():
        for batch in run.val_loader:
            meter.add(run.objective.loss(run.ddp, batch, run.ctx, train=False), len(batch.rows))
    return meter.mean


def fit_epoch(run: Run, epoch: int, tracker: Tracker) -> None:
    """Train, validate, step the plateau schedule, decide early stopping, commit the epoch's checkpoint."""
    cfg, t0 = run.cfg, time.perf_counter()
    train_loss = train_one_epoch(run, epoch, tracker)
    val_loss = validate(run)
    run.plateau.step(val_loss)
    improved = run.progress.update(val_loss, cfg.early_stop_patience)
    rec = {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "best_val": run.progress.best_val,
        "lr": run.stepper.first.param_groups[0]["lr"],
        "temperature": run.model.temperature(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    for name, opt in list(run.stepper.optimizers.items())[1:]:
        rec[name.replace("optimizer", "lr")] = opt.param_groups[0]["lr"]
    run.progress.history.append(rec)
    if not run.ctx.dist.is_main:
        return
    state = clip_checkpoint_state(
        run.model.clip,
        run.clip.model_name,
        run.clip.model_cfg,
        kind=f"villa-stage2-{run.objective.name}",
        scheduler=run.plateau.state_dict(),
        config=config_dict(cfg),
        **run.record,
        **training_state(run.stepper, run.ctx.generator, run.progress),
        **run.objective.checkpoint_state(run.model),
    )
    commit_epoch(
        run.ckpt_dir,
        state,
        improved,
        f"{run.objective.name} epoch {epoch + 1}/{cfg.epochs}",
        rec,
        tracker,
        (epoch + 1) * run.steps_per_epoch,
        checkpoint=run.checkpoints.due(epoch + 1, cfg.epochs, stopping=run.progress.stopped),
    )
    if run.progress.stopped:
        log.info("early stop: no better val loss for %d epochs", run.progress.bad_epochs)


def summary(run: Run, seconds: float) -> dict[str, Any]:
    model, d = run.model, run.ctx.dist
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)
    log.info("rank %d/%d finished: trainable parameter checksum %.10e", d.rank, d.world_size, checksum)
    if d.is_main:
        log.info("checkpoints: %s (best) and %s (last)", run.ckpt_dir / "best.pt", run.ckpt_dir / "last.pt")
    return {
        "objective": run.objective.name,
        "best_val": run.progress.best_val,
        "checksum": checksum,
        "epochs_run": len(run.progress.history),
        "history": run.progress.history,
        "best_checkpoint": str(run.ckpt_dir / "best.pt"),
        "last_checkpoint": str(run.ckpt_dir / "last.pt"),
        "seconds": round(seconds, 2),
    }
