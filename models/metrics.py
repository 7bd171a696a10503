"""Offline metrics, exactly as DESIGN §8 defines them (numpy, for evaluation code and reports).

    AUC           P(score of a random positive > score of a random negative); ties count ½
                  (Mann–Whitney U with average ranks).
    PerQueryAUC   mean over requests having both classes of that request's AUC.
    NE            mean log loss / H(p̄),  H(p) = −p·log p − (1−p)·log(1−p),  p̄ = mean label.
    Calibration   bias Σ(y − ŷ) / Σy per bucket of predicted CTR and per slice (e.g. ui_position).
    PD            relative prediction difference of two models: mean |p1 − p2| / ((p1 + p2)/2).
"""
from typing import Dict, List, Optional, Sequence

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


def calibration_bias(labels: np.ndarray, probs: np.ndarray, boundaries: Sequence[float]) -> List[Dict[str, float]]:
    """Per bucket of predicted CTR (bucket b holds boundaries[b-1] <= p < boundaries[b]):
    count, mean prediction, mean label and bias = Σ(y − ŷ) / Σy (NaN when Σy = 0)."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    bucket = np.digitize(p, boundaries)
    edges = [0.0] + list(boundaries) + [1.0]
    out = []
    for b in range(len(boundaries) + 1):
        sel = bucket == b
        positives = y[sel].sum()
        out.append({
            "lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(sel.sum()),
            "mean_prediction": float(p[sel].mean()) if sel.any() else float("nan"),
            "mean_label": float(y[sel].mean()) if sel.any() else float("nan"),
            "bias": float((y[sel] - p[sel]).sum() / positives) if positives > 0 else float("nan"),
        })
    return out


def calibration_bias_by_slice(labels: np.ndarray, probs: np.ndarray, slices: np.ndarray) -> Dict[str, Dict[str, float]]:
    """Bias Σ(y − ŷ) / Σy and count per value of a slicing feature (e.g. ui_position)."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    s = np.asarray(slices).reshape(-1)
    out = {}
    for value in np.unique(s):
        sel = s == value
        positives = y[sel].sum()
        out[str(value)] = {"count": int(sel.sum()),
                           "bias": float((y[sel] - p[sel]).sum() / positives) if positives > 0 else float("nan")}
    return out


def prediction_difference(p1: np.ndarray, p2: np.ndarray) -> float:
    """PD, the relative prediction difference of two models: mean |p1 − p2| / ((p1 + p2) / 2)."""
    a = np.asarray(p1, dtype=np.float64).reshape(-1)
    b = np.asarray(p2, dtype=np.float64).reshape(-1)
    return float(np.mean(np.abs(a - b) / np.maximum((a + b) / 2.0, EPSILON)))


# ---------------------------------------------------------------------------------------------
# Cascade metrics (DESIGN §8, the RecFlow / LCRON protocol), on request lists [B, L].
#   End-to-end recall: each stage keeps its top q_i of the survivors of the stage before;
#       recall = |final ∩ GT| / |GT|, mean over requests with GT.
#   Per-stage Recall@|GT|@m: |top-m by that stage's score ∩ GT| / |GT|, mean over requests with GT.
#   NDCG@k: Σ_{r<k} (2^{y_(r)} − 1) / log2(r + 2), divided by the same sum for the ideal order,
#       mean over requests with a positive label (Järvelin & Kekäläinen, 2002).
#   Chance Recall@|GT|@q: the expected Recall@|GT|@q of a uniformly random order, mean over
#       requests with GT of min(q, n_r) / n_r (n_r = the request's candidates): by symmetry each GT
#       candidate is in a random top q with probability min(q, n_r) / n_r.
#   Recall lift: (recall − chance) / (1 − chance): 0 for a random order, 1 for a perfect one,
#       negative for worse than random; undefined (NaN) when chance = 1 (q keeps every candidate).
# A request without GT (no real GT candidate) has no recall: it is left out of the means, and
# `requests_without_gt` counts such requests so that reports can say how many were left out.
# Padded candidates (mask 0) never survive a stage, never count as GT and are never ranked.
# Ties between scores are broken by list position (lower index first: a stable sort).
# ---------------------------------------------------------------------------------------------
def _list_inputs(scores, mask, name="scores"):
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"{name} must be [batch, list_size], got shape {s.shape}")
    if mask is None:
        valid = np.ones(s.shape, dtype=bool)
    else:
        valid = np.asarray(mask) != 0
        if valid.shape != s.shape:
            raise ValueError(f"mask has shape {valid.shape} but {name} have shape {s.shape}")
    return s, valid


def _top_m(scores: np.ndarray, alive: np.ndarray, m) -> np.ndarray:
    """Boolean [B, L]: the top m (per request: an int or a [B] array) of the alive candidates."""
    order = np.argsort(-np.where(alive, scores, -np.inf), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(scores.shape[1])[None, :].repeat(scores.shape[0], 0), axis=1)
    m = np.broadcast_to(np.asarray(m).reshape(-1, 1) if np.ndim(m) else m, (scores.shape[0], 1))
    return alive & (rank < m)


def cascade_survivors(stage_scores, quotas, mask=None) -> np.ndarray:
    """Boolean [B, L]: the candidates that the last stage keeps (each stage keeps its top q_i of
    the previous stage's survivors; a stage with fewer than q_i survivors keeps them all)."""
    if len(stage_scores) != len(quotas):
        raise ValueError(f"{len(stage_scores)} stage score arrays but {len(quotas)} quotas")
    if any(int(q) < 1 for q in quotas):
        raise ValueError(f"quotas must be >= 1, got {tuple(quotas)}")
    first, alive = _list_inputs(stage_scores[0], mask, "stage_scores[0]")
    for i, (s, q) in enumerate(zip(stage_scores, quotas)):
        s = np.asarray(s, dtype=np.float64)
        if s.shape != first.shape:
            raise ValueError(f"stage_scores[{i}] has shape {s.shape} but stage_scores[0] has shape {first.shape}")
        alive = _top_m(s, alive, int(q))
    return alive


def requests_without_gt(gt_mask, mask=None) -> int:
    """Number of requests [B, L] with no real GT candidate (GT on a padded slot does not count):
    the requests that e2e_recall and stage_recall leave out of their means."""
    gt, valid = _list_inputs(gt_mask, mask, "gt_mask")
    return int(np.sum(((gt != 0) & valid).sum(axis=1) == 0))


def _mean_recall(selected: np.ndarray, gt: np.ndarray) -> float:
    n_gt = gt.sum(axis=1)
    has_gt = n_gt > 0
    if not has_gt.any():
        return float("nan")
    return float(np.mean((selected & gt).sum(axis=1)[has_gt] / n_gt[has_gt]))


def e2e_recall(stage_scores, gt_mask, quotas=(40, 30, 20), mask=None) -> float:
    """End-to-end cascade recall |final ∩ GT| / |GT|, mean over requests with GT.

    Args:
        stage_scores: one [B, L] array per stage, earliest first (len = len(quotas)).
        gt_mask: [B, L], nonzero for the GT candidates.
        quotas: q_i of every stage. A stage with fewer than q_i survivors keeps them all (so lists
            shorter than the quotas, e.g. MovieLens's 31..40 candidates, are defined).
        mask: optional [B, L], nonzero for real candidates; padding never survives or counts.
    """
    survivors = cascade_survivors(stage_scores, quotas, mask)
    _, valid = _list_inputs(stage_scores[0], mask, "stage_scores[0]")
    gt = (np.asarray(gt_mask) != 0)
    if gt.shape != valid.shape:
        raise ValueError(f"gt_mask has shape {gt.shape} but stage scores have shape {valid.shape}")
    return _mean_recall(survivors, gt & valid)


def stage_recall(scores, gt_mask, m=None, mask=None) -> float:
    """Recall@|GT|@m of one stage: |top-m by score ∩ GT| / |GT|, mean over requests with GT.

    m=None uses m = |GT| of each request (Recall@|GT|@|GT|).
    """
    s, valid = _list_inputs(scores, mask)
    gt = (np.asarray(gt_mask) != 0)
    if gt.shape != s.shape:
        raise ValueError(f"gt_mask has shape {gt.shape} but scores have shape {s.shape}")
    gt = gt & valid
    if m is not None and int(m) < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    top = _top_m(s, valid, gt.sum(axis=1) if m is None else int(m))
    return _mean_recall(top, gt)


def ndcg_at_k(scores, labels, k: int = 10, mask=None) -> float:
    """NDCG@k with gains 2^y − 1 and discounts 1 / log2(rank + 2), mean over requests with y > 0."""
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s, valid = _list_inputs(scores, mask)
    y = np.asarray(labels, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels have shape {y.shape} but scores have shape {s.shape}")
    gains = np.where(valid, np.power(2.0, y) - 1.0, 0.0)
    k = min(int(k), s.shape[1])
    discounts = 1.0 / np.log2(np.arange(k) + 2.0)
    order = np.argsort(-np.where(valid, s, -np.inf), axis=1, kind="stable")[:, :k]
    dcg = (np.take_along_axis(gains, order, axis=1) * discounts).sum(axis=1)
    ideal = (-np.sort(-gains, axis=1)[:, :k] * discounts).sum(axis=1)
    has_pos = ideal > 0
    if not has_pos.any():
        return float("nan")
    return float(np.mean(dcg[has_pos] / ideal[has_pos]))


def chance_recall(gt_mask, q: int, mask=None) -> float:
    """Expected Recall@|GT|@q of a uniformly random order: mean over requests with GT of
    min(q, n_r) / n_r, n_r = the request's real candidates (the baseline that `recall_lift` removes)."""
    gt, valid = _list_inputs(gt_mask, mask, "gt_mask")
    if int(q) < 1:
        raise ValueError(f"q must be >= 1, got {q}")
    has_gt = ((gt != 0) & valid).sum(axis=1) > 0
    if not has_gt.any():
        return float("nan")
    n = valid.sum(axis=1)[has_gt]
    return float(np.mean(np.minimum(int(q), n) / n))


def recall_lift(recall: float, chance: float) -> float:
    """(recall − chance) / (1 − chance): 0 = a random order, 1 = perfect; NaN when chance = 1 (the
    quota keeps every candidate, so there is no order to judge) or either input is NaN."""
    if not (np.isfinite(recall) and np.isfinite(chance)) or chance >= 1.0:
        return float("nan")
    return float((recall - chance) / (1.0 - chance))
