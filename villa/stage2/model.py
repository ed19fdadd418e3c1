"""Stage 2's model: a CLIP model trained through the region path, plus the head an objective adds."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from villa.core.errors import VillaError
from villa.models.clip import Clip
from villa.models.grain_head import GrainHead, GrainSpec, image_tokens, tower_width
from villa.models.region_encoder import RegionEncoder, roi_features


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
