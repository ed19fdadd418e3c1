"""CLIP pretraining: whole images against whole captions with both towers training and CLIP's learnable
temperature (``learn_temperature=true``); optionally a content-aware random crop (``pretrain.crop=content``). An
offline stand-in for OpenAI's weights; the recipe of villa's shipped encoder is docs/pretrained.md."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import open_clip
import torch

from villa.core.runtime import Runtime
from villa.data.annotations import Annotations
from villa.models.clip import Clip
from villa.stage2.objectives.base import Objective, StepContext, Targets
from villa.stage2.pairs import PairBatch, PairSet


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


class Pretrain(Objective):
    name = "pretrain"
    trains_text = True

    def whole_image_boxes(self, ann: Annotations) -> Optional[np.ndarray]:
        self.image_size = ann.image_size
        return content_boxes(ann) if self.cfg.pretrain.crop == "content" else None

    def targets(self, pairs: PairSet, clip: Clip, runtime: Runtime, cache: Optional[Path]) -> Targets:
        return Targets(tokens=open_clip.get_tokenizer(clip.model_name)(pairs.text))

    def step_boxes(self, batch: PairBatch, ctx: StepContext, train: bool) -> torch.Tensor:
        if not (train and self.cfg.pretrain.crop == "content"):
            return batch.boxes
        sizes = torch.from_numpy(self.image_size[batch.rows.numpy()[batch.box_image.numpy()]])
        return jitter_boxes(batch.boxes, sizes, float(self.cfg.pretrain.crop_margin), ctx.generator)
