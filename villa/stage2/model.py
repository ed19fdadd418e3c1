"""Stage 2's model: a CLIP model trained through the region path, plus the module its objective adds (a head).

Which CLIP parameters train and what the forward pass returns are the objective's (villa/stage2/objectives/); this
module holds what every objective shares: the region path, the temperature, frozen BatchNorm statistics, the frozen
text tower's eval mode.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from villa.models.clip import Clip
from villa.models.region_encoder import RegionEncoder
from villa.stage2.objectives.base import Objective


class Stage2Model(nn.Module):
    """``clip`` (open_clip's model), ``regions`` (its image tower's region path), ``head`` (the objective's module,
    or None). ``forward`` runs the objective's forward, so that DDP wraps one module whatever the objective."""

    def __init__(self, clip: Clip, cfg: DictConfig, objective: Objective):
        super().__init__()
        self.clip = clip.model
        self.regions = RegionEncoder(clip.model.visual, normalize=cfg.model.normalize, input_size=cfg.model.input_size)
        self.train_text = objective.trains_text
        self.freeze_bn = bool(cfg.model.freeze_bn)
        for name, p in self.clip.named_parameters():
            p.requires_grad_(objective.trains(name))
        if cfg.learn_temperature:
            with torch.no_grad():
                self.clip.logit_scale.fill_(float(np.log(1 / cfg.temperature)))
            self.clip.logit_scale.requires_grad_(True)
        self.fixed_temperature = float(cfg.temperature)
        self.fixed_scale = 1.0 / cfg.temperature
        self.learn_temperature = bool(cfg.learn_temperature)
        self.head: Optional[nn.Module] = objective.build(self, clip)
        self.objective = [objective]  # in a list: not a submodule, not in the state dict

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
        """The logit scale (1 / temperature): learned (CLIP's, clamped at 100) or fixed."""
        if self.learn_temperature:
            return self.clip.logit_scale.exp().clamp(max=100)
        return torch.tensor(self.fixed_scale, device=device)

    def temperature(self) -> float:
        """The temperature in use: learned (1 / exp(logit_scale)) or fixed."""
        return 1.0 / float(self.clip.logit_scale.detach().exp()) if self.learn_temperature else self.fixed_temperature

    def forward(self, images, boxes, box_image, tokens=None) -> tuple[torch.Tensor, ...]:
        return self.objective[0].forward(self, images, boxes, box_image, tokens)
