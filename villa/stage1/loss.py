"""Losses: Stage 1's attribute-image contrastive loss, and the symmetric InfoNCE of Stage 2 / CLIP."""

from __future__ import annotations

import torch


def segment_max(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Max of the rows of ``values`` (R, A) within each segment (R,) -> (n_segments, A)."""
    out = values.new_full((n_segments, values.shape[1]), float("-inf"))
    return out.scatter_reduce(0, segment[:, None].expand_as(values), values, reduce="amax", include_self=True)


def stage1_loss(
    region_scores: torch.Tensor,
    region_image: torch.Tensor,
    image_attributes: torch.Tensor,
    temperature: float = 0.07,
    original: bool = True,
) -> torch.Tensor:
    """Stage 1 loss (the original's), vectorised over images and attributes.

    region_scores (R, A): cosine(head_a(region), emb_a); region_image (R,): image of each region in the batch;
    image_attributes (B, A) bool: attributes each image's text mentions. The loss of each image's best region per
    attribute: :func:`image_loss`.
    """
    b = image_attributes.shape[0]
    return image_loss(segment_max(region_scores.float(), region_image, b), image_attributes, temperature, original)


def image_loss(
    image_scores: torch.Tensor, image_attributes: torch.Tensor, temperature: float = 0.07, original: bool = True
) -> torch.Tensor:
    """Stage 1 loss from each image's best region score per attribute, image_scores (B, A).

    s_ia = image_scores / temperature. For every attribute present in the batch and every image i that has it:
    -log(exp(s_ia) / (exp(s_ia) + sum over images j without a of exp(s_ja))), averaged over all such (i, a).
    ``original=True`` reproduces the original code, whose denominator also adds exp(0) = 1 once per image that has
    a (it multiplies the scores by the negative mask before exp); see docs/stage1.md. Columns of attributes no image
    has add nothing, so a caller may leave them out.
    """
    s = image_scores.float() / temperature  # (B, A)
    pos = image_attributes.bool()
    if not pos.any():
        return s.sum() * 0.0
    neg_lse = torch.logsumexp(s.masked_fill(pos, float("-inf")), dim=0)  # (A,) log sum_{j without a} exp(s_ja)
    parts = [s, neg_lse.expand_as(s)]
    if original:
        n_pos = pos.sum(0).clamp(min=1).to(s.dtype)
        parts.append(torch.log(n_pos).expand_as(s))
    denom = torch.logsumexp(torch.stack(parts), dim=0)  # (B, A)
    return (denom - s)[pos].mean()
