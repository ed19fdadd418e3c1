"""Quality metrics: region-attribute mapping precision/recall/F1 and retrieval R-Precision / Precision@K."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def prf(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Micro precision, recall and F1 over the True entries of two bool arrays of the same shape."""
    tp = int(np.logical_and(pred, gold).sum())
    n_pred, n_gold = int(pred.sum()), int(gold.sum())
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f, "tp": tp, "predicted": n_pred, "gold": n_gold}


def mapping_quality(
    pred: np.ndarray, gold: np.ndarray, attribute_group: Sequence[int], groups: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Micro P/R/F1 over region-attribute pairs, overall and per attribute group. pred, gold: (R, A) bool."""
    out = {"all": prf(pred, gold)}
    ag = np.asarray(attribute_group)
    for gi, g in enumerate(groups):
        cols = ag == gi
        out[g] = prf(pred[:, cols], gold[:, cols])
    return out
