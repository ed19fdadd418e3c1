"""The tower's optimiser: the original's Adam (L2 decay on every parameter) or AdamW with open_clip's no-decay rule."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from villa.core.errors import VillaError


def no_decay(name: str, p: torch.Tensor) -> bool:
    """open_clip's training rule (gains, biases, logit_scale: ``ndim < 2``, ``bn``, ``ln``, ``bias``), plus the
    token and positional embeddings."""
    return p.ndim < 2 or any(k in name for k in ("bn", "ln", "bias", "logit_scale", "embedding"))


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool) -> list[dict[str, Any]]:
    """Trainable parameters as optimiser groups: one decayed group (``decay_all``: the original's), or decayed
    weights and undecayed gains, biases, temperature and embeddings (open_clip's pretraining)."""
    return param_groups_of([(n, p) for n, p in model.named_parameters() if p.requires_grad], weight_decay, decay_all)


def param_groups_of(
    named: list[tuple[str, nn.Parameter]], weight_decay: float, decay_all: bool
) -> list[dict[str, Any]]:
    if decay_all:
        return [{"params": [p for _, p in named], "weight_decay": weight_decay}]
    groups = [
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The tower's optimiser (the original's Adam with L2 decay by default). The GRAIN head is in it only with
    ``grain.optimizer=trainer``; else it has its own (:func:`build_head_optimizer`)."""
    head = getattr(model, "grain", None)
    if head is not None and cfg.grain.optimizer == "grain":
        mine = {id(p) for p in head.parameters()}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in mine]
        groups = param_groups_of(named, cfg.weight_decay, cfg.weight_decay_all)
        head = None
    else:
        groups = param_groups(model, cfg.weight_decay, cfg.weight_decay_all)
    if head is not None and cfg.grain.head_lr is not None:  # the GRAIN head (trained from scratch) at its own lr
        mine = {id(p) for p in head.parameters()}
        tower = [{**g, "params": [p for p in g["params"] if id(p) not in mine]} for g in groups]
        heads = [{**g, "params": [p for p in g["params"] if id(p) in mine], "lr": cfg.grain.head_lr} for g in groups]
        groups = [g for g in tower + heads if g["params"]]
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, **kw)  # the original's: L2 weight decay added to the gradient
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kw)
    raise VillaError(f"optimizer={cfg.optimizer!r}: use adam or adamw")
