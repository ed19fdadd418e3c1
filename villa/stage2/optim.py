"""The tower's optimiser: the original's Adam (L2 decay on every parameter) or AdamW with open_clip's no-decay rule."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from villa.core.errors import VillaError
from villa.stage2.objectives.base import Objective


def no_decay(name: str, p: torch.Tensor) -> bool:
    """open_clip's training rule (gains, biases, logit_scale: ``ndim < 2``, ``bn``, ``ln``, ``bias``), plus the
    token and positional embeddings."""
    return p.ndim < 2 or any(k in name for k in ("bn", "ln", "bias", "logit_scale", "embedding"))


def param_groups_of(
    named: list[tuple[str, nn.Parameter]], weight_decay: float, decay_all: bool
) -> list[dict[str, Any]]:
    """Trainable parameters as optimiser groups: one decayed group (``decay_all``: the original's), or decayed
    weights and undecayed gains, biases, temperature and embeddings (open_clip's pretraining)."""
    if decay_all:
        return [{"params": [p for _, p in named], "weight_decay": weight_decay}]
    groups = [
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: DictConfig, model: nn.Module, objective: Objective) -> torch.optim.Optimizer:
    """The tower's optimiser (the original's Adam with L2 decay by default) over every trainable parameter the
    objective does not optimise itself, grouped as the objective wants (:meth:`Objective.tower_groups`)."""
    own = objective.own_parameters(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in own]
    groups = objective.tower_groups(model, param_groups_of(named, cfg.weight_decay, cfg.weight_decay_all))
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, **kw)  # the original's: L2 weight decay added to the gradient
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kw)
    raise VillaError(f"optimizer={cfg.optimizer!r}: use adam or adamw")
