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
    token's query, as OpenAI's CLIP code and the original ViLLA code compute it (``query=x[:1]``). open_clip projects
    and attends a query at every position and keeps the first; the result is the same to float rounding (tested),
    for a fraction of the pool's work (the region path runs the pool once per region)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (HW+1)NC
        x = x + self.positional_embedding[:, None, :].to(x.dtype)
        out, _ = F.multi_head_attention_forward(
            query=x[:1],
            key=x,
            value=x,
            embed_dim_to_check=x.shape[-1],
            num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight,
            k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True,
            training=self.training,
            need_weights=False,
        )
        return out.squeeze(0)


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
    feat: torch.Tensor, boxes: torch.Tensor, box_image: torch.Tensor, output_size: int, spatial_scale: float
) -> torch.Tensor:
    """ROI-Align of ``boxes`` (K, 4) on ``feat`` (B, C, h, w) -> (K, C, s, s) in ``feat``'s dtype.

    The boxes stay fp32 whatever ``feat``'s dtype: under bf16 autocast a pixel coordinate such as 150.7 would become
    151 (bf16 keeps 8 significant bits). The features are upcast for the interpolation, as torchvision's own autocast
    wrapper of roi_align does on CUDA, and the result is cast back.
    """
    rois = torch.cat([box_image[:, None].to(torch.float32), boxes.to(torch.float32)], dim=1)
    x = roi_align(
        feat.float(), rois, output_size=output_size, spatial_scale=spatial_scale, sampling_ratio=0, aligned=True
    )
    return x.to(feat.dtype)


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
