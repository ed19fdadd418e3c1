"""ViLLA's region path through an open_clip ModifiedResNet: backbone to the third stage over whole images, one
ROI-Align over every box of the batch, then the last stage and the attention pool (the original's path, batched);
the class-token attention pool; BatchNorm statistics for a randomly initialised tower."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from torch import nn
from torchvision.ops import roi_align

from villa.core.errors import VillaError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClassTokenAttentionPool2d(AttentionPool2d):
    """open_clip's ``AttentionPool2d`` computing only the output it returns: the attention of the mean (class)
    token's query, as OpenAI's CLIP code and the original ViLLA code compute it (``query=x[:1]``), with the key and
    value projections folded into that one query. The same function to float rounding (tested against open_clip's,
    outputs and every parameter's gradient), for a small fraction of the pool's work; the region path runs the pool
    once per region, where open_clip's projected every position's key and value (two (L, C) x (C, C) products per
    region) to use one query.

    Per head h, with the query q (scaled by 1/sqrt(head width)) and tokens x_j:
    ``q . (Wk_h x_j + bk_h) = (Wk_h^T q) . x_j + q . bk_h`` (the attention logits from one (C,)-vector per head), and
    ``sum_j a_j (Wv_h x_j + bv_h) = Wv_h (sum_j a_j x_j) + bv_h`` (the weights sum to 1). ``q . bk_h`` is the same
    for every token, so the softmax does not see it; it is kept so that ``k_proj.bias`` gets its (zero) gradient as
    in the original, and DDP finds every parameter used.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)  # (N, L, C)
        h = self.num_heads
        d = c // h
        q = (F.linear(x[:, 0], self.q_proj.weight, self.q_proj.bias) * d**-0.5).view(n, h, d)
        wk, wv = self.k_proj.weight.view(h, d, c), self.v_proj.weight.view(h, d, c)
        u = torch.einsum("nhd,hdc->nhc", q, wk)  # (N, H, C): head h's query carried back to the tokens' space
        logits = torch.einsum("nhc,nlc->nhl", u, x) + (q * self.k_proj.bias.view(h, d)).sum(-1, keepdim=True)
        z = torch.einsum("nhl,nlc->nhc", logits.softmax(dim=-1), x)  # (N, H, C): attention-weighted tokens
        out = torch.einsum("nhc,hdc->nhd", z, wv).reshape(n, c) + self.v_proj.bias
        return F.linear(out, self.c_proj.weight, self.c_proj.bias)


def class_token_pool(visual: ModifiedResNet) -> ModifiedResNet:
    """Give ``visual``'s attention pool :class:`ClassTokenAttentionPool2d`'s forward, in place (the same parameters
    and state dict: only the class changes, so copies and pickles keep it)."""
    if type(visual.attnpool) is AttentionPool2d:
        visual.attnpool.__class__ = ClassTokenAttentionPool2d
    return visual


class RegionEncoder(nn.Module):
    """ViLLA's region path on an open_clip ModifiedResNet (RN50 and villa's small configs).

    Images (B, 3, H, W) in [0, 1] -> stem, layer1..layer3 -> ROI-Align of every box (output
    ``2 * attnpool grid``, 14x14 for RN50; spatial scale = feature width / image width; sampling ratio 0;
    aligned) -> layer4 -> attention pool -> (K, D) region embeddings (not normalised).
    """

    def __init__(self, visual: nn.Module, normalize: bool = False, input_size: Optional[int] = None):
        super().__init__()
        if not isinstance(visual, ModifiedResNet):
            raise VillaError(
                f"the region path needs a ModifiedResNet image tower (RN50, villa-tiny-rn...), got {type(visual).__name__}"
            )
        self.visual = class_token_pool(visual)
        grid = int(round((visual.attnpool.positional_embedding.shape[0] - 1) ** 0.5))
        self.roi_size = 2 * grid
        self.normalize = normalize
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.visual.output_dim

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = images.to(v.conv1.weight.dtype)
        return v.layer3(v.layer2(v.layer1(v.stem(x))))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The region path's input: CLIP's mean/std when ``normalize``, resized to ``input_size`` when set."""
        if self.normalize:
            images = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        h, w = images.shape[-2:]
        if self.input_size is not None and (h, w) != (self.input_size, self.input_size):
            images = F.interpolate(
                images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
            )
        return images

    def forward(self, images: torch.Tensor, boxes: torch.Tensor, box_image: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) float in [0, 1]; boxes (K, 4) [x0, y0, x1, y1] in pixels; box_image (K,) long."""
        h, w = images.shape[-2:]
        images = self.prepare(images)
        if images.shape[-1] != w:
            boxes = boxes * boxes.new_tensor([images.shape[-1] / w, images.shape[-2] / h] * 2)
            w = images.shape[-1]
        feat = self.trunk(images)
        x = roi_features(feat, boxes, box_image, self.roi_size, feat.shape[-1] / w)
        x = self.visual.layer4(x)
        return self.visual.attnpool(x)


def roi_features(
    feat: torch.Tensor,
    boxes: torch.Tensor,
    box_image: torch.Tensor,
    output_size: int,
    spatial_scale: float,
    kernel: str = "auto",
) -> torch.Tensor:
    """ROI-Align of ``boxes`` (K, 4) on ``feat`` (B, C, h, w) -> (K, C, s, s) in ``feat``'s dtype (sampling ratio 0:
    ceil(box size / s) samples per bin; aligned: pixel centres at +0.5).

    ``kernel``: ``torchvision`` (``torchvision.ops.roi_align``), ``separable`` (:func:`roi_align_separable`, the same
    function as two small matmuls per box; on a CPU its forward and backward together are 4.9x torchvision's,
    whose backward is one thread: docs/speed.md), ``auto``: separable on a CPU, torchvision elsewhere.

    The boxes stay fp32 whatever ``feat``'s dtype: under bf16 autocast a pixel coordinate such as 150.7 would become
    151 (bf16 keeps 8 significant bits). The features are upcast for the interpolation, as torchvision's own autocast
    wrapper of roi_align does on CUDA, and the result is cast back.
    """
    if kernel == "auto":
        kernel = "separable" if feat.device.type == "cpu" else "torchvision"
    boxes = boxes.to(torch.float32)
    if kernel == "separable":
        with torch.autocast(feat.device.type, enabled=False):  # fp32 matmuls, as torchvision's fp32 kernel
            x = roi_align_separable(feat.float(), boxes, box_image, output_size, spatial_scale)
    elif kernel == "torchvision":
        rois = torch.cat([box_image[:, None].to(torch.float32), boxes], dim=1)
        x = roi_align(
            feat.float(), rois, output_size=output_size, spatial_scale=spatial_scale, sampling_ratio=0, aligned=True
        )
    else:
        raise VillaError(f"roi kernel={kernel!r}: use auto, separable or torchvision")
    return x.to(feat.dtype)


def _axis_weights(start: torch.Tensor, size: torch.Tensor, bins: int, length: int) -> torch.Tensor:
    """(K, bins, length): ROI-Align's sampling along one axis for K boxes starting at ``start`` with extent
    ``size`` (feature-map units): each bin's ceil(size / bins) sample points, each spread over its two neighbouring
    cells with linear weights (torchvision's boundary rules: a point beyond [-1, length] adds nothing, one below 0
    reads cell 0, one past the last cell reads the last), averaged over the bin's points."""
    grid = torch.ceil(size / bins)
    n = max(int(grid.max()) if grid.numel() else 1, 1)
    step = (size / bins)[:, None, None]
    b = torch.arange(bins, dtype=start.dtype, device=start.device)[None, :, None]
    i = torch.arange(n, dtype=start.dtype, device=start.device)[None, None, :]
    pos = start[:, None, None] + b * step + (i + 0.5) * step / grid.clamp(min=1)[:, None, None]  # (K, bins, n)
    valid = (i < grid[:, None, None]) & (pos >= -1.0) & (pos <= length)
    p = torch.where(valid, pos, torch.zeros_like(pos)).clamp(min=0)
    low = p.floor()
    last = low >= length - 1
    low = torch.where(last, torch.full_like(low, length - 1), low)
    p = torch.where(last, low, p)
    high = torch.where(last, low, low + 1)
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    w = torch.zeros(start.shape[0], bins, length, dtype=start.dtype, device=start.device)
    w.scatter_add_(2, low.long(), torch.where(valid, 1 - (p - low), zero))
    w.scatter_add_(2, high.long(), torch.where(valid, p - low, zero))
    return w / grid.clamp(min=1)[:, None, None]


ROI_CHUNK_BYTES = 1 << 28  # the boxes' gathered feature maps held at once (256 MiB)


def roi_align_separable(
    feat: torch.Tensor, boxes: torch.Tensor, box_image: torch.Tensor, output_size: int, spatial_scale: float
) -> torch.Tensor:
    """``torchvision.ops.roi_align(..., sampling_ratio=0, aligned=True)`` as matrix products (equal to float rounding;
    tested on the edge cases: boxes past the border, empty and reversed boxes).

    ROI-Align's bilinear weight of a sample point is a product of a row weight and a column weight, and the validity
    test and the count of samples split the same way, so each box's output is ``Wy @ F @ Wx.T`` per channel, with
    ``Wy`` (s, h) and ``Wx`` (s, w) the averaged sampling weights of its rows and columns (:func:`_axis_weights`).
    The backward is then two matmuls and an ``index_add`` over images, where torchvision's CPU backward scatters
    every sample's four weights in one thread.
    """
    _, c, h, w = feat.shape
    start = boxes * spatial_scale - 0.5
    wy = _axis_weights(start[:, 1], start[:, 3] - start[:, 1], output_size, h)[:, None]  # (K, 1, s, h)
    wx = _axis_weights(start[:, 0], start[:, 2] - start[:, 0], output_size, w)[:, None].transpose(-1, -2)
    chunk = max(1, ROI_CHUNK_BYTES // max(1, c * h * w * feat.element_size()))
    outs = []
    for k in range(0, boxes.shape[0], chunk):  # a few chunks at most: bounds the gathered maps' memory
        f = feat.index_select(0, box_image[k : k + chunk])  # (k, C, h, w)
        outs.append(torch.matmul(torch.matmul(wy[k : k + chunk], f), wx[k : k + chunk]))  # (k, C, s, s)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@torch.no_grad()
def calibrate_batchnorm(encoder: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]], max_batches: int = 10) -> int:
    """Estimate BatchNorm running statistics from data (cumulative average over up to ``max_batches``).

    Only for randomly initialised encoders: their running statistics start at mean 0 / variance 1, so in eval mode
    every image maps to nearly the same embedding (cosine ~1.0) until hundreds of training steps have decayed the
    initial variance (momentum 0.1: 0.9^n). Pretrained weights never go through this. Returns batches used.
    """
    bns = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    was_training = encoder.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    encoder.train()
    n = 0
    for args in batches:
        encoder(*args)
        n += 1
        if n >= max_batches:
            break
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    encoder.train(was_training)
    return n
