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
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from open_clip.modified_resnet import ModifiedResNet
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from villa.config import hydra_entry, vocab_from_config
from villa.data import PairSet, build_pairs, gather_index
from villa.data_format import Annotations, load_annotations
from villa.distributed import Dist, cleanup, gather_rows, init_distributed, rank_sizes, scale_grad, sum_over_ranks
from villa.embeddings import weights_id
from villa.encoders import Clip, RegionEncoder, clip_checkpoint_state, create_clip, mean_text_embeddings, roi_features
from villa.errors import VillaError
from villa.grain import GrainHead, GrainSpec, grain_losses, image_tokens, normalized_targets, tower_width
from villa.losses import infonce
from villa.mapping import assign_text, mapping_record
from villa.provenance import (
    check_resume,
    checkpoint_pools,
    dataset_pools,
    file_sha256,
    images_digest,
    run_fingerprint,
    unique_pools,
)
from villa.regions import ImageDataset, calibrate_on_data, collate_images
from villa.runtime import Runtime, get_runtime, seed_everything
from villa.schemas import validate_config
from villa.training import (
    FiniteGuard,
    check_best_on_resume,
    checkpoint_lock,
    commit_epoch,
    config_dict,
    load_checkpoint,
    make_tracker,
    rng_state,
    set_rng_state,
)

log = logging.getLogger(__name__)
MODES = ("villa", "baseline", "pretrain", "grain")


class Stage2Model(nn.Module):
    """A CLIP model trained through the region path. Returns normalised region (and, in pretraining, text)
    embeddings and the logit scale (1 / temperature)."""

    def __init__(self, clip: Clip, cfg: DictConfig):
        super().__init__()
        self.clip = clip.model
        self.regions = RegionEncoder(clip.model.visual, normalize=cfg.model.normalize, input_size=cfg.model.input_size)
        self.train_text = cfg.mode == "pretrain"
        self.freeze_bn = bool(cfg.model.freeze_bn)
        for name, p in self.clip.named_parameters():
            p.requires_grad_(name.startswith("visual.") or (self.train_text and name != "logit_scale"))
        if cfg.learn_temperature:
            with torch.no_grad():
                self.clip.logit_scale.fill_(float(np.log(1 / cfg.temperature)))
            self.clip.logit_scale.requires_grad_(True)
        self.fixed_scale = 1.0 / cfg.temperature
        self.learn_temperature = bool(cfg.learn_temperature)
        self.grain: Optional[GrainHead] = None
        self.pool_image = False
        if cfg.mode == "grain":
            g = cfg.grain
            self.grain = GrainHead(GrainSpec(tower_width(clip.model.visual), clip.embed_dim, g.queries, g.width,
                                             g.heads, g.layers, g.ffn, g.dropout))  # fmt: skip
            self.pool_image = g.image_embedding == "attnpool"
            if self.pool_image and not isinstance(clip.model.visual, ModifiedResNet):
                raise VillaError("grain.image_embedding=attnpool needs a ModifiedResNet tower (RN50, villa-*-rn)")
            if not self.pool_image:  # GRAIN's objective pools through its image query, not CLIP's attention pool
                for p in self.clip.visual.attnpool.parameters():
                    p.requires_grad_(False)

    def train(self, mode: bool = True) -> Stage2Model:
        super().train(mode)
        if not self.train_text:
            self.clip.transformer.eval()
        if self.freeze_bn:  # frozen BatchNorm statistics (fine-tuning, as detection backbones)
            for m in self.regions.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def scale(self, device: torch.device) -> torch.Tensor:
        if self.learn_temperature:
            return self.clip.logit_scale.exp().clamp(max=100)
        return torch.tensor(self.fixed_scale, device=device)

    def forward(
        self, images: torch.Tensor, boxes: torch.Tensor, box_image: torch.Tensor, tokens: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, ...]:
        if self.grain is not None:  # (L, B, Q, 4) boxes, (B, Q, E) region and (B, E) image embeddings, scale
            x = self.regions.prepare(images)
            if not self.pool_image:
                feat, positions = image_tokens(self.clip.visual, x)
                return (*self.grain(feat, positions), self.scale(images.device))
            # the image embedding through the region path's whole-image box: trunk once, then layer4 for the
            # decoder's tokens and ROI-Align + layer4 + attention pool for the image (grain.image_embedding=attnpool)
            v, trunk = self.clip.visual, self.regions.trunk(x)
            whole = trunk.new_tensor([[0.0, 0.0, x.shape[-1], x.shape[-2]]]).float().expand(len(x), 4)
            roi = roi_features(trunk, whole, torch.arange(len(x), device=x.device), self.regions.roi_size,
                               trunk.shape[-1] / x.shape[-1])  # fmt: skip
            boxes, region_emb, _ = self.grain(v.layer4(trunk), True)
            return boxes, region_emb, v.attnpool(v.layer4(roi)), self.scale(images.device)
        img = F.normalize(self.regions(images, boxes, box_image).float(), dim=-1)
        txt = F.normalize(self.clip.encode_text(tokens).float(), dim=-1) if tokens is not None else None
        return img, txt, self.scale(img.device)


def content_boxes(ann: Annotations) -> np.ndarray:
    """Per image, the bounding box of its content: the union of its region boxes (on DocMNIST, exactly where the
    non-black pixels can be). (I, 4) float32."""
    start = ann.region_offsets[:-1]
    lo = np.minimum.reduceat(ann.boxes[:, :2], start, axis=0)
    hi = np.maximum.reduceat(ann.boxes[:, 2:], start, axis=0)
    return np.concatenate([lo, hi], 1).astype(np.float32)


def jitter_boxes(boxes: torch.Tensor, sizes: torch.Tensor, margin: float, generator: torch.Generator) -> torch.Tensor:
    """Grow each box by a random margin in [0, margin] pixels per side, clipped to its image (W, H): a
    content-aware random crop (CLIP pretraining's random-resized-crop augmentation, keeping all captioned content)."""
    m = torch.rand(boxes.shape, generator=generator) * margin
    grown = boxes + m * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    upper = torch.cat([sizes - 1, sizes - 1], 1).float()
    return torch.minimum(torch.clamp(grown, min=0), upper)


class PairData:
    """One split's images, their pairs, and each pair's text target (embedding or tokens)."""

    def __init__(
        self,
        ann: Annotations,
        rows: np.ndarray,
        pairs: PairSet,
        text_emb: Optional[torch.Tensor],
        tokens: Optional[torch.Tensor],
    ):
        self.ann, self.rows, self.pairs = ann, rows, pairs
        self.text_emb, self.tokens = text_emb, tokens
        self.grain: Optional[DictConfig] = None  # mode=grain: its options (cfg.grain)


def uses_mapping(cfg: DictConfig) -> bool:
    """ViLLA, and GRAIN on Stage 1's mapping, read mapping.feather; GRAIN on gold pairs reads reg_to_attr."""
    return cfg.mode == "villa" or (cfg.mode == "grain" and cfg.grain_boxes == "mapping")


def load_stage2_annotations(cfg: DictConfig, d: Dist) -> Annotations:
    """The dataset (and, in villa mode, Stage 1's mapping) checked and loaded before any weights are."""
    if cfg.mode not in MODES:
        raise VillaError(f"mode={cfg.mode!r}: use one of {', '.join(MODES)}")
    villa_mode = uses_mapping(cfg)
    if villa_mode and not Path(cfg.mapping_path).is_file():
        raise VillaError(
            f"mapping not found: {cfg.mapping_path}; run Stage 1 first (python -m villa.stage1 ...) or set mapping_path"
        )
    ann_path = Path(cfg.data_dir) / "annotations.feather"
    if villa_mode and ann_path.is_file():
        rec = mapping_record(Path(cfg.mapping_path))
        if rec is None and not cfg.trust_mapping:
            raise VillaError(
                f"{cfg.mapping_path} records no provenance (Stage 1 writes which dataset it mapped): it may belong to "
                "another dataset; run Stage 1 on this dataset, or set trust_mapping=true to use it anyway"
            )
        if rec is not None and rec.get("annotations") != file_sha256(ann_path):
            raise VillaError(
                f"{cfg.mapping_path} was made by Stage 1 for another dataset than {cfg.data_dir}; "
                "run Stage 1 on this dataset or pass its mapping_path"
            )
    return load_annotations(
        Path(cfg.data_dir), vocab_from_config(cfg), required_splits=("train", "val"), check_images=d.is_main,
        table_path=cfg.mapping_path if villa_mode else None,
        required_columns=("assigned_text",) if villa_mode else (),
    )  # fmt: skip


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


def load_pair_data(
    cfg: DictConfig, clip: Clip, runtime: Runtime, d: Dist, ann: Optional[Annotations] = None
) -> tuple[PairData, PairData]:
    """Train and val pairs for the mode; texts embedded once by the frozen text tower (villa, baseline)."""
    if ann is None:
        ann = load_stage2_annotations(cfg, d)
    if uses_mapping(cfg):
        col = ann.table.column("assigned_text").combine_chunks()
        region_text = col.flatten().to_pylist()
        pairs = build_pairs(ann.image_size, ann.text, ann.region_offsets, ann.boxes, region_text)
    elif cfg.mode == "grain":  # grain_boxes=gold: the ground-truth pairs, sentences chosen as Stage 1's rule does
        vocab = vocab_from_config(cfg)
        gold = ann.region_attribute_matrix(len(vocab))
        if gold is None:
            raise VillaError(f"grain_boxes=gold needs ground-truth regions: {cfg.data_dir} has no reg_to_attr column")
        region_text = assign_text(ann.text, ann.region_offsets, gold, vocab, np.random.default_rng(cfg.seed))
        pairs = build_pairs(ann.image_size, ann.text, ann.region_offsets, ann.boxes, region_text)
    else:
        pairs = build_pairs(ann.image_size, ann.text)
    text_emb = tokens = None
    if cfg.mode == "pretrain":
        tokens = open_clip.get_tokenizer(clip.model_name)(pairs.text)
        if cfg.crop == "content":
            pairs.boxes = content_boxes(ann)
        elif cfg.crop != "none":
            raise VillaError(f"crop={cfg.crop!r}: use none or content")
    else:
        cache = Path(cfg.data_dir) / "text_cache"  # one file per text tower (villa.encoders.text_tower_digest)
        text_emb = mean_text_embeddings(clip, pairs.text, runtime, cache if d.is_main else None).to(runtime.device)
    out = []
    for split in ("train", "val"):
        out.append(PairData(ann, np.flatnonzero(ann.split == split), pairs, text_emb, tokens))
        if cfg.mode == "grain":
            out[-1].grain = cfg.grain
    n_pairs = int(np.diff(pairs.offsets)[out[0].rows].sum())
    log.info(
        "stage2 (%s): %d train images, %d train pairs, %d val images",
        cfg.mode,
        len(out[0].rows),
        n_pairs,
        len(out[1].rows),
    )
    return out[0], out[1]


class PairBatch(NamedTuple):
    """One step's input, assembled in the DataLoader (worker processes, pinned memory): uint8 images, their rows,
    and every pair of those images: index into the pair arrays, owning batch position, box."""

    images: torch.Tensor  # (B, 3, H, W) uint8
    rows: torch.Tensor  # (B,)
    pair_idx: torch.Tensor  # (P,)
    box_image: torch.Tensor  # (P,) in [0, B)
    boxes: torch.Tensor  # (P, 4) float32, pixels
    whole: torch.Tensor  # (P,) bool: the whole-image pair (the caption), last of each image's pairs


class PairCollate:
    """Collate images and gather their pairs' boxes off the training loop (picklable for worker processes)."""

    def __init__(self, pairs: PairSet):
        self.offsets, self.boxes = pairs.offsets, pairs.boxes

    def __call__(self, batch: list[tuple[torch.Tensor, int]]) -> PairBatch:
        images, rows = collate_images(batch)
        pair_idx, box_image = gather_index(self.offsets, rows.numpy())
        whole = pair_idx == self.offsets[rows.numpy() + 1][box_image] - 1
        return PairBatch(
            images, rows, torch.from_numpy(pair_idx), torch.from_numpy(box_image),
            torch.from_numpy(self.boxes[pair_idx]), torch.from_numpy(whole),
        )  # fmt: skip


def make_loader(
    data: PairData, cfg: DictConfig, d: Dist, train: bool, split: str = "train"
) -> tuple[DataLoader, DistributedSampler]:
    """Training batches are shuffled and, as the original's (``drop_last=True``), the last partial one is dropped
    unless ``drop_last=false``; validation keeps every image."""
    ds = ImageDataset(data.ann, data.rows)
    sampler = DistributedSampler(
        ds, num_replicas=d.world_size, rank=d.rank, shuffle=train, seed=cfg.seed, drop_last=False
    )
    per_rank = max(1, cfg.batch_size // d.world_size)
    drop_last = bool(train and cfg.drop_last)
    if drop_last and len(sampler) < per_rank:
        raise VillaError(
            f"the {split} split has {len(ds)} images, fewer than one batch ({cfg.batch_size}) with drop_last=true; "
            "lower batch_size or set drop_last=false"
        )
    loader = DataLoader(
        ds, batch_size=per_rank, sampler=sampler, num_workers=cfg.num_workers, collate_fn=PairCollate(data.pairs),
        pin_memory=torch.cuda.is_available(), persistent_workers=cfg.num_workers > 0, drop_last=drop_last,
    )  # fmt: skip
    return loader, sampler


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


def grain_step_loss(
    model: nn.Module, data: PairData, batch: PairBatch, runtime: Runtime, d: Dist, channels_last: bool
) -> torch.Tensor:
    """L_ic + w_rd L_rd + box_scale (w_l1 L1 + w_giou GIoU) (villa/grain.py) on the (global) batch.

    L_ic is computed whole on every rank (gathered features, as the other modes). L_rd and L_box are sums over this
    rank's matched queries (L_rd) or targets (L_box) divided by the global count, so after the trainer's world-size
    factor and DDP's averaging their gradients are a single process's; their value is summed over ranks for
    logging. Matching copies one cost tensor to the host per matched decoder layer (scipy's solver runs there).
    """
    g = data.grain
    dev = runtime.device
    images = batch.images.to(dev, non_blocking=True).float().div_(255)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    region = ~batch.whole
    h, w = images.shape[-2:]
    target = normalized_targets(batch.boxes[region], w, h).to(dev, non_blocking=True)
    target_image = batch.box_image[region].to(dev, non_blocking=True)
    desc = data.text_emb.index_select(0, batch.pair_idx[region].to(dev, non_blocking=True))
    caption = data.text_emb.index_select(0, batch.pair_idx[batch.whole].to(dev, non_blocking=True))
    with runtime.autocast():
        boxes, region_emb, image_emb, scale = model(images, None, None, None)
    if d.enabled and scale.requires_grad:
        scale = scale_grad(scale, 1.0 / d.world_size)
    scale = scale.float()
    l_ic = infonce(gather_rows(F.normalize(image_emb.float(), dim=-1), d), gather_rows(caption, d), scale)
    sizes = rank_sizes(len(desc), d, dev)  # the global batch's descriptions: this rank's start at its offset
    parts = grain_losses(boxes.float(), region_emb, target, target_image, gather_rows(desc, d, sizes),
                         sum(sizes[: d.rank]), scale, torch.tensor(float(sum(sizes)), device=dev), aux=g.aux_loss)  # fmt: skip
    rd = parts["rd_sum"] / sum_over_ranks(parts["matched"], d).clamp(min=1)  # GRAIN: the mean over matched queries
    local = g.rd_weight * rd + g.box_scale * (g.l1_weight * parts["l1"] + g.giou_weight * parts["giou"])
    value = sum_over_ranks(local.detach(), d)
    return l_ic + local + (value - local.detach())


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


def no_decay(name: str, p: torch.Tensor) -> bool:
    """open_clip's training rule (gains, biases, logit_scale: ``ndim < 2``, ``bn``, ``ln``, ``bias``), plus the
    token and positional embeddings."""
    return p.ndim < 2 or any(k in name for k in ("bn", "ln", "bias", "logit_scale", "embedding"))


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool) -> list[dict[str, Any]]:
    """Trainable parameters as optimiser groups: one decayed group (``decay_all``: the original's), or decayed
    weights and undecayed gains, biases, temperature and embeddings (open_clip's pretraining)."""
    return param_groups_of([(n, p) for n, p in model.named_parameters() if p.requires_grad], weight_decay, decay_all)


def param_groups_of(
    named: list[tuple[str, nn.Parameter]], weight_decay: float, decay_all: bool
) -> list[dict[str, Any]]:
    if decay_all:
        return [{"params": [p for _, p in named], "weight_decay": weight_decay}]
    groups = [
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The tower's optimiser (the original's Adam with L2 decay by default). The GRAIN head is in it only with
    ``grain.optimizer=trainer``; else it has its own (:func:`build_head_optimizer`)."""
    head = getattr(model, "grain", None)
    if head is not None and cfg.grain.optimizer == "grain":
        mine = {id(p) for p in head.parameters()}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in mine]
        groups = param_groups_of(named, cfg.weight_decay, cfg.weight_decay_all)
        head = None
    else:
        groups = param_groups(model, cfg.weight_decay, cfg.weight_decay_all)
    if head is not None and cfg.grain.head_lr is not None:  # the GRAIN head (trained from scratch) at its own lr
        mine = {id(p) for p in head.parameters()}
        tower = [{**g, "params": [p for p in g["params"] if id(p) not in mine]} for g in groups]
        heads = [{**g, "params": [p for p in g["params"] if id(p) in mine], "lr": cfg.grain.head_lr} for g in groups]
        groups = [g for g in tower + heads if g["params"]]
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, **kw)  # the original's: L2 weight decay added to the gradient
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kw)
    raise VillaError(f"optimizer={cfg.optimizer!r}: use adam or adamw")


GRAIN_LR = 1e-3  # GRAIN's train.py default


def build_head_optimizer(
    cfg: DictConfig, model: Stage2Model, steps_per_epoch: int
) -> tuple[Optional[torch.optim.Optimizer], Optional[torch.optim.lr_scheduler.LambdaLR]]:
    """GRAIN's optimisation of its head (``grain.optimizer=grain``; train.py and utils/train_utils.py): AdamW at
    ``head_lr`` (GRAIN's 1e-3), betas (0.9, 0.98), decoupled decay 0.1 except on biases and norm gains
    (``optim_policy``: ``ndim < 2``, ``bias``, ``norm``), and per step a linear warm-up from ``lr_start`` over
    ``warmup_epochs`` then a cosine to ``lr_end`` at the epoch cap (``cosine_scheduler``)."""
    head = getattr(model, "grain", None)
    if head is None or cfg.grain.optimizer != "grain":
        return None, None
    g = cfg.grain
    base = float(g.head_lr or GRAIN_LR)
    named = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    plain = [p for n, p in named if p.ndim < 2 or "bias" in n or "norm" in n]
    decayed = [p for n, p in named if not (p.ndim < 2 or "bias" in n or "norm" in n)]
    opt = torch.optim.AdamW([{"params": plain, "weight_decay": 0.0},
                             {"params": decayed, "weight_decay": float(g.head_weight_decay)}],
                            lr=base, betas=tuple(g.head_betas), eps=float(cfg.eps))  # fmt: skip
    warm = int(round(float(g.warmup_epochs) * steps_per_epoch))
    total = int(cfg.epochs) * steps_per_epoch
    start, end = float(g.lr_start), float(g.lr_end)

    def factor(step: int) -> float:  # GRAIN's schedule[step] / base
        if step < warm:
            return (start + (base - start) * step / max(warm - 1, 1)) / base
        n = max(total - warm, 1)
        i = min(step - warm, n)  # past the cap (epochs raised on resume): lr_end
        return (end + 0.5 * (base - end) * (1 + math.cos(math.pi * i / n))) / base

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def grain_state(model: Stage2Model) -> dict[str, Any]:
    """GRAIN's head in a checkpoint: its shape and weights (evaluation's query readout rebuilds it)."""
    if model.grain is None:
        return {}
    return {"grain": asdict(model.grain.spec), "grain_state": model.grain.state_dict()}


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
