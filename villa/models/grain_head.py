"""A GRAIN-style local+global objective (Halbe et al., "Grounding Descriptions in Images informs Zero-Shot Visual
Recognition", arXiv 2412.04429; public code shaunak27/grain-clip) as Stage 2's ``objective=grain``.

One model, three losses at once:

- L_ic: image-caption alignment, the symmetric CLIP loss between the image query's embedding and the caption;
- L_rd: region-description alignment, each region query matched to a target region against every description of
  the (global) batch (cross-entropy, one direction, as GRAIN's ``WordContrastiveLoss``);
- L_box: box prediction, queries matched to target boxes by the Hungarian algorithm on 5 x L1 + 2 x (-GIoU)
  (``scipy.optimize.linear_sum_assignment``), then L1 + GIoU loss (weights 1 and 1) on the matched pairs of the last
  decoder layer, times 1.5, as GRAIN's ``compute_box_loss`` (it sums its ``weight_dict`` keys, the last layer's
  terms, and divides by ``len(weight_dict) / 3``; the auxiliary layers' losses it computes are dropped); the sum
  over every layer (DETR's auxiliary losses) is ``aux=True``.

:class:`GrainHead` is the part GRAIN adds to the image tower: a transformer decoder (torch's
``nn.TransformerDecoderLayer``, pre-norm) whose queries (``queries`` region queries plus one image query) attend to
the tower's output tokens, a box MLP (``torchvision.ops.MLP``) giving (cx, cy, w, h) in [0, 1] per region query, and
projections of region and image queries into the shared embedding space. :func:`image_tokens` gives the tokens of
any open_clip image tower: ModifiedResNet's last feature map flattened (plus a fixed 2-D sine position code, as
DETR, since a ResNet map carries no position), or a ViT's last-block tokens through open_clip's
``forward_intermediates``. Where villa differs from GRAIN's code: docs/grain.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import MLP, box_convert, box_iou

from villa.core.errors import VillaError

MATCH_COST_L1, MATCH_COST_GIOU = 5.0, 2.0  # GRAIN's (DETR's) matching costs
GRAIN_IOU_EPS = 1e-4  # GRAIN's model/box_ops.py box_iou: inter / (union + 0.0001), in its GIoU cost and loss


def _giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU as GRAIN's ``box_ops.generalized_box_iou`` computes it (DETR's, with ``GRAIN_IOU_EPS`` added to the
    IoU's union), for xyxy boxes that broadcast against each other ((N, 1, 4) x (M, 4): pairwise; (K, 4) x (K, 4):
    pair by pair, the same arithmetic as the diagonal of the pairwise matrix)."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    iou = inter / (union + GRAIN_IOU_EPS)
    wh = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


@dataclass(frozen=True)
class GrainSpec:
    """The head's shape, recorded in checkpoints so that evaluation rebuilds it."""

    feature_dim: int
    embed_dim: int
    queries: int = 5
    width: int = 256
    heads: int = 8
    layers: int = 3
    ffn: int = 1024
    dropout: float = 0.1


def sine_positions(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """DETR's fixed 2-D sine position code of an h x w grid: (h * w, dim), half for y, half for x."""
    if dim % 4:
        raise VillaError(f"grain.width={dim}: must be a multiple of 4 (the 2-D position code)")
    n = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(n, device=device, dtype=torch.float32) / n))
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    py = torch.cat([torch.sin(ys[:, None] * freq), torch.cos(ys[:, None] * freq)], 1)  # (h, dim/2)
    px = torch.cat([torch.sin(xs[:, None] * freq), torch.cos(xs[:, None] * freq)], 1)  # (w, dim/2)
    return torch.cat([py[:, None].expand(h, w, -1), px[None].expand(h, w, -1)], -1).reshape(h * w, dim)


def tower_width(visual: nn.Module) -> int:
    """Channels of the tokens :func:`image_tokens` returns for this tower."""
    if isinstance(visual, ModifiedResNet):
        return int(visual.layer4[-1].conv3.out_channels)
    if hasattr(visual, "forward_intermediates") and hasattr(visual, "transformer"):
        return int(visual.transformer.width)
    raise VillaError(
        f"objective=grain needs an image tower with a spatial feature map or tokens (ModifiedResNet, or a ViT with "
        f"open_clip's forward_intermediates), got {type(visual).__name__}; upgrade open_clip or use an RN model"
    )


def image_tokens(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The tower's output tokens (B, N, C) and whether they need a position code (ResNet maps do)."""
    if isinstance(visual, ModifiedResNet):
        x = images.to(visual.conv1.weight.dtype)
        feat = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))  # (B, C, h, w)
        return feat, True
    out = visual.forward_intermediates(
        images, indices=1, normalize_intermediates=True, intermediates_only=True, output_fmt="NLC"
    )
    if isinstance(out, dict):
        out = out.get("image_intermediates", out.get("intermediates"))
    return out[-1], False  # the last block's patch tokens, which carry the ViT's own position embedding


class GrainHead(nn.Module):
    """Queries, decoder, box MLP and projections on top of an image tower's tokens (module docstring)."""

    def __init__(self, spec: GrainSpec):
        super().__init__()
        if spec.width % spec.heads or spec.width % 4:
            raise VillaError(
                f"grain.width={spec.width} must be a multiple of grain.heads={spec.heads} and of 4 (the 2-D position "
                "code); e.g. grain.width=256 grain.heads=8"
            )
        self.spec = spec
        self.proj = nn.Linear(spec.feature_dim, spec.width, bias=False)
        self.memory_norm = nn.LayerNorm(spec.width)  # GRAIN's pre-norm of the memory (normalize_before=True)
        self.query = nn.Embedding(spec.queries + 1, spec.width)  # region queries, then the image query
        layer = nn.TransformerDecoderLayer(
            spec.width, spec.heads, spec.ffn, spec.dropout, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, spec.layers, norm=nn.LayerNorm(spec.width))
        self.box = MLP(spec.width, [spec.width, spec.width, 4], activation_layer=nn.ReLU)
        self.region_proj = nn.Linear(spec.width, spec.embed_dim, bias=False)
        self.image_proj = nn.Linear(spec.width, spec.embed_dim, bias=False)
        nn.init.normal_(self.region_proj.weight, std=spec.width**-0.5)  # GRAIN's obj_proj / img_proj init
        nn.init.normal_(self.image_proj.weight, std=spec.width**-0.5)

    def forward(self, feat: torch.Tensor, positions: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens -> boxes (L, B, Q, 4) cxcywh in [0, 1] (every decoder layer), region embeddings (B, Q, E) and the
        image embedding (B, E), both from the last layer, not normalised."""
        if feat.dim() == 4:  # (B, C, h, w) feature map
            h, w = feat.shape[-2:]
            feat = feat.flatten(2).transpose(1, 2)
        memory = self.memory_norm(self.proj(feat))
        if positions:
            memory = memory + sine_positions(h, w, self.spec.width, memory.device).to(memory.dtype)
        x = self.query.weight.unsqueeze(0).expand(memory.shape[0], -1, -1)
        states = []
        for layer in self.decoder.layers:
            x = layer(x, memory)
            states.append(self.decoder.norm(x))
        hs = torch.stack(states)  # (L, B, Q + 1, width)
        boxes = self.box(hs[:, :, :-1]).sigmoid()
        return boxes, self.region_proj(hs[-1, :, :-1]), self.image_proj(hs[-1, :, -1])


def normalized_targets(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pixel [x0, y0, x1, y1] boxes -> (cx, cy, w, h) in [0, 1] of the (padded) batch canvas."""
    scale = boxes.new_tensor([width, height, width, height])
    return box_convert(boxes.float() / scale, "xyxy", "cxcywh").clamp(0, 1)


@torch.no_grad()
def hungarian_match(
    pred: torch.Tensor, target: torch.Tensor, target_image: torch.Tensor, n_images: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match each image's queries to its targets: (image, query, target) index triples, one per matched target.

    ``pred`` (B, Q, 4) and ``target`` (T, 4) are cxcywh in [0, 1]; ``target_image`` (T,) is each target's image,
    non-decreasing. Cost = 5 x L1 + 2 x (-GIoU) (GRAIN's GIoU, :func:`_giou`), built on the device in one pass, copied to the host once, and
    solved per image by ``scipy.optimize.linear_sum_assignment`` (min(Q, n) pairs when an image has n targets).
    """
    dev = pred.device
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    if len(target) == 0:
        return empty, empty, empty
    b, q = pred.shape[:2]
    counts = torch.bincount(target_image, minlength=n_images)
    starts = torch.cumsum(counts, 0) - counts
    width = int(counts.max())
    # each image's targets as columns of a (B, Q, width) block, padded by repeating its last target (cut off below)
    col = starts[:, None] + torch.arange(width, device=dev)[None]
    col = torch.minimum(col, (starts + counts - 1).clamp(min=0)[:, None])
    flat = pred.reshape(b * q, 4).float()
    tgt = target.float()
    cost = MATCH_COST_L1 * torch.cdist(flat, tgt, p=1) - MATCH_COST_GIOU * _giou(
        box_convert(flat, "cxcywh", "xyxy")[:, None], box_convert(tgt, "cxcywh", "xyxy")
    )
    cost = cost.view(b, q, -1).gather(2, col[:, None, :].expand(b, q, width)).cpu().numpy()
    counts_h, starts_h = counts.cpu().numpy(), starts.cpu().numpy()
    img, qry, tgt_idx = [], [], []
    for i in np.flatnonzero(counts_h):
        r, c = linear_sum_assignment(cost[i, :, : counts_h[i]])
        img.append(np.full(len(r), i))
        qry.append(r)
        tgt_idx.append(c + starts_h[i])
    as_t = lambda parts: torch.from_numpy(np.concatenate(parts).astype(np.int64)).to(dev)  # noqa: E731
    return as_t(img), as_t(qry), as_t(tgt_idx)


def box_loss_sums(
    pred: torch.Tensor, target: torch.Tensor, match: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the matched pairs of the L1 distance (cxcywh) and of 1 - GIoU (GRAIN's GIoU, :func:`_giou`)."""
    img, qry, tgt = match
    src = pred[img, qry].float()
    t = target[tgt].float()
    if len(t) == 0:
        zero = pred.sum() * 0.0
        return zero, zero
    l1 = F.l1_loss(src, t, reduction="sum")
    giou = (1 - _giou(box_convert(src, "cxcywh", "xyxy"), box_convert(t, "cxcywh", "xyxy"))).sum()
    return l1, giou


@torch.no_grad()
def matched_iou(pred: torch.Tensor, target: torch.Tensor, match: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """IoU of each matched (query box, target box) pair: (M,)."""
    img, qry, tgt = match
    a = box_convert(pred[img, qry].float(), "cxcywh", "xyxy")
    b = box_convert(target[tgt].float(), "cxcywh", "xyxy")
    return box_iou(a, b).diagonal() if len(a) else a.new_zeros(0)


def permute_queries(boxes: torch.Tensor, region_emb: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same predictions with the region queries in another order (tests: the loss does not depend on it)."""
    return boxes[..., perm, :], region_emb[:, perm]


def query_readout(
    head: GrainHead, visual: nn.Module, images: torch.Tensor, gt_boxes: torch.Tensor, gt_image: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The second readout: each ground-truth region's embedding is the region query matched to its box (Hungarian
    on box costs only: no text is used). Returns (K, E) embeddings (zero for a region no query matched), a (K,)
    matched mask and the matched pairs' IoU. ``gt_boxes`` are cxcywh in [0, 1]."""
    feat, positions = image_tokens(visual, images)
    boxes, region_emb, _ = head(feat, positions)
    match = hungarian_match(boxes[-1], gt_boxes, gt_image, images.shape[0])
    img, qry, tgt = match
    out = region_emb.new_zeros((len(gt_boxes), region_emb.shape[-1])).float()
    out[tgt] = region_emb[img, qry].float()
    matched = torch.zeros(len(gt_boxes), dtype=torch.bool, device=out.device)
    matched[tgt] = True
    return out, matched, matched_iou(boxes[-1], gt_boxes, match)
