"""LCRON losses (models/lcron.py) against an independent numpy computation of DESIGN §5."""
import numpy as np
import pytest
import tensorflow as tf

from cascade_ranking.models import lcron
from cascade_ranking.models.losses import lcron_losses

EPS = 1e-8


# ---------------------------------------------------------------------------------------------
# Independent numpy reference. Masking: padded candidates are dropped before anything is
# computed, so NeuralSort runs on the n real candidates of each request (n = their count).
# ---------------------------------------------------------------------------------------------
def np_neural_sort(s, tau):
    """P̂[k, :] = softmax(((n + 1 − 2k)·s − A_s·1) / τ), k = 1..n."""
    s = np.asarray(s, dtype=np.float64)
    n = s.size
    a_sum = np.abs(s[:, None] - s[None, :]).sum(axis=0)  # (A_s·1)[c] = Σ_j |s_j − s_c|
    rows = []
    for k in range(1, n + 1):
        z = ((n + 1 - 2 * k) * s - a_sum) / tau
        z = np.exp(z - z.max())
        rows.append(z / z.sum())
    return np.stack(rows)


def np_lcron(stage_scores, labels, mask, quotas, tau):
    """(L_e2e, [L_single^i]) of DESIGN §5, request by request, padded slots removed."""
    e2e, singles = [], [[] for _ in stage_scores]
    for b in range(labels.shape[0]):
        real = mask[b] > 0
        if not real.any():
            continue
        y = (labels[b][real] > 0).astype(np.float64)
        ps, ds = [], []
        for s, q in zip(stage_scores, quotas):
            perm = np_neural_sort(s[b][real], tau)
            column = perm.sum(axis=0)
            ps.append(perm[:q].sum(axis=0) / column)
            ds.append(perm[q:].sum(axis=0) / column)
        prod_p = np.prod(ps, axis=0)
        prod_1md = np.prod([1 - d for d in ds], axis=0)
        e2e.append(np.mean(-y * np.log(prod_p + EPS) - (1 - y) * np.log(1 - prod_1md + EPS)))
        for i, (p, d) in enumerate(zip(ps, ds)):
            singles[i].append(np.mean(-y * np.log(p + EPS) - (1 - y) * np.log(d + EPS)))
    return np.mean(e2e), [np.mean(x) for x in singles]


def _random_inputs(rng, batch=4, size=12, stages=3, pad_from=None):
    scores = [rng.normal(scale=2.0, size=(batch, size)) for _ in range(stages)]
    labels = (rng.random((batch, size)) < 0.3).astype(np.float32)
    mask = np.ones((batch, size), dtype=np.int64)
    if pad_from is not None:
        for b, n in enumerate(pad_from):
            mask[b, n:] = 0
    return scores, labels, mask


# ---------------------------------------------------------------------------------------------
# NeuralSort
# ---------------------------------------------------------------------------------------------
def test_neural_sort_rows_sum_to_one_and_match_the_formula():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 7))
    perm = lcron.neural_sort(s, tau=0.7).numpy()
    np.testing.assert_allclose(perm.sum(axis=2), 1.0, atol=1e-6)
    for b in range(3):
        np.testing.assert_allclose(perm[b], np_neural_sort(s[b], 0.7), atol=1e-5)


def test_neural_sort_tends_to_the_argsort_permutation_as_tau_goes_to_zero():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(2, 9))
    hard = np.zeros((2, 9, 9))
    for b in range(2):
        hard[b, np.arange(9), np.argsort(-s[b])] = 1.0  # row k holds the k-th largest score
    errors = [np.abs(lcron.neural_sort(s, tau=t).numpy() - hard).max() for t in (1.0, 0.1, 1e-3)]
    assert errors[0] > 0.05  # a real relaxation at τ = 1 ...
    assert errors[2] < 1e-4  # ... and the permutation matrix as τ → 0
    assert errors[0] > errors[1] > errors[2]


def test_neural_sort_of_a_padded_list_is_the_sort_of_its_real_candidates():
    rng = np.random.default_rng(2)
    s = rng.normal(size=(1, 8))
    mask = np.array([[1, 0, 1, 1, 0, 1, 1, 0]])
    perm = lcron.neural_sort(s, mask, tau=0.5).numpy()[0]
    real = np.flatnonzero(mask[0])
    np.testing.assert_allclose(perm[: real.size][:, real], np_neural_sort(s[0, real], 0.5), atol=1e-5)
    assert np.all(perm[: real.size][:, mask[0] == 0] == 0)  # real ranks never pick padding


# ---------------------------------------------------------------------------------------------
# Selection probabilities
# ---------------------------------------------------------------------------------------------
def test_selection_probabilities_sum_to_q_over_the_real_candidates():
    rng = np.random.default_rng(3)
    s = rng.normal(scale=3.0, size=(3, 10))
    mask = np.ones((3, 10), dtype=np.int64)
    mask[1, 7:] = 0
    mask[2, ::3] = 0
    q = 4
    p_raw, d_raw = lcron.selection_probabilities(s, mask, q, tau=1.0, normalize=False)
    # Un-normalised: the q top rows of P̂ each sum to 1 → exactly q; the other n − q rows give D.
    np.testing.assert_allclose(p_raw.numpy().sum(axis=1), q, atol=1e-5)
    np.testing.assert_allclose(d_raw.numpy().sum(axis=1), mask.sum(axis=1) - q, atol=1e-5)
    p, d = lcron.selection_probabilities(s, mask, q, tau=1.0)
    p, d = p.numpy(), d.numpy()
    np.testing.assert_allclose((p + d)[mask > 0], 1.0, atol=1e-6)  # normalised: P + D = 1
    assert np.all(p[mask == 0] == 0) and np.all(d[mask == 0] == 0)
    # Normalised, the sum is q up to the column sums of P̂ (close to 1 for a sharp sort).
    sharp, _ = lcron.selection_probabilities(s, mask, q, tau=0.01)
    np.testing.assert_allclose(sharp.numpy().sum(axis=1), q, atol=1e-3)
    for b in range(3):
        real = mask[b] > 0
        perm = np_neural_sort(s[b, real], 1.0)
        np.testing.assert_allclose(p[b, real], perm[:q].sum(0) / perm.sum(0), atol=1e-5)


def test_gradient_does_not_flow_through_the_normalisation():
    s = tf.Variable([[0.3, -1.2, 2.0, 0.1, 0.9]])
    with tf.GradientTape() as tape:
        p, _ = lcron.selection_probabilities(s, None, 2, tau=1.0)
        target = p[0, 1]
    grad = tape.gradient(target, s).numpy()[0]
    # d/ds of Σ_{k≤q} P̂[k, c] / constant, by finite differences on the un-normalised numerator.
    base = np_neural_sort(s.numpy()[0], 1.0)
    column = base.sum(axis=0)[1]
    expected = []
    for j in range(5):
        h = np.zeros(5)
        h[j] = 1e-4
        up = np_neural_sort(s.numpy()[0] + h, 1.0)[:2, 1].sum()
        down = np_neural_sort(s.numpy()[0] - h, 1.0)[:2, 1].sum()
        expected.append((up - down) / 2e-4 / column)
    np.testing.assert_allclose(grad, expected, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,tau,quota", [(0, 1.0, 3), (1, 50.0, 4), (2, 0.3, [2, 4, 5])])
def test_lcron_losses_equal_the_numpy_formulas(seed, tau, quota):
    rng = np.random.default_rng(seed)
    scores, labels, mask = _random_inputs(rng, pad_from=[12, 9, 7, 12])
    l_e2e, singles = lcron_losses([tf.constant(s) for s in scores], labels, mask, quota, tau)
    quotas = quota if isinstance(quota, list) else [quota] * 3
    ref_e2e, ref_singles = np_lcron(scores, labels, mask, quotas, tau)
    assert len(singles) == 3
    np.testing.assert_allclose(float(l_e2e), ref_e2e, rtol=1e-4)
    np.testing.assert_allclose([float(x) for x in singles], ref_singles, rtol=1e-4)


def test_padded_slots_with_arbitrary_scores_change_nothing():
    rng = np.random.default_rng(4)
    scores, labels, mask = _random_inputs(rng, batch=3, size=8)
    base = lcron_losses(scores, labels, mask, 3, 2.0)
    # Insert 5 padded slots at random positions with huge/odd scores and GT labels.
    size = 13
    where = np.sort(rng.choice(size, 8, replace=False))
    padded_scores = [np.full((3, size), 0.0) for _ in scores]
    for p in padded_scores:
        p[:] = rng.normal(scale=1e3, size=(3, size))
    padded_labels = np.ones((3, size), dtype=np.float32)
    padded_mask = np.zeros((3, size), dtype=np.int64)
    for dst, src in zip(padded_scores, scores):
        dst[:, where] = src
    padded_labels[:, where] = labels
    padded_mask[:, where] = mask
    # And a request made only of padding.
    padded = lcron_losses(
        [np.concatenate([p, rng.normal(size=(1, size))]) for p in padded_scores],
        np.concatenate([padded_labels, np.ones((1, size))]),
        np.concatenate([padded_mask, np.zeros((1, size), dtype=np.int64)]),
        3, 2.0,
    )
    np.testing.assert_allclose(float(padded[0]), float(base[0]), rtol=1e-6)
    np.testing.assert_allclose([float(x) for x in padded[1]], [float(x) for x in base[1]], rtol=1e-6)


def test_gradients_are_finite_and_zero_on_padding():
    rng = np.random.default_rng(5)
    scores, labels, mask = _random_inputs(rng, batch=2, size=10, stages=2, pad_from=[10, 6])
    variables = [tf.Variable(s, dtype=tf.float32) for s in scores]
    with tf.GradientTape() as tape:
        l_e2e, singles = lcron_losses(variables, labels, mask, 3, 1.0)
        total = l_e2e + tf.add_n(singles)
    for g in tape.gradient(total, variables):
        g = g.numpy()
        assert np.all(np.isfinite(g))
        assert np.all(g[mask == 0] == 0)
        assert np.abs(g[mask > 0]).sum() > 0


def test_uncertainty_weighting_starts_at_one_and_follows_the_formula():
    weighting = lcron.UncertaintyWeighting(3)
    np.testing.assert_array_equal(weighting.w.numpy(), [1.0, 1.0, 1.0])
    assert weighting.trainable_weights == [weighting.w]
    total = weighting(tf.constant(0.7), [tf.constant(1.0), tf.constant(2.0), tf.constant(0.5)])
    np.testing.assert_allclose(float(total), 3.5 / 2 + 0.7 + 0.0, rtol=1e-6)
    weighting.w.assign([0.5, 2.0, 1.5])
    total = weighting(tf.constant(0.7), [tf.constant(1.0), tf.constant(2.0), tf.constant(0.5)])
    expected = 1.0 / (2 * 0.25) + 2.0 / (2 * 4.0) + 0.5 / (2 * 2.25) + 0.7 + np.log(0.5 * 2.0 * 1.5)
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)


def test_lcron_losses_work_inside_tf_function():
    rng = np.random.default_rng(6)
    scores, labels, mask = _random_inputs(rng, pad_from=[12, 10, 11, 12])
    fn = tf.function(lambda s0, s1, y, m: lcron_losses([s0, s1], y, m, 3, 1.0))
    spec = tf.TensorSpec([None, 12], tf.float32)
    out = fn.get_concrete_function(spec, spec, spec, tf.TensorSpec([None, 12], tf.int64))(
        tf.constant(scores[0], tf.float32), tf.constant(scores[1], tf.float32), tf.constant(labels), tf.constant(mask))
    ref_e2e, _ = np_lcron(scores[:2], labels, mask, [3, 3], 1.0)
    np.testing.assert_allclose(float(out[0]), ref_e2e, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_bad_input_raises_value_error_naming_the_problem():
    rng = np.random.default_rng(7)
    scores, labels, mask = _random_inputs(rng, batch=2, size=6, stages=2, pad_from=[6, 4])
    with pytest.raises(ValueError, match=r"stage_scores\[1\] has shape"):
        lcron_losses([scores[0], scores[1][:, :5]], labels, mask, 2, 1.0)
    with pytest.raises(ValueError, match="mask has shape"):
        lcron_losses(scores, labels, mask[:, :5], 2, 1.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        lcron_losses(scores, labels, mask, 2, 0.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        lcron.neural_sort(scores[0], tau=-1.0)
    with pytest.raises(ValueError, match="quota 5 > number of real candidates"):
        lcron_losses(scores, labels, mask, 5, 1.0)  # request 1 has 4 real candidates
    with pytest.raises(ValueError, match="quota must be >= 1"):
        lcron_losses(scores, labels, mask, 0, 1.0)
    with pytest.raises(ValueError, match="quota has 3 entries"):
        lcron_losses(scores, labels, mask, [1, 2, 3], 1.0)
    with pytest.raises(ValueError, match="non-empty list"):
        lcron_losses([], labels, mask, 2, 1.0)
    lcron_losses(scores, labels, mask, 4, 1.0)  # q = n of the smallest request is allowed


def test_quota_above_the_real_candidates_fails_at_run_time_in_graph_mode():
    fn = tf.function(lambda s, y, m: lcron_losses([s], y, m, 5, 1.0)[0])
    spec = tf.TensorSpec([None, 6], tf.float32)
    concrete = fn.get_concrete_function(spec, spec, tf.TensorSpec([None, 6], tf.int64))
    scores = tf.zeros([2, 6])
    assert np.isfinite(float(concrete(scores, scores, tf.constant([[1] * 6, [1] * 5 + [0]], tf.int64))))
    with pytest.raises(tf.errors.InvalidArgumentError, match="quota 5 > number of real candidates"):
        concrete(scores, scores, tf.constant([[1] * 6, [1] * 4 + [0, 0]], tf.int64))


def test_lcron_loss_class_is_the_uncertainty_weighted_objective():
    from cascade_ranking.models import lcron, losses
    rng = np.random.default_rng(3)
    scores, labels, mask = _random_inputs(rng, pad_from=[12, 8, 10, 12])
    ref_e2e, ref_singles = np_lcron(scores, labels, mask, [3, 3, 3], 2.0)
    w = np.array([0.5, 1.0, 2.0])
    want = sum(s / (2 * wi * wi) for s, wi in zip(ref_singles, w)) + ref_e2e + np.sum(np.log(w))
    loss = losses.get("lcron", quota=3, tau=2.0)
    stacked = np.stack(scores, axis=1).astype(np.float32)  # [B, S, L], as CascadeModel.call returns
    np.testing.assert_allclose(float(loss(labels, stacked, mask=mask, w=tf.constant(w, tf.float32))), want, rtol=1e-4)
    at_one = sum(s / 2 for s in ref_singles) + ref_e2e
    np.testing.assert_allclose(float(loss(labels, [tf.constant(s) for s in scores], mask=mask)), at_one, rtol=1e-4)
    assert isinstance(loss, lcron.LCRONLoss) and loss.get_config()["quota"] == 3
