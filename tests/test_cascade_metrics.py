"""Cascade metrics (models/metrics.py): e2e recall, per-stage Recall@|GT|@m, NDCG@k, on hand-made lists."""
import math

import numpy as np
import pytest

from cascade_ranking.models.metrics import cascade_survivors, e2e_recall, ndcg_at_k, requests_without_gt, stage_recall

P = 100.0  # score of padded slots: high, so a metric that forgot the mask would pick them

# Request 0: 8 real candidates, GT {0, 1, 2}.
#   stage 1 (q=6) keeps {1..6} (drops GT 0), stage 2 (q=4) keeps {2, 4, 5, 6} (drops GT 1; 0 is
#   dead although it scores 9), stage 3 (q=2) keeps {2, 4}: recall 1/3.
# Request 1: 5 real candidates (fewer than q1 = 6: all survive stage 1), GT {0, 3}; the padded
#   slot 6 is marked GT and must not count. Stage 2 keeps {0, 1, 2, 3}, stage 3 keeps {0, 2}: 1/2.
# Request 2: no GT: left out of the mean.
S1 = [[1, 8, 7, 6, 5, 4, 3, 2], [1, 2, 3, 4, 5, P, P, P], [1, 2, 3, 4, 5, 6, 7, 8]]
S2 = [[9, 1, 8, 2, 7, 6, 5, 4], [5, 4, 3, 2, 1, P, P, P], [1, 2, 3, 4, 5, 6, 7, 8]]
S3 = [[9, 9, 6, 0, 5, 3, 4, 9], [3, 1, 2, 0, 0, P, P, P], [1, 2, 3, 4, 5, 6, 7, 8]]
GT = [[1, 1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0, 1, 0], [0] * 8]
MASK = [[1] * 8, [1, 1, 1, 1, 1, 0, 0, 0], [1] * 8]


def test_e2e_recall_on_a_hand_made_three_stage_cascade():
    survivors = cascade_survivors([S1, S2, S3], (6, 4, 2), MASK)
    assert set(np.flatnonzero(survivors[0])) == {2, 4}
    assert set(np.flatnonzero(survivors[1])) == {0, 2}
    assert e2e_recall([S1, S2, S3], GT, quotas=(6, 4, 2), mask=MASK) == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_requests_without_gt_are_left_out_and_counted():
    # Request 2 has no GT; a 4th request has GT only on a padded slot: both are left out of the
    # means (which stay those of requests 0 and 1) and both are counted.
    s = [np.vstack([x, [5, 4, 3, 2, 1, 0, 0, 0]]) for x in (S1, S2, S3)]
    gt = np.vstack([GT, [0, 0, 0, 0, 0, 0, 0, 1]])
    mask = np.vstack([MASK, [1, 1, 1, 1, 1, 1, 1, 0]])
    assert requests_without_gt(gt, mask) == 2
    assert requests_without_gt(GT, MASK) == 1
    assert requests_without_gt(gt) == 1  # without the mask the padded GT would count
    assert e2e_recall(s, gt, quotas=(6, 4, 2), mask=mask) == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert stage_recall(s[0], gt, m=3, mask=mask) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert math.isnan(e2e_recall([np.zeros((2, 3))], np.zeros((2, 3)), quotas=(2,)))
    assert requests_without_gt(np.zeros((2, 3))) == 2


def test_without_the_mask_padding_would_survive_and_change_the_answer():
    unmasked = e2e_recall([S1, S2, S3], GT, quotas=(6, 4, 2))
    assert unmasked != pytest.approx((1 / 3 + 1 / 2) / 2)
    assert e2e_recall([S1, S2, S3], GT, quotas=(6, 4, 2), mask=MASK) != unmasked


def test_default_quotas_forty_thirty_twenty_on_fifty_candidates():
    rng = np.random.default_rng(0)
    gt = np.zeros((4, 50))
    for b in range(4):
        gt[b, rng.choice(50, 10, replace=False)] = 1
    perfect = gt + rng.random((4, 50)) * 0.5
    assert e2e_recall([perfect] * 3, gt) == pytest.approx(1.0)
    reverse = -perfect
    # A reversed last stage keeps the 20 worst of the 30 survivors (10 GT + 20 others): no GT.
    assert e2e_recall([perfect, perfect, reverse], gt) == pytest.approx(0.0)
    # A reversed first stage keeps the 40 worst of 50: all 40 non-GT, so nothing is left to find.
    assert e2e_recall([reverse, perfect, perfect], gt) == pytest.approx(0.0)
    # Stage 1 keeps 40 of 50 at random-but-fixed order: the GT that survive it are all found.
    middle = rng.random((4, 50))
    survived = cascade_survivors([middle], (40,))
    expected = np.mean((survived & (gt > 0)).sum(1) / 10)
    assert e2e_recall([middle, perfect, perfect], gt) == pytest.approx(expected)
    assert 0 < expected < 1


def test_stage_recall_at_gt_at_m():
    # Stage 1, m = 3: request 0 top-3 {1, 2, 3} → 2/3; request 1 top-3 real {4, 3, 2} → 1/2.
    assert stage_recall(S1, GT, m=3, mask=MASK) == pytest.approx((2 / 3 + 1 / 2) / 2)
    # Stage 2, m = |GT|: request 0 top-3 {0, 2, 4} → 2/3; request 1 top-2 {0, 1} → 1/2.
    assert stage_recall(S2, GT, mask=MASK) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert stage_recall(S2, GT, m=8, mask=MASK) == pytest.approx(1.0)


def test_ndcg_at_k():
    scores = [[3.0, 2.0, 1.0, P], [0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4]]
    labels = [[0, 1, 2, 5], [1, 0, 0, 0], [0, 0, 0, 0]]
    mask = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    # Request 0 at k=2: DCG = 0 + 1/log2(3); ideal gains (3, 1): 3 + 1/log2(3). The padded slot
    # (label 5, score P) is neither ranked nor in the ideal order.
    r0 = (1 / math.log2(3)) / (3 + 1 / math.log2(3))
    # Request 1 at k=2: the positive is ranked 4th → 0. Request 2 has no positive: left out.
    assert ndcg_at_k(scores, labels, k=2, mask=mask) == pytest.approx((r0 + 0.0) / 2)
    # k = 4 reaches request 1's positive: DCG = 1/log2(5), ideal 1.
    r0_k4 = (1 / math.log2(3) + 3 / math.log2(4)) / (3 + 1 / math.log2(3))
    assert ndcg_at_k(scores, labels, k=4, mask=mask) == pytest.approx((r0_k4 + 1 / math.log2(5)) / 2)
    assert ndcg_at_k([[1.0, 2.0]], [[0, 1]], k=10) == pytest.approx(1.0)


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="3 stage score arrays but 2 quotas"):
        e2e_recall([S1, S2, S3], GT, quotas=(6, 4))
    with pytest.raises(ValueError, match=r"stage_scores\[1\] has shape"):
        e2e_recall([S1, np.zeros((3, 7)), S3], GT, quotas=(6, 4, 2))
    with pytest.raises(ValueError, match="mask has shape"):
        e2e_recall([S1, S2, S3], GT, quotas=(6, 4, 2), mask=np.ones((3, 7)))
    with pytest.raises(ValueError, match="gt_mask has shape"):
        e2e_recall([S1, S2, S3], np.ones((2, 8)), quotas=(6, 4, 2))
    with pytest.raises(ValueError, match="quotas must be >= 1"):
        e2e_recall([S1, S2, S3], GT, quotas=(6, 0, 2))
    with pytest.raises(ValueError, match="k must be >= 1"):
        ndcg_at_k(S1, GT, k=0)
