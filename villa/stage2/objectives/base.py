"""The interface of a Stage 2 objective, and the CLIP-style contrastive objective the others start from.

The trainer (villa/stage2/train.py) owns the loop: data loading, the optimisation step, validation, early stopping,
checkpoints, DDP. An objective owns what differs between ViLLA, the one-to-one baseline, CLIP pretraining and
GRAIN, each a subclass chosen by ``objective=<name>`` (or ``objective=<module.Class>`` for your own):

- :meth:`Objective.region_text`: which regions pair with which text (none: whole images only);
- :meth:`Objective.targets`: each pair's text target (frozen text-tower embeddings, or tokens when the text tower
  trains);
- :meth:`Objective.build`: the parameters it adds to the model (a head) and the ones it freezes;
- :meth:`Objective.forward` and :meth:`Objective.loss`: one step's outputs and the loss over the (global) batch
  (:meth:`Objective.contrast`: the loss between matched region and text embeddings, CLIP's InfoNCE);
- :meth:`Objective.optimizers`: the optimisers and per-step schedules beyond the tower's;
- :meth:`Objective.checkpoint_state` / :meth:`Objective.load_checkpoint_state`: what it adds to a checkpoint.

The base class is the CLIP-style objective: every pair's region embedding against its text embedding, the
symmetric InfoNCE at a fixed (or learned) temperature; on its own it is the one-to-one baseline (whole image,
whole caption). docs/stage2.md shows how to add a fifth objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from villa.core.distributed import Dist, gather_rows, scale_grad
from villa.core.runtime import Runtime
from villa.data.annotations import Annotations
from villa.data.vocab import Vocabulary

if TYPE_CHECKING:  # the model and the batch are built by the trainer; only their types are named here
    from villa.models.clip import Clip
    from villa.stage2.model import Stage2Model
    from villa.stage2.pairs import PairBatch, PairSet


def infonce(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float = 1 / 0.07
) -> torch.Tensor:
    """Symmetric InfoNCE over matched rows of (N, D) normalised embeddings, weight 0.5 per direction."""
    logits = logit_scale * image_emb @ text_emb.t()
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


@dataclass
class StepContext:
    """What a step needs beyond the batch: where it runs, the process group, the memory format, and the run's
    generator (for random augmentation)."""

    runtime: Runtime
    dist: Dist
    channels_last: bool = False
    generator: Optional[torch.Generator] = None


@dataclass
class Targets:
    """Every pair's text target: frozen embeddings (P, D) on the device, or tokens (P, L) when the text trains."""

    embeddings: Optional[torch.Tensor] = None
    tokens: Optional[torch.Tensor] = None


class Objective:
    """A Stage 2 objective. Subclasses set :attr:`name` and override what differs from CLIP's contrastive loss."""

    name: ClassVar[str] = ""
    reads_mapping: ClassVar[bool] = False  # reads Stage 1's mapping.feather (checked and fingerprinted)
    trains_text: ClassVar[bool] = False  # the text tower trains (its targets are tokens)

    def __init__(self, cfg: DictConfig, vocab: Vocabulary):
        self.cfg, self.vocab = cfg, vocab
        self.targets_: Targets = Targets()
        self.pairs: Optional[PairSet] = None

    # --- data ---------------------------------------------------------------------------------------------------

    def region_text(self, ann: Annotations) -> Optional[list[str]]:
        """Each region's text (an empty string: the region is not a pair), or None: whole images only."""
        return None

    def whole_image_boxes(self, ann: Annotations) -> Optional[np.ndarray]:
        """(I, 4) boxes for the whole-image pairs instead of the full image (pretraining's content crop), or None."""
        return None

    def targets(self, pairs: PairSet, clip: Clip, runtime: Runtime, cache: Optional[Path]) -> Targets:
        """Every pair's text embedded once by the frozen text tower (sentences averaged, L2-normalised)."""
        from villa.models.text import mean_text_embeddings

        return Targets(embeddings=mean_text_embeddings(clip, pairs.text, runtime, cache).to(runtime.device))

    # --- model --------------------------------------------------------------------------------------------------

    def trains(self, name: str) -> bool:
        """Whether the CLIP parameter ``name`` trains: the image tower; with :attr:`trains_text`, the text tower."""
        return name.startswith("visual.") or (self.trains_text and name != "logit_scale")

    def build(self, model: Stage2Model, clip: Clip) -> Optional[nn.Module]:
        """The module this objective adds to the model (trained with it, saved with it), or None."""
        return None

    # --- one step -----------------------------------------------------------------------------------------------

    def forward(
        self,
        model: Stage2Model,
        images: torch.Tensor,
        boxes: torch.Tensor,
        box_image: torch.Tensor,
        tokens: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        """Inside the (DDP-wrapped) model's forward: normalised region (and text) embeddings and the logit scale."""
        img = F.normalize(model.regions(images, boxes, box_image).float(), dim=-1)
        txt = F.normalize(model.clip.encode_text(tokens).float(), dim=-1) if tokens is not None else None
        return img, txt, model.scale(img.device)

    def step_boxes(self, batch: PairBatch, ctx: StepContext, train: bool) -> torch.Tensor:
        """The boxes a step embeds (pretraining jitters them while training)."""
        return batch.boxes

    def loss(self, model: nn.Module, batch: PairBatch, ctx: StepContext, train: bool = True) -> torch.Tensor:
        """The symmetric InfoNCE over every region-text pair of the (global) batch. No host sync: inputs are copied
        asynchronously from pinned memory and the loss stays on the device."""
        dev, d = ctx.runtime.device, ctx.dist
        images = step_images(batch, ctx)
        boxes = self.step_boxes(batch, ctx, train).to(dev, non_blocking=True)
        box_image = batch.box_image.to(dev, non_blocking=True)
        tokens = self.targets_.tokens
        tokens = tokens[batch.pair_idx].to(dev, non_blocking=True) if tokens is not None else None
        with ctx.runtime.autocast():
            img, txt, scale = model(images, boxes, box_image, tokens)
        scale = share_scale_grad(scale, d)
        if txt is None:
            txt = self.targets_.embeddings.index_select(0, batch.pair_idx.to(dev, non_blocking=True))
        return self.contrast(gather_rows(img, d), gather_rows(txt.float(), d), scale.float())

    def contrast(self, region_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The loss between the (global) batch's matched rows of (N, D) normalised region and text embeddings:
        CLIP's symmetric InfoNCE."""
        return infonce(region_emb, text_emb, scale)

    # --- optimisation and checkpoints ---------------------------------------------------------------------------

    def optimizers(self, model: Stage2Model, steps_per_epoch: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Optimisers and per-step schedules of this objective's own, beyond the tower's (``{name: object}``, the
        names their states carry in checkpoints); the tower's optimiser skips :meth:`own_parameters`."""
        return {}, {}

    def own_parameters(self, model: Stage2Model) -> set[int]:
        """Ids of the parameters :meth:`optimizers` trains (the tower's optimiser leaves them out)."""
        return set()

    def tower_groups(self, model: Stage2Model, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The tower optimiser's parameter groups, as this objective wants them (e.g. a head at its own lr)."""
        return groups

    def checkpoint_state(self, model: Stage2Model) -> dict[str, Any]:
        return {}

    def load_checkpoint_state(self, model: Stage2Model, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> str:
        return self.name


def step_images(batch: PairBatch, ctx: StepContext) -> torch.Tensor:
    """A step's uint8 images on the device as floats in [0, 1] (channels-last where it pays)."""
    images = batch.images.to(ctx.runtime.device, non_blocking=True).float().div_(255)
    if ctx.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def share_scale_grad(scale: torch.Tensor, d: Dist) -> torch.Tensor:
    """Every rank sees the whole gathered logit matrix, so a learned logit scale already gets the full gradient
    locally: undo the world-size factor the trainer applies for the towers' gathered features."""
    if d.enabled and scale.requires_grad:
        return scale_grad(scale, 1.0 / d.world_size)
    return scale
