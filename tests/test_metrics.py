"""Metric definitions (DESIGN §8) against brute-force computations written here."""
import itertools

import numpy as np
import pytest

from cascade_ranking.models import metrics


def _pairwise_auc(y, s, w=None):
    w = np.ones_like(s) if w is None else w
    num = den = 0.0
    for i, j in itertools.product(range(len(y)), repeat=2):
        if y[i] == 1 and y[j] == 0:
            num += w[i] * w[j] * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
            den += w[i] * w[j]
    return num / den


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 40)
    s = rng.integers(0, 5, 40).astype(float)  # many ties
    assert metrics.auc(y, s) == pytest.approx(_pairwise_auc(y, s), abs=1e-12)
    w = rng.uniform(0.5, 3.0, 40)
    assert metrics.auc(y, s, w) == pytest.approx(_pairwise_auc(y, s, w), abs=1e-12)


def test_auc_single_class_is_nan():
    assert np.isnan(metrics.auc(np.ones(4), np.arange(4)))


def test_per_query_auc_is_mean_over_queries_with_both_classes():
    y = np.array([1, 0, 0, 1, 1, 0, 1, 0])
    s = np.array([0.9, 0.1, 0.5, 0.2, 0.7, 0.3, 0.4, 0.6])
    q = np.array([7, 7, 7, 3, 3, 3, 5, 5])
    expected = np.mean([1.0, 0.5, 0.0])  # query 7: 2/2 pairs; 3: (0.2<0.3, 0.7>0.3) -> 1/2; 5: 0.4<0.6
    # Query with one class only is left out.
    y2, s2, q2 = np.append(y, [0, 0]), np.append(s, [0.5, 0.6]), np.append(q, [9, 9])
    assert metrics.per_query_auc(y2, s2, q2) == pytest.approx(expected)


def test_normalized_entropy():
    y = np.array([1, 0, 0, 0])
    p = np.array([0.6, 0.2, 0.1, 0.3])
    logloss = -(np.log(0.6) + np.log(0.8) + np.log(0.9) + np.log(0.7)) / 4
    entropy = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    assert metrics.normalized_entropy(y, p) == pytest.approx(logloss / entropy)
    # Predicting the base rate everywhere gives NE = 1.
    assert metrics.normalized_entropy(y, np.full(4, 0.25)) == pytest.approx(1.0)


def _random_order_recall(gt, valid, q):
    """Recall@|GT|@q averaged over every order of every request's real candidates (brute force)."""
    recalls = []
    for g, v in zip(gt, valid):
        real = np.flatnonzero(v)
        if not g[real].any():
            continue  # no GT: left out, as stage_recall does
        recalls.append(np.mean([g[list(order[:q])].sum() / g[real].sum() for order in itertools.permutations(real)]))
    return np.mean(recalls)


@pytest.mark.parametrize("q", [1, 2, 3, 5])
def test_chance_recall_is_the_mean_recall_of_every_order(q):
    gt = np.array([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 0, 1, 0]])
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=bool)
    expected = _random_order_recall(gt, valid, q)
    assert metrics.chance_recall(gt, q, mask=valid) == pytest.approx(expected, abs=1e-12)


def test_recall_lift_is_zero_at_chance_and_one_when_perfect():
    assert metrics.recall_lift(0.4, 0.4) == 0.0
    assert metrics.recall_lift(1.0, 0.4) == 1.0
    assert metrics.recall_lift(0.25, 0.4) == pytest.approx(-0.25)
    assert np.isnan(metrics.recall_lift(1.0, 1.0))  # the quota keeps everything: no order to judge
    assert np.isnan(metrics.recall_lift(float("nan"), 0.4))
    assert np.isnan(metrics.chance_recall(np.zeros((2, 3)), 2))  # no request has GT
