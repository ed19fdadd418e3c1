"""The interface of a Stage 2 objective, and the symmetric InfoNCE the contrastive ones share."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def infonce(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float = 1 / 0.07
) -> torch.Tensor:
    """Symmetric InfoNCE over matched rows of (N, D) normalised embeddings, weight 0.5 per direction."""
    logits = logit_scale * image_emb @ text_emb.t()
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
