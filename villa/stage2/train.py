"""Stage 2: a CLIP-style trainer for region embeddings; also the one-to-one baseline and CLIP pretraining.

    python -m villa.stage2 experiment=docmnist_stage2      # ViLLA: Stage 1's region-attribute pairs + whole images
    python -m villa.stage2 experiment=docmnist_baseline    # one-to-one VLM: whole image <-> whole caption only
    python -m villa.stage2 experiment=pretrain             # CLIP pretraining, both towers, learnable temperature
    python -m villa.stage2 experiment=docmnist_grain       # GRAIN-style: decoder queries, boxes, L_ic + L_rd + L_box
    torchrun --nproc_per_node=4 -m villa.stage2 experiment=docmnist_stage2    # multi-GPU (DDP)

The image tower is open_clip's ModifiedResNet through the region path (:class:`villa.encoders.RegionEncoder`):
backbone to the third stage over the batch of images, one ROI-Align over all regions of the batch, last stage and
attention pool. In ``villa`` and ``baseline`` modes texts are embedded once by the frozen text tower (sentences
averaged, L2-normalised) and only the image tower trains, with a fixed temperature, as the original. ``grain``
trains the image tower's trunk with a GRAIN-style head (villa/grain.py, docs/grain.md) on the same pairs as ViLLA.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from villa.core.checkpoint import (
    check_best_on_resume,
    checkpoint_lock,
    config_dict,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from villa.core.config import hydra_entry
from villa.core.distributed import Dist, cleanup, gather_rows, init_distributed, scale_grad
from villa.core.engine import FiniteGuard, commit_epoch
from villa.core.errors import VillaError
from villa.core.provenance import (
    check_resume,
    checkpoint_pools,
    dataset_pools,
    file_sha256,
    images_digest,
    run_fingerprint,
    unique_pools,
)
from villa.core.runtime import Runtime, get_runtime, seed_everything
from villa.core.schemas import validate_config
from villa.core.tracking import make_tracker
from villa.data.embeddings import weights_id
from villa.models.clip import clip_checkpoint_state, create_clip
from villa.preprocess import calibrate_on_data
from villa.stage2.model import Stage2Model
from villa.stage2.objectives.base import infonce
from villa.stage2.objectives.grain import build_head_optimizer, grain_state, grain_step_loss
from villa.stage2.optim import build_optimizer
from villa.stage2.pairs import (
    PairBatch,
    PairData,
    jitter_boxes,
    load_pair_data,
    load_stage2_annotations,
    make_loader,
    uses_mapping,
)

log = logging.getLogger(__name__)
MODES = ("villa", "baseline", "pretrain", "grain")














def stage2_images_digest(cfg: DictConfig) -> str:
    """The contents of the dataset's images (a run that trained on other pixels is another run)."""
    import pyarrow.feather as pf

    paths = pf.read_table(str(Path(cfg.data_dir) / "annotations.feather"), columns=["image_filepath"])
    return images_digest(cfg.data_dir, paths.column("image_filepath").to_pylist())


def stage2_inputs(cfg: DictConfig) -> dict[str, Any]:
    """What a Stage 2 run reads, by content: the resume fingerprint's inputs and the checkpoint's record."""
    inputs = {
        "annotations": file_sha256(Path(cfg.data_dir) / "annotations.feather"),
        "images": stage2_images_digest(cfg),
        "pretrained": weights_id(None if cfg.model.pretrained == "none" else str(cfg.model.pretrained)),
    }
    if uses_mapping(cfg):
        inputs["mapping"] = file_sha256(cfg.mapping_path)
        inputs["mapping_path"] = str(cfg.mapping_path)
    return inputs










def step_loss(
    model: nn.Module,
    data: PairData,
    batch: PairBatch,
    runtime: Runtime,
    d: Dist,
    channels_last: bool,
    jitter: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The symmetric InfoNCE over all region-text pairs of the (global) batch (GRAIN: :func:`grain_step_loss`). No
    host sync: inputs are copied asynchronously from pinned memory and the loss stays on the device."""
    if data.grain is not None:
        return grain_step_loss(model, data, batch, runtime, d, channels_last)
    dev = runtime.device
    images = batch.images.to(dev, non_blocking=True).float().div_(255)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    boxes = batch.boxes
    if jitter > 0:
        sizes = torch.from_numpy(data.ann.image_size[batch.rows.numpy()[batch.box_image.numpy()]])
        boxes = jitter_boxes(boxes, sizes, jitter, generator)
    boxes = boxes.to(dev, non_blocking=True)
    box_image = batch.box_image.to(dev, non_blocking=True)
    tokens = data.tokens[batch.pair_idx].to(dev, non_blocking=True) if data.tokens is not None else None
    with runtime.autocast():
        img, txt, scale = model(images, boxes, box_image, tokens)
    if d.enabled and scale.requires_grad:
        # every rank sees the whole gathered logit matrix, so logit_scale already gets the full gradient locally;
        # undo the world-size factor that the caller applies for the towers' gathered features
        scale = scale_grad(scale, 1.0 / d.world_size)
    if txt is None:
        txt = data.text_emb.index_select(0, batch.pair_idx.to(dev, non_blocking=True))
    return infonce(gather_rows(img, d), gather_rows(txt.float(), d), scale.float())




class LossMeter:
    """Mean of the losses of an epoch: per batch (the original's) or weighted by images per batch. Losses are
    summed on the device; reading :attr:`mean` is the one host sync."""

    def __init__(self, average: str):
        if average not in ("batch", "image"):
            raise VillaError(f"loss_average={average!r}: use batch (the original's) or image")
        self.average, self.n = average, 0
        self.total: torch.Tensor | float = 0.0

    def add(self, loss: torch.Tensor | float, images: int) -> None:
        w = 1 if self.average == "batch" else images
        value = loss.detach().double() if isinstance(loss, torch.Tensor) else loss
        self.total = self.total + value * w
        self.n += w

    @property
    def mean(self) -> float:
        return float(self.total) / max(self.n, 1)


def evaluate_loss(
    model: nn.Module, data: PairData, loader: DataLoader, runtime: Runtime, d: Dist, cfg: DictConfig
) -> float:
    model.eval()
    meter = LossMeter(cfg.loss_average)
    with torch.no_grad():
        for batch in loader:
            loss = step_loss(model, data, batch, runtime, d, cfg.model.channels_last and runtime.is_cuda)
            meter.add(loss, len(batch.rows))
    return meter.mean
















def temperature(model: Stage2Model, cfg: DictConfig) -> float:
    """The contrastive temperature in use: learned (1 / exp(logit_scale)) or fixed."""
    return 1.0 / float(model.clip.logit_scale.detach().exp()) if model.learn_temperature else float(cfg.temperature)


def train_stage2(cfg: DictConfig) -> dict[str, Any]:
    """Train one of the three modes; write best.pt / last.pt (villa-clip checkpoints); return the history."""
    validate_config(cfg, "stage2")
    d = init_distributed(cfg.device)
    try:
        with checkpoint_lock(Path(cfg.checkpoint_dir), enabled=d.is_main):
            return _train(cfg, d)
    finally:
        cleanup(d)


def _train(cfg: DictConfig, d: Dist) -> dict[str, Any]:
    t_start = time.perf_counter()
    device = cfg.device
    if d.enabled and (device in ("auto", "cuda")) and torch.cuda.is_available():
        device = f"cuda:{d.local_rank}"
    runtime = get_runtime(device, cfg.amp)
    generator = seed_everything(cfg.seed)
    ann = load_stage2_annotations(cfg, d)
    inputs = stage2_inputs(cfg)
    fingerprint = run_fingerprint(cfg, {k: v for k, v in inputs.items() if k != "mapping_path"})
    ckpt_dir = Path(cfg.checkpoint_dir)
    last, best = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    state = load_checkpoint(last) if cfg.resume and last.exists() else None
    if state is not None:
        check_resume(state.get("fingerprint"), fingerprint, last)
    started = checkpoint_pools(str(cfg.model.pretrained))
    data_pools = None if started is None else unique_pools(started + dataset_pools(cfg.data_dir, ("train", "val")))
    clip = create_clip(cfg.model.name, cfg.model.pretrained, device=runtime.device)
    train_data, val_data = load_pair_data(cfg, clip, runtime, d, ann)
    model = Stage2Model(clip, cfg).to(runtime.device)
    if clip.pretrained is None and state is None:
        # the same fixed batches on every rank, so the statistics do not depend on the world size
        calibrate_on_data(model.regions, train_data.ann, runtime, train_data.rows)
    if cfg.compile:
        # in place (state_dict keys unchanged); dynamic: the number of regions differs from batch to batch
        model.regions.compile(dynamic=True, backend=cfg.compile_backend)
    channels_last = bool(cfg.model.channels_last and runtime.is_cuda)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if d.enabled and runtime.is_cuda and not cfg.model.freeze_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.scheduler.factor, patience=cfg.scheduler.patience,
        threshold=cfg.scheduler.threshold, threshold_mode="abs",
    )  # fmt: skip
    scaler = torch.amp.GradScaler("cuda") if runtime.amp_dtype == torch.float16 else None
    start_epoch, best_val, bad_epochs, stopped = 0, float("inf"), 0, False
    history: list[dict[str, Any]] = []
    if state is not None:
        try:
            model.clip.load_state_dict(state["state_dict"])
        except RuntimeError as e:
            raise VillaError(
                f"{last} holds another model ({str(e).splitlines()[0]}); set resume=false or delete it"
            ) from e
        if model.grain is not None:
            model.grain.load_state_dict(state["grain_state"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], generator)
        start_epoch, best_val, bad_epochs, stopped = (
            state["epoch"],
            state["best_val"],
            state["bad_epochs"],
            state["stopped"],
        )
        history = list(state.get("history", []))
        check_best_on_resume(state, ckpt_dir)
        if d.is_main:
            log.info("resumed from %s at epoch %d", last, start_epoch)
    ddp = (
        DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.is_cuda else None)
        if d.enabled
        else model
    )
    train_loader, train_sampler = make_loader(train_data, cfg, d, train=True)
    val_loader, _ = make_loader(val_data, cfg, d, train=False, split="val")
    jitter = float(cfg.crop_margin) if cfg.mode == "pretrain" and cfg.crop == "content" else 0.0
    steps_per_epoch = len(train_loader)
    head_opt, head_sched = build_head_optimizer(cfg, model, steps_per_epoch)  # mode=grain: GRAIN's own
    if head_opt is not None and state is not None:
        head_opt.load_state_dict(state["head_optimizer"])
        head_sched.load_state_dict(state["head_scheduler"])
    optimizers = [optimizer] + ([head_opt] if head_opt is not None else [])
    with make_tracker(cfg, start_epoch, enabled=d.is_main) as tracker:
        for epoch in range(start_epoch, cfg.epochs):
            if stopped:
                break
            t0 = time.perf_counter()
            train_sampler.set_epoch(epoch)
            ddp.train()
            meter = LossMeter(cfg.loss_average)
            guard = FiniteGuard(cfg.log_every, epoch + 1, last)
            t_log, seen = time.perf_counter(), 0
            bar = tqdm(
                train_loader,
                desc=f"{cfg.mode} epoch {epoch + 1}",
                leave=False,
                disable=not (cfg.progress and d.is_main),
            )
            for step, batch in enumerate(bar):
                loss = step_loss(ddp, train_data, batch, runtime, d, channels_last, jitter, generator)
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                scaled = loss * d.world_size  # DDP averages gradients; see villa.distributed.gather_rows
                if scaler is not None:
                    scaler.scale(scaled).backward()
                    for opt in optimizers:
                        scaler.step(opt)
                    scaler.update()
                else:
                    scaled.backward()
                    for opt in optimizers:
                        opt.step()
                if head_sched is not None:
                    head_sched.step()
                meter.add(loss, len(batch.rows))
                seen += len(batch.rows)
                if guard.add(loss, step):  # a host sync only every log_every steps
                    bar.set_postfix(loss=f"{guard.last:.4f}")
                    now = time.perf_counter()
                    tracker.step(epoch + 1, epoch * steps_per_epoch + step, {
                        "loss": guard.last, "lr": optimizer.param_groups[0]["lr"], "temperature": temperature(model, cfg),
                        "images_per_s": seen * d.world_size / max(now - t_log, 1e-9)})  # fmt: skip
                    t_log, seen = now, 0
            guard.flush()
            train_loss = meter.mean
            val_loss = evaluate_loss(ddp, val_data, val_loader, runtime, d, cfg)
            scheduler.step(val_loss)
            improved = val_loss < best_val
            if improved:
                best_val, bad_epochs = val_loss, 0
            else:
                bad_epochs += 1
            stopped = bad_epochs >= cfg.early_stop_patience
            rec = {
                "epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "best_val": best_val,
                "lr": optimizer.param_groups[0]["lr"], "temperature": temperature(model, cfg),
                "seconds": round(time.perf_counter() - t0, 2),
            }  # fmt: skip
            if head_opt is not None:
                rec["head_lr"] = head_opt.param_groups[0]["lr"]
            history.append(rec)
            if d.is_main:
                state = clip_checkpoint_state(
                    model.clip, clip.model_name, clip.model_cfg, kind=f"villa-stage2-{cfg.mode}",
                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    **({"head_optimizer": head_opt.state_dict(), "head_scheduler": head_sched.state_dict()}
                       if head_opt is not None else {}),
                    scaler=scaler.state_dict() if scaler is not None else None, epoch=epoch + 1, best_val=best_val,
                    bad_epochs=bad_epochs, stopped=stopped, rng=rng_state(generator), history=history,
                    config=config_dict(cfg),
                    started_from={"model": cfg.model.name, "pretrained": str(cfg.model.pretrained)},
                    fingerprint=fingerprint, inputs=inputs, data_pools=data_pools, **grain_state(model),
                )  # fmt: skip
                commit_epoch(ckpt_dir, state, improved, f"{cfg.mode} epoch {epoch + 1}/{cfg.epochs}", rec, tracker,
                             (epoch + 1) * steps_per_epoch)  # fmt: skip
                if stopped:
                    log.info("early stop: no better val loss for %d epochs", bad_epochs)
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)
    log.info("rank %d/%d finished: trainable parameter checksum %.10e", d.rank, d.world_size, checksum)
    return {
        "mode": cfg.mode, "best_val": best_val, "checksum": checksum, "epochs_run": len(history), "history": history,
        "best_checkpoint": str(best), "last_checkpoint": str(last), "seconds": round(time.perf_counter() - t_start, 2),
    }  # fmt: skip


main = hydra_entry("stage2", train_stage2, __doc__)


if __name__ == "__main__":
    main()
