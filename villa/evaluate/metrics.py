"""Quality metrics: region-attribute mapping precision/recall/F1 and retrieval R-Precision / Precision@K."""

from __future__ import annotations

import numpy as np


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
