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


def _ranked_relevance(sim: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """rel reordered by descending similarity per row; ties keep the lower gallery index first (stable)."""
    order = np.argsort(-sim, axis=1, kind="stable")
    return np.take_along_axis(rel, order, axis=1)


def r_precision(sim: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """Per query (row): precision among the top R results, R = number of relevant items. NaN where R = 0.

    sim, rel: (Q, G) similarities and bool relevance. Ties in ``sim`` are broken by gallery index (lower first).
    """
    ranked = _ranked_relevance(sim, rel)
    r = rel.sum(1)
    cum = np.cumsum(ranked, axis=1)
    hits = cum[np.arange(len(r)), np.maximum(r, 1) - 1]
    return np.where(r > 0, hits / np.maximum(r, 1), np.nan)


def precision_at_k(sim: np.ndarray, rel: np.ndarray, k: int) -> np.ndarray:
    """Per query: fraction of the top ``k`` results that are relevant (k capped at the gallery size)."""
    k = min(k, sim.shape[1])
    return _ranked_relevance(sim, rel)[:, :k].mean(1)
