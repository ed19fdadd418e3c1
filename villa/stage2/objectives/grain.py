"""GRAIN's objective (Halbe et al.): L_ic + L_rd + L_box on a decoder head; see villa/models/grain_head.py and docs/grain.md."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from villa.core.distributed import Dist, gather_rows, rank_sizes, scale_grad, sum_over_ranks
from villa.core.runtime import Runtime
from villa.models.grain_head import box_loss_sums, hungarian_match, normalized_targets
from villa.stage2.model import Stage2Model
from villa.stage2.objectives.base import infonce
from villa.stage2.pairs import PairBatch, PairData


def grain_losses(
    boxes: torch.Tensor,
    region_emb: torch.Tensor,
    target: torch.Tensor,
    target_image: torch.Tensor,
    desc_emb_all: torch.Tensor,
    desc_offset: int,
    scale: torch.Tensor,
    n_boxes: torch.Tensor,
    aux: bool = False,
) -> dict[str, torch.Tensor]:
    """L_rd and L_box of one rank's images, as GRAIN's code computes them.

    ``boxes`` (L, B, Q, 4) from every decoder layer; ``region_emb`` (B, Q, E); ``target`` (T, 4) cxcywh;
    ``desc_emb_all`` the normalised descriptions of the global batch, this rank's starting at ``desc_offset``.
    Returns ``l1`` and ``giou``: sums over the matched pairs of the last layer (every layer with ``aux``) divided by
    the global number of target boxes ``n_boxes`` (GRAIN's ``num_boxes``); ``rd_sum``: the sum of L_rd's
    cross-entropies over this rank's matched queries and ``matched`` their number (GRAIN averages over the matched
    queries: the caller divides by the global count); ``match``: the last layer's (image, query, target) triples.
    """
    n_images = boxes.shape[1]
    layers = range(boxes.shape[0]) if aux else [boxes.shape[0] - 1]
    l1 = giou = boxes.sum() * 0.0
    match_last = None
    for li in layers:  # the last layer's matching feeds L_rd too
        match = hungarian_match(boxes[li], target, target_image, n_images)
        a, b = box_loss_sums(boxes[li], target, match)
        l1, giou = l1 + a, giou + b
        if li == boxes.shape[0] - 1:
            match_last = match
    img, qry, tgt = match_last
    z = F.normalize(region_emb[img, qry].float(), dim=-1)
    logits = scale * z @ desc_emb_all.t()
    rd = F.cross_entropy(logits, tgt + desc_offset, reduction="sum") if len(tgt) else logits.sum() * 0.0
    n = n_boxes.clamp(min=1)
    return {"rd_sum": rd, "matched": torch.tensor(float(len(tgt)), device=rd.device), "l1": l1 / n,
            "giou": giou / n, "match": match_last}  # fmt: skip


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
