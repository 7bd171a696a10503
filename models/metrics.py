"""Offline metrics, exactly as DESIGN §8 defines them (numpy, for evaluation code and reports).

    AUC           P(score of a random positive > score of a random negative); ties count ½
                  (Mann–Whitney U with average ranks).
    PerQueryAUC   mean over requests having both classes of that request's AUC.
    NE            mean log loss / H(p̄),  H(p) = −p·log p − (1−p)·log(1−p),  p̄ = mean label.
"""
from typing import Optional

import numpy as np
from scipy.stats import rankdata

EPSILON = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray, weights: Optional[np.ndarray] = None) -> float:
    """ROC AUC with ties counted ½; NaN when only one class is present."""
    y = np.asarray(labels).reshape(-1) > 0
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if weights is not None:
        return _weighted_auc(y, s, np.asarray(weights, dtype=np.float64).reshape(-1))
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _weighted_auc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> float:
    order = np.argsort(s, kind="mergesort")
    s, y, w = s[order], y[order], w[order]
    _, start = np.unique(s, return_index=True)
    pos_w = np.add.reduceat(np.where(y, w, 0.0), start)
    neg_w = np.add.reduceat(np.where(~y, w, 0.0), start)
    total_pos, total_neg = pos_w.sum(), neg_w.sum()
    if total_pos == 0 or total_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg_w) - neg_w
    return float((pos_w * (neg_below + 0.5 * neg_w)).sum() / (total_pos * total_neg))


def per_query_auc(labels: np.ndarray, scores: np.ndarray, query_ids: np.ndarray) -> float:
    """Mean over queries with both classes of the per-query AUC."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores).reshape(-1)
    q = np.asarray(query_ids).reshape(-1)
    order = np.argsort(q, kind="mergesort")
    y, s, q = y[order], s[order], q[order]
    bounds = np.flatnonzero(np.diff(q)) + 1
    values = [auc(yy, ss) for yy, ss in zip(np.split(y, bounds), np.split(s, bounds))]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), EPSILON, 1 - EPSILON)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def normalized_entropy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean log loss divided by the entropy of the mean label."""
    p_bar = float(np.mean(labels))
    if p_bar <= 0.0 or p_bar >= 1.0:
        return float("nan")
    entropy = -(p_bar * np.log(p_bar) + (1 - p_bar) * np.log(1 - p_bar))
    return log_loss(labels, probs) / entropy
