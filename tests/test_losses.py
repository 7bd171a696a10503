"""Tests for models/losses.py against hand computations in numpy."""

import numpy as np
import pytest
import tensorflow as tf

from cascade_ranking.models import losses


def _softplus(z):
    return np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0.0)


def _hand_ranknet(lists, weights=None):
    """lists: [(labels, logits)] per request, no padding.

    Σ over pairs y_i > y_j of w_i · log(1 + exp(-(s_i - s_j))), divided by the
    number of items (TF-Ranking's SUM_OVER_BATCH_SIZE, over real items only).
    """
    total, count = 0.0, 0
    for r, (y, s) in enumerate(lists):
        for i in range(len(y)):
            for j in range(len(y)):
                if y[i] > y[j]:
                    w = 1.0 if weights is None else weights[r][i]
                    total += w * np.log(1.0 + np.exp(-(s[i] - s[j])))
        count += len(y)
    return total / count


def _bce(y, s):
    return -(y * np.log(1 / (1 + np.exp(-s))) +
             (1 - y) * np.log(1 - 1 / (1 + np.exp(-s))))


def test_ranknet_tf_ranking_docstring_value():
    # tfr docs: PairwiseLogisticLoss()([[1., 0.]], [[0.6, 0.8]]) == 0.39906943
    # = log(1 + exp(0.2)) / 2.
    got = losses.ranknet_loss([[1.0, 0.0]], [[0.6, 0.8]]).numpy()
    assert got == pytest.approx(0.39906943, rel=1e-6)
    assert got == pytest.approx(np.log1p(np.exp(0.2)) / 2, rel=1e-6)


def test_ranknet_matches_hand_computation():
    requests = [
        ([1.0, 0.0, 0.0, 1.0], [0.2, 1.5, -0.3, 0.9]),
        ([0.0, 2.0, 1.0, 0.0], [0.0, 0.4, 0.8, -1.0]),
    ]
    labels = [r[0] for r in requests]
    logits = [r[1] for r in requests]
    want = _hand_ranknet(requests)
    # pairs: request 0 has 4, request 1 has 5 (2>1, 2>0 x2, 1>0 x2); 8 items
    assert want == pytest.approx(
        (np.log1p(np.exp(1.3)) + np.log1p(np.exp(-0.5)) + np.log1p(np.exp(0.6))
         + np.log1p(np.exp(-1.2)) + np.log1p(np.exp(0.4)) + np.log1p(np.exp(-0.4))
         + np.log1p(np.exp(-1.4)) + np.log1p(np.exp(-0.8))
         + np.log1p(np.exp(-1.8))) / 8)
    got = losses.ranknet_loss(labels, logits).numpy()
    assert got == pytest.approx(want, rel=1e-5)


def test_ranknet_padding_changes_nothing():
    requests = [([1.0, 0.0, 0.0], [0.3, 0.1, 0.9]),
                ([0.0, 1.0], [0.5, -0.2])]
    want = _hand_ranknet(requests)
    # Pad to L = 5, with garbage in the padded slots (labels that would form
    # pairs, huge and NaN logits), padding in the middle of a row too.
    labels = np.array([[1.0, 5.0, 0.0, 0.0, 3.0],
                       [0.0, 2.0, 1.0, 7.0, 9.0]], np.float32)
    logits = np.array([[0.3, np.nan, 0.1, 0.9, 1e9],
                       [0.5, -1e9, -0.2, np.nan, 4.0]], np.float32)
    mask = np.array([[1, 0, 1, 1, 0],
                     [1, 0, 1, 0, 0]], np.float32)
    logits_t = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(logits_t)
        got = losses.ranknet_loss(labels, logits_t, mask)
    assert got.numpy() == pytest.approx(want, rel=1e-5)
    grad = tape.gradient(got, logits_t).numpy()
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[mask == 0], 0.0)
    # Boolean masks work the same.
    assert losses.ranknet_loss(labels, logits, mask > 0).numpy() == pytest.approx(
        want, rel=1e-5)


def test_ranknet_sample_weight_weights_preferred_item():
    requests = [([1.0, 0.0, 2.0], [0.3, 0.1, -0.4])]
    weights = [[2.0, 5.0, 0.5]]
    want = _hand_ranknet(requests, weights)
    got = losses.ranknet_loss([requests[0][0]], [requests[0][1]],
                              sample_weight=weights).numpy()
    assert got == pytest.approx(want, rel=1e-5)
    assert got != pytest.approx(_hand_ranknet(requests), rel=1e-3)


ROW_IDS = np.array([7, 3, 7, 3, 9, 7, 9, 3], np.int64)
ROW_LABELS = np.array([1, 0, 0, 1, 0, 0, 1, 0], np.float32)
ROW_LOGITS = np.array([0.2, 2.0, 1.1, -0.5, 3.0, 0.4, -2.0, 0.7], np.float32)


def test_ranknet_from_rows_forms_pairs_within_requests_only():
    requests = []
    for rid in (7, 3, 9):
        rows = ROW_IDS == rid
        requests.append((ROW_LABELS[rows], ROW_LOGITS[rows]))
    want = _hand_ranknet(requests)
    # The same sum over all pairs of the batch, ignoring requests, differs a lot:
    # the cross-request pairs would change the value.
    all_pairs = _hand_ranknet([(ROW_LABELS, ROW_LOGITS)])
    assert abs(all_pairs - want) > 0.3
    got = losses.ranknet_loss_from_rows(ROW_LABELS, ROW_LOGITS, ROW_IDS).numpy()
    assert got == pytest.approx(want, rel=1e-5)
    # String request ids group the same way.
    got_str = losses.ranknet_loss_from_rows(
        ROW_LABELS, ROW_LOGITS, ROW_IDS.astype(str)).numpy()
    assert got_str == pytest.approx(want, rel=1e-5)


def test_ranknet_from_rows_with_weights():
    weights = np.array([1, 2, 3, 4, 5, 6, 7, 8], np.float32)
    requests, request_weights = [], []
    for rid in (7, 3, 9):
        rows = ROW_IDS == rid
        requests.append((ROW_LABELS[rows], ROW_LOGITS[rows]))
        request_weights.append(weights[rows])
    want = _hand_ranknet(requests, request_weights)
    got = losses.ranknet_loss_from_rows(
        ROW_LABELS, ROW_LOGITS, ROW_IDS, sample_weight=weights).numpy()
    assert got == pytest.approx(want, rel=1e-5)


def test_rows_to_lists_layout():
    (labels, logits), mask = losses.rows_to_lists(
        ROW_IDS, [ROW_LABELS, ROW_LOGITS], pad_values=[-1.0, 0.0])
    # Requests in order of first appearance: 7, 3, 9; rows in original order.
    np.testing.assert_array_equal(
        mask.numpy(), [[True, True, True], [True, True, True],
                       [True, True, False]])
    np.testing.assert_array_equal(labels.numpy(),
                                  [[1, 0, 0], [0, 1, 0], [0, 1, -1]])
    np.testing.assert_allclose(logits.numpy(),
                               [[0.2, 1.1, 0.4], [2.0, -0.5, 0.7],
                                [3.0, -2.0, 0.0]])


def test_weighted_logistic_loss():
    y = np.array([1.0, 0.0, 1.0, 0.0])
    s = np.array([0.4, -1.2, 2.0, 0.3])
    w = np.array([1.0, 4.0, 0.5, 2.0])
    assert losses.weighted_logistic_loss(y, s).numpy() == pytest.approx(
        _bce(y, s).mean(), rel=1e-5)
    assert losses.weighted_logistic_loss(y, s, w).numpy() == pytest.approx(
        (w * _bce(y, s)).sum() / 4, rel=1e-5)
    mask = np.array([1, 1, 0, 1])
    assert losses.weighted_logistic_loss(y, s, w, mask=mask).numpy() == (
        pytest.approx((mask * w * _bce(y, s)).sum() / 3, rel=1e-5))


def test_multi_objective_loss():
    labels = np.array([[1.0, 0.0, 0.0, 9.0], [0.0, 1.0, 1.0, 0.0]], np.float32)
    logits = np.array([[0.5, 0.9, -1.0, 7.0], [0.2, -0.3, 0.1, 1.5]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
    rank = _hand_ranknet([(labels[0, :3], logits[0, :3]), (labels[1], logits[1])])
    valid = mask > 0
    logistic = _bce(labels[valid].astype(np.float64),
                    logits[valid].astype(np.float64)).mean()
    for alpha in (0.0, 0.3, 1.0):
        got = losses.multi_objective_loss(labels, logits, mask, alpha).numpy()
        assert got == pytest.approx(alpha * rank + (1 - alpha) * logistic,
                                    rel=1e-5)
    with pytest.raises(ValueError):
        losses.multi_objective_loss(labels, logits, mask, 1.5)


def test_distillation_loss_closed_form_and_missing_teacher():
    teacher = np.array([2.0, np.nan, -1.0, 0.0, np.nan], np.float32)
    student = np.array([0.5, 3.0, -2.0, 1.0, -4.0], np.float32)
    weight = np.array([1.0, 9.0, 2.0, 0.5, 9.0], np.float32)
    rows = [0, 2, 3]
    t = teacher[rows].astype(np.float64)
    s = student[rows].astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-t))
    sig = 1.0 / (1.0 + np.exp(-s))
    ce = -(p * np.log(sig) + (1 - p) * np.log(1 - sig))
    assert losses.distillation_loss(teacher, student).numpy() == pytest.approx(
        ce.mean(), rel=1e-5)
    assert losses.distillation_loss(
        teacher, student, weight).numpy() == pytest.approx(
            (weight[rows] * ce).sum() / 3, rel=1e-5)
    # Gradient reaches the student only where the teacher is present.
    student_t = tf.constant(student)
    with tf.GradientTape() as tape:
        tape.watch(student_t)
        loss = losses.distillation_loss(teacher, student_t)
    grad = tape.gradient(loss, student_t).numpy()
    np.testing.assert_allclose(grad[rows], (sig - p) / 3, rtol=1e-5)
    np.testing.assert_array_equal(grad[[1, 4]], 0.0)
    # All teachers missing: nothing to learn from.
    assert losses.distillation_loss([np.nan, np.nan], [1.0, 2.0]).numpy() == 0.0


# ---------------------------------------------------------------------------------------------
# Loss classes and the registry.
# ---------------------------------------------------------------------------------------------
def test_registry_gets_every_loss_and_names_an_unknown_one():
    from cascade_ranking.models import lcron, lspr, preranking
    expected = {"ranknet": losses.RankNetLoss, "logistic": losses.LogisticLoss,
                "multi_objective": losses.MultiObjectiveLoss, "distillation": losses.DistillationLoss,
                "lcron": lcron.LCRONLoss, "hap_group_wise": preranking.GroupWiseLoss, "lspr": lspr.LSPRLoss}
    assert set(losses.known()) == set(expected)
    for name, cls in expected.items():
        assert losses.get_class(name) is cls
        loss = losses.get(name)
        assert type(loss) is cls and isinstance(loss, tf.keras.losses.Loss) and loss.name == name
        config = loss.get_config()
        assert type(cls(**config)) is cls  # get_config round-trips
    with pytest.raises(ValueError, match=r"unknown loss 'listmle'.*ranknet"):
        losses.get("listmle")


def test_ranknet_class_equals_hand_computation_on_lists_and_rows():
    requests = [([1.0, 0.0, 0.0, 1.0], [0.2, 1.5, -0.3, 0.9]),
                ([0.0, 2.0, 1.0, 0.0], [0.0, 0.4, 0.8, -1.0])]
    weights = [[0.5, 1.0, 2.0, 1.5], [1.0, 3.0, 0.5, 1.0]]
    want = _hand_ranknet(requests, weights)
    labels = np.array([r[0] for r in requests], np.float32)
    logits = np.array([r[1] for r in requests], np.float32)
    loss = losses.get("ranknet")
    assert float(loss(labels, logits, sample_weight=np.array(weights, np.float32))) == pytest.approx(want, rel=1e-5)
    # The same rows, flat and shuffled, grouped by request id or by a precomputed layout.
    order = np.array([5, 0, 7, 2, 1, 6, 3, 4])
    ids = np.repeat([10, 20], 4)[order]
    flat = [x.reshape(-1)[order] for x in (labels, logits, np.array(weights, np.float32))]
    assert float(loss(flat[0], flat[1], sample_weight=flat[2], grouping=ids)) == pytest.approx(want, rel=1e-5)
    (index,), mask = losses.rows_to_lists(ids, [tf.range(8, dtype=tf.int64)])
    assert float(loss(flat[0], flat[1], sample_weight=flat[2], grouping=(index, mask))) == pytest.approx(want, rel=1e-5)


def test_logistic_multi_objective_and_distillation_classes_equal_numpy():
    y = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], np.float32)
    s = np.array([[0.4, -1.2, 2.0], [0.3, 0.1, 9.0]], np.float32)
    w = np.array([[1.0, 2.0, 0.5], [1.5, 1.0, 3.0]], np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    valid = mask > 0
    logistic = np.sum((w * _bce(y.astype(np.float64), s.astype(np.float64)))[valid]) / valid.sum()
    assert float(losses.get("logistic")(y, s, sample_weight=w, mask=mask)) == pytest.approx(logistic, rel=1e-5)
    rank = _hand_ranknet([(y[0], s[0]), (y[1, :2], s[1, :2])], [w[0], w[1, :2]])
    mo = losses.get("multi_objective", alpha=0.3)
    assert float(mo(y, s, sample_weight=w, mask=mask)) == pytest.approx(0.3 * rank + 0.7 * logistic, rel=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        losses.get("multi_objective", alpha=1.5)
    teacher = np.array([0.5, np.nan, -1.0, 2.0], np.float32)
    student = np.array([0.1, 5.0, -0.5, 1.0], np.float32)
    rw = np.array([1.0, 1.0, 2.0, 0.5], np.float32)
    p = 1 / (1 + np.exp(-teacher.astype(np.float64)))
    q = 1 / (1 + np.exp(-student.astype(np.float64)))
    per = -(p * np.log(q) + (1 - p) * np.log(1 - q))
    keep = ~np.isnan(teacher)
    want = np.sum((rw * per)[keep]) / keep.sum()
    assert float(losses.get("distillation")(teacher, student, sample_weight=rw)) == pytest.approx(want, rel=1e-5)


def test_lspr_class_is_the_clean_loss_plus_lambda_times_the_perturbed_one():
    y = np.array([1.0, 0.0, 1.0], np.float32)
    clean = np.array([0.4, -1.2, 2.0], np.float32)
    noisy = np.array([0.1, -0.2, 1.0], np.float32)
    bce = lambda s: np.mean(_bce(y.astype(np.float64), s.astype(np.float64)))  # noqa: E731
    got = float(losses.get("lspr", loss="logistic", weight=0.25)(y, clean, perturbed=noisy))
    assert got == pytest.approx(bce(clean) + 0.25 * bce(noisy), rel=1e-5)
