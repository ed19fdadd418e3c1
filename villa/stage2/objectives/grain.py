"""GRAIN's objective (Halbe et al., "Grounding Descriptions in Images informs Zero-Shot Visual Recognition"; public
code shaunak27/grain-clip) as ``objective=grain``: L_ic + w_rd L_rd + box_scale (w_l1 L1 + w_giou GIoU) on a
decoder head over the image tower's tokens (villa/models/grain_head.py), trained with GRAIN's own optimiser for the
head (``grain.optimizer=grain``). Where villa differs from GRAIN's code: docs/grain.md.

- L_ic: the symmetric CLIP loss between the image query's embedding and the caption;
- L_rd: each region query matched to a target region, against every description of the (global) batch
  (cross-entropy, one direction, as GRAIN's ``WordContrastiveLoss``), averaged over the matched queries;
- L_box: L1 + GIoU on the Hungarian-matched pairs of the last decoder layer (every layer with ``grain.aux_loss``),
  times ``box_scale`` (1.5: GRAIN's ``compute_box_loss`` divides by ``len(weight_dict) / 3``).

Region descriptions and boxes come from Stage 1's mapping (``grain.boxes=mapping``, no labels) or from the
ground truth (``grain.boxes=gold``, an upper bound).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from villa.core.distributed import Dist, gather_rows, rank_sizes, sum_over_ranks
from villa.core.errors import VillaError
from villa.data.annotations import Annotations
from villa.models.clip import Clip
from villa.models.grain_head import (
    GrainHead,
    GrainSpec,
    box_loss_sums,
    hungarian_match,
    image_tokens,
    normalized_targets,
    tower_width,
)
from villa.models.region_encoder import roi_features
from villa.stage1.mapping import assign_text
from villa.stage2.objectives.base import Objective, StepContext, infonce, share_scale_grad, step_images

GRAIN_LR = 1e-3  # GRAIN's train.py default


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
    return {
        "rd_sum": rd,
        "matched": torch.tensor(float(len(tgt)), device=rd.device),
        "l1": l1 / n,
        "giou": giou / n,
        "match": match_last,
    }


class Grain(Objective):
    name = "grain"

    @property
    def reads_mapping(self) -> bool:  # type: ignore[override]
        return self.cfg.grain.boxes == "mapping"

    @property
    def pool_image(self) -> bool:
        """L_ic's image side through CLIP's attention pool (which then trains) instead of GRAIN's image query."""
        return self.cfg.grain.image_embedding == "attnpool"

    def region_text(self, ann: Annotations) -> Optional[list[str]]:
        """Stage 1's assigned sentences (``grain.boxes=mapping``) or the ground-truth pairs with sentences chosen as
        Stage 1's rule does (``gold``)."""
        if self.reads_mapping:
            return ann.table.column("assigned_text").combine_chunks().flatten().to_pylist()
        gold = ann.region_attribute_matrix(len(self.vocab))
        if gold is None:
            raise VillaError(f"grain.boxes=gold needs ground-truth regions: {ann.root} has no reg_to_attr column")
        return assign_text(ann.text, ann.region_offsets, gold, self.vocab, np.random.default_rng(self.cfg.seed))

    def trains(self, name: str) -> bool:
        if not self.pool_image and name.startswith("visual.attnpool."):
            return False  # GRAIN pools through its image query, not CLIP's attention pool
        return super().trains(name)

    def build(self, model: nn.Module, clip: Clip) -> Optional[nn.Module]:
        g = self.cfg.grain
        if self.pool_image and not isinstance(clip.model.visual, ModifiedResNet):
            raise VillaError("grain.image_embedding=attnpool needs a ModifiedResNet tower (RN50, villa-*-rn)")
        return GrainHead(
            GrainSpec(
                tower_width(clip.model.visual), clip.embed_dim, g.queries, g.width, g.heads, g.layers, g.ffn, g.dropout
            )
        )

    def forward(self, model, images, boxes, box_image, tokens):
        """(L, B, Q, 4) boxes, (B, Q, E) region and (B, E) image embeddings, and the logit scale."""
        x = model.regions.prepare(images)
        if not self.pool_image:
            feat, positions = image_tokens(model.clip.visual, x)
            return (*model.head(feat, positions), model.scale(images.device))
        # the image embedding through the region path's whole-image box: trunk once, then layer4 for the decoder's
        # tokens and ROI-Align + layer4 + attention pool for the image (grain.image_embedding=attnpool)
        v, trunk = model.clip.visual, model.regions.trunk(x)
        whole = trunk.new_tensor([[0.0, 0.0, x.shape[-1], x.shape[-2]]]).float().expand(len(x), 4)
        roi = roi_features(
            trunk, whole, torch.arange(len(x), device=x.device), model.regions.roi_size, trunk.shape[-1] / x.shape[-1]
        )
        boxes, region_emb, _ = model.head(v.layer4(trunk), True)
        return boxes, region_emb, v.attnpool(v.layer4(roi)), model.scale(images.device)

    def loss(self, model, batch, ctx: StepContext, train: bool = True) -> torch.Tensor:
        """L_ic is computed whole on every rank (gathered features). L_rd and L_box are sums over this rank's
        matched queries (L_rd) or targets (L_box) divided by the global count, so after the trainer's world-size
        factor and DDP's averaging their gradients are a single process's; their value is summed over ranks for
        logging. Matching copies one cost tensor to the host per matched decoder layer (scipy's solver runs there).
        """
        d, dev = ctx.dist, ctx.runtime.device
        emb = self.targets_.embeddings
        images = step_images(batch, ctx)
        region = ~batch.whole
        h, w = images.shape[-2:]
        target = normalized_targets(batch.boxes[region], w, h).to(dev, non_blocking=True)
        target_image = batch.box_image[region].to(dev, non_blocking=True)
        desc = emb.index_select(0, batch.pair_idx[region].to(dev, non_blocking=True))
        caption = emb.index_select(0, batch.pair_idx[batch.whole].to(dev, non_blocking=True))
        with ctx.runtime.autocast():
            boxes, region_emb, image_emb, scale = model(images, None, None, None)
        return self.criterion(boxes, region_emb, image_emb, scale, target, target_image, desc, caption, d)["total"]

    def criterion(
        self,
        boxes: torch.Tensor,
        region_emb: torch.Tensor,
        image_emb: torch.Tensor,
        scale: torch.Tensor,
        target: torch.Tensor,
        target_image: torch.Tensor,
        desc: torch.Tensor,
        caption: torch.Tensor,
        d: Dist,
    ) -> dict[str, Any]:
        """GRAIN's three losses as the config weighs them, from the head's outputs: ``boxes`` (L, B, Q, 4) cxcywh,
        ``region_emb`` (B, Q, E), ``image_emb`` (B, E), the logit ``scale``; the targets (T, 4) cxcywh with their
        images (T,), the descriptions (T, E) and captions (B, E), L2-normalised. Returns ``l_ic``, ``l_rd``
        (w_rd L_rd), ``l_box`` (box_scale (w_l1 L1 + w_giou GIoU)), their ``total`` (what Stage 2 trains on) and
        the last layer's ``match``. fidelity/grain_losses.py holds this against GRAIN's own code."""
        g, dev = self.cfg.grain, boxes.device
        scale = share_scale_grad(scale, d).float()
        l_ic = infonce(gather_rows(F.normalize(image_emb.float(), dim=-1), d), gather_rows(caption, d), scale)
        sizes = rank_sizes(len(desc), d, dev)  # the global batch's descriptions: this rank's start at its offset
        parts = grain_losses(
            boxes.float(),
            region_emb,
            target,
            target_image,
            gather_rows(desc, d, sizes),
            sum(sizes[: d.rank]),
            scale,
            torch.tensor(float(sum(sizes)), device=dev),
            aux=g.aux_loss,
        )
        rd = parts["rd_sum"] / sum_over_ranks(parts["matched"], d).clamp(min=1)  # GRAIN: mean over matched queries
        l_rd = g.rd_weight * rd
        l_box = g.box_scale * (g.l1_weight * parts["l1"] + g.giou_weight * parts["giou"])
        local = l_rd + l_box
        value = sum_over_ranks(local.detach(), d)
        return {
            "total": l_ic + local + (value - local.detach()),
            "l_ic": l_ic,
            "l_rd": l_rd,
            "l_box": l_box,
            "match": parts["match"],
        }

    # --- the head's optimisation -----------------------------------------------------------------------------

    def own_parameters(self, model) -> set[int]:
        return {id(p) for p in model.head.parameters()} if self.cfg.grain.optimizer == "grain" else set()

    def tower_groups(self, model, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``grain.optimizer=trainer``: the head trains in the tower's optimiser, at ``grain.head_lr`` when set."""
        if self.cfg.grain.optimizer == "grain" or self.cfg.grain.head_lr is None:
            return groups
        mine = {id(p) for p in model.head.parameters()}
        tower = [{**g, "params": [p for p in g["params"] if id(p) not in mine]} for g in groups]
        heads = [
            {**g, "params": [p for p in g["params"] if id(p) in mine], "lr": self.cfg.grain.head_lr} for g in groups
        ]
        return [g for g in tower + heads if g["params"]]

    def optimizers(self, model, steps_per_epoch: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """GRAIN's optimisation of its head (``grain.optimizer=grain``; its train.py and utils/train_utils.py):
        AdamW at ``head_lr`` (GRAIN's 1e-3), betas (0.9, 0.98), decoupled decay 0.1 except on biases and norm gains
        (``optim_policy``: ``ndim < 2``, ``bias``, ``norm``), and per step a linear warm-up from ``lr_start`` over
        ``warmup_epochs`` then a cosine to ``lr_end`` at the epoch cap (``cosine_scheduler``)."""
        cfg, g = self.cfg, self.cfg.grain
        if g.optimizer != "grain":
            return {}, {}
        base = float(g.head_lr or GRAIN_LR)
        named = [(n, p) for n, p in model.head.named_parameters() if p.requires_grad]
        plain = [p for n, p in named if p.ndim < 2 or "bias" in n or "norm" in n]
        decayed = [p for n, p in named if not (p.ndim < 2 or "bias" in n or "norm" in n)]
        opt = torch.optim.AdamW(
            [{"params": plain, "weight_decay": 0.0}, {"params": decayed, "weight_decay": float(g.head_weight_decay)}],
            lr=base,
            betas=tuple(g.head_betas),
            eps=float(cfg.eps),
        )
        warm = int(round(float(g.warmup_epochs) * steps_per_epoch))
        total = int(cfg.epochs) * steps_per_epoch
        start, end = float(g.lr_start), float(g.lr_end)

        def factor(step: int) -> float:  # GRAIN's schedule[step] / base
            if step < warm:
                return (start + (base - start) * step / max(warm - 1, 1)) / base
            n = max(total - warm, 1)
            i = min(step - warm, n)  # past the cap (epochs raised on resume): lr_end
            return (end + 0.5 * (base - end) * (1 + math.cos(math.pi * i / n))) / base

        return {"head_optimizer": opt}, {"head_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor)}

    def checkpoint_state(self, model) -> dict[str, Any]:
        """GRAIN's head: its shape and weights (evaluation's query readout rebuilds it)."""
        return {"grain": asdict(model.head.spec), "grain_state": model.head.state_dict()}

    def load_checkpoint_state(self, model, state: dict[str, Any]) -> None:
        model.head.load_state_dict(state["grain_state"])

    def describe(self) -> str:
        return f"grain (boxes from {self.cfg.grain.boxes})"
