"""Tests for models/bias_constraints.py: slice bias, the Lagrangian, dual ascent."""

import numpy as np
import pytest
import tensorflow as tf

from cascade_ranking.models import bias_constraints as bc_lib
from cascade_ranking.models import curriculum


def test_slice_bias_by_hand():
    y = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    yhat = [0.5, 0.2, 0.9, 0.3, 0.1, 0.4, 0.6]
    slices = [0, 0, 1, 1, 2, 2, 7]   # 7 is outside [0, 4): ignored
    # slice 0: (1 - .5 + 0 - .2) / 1 = 0.3; slice 1: (.1 + .7) / 2 = 0.4
    # slice 2: no positives -> NaN; slice 3: empty -> NaN
    want = [0.3, 0.4, np.nan, np.nan]
    np.testing.assert_allclose(
        bc_lib.slice_bias(y, yhat, slices, 4).numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(bc_lib.slice_bias_np(y, yhat, slices, 4), want,
                               rtol=1e-12)


def test_slice_ids_buckets_then_categories():
    bc = bc_lib.BiasConstraints(ctr_boundaries=[0.1, 0.3], num_categories=2)
    assert bc.num_slices == 5
    ids = bc.slice_ids([0.05, 0.1, 0.2, 0.5], categories=[0, 1, 5, -1]).numpy()
    # buckets: <0.1 -> 0, [0.1, 0.3) -> 1, >=0.3 -> 2; categories offset by 3;
    # out-of-range categories get id 5 (= no slice).
    np.testing.assert_array_equal(ids, [[0, 3], [1, 4], [1, 5], [2, 5]])
    with pytest.raises(ValueError):
        bc.slice_ids([0.5])


def _numpy_terms(y, yhat, ids, lam, alpha, num_slices):
    y, yhat = np.asarray(y, np.float64), np.asarray(yhat, np.float64)
    ids = np.asarray(ids).reshape(len(y), -1)
    r = np.zeros(num_slices)
    c = np.zeros(num_slices)
    for i in range(len(y)):
        for k in ids[i]:
            if 0 <= k < num_slices:
                r[k] += y[i] - yhat[i]
                c[k] += 1
    lagrangian = (lam * r - 0.5 * alpha * lam ** 2 * c).sum() / len(y)
    dual_grad = (r - alpha * lam * c) / len(y)
    return r, lagrangian, dual_grad


def test_lagrangian_and_dual_step_against_numpy():
    bc = bc_lib.BiasConstraints(ctr_boundaries=[0.25], num_categories=3,
                                alpha=0.5, dual_learning_rate=0.2)
    y = np.array([1, 0, 0, 1, 1, 0], np.float32)
    yhat = np.array([0.3, 0.2, 0.6, 0.1, 0.8, 0.05], np.float32)
    cats = np.array([0, 1, 2, 2, 0, 1])
    ids = bc.slice_ids(yhat, cats)
    lam = np.array([0.4, -1.0, 2.0, 0.0, -0.3], np.float32)
    bc.duals.assign(lam)
    ramp = 0.6
    _, lagr, dgrad = _numpy_terms(y, yhat, ids.numpy(), lam.astype(np.float64),
                                  0.5, 5)
    assert bc.lagrangian(y, yhat, ids, ramp).numpy() == pytest.approx(
        ramp * lagr, rel=1e-5)
    # d T / d yhat_i = -ramp * sum_{k: i in S_k} lambda_k / N
    yhat_t = tf.constant(yhat)
    with tf.GradientTape() as tape:
        tape.watch(yhat_t)
        term = bc(y, yhat_t, ids, ramp)   # also takes one ascent step
    want_grad = -ramp * np.array([lam[a] + lam[b] for a, b in ids.numpy()]) / 6
    np.testing.assert_allclose(tape.gradient(term, yhat_t).numpy(), want_grad,
                               rtol=1e-5)
    assert term.numpy() == pytest.approx(ramp * lagr, rel=1e-5)  # old duals
    np.testing.assert_allclose(bc.duals.numpy(), lam + 0.2 * ramp * dgrad,
                               rtol=1e-5)
    # Not training: no dual step.
    before = bc.duals.numpy().copy()
    bc(y, yhat, ids, ramp, training=False)
    np.testing.assert_array_equal(bc.duals.numpy(), before)


def test_sample_weight_weights_residuals_and_counts():
    bc = bc_lib.BiasConstraints(ctr_boundaries=[0.5], num_categories=2,
                                alpha=0.5, dual_learning_rate=0.3)
    y = np.array([1, 0, 1, 0, 1], np.float32)
    yhat = np.array([0.2, 0.7, 0.6, 0.3, 0.9], np.float32)
    w = np.array([2.0, 0.5, 1.0, 3.0, 0.25], np.float32)
    ids = bc.slice_ids(yhat, [0, 1, 1, 0, 5]).numpy()  # category 5: no category slice
    lam = np.array([0.3, -0.6, 1.2, -0.4], np.float32)
    bc.duals.assign(lam)
    # By hand: r_k = Σ w (y − ŷ), c_k = Σ w over the slice, N = 5 rows.
    def slice_sums(weights):
        r, c = np.zeros(4), np.zeros(4)
        for i in range(5):
            for k in ids[i]:
                if k < 4:
                    r[k] += weights[i] * (y[i] - yhat[i])
                    c[k] += weights[i]
        return r, c

    r, c = slice_sums(w)
    # bucket 0 (ŷ < .5): rows 0, 3: r = 2·.8 + 3·(−.3) = .7, c = 5; category 0: the same rows.
    np.testing.assert_allclose(r[[0, 2]], [0.7, 0.7], rtol=1e-6)
    np.testing.assert_allclose(c, [5.0, 1.75, 5.0, 1.5])
    lagrangian = (lam * r - 0.25 * lam ** 2 * c).sum() / 5
    assert bc.lagrangian(y, yhat, ids, 0.8, sample_weight=w).numpy() == pytest.approx(0.8 * lagrangian, rel=1e-5)
    new = bc.update_duals(y, yhat, ids, 0.8, sample_weight=w).numpy()
    np.testing.assert_allclose(new, lam + 0.3 * 0.8 * (r - 0.5 * lam * c) / 5, rtol=1e-5)
    # Unit weights give the unweighted formula; integer weights act like repeated rows in r and c.
    bc.duals.assign(lam)
    np.testing.assert_allclose(bc.dual_gradient(y, yhat, ids, sample_weight=np.ones(5)).numpy(),
                               bc.dual_gradient(y, yhat, ids).numpy(), rtol=1e-6)
    reps = np.array([2, 1, 1, 3, 1])
    r_rep, c_rep = slice_sums(reps)
    grad = bc.dual_gradient(y, yhat, ids, sample_weight=reps.astype(np.float32)).numpy()
    np.testing.assert_allclose(grad * 5, r_rep - 0.5 * lam * c_rep, rtol=1e-5)


def test_dual_update_is_ascent_along_the_residual():
    bc = bc_lib.BiasConstraints(num_categories=3, alpha=1.0,
                                dual_learning_rate=1.0)
    y = np.array([1, 1, 0, 0, 0, 1], np.float32)
    yhat = np.array([0.2, 0.4, 0.9, 0.7, 0.5, 0.5], np.float32)
    ids = bc.slice_ids(yhat, [0, 0, 1, 1, 2, 2])
    # residuals: slice 0 +1.4 (under-predicted), slice 1 -1.6, slice 2 0.0
    new = bc.update_duals(y, yhat, ids).numpy()
    np.testing.assert_allclose(new, [1.4 / 6, -1.6 / 6, 0.0], atol=1e-6)
    assert new[0] > 0 > new[1]
    # With the ramp at 0 the duals do not move.
    bc.update_duals(y, yhat, ids, ramp=0.0)
    np.testing.assert_allclose(bc.duals.numpy(), new)


def test_duals_are_not_trainable_model_weights():
    bc = bc_lib.BiasConstraints(ctr_boundaries=[0.1], alpha=1.0)
    assert bc.trainable_variables == ()
    assert not bc.duals.trainable
    model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(2,))])
    assert all(v is not bc.duals for v in model.variables)


def _toy_fit(constrained, steps=300):
    """Logistic regression by full-batch gradient descent on a shifted slice.

    The slice is x0 > 0 and its true logit is shifted by +1.5; the linear model
    cannot represent that step, so the unconstrained fit is biased on it.
    """
    rng = np.random.default_rng(0)
    n = 2000
    x = rng.normal(size=(n, 2)).astype(np.float32)
    slices = (x[:, 0] > 0).astype(np.int32)
    true_logit = -1.5 + 0.3 * x[:, 1] + 1.5 * slices
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-true_logit))).astype(np.float32)
    w = tf.Variable(tf.zeros([2]))
    b = tf.Variable(0.0)
    bc = bc_lib.BiasConstraints(num_categories=2, alpha=1e-3,
                                dual_learning_rate=2.0)
    ramp = curriculum.Ramp(max_weight=1.0, start_step=0, ramp_steps=50)
    xs, ys, ids = tf.constant(x), tf.constant(y), tf.constant(slices)

    @tf.function
    def step(t):
        with tf.GradientTape() as tape:
            p = tf.sigmoid(tf.linalg.matvec(xs, w) + b)
            loss = tf.reduce_mean(-ys * tf.math.log(p) -
                                  (1 - ys) * tf.math.log(1 - p))
            if constrained:
                loss += bc(ys, p, ids, ramp(t))
        gw, gb = tape.gradient(loss, [w, b])
        w.assign_sub(1.0 * gw)
        b.assign_sub(1.0 * gb)

    for t in range(steps):
        step(tf.constant(t))
    p = 1 / (1 + np.exp(-(x @ w.numpy() + b.numpy())))
    bias = [((y - p)[slices == k]).sum() / y[slices == k].sum() for k in (0, 1)]
    return np.array(bias), bc.duals.numpy()


def test_constraints_shrink_slice_bias_on_toy_problem():
    bias_free, duals_free = _toy_fit(constrained=False)
    bias_con, duals_con = _toy_fit(constrained=True)
    # The shifted slice (1) is under-predicted without constraints, and the
    # rest over-predicted.
    assert bias_free[1] > 0.05 and bias_free[0] < -0.05
    np.testing.assert_array_equal(duals_free, 0.0)
    for k in (0, 1):
        assert abs(bias_con[k]) * 5 <= abs(bias_free[k]), (bias_free, bias_con)
    # The duals point the way of the residuals.
    assert duals_con[1] > 0 > duals_con[0]


def test_constructor_validation():
    with pytest.raises(ValueError):
        bc_lib.BiasConstraints()
    with pytest.raises(ValueError):
        bc_lib.BiasConstraints(ctr_boundaries=[0.3, 0.1])
    with pytest.raises(ValueError):
        bc_lib.BiasConstraints(num_categories=2, num_slices=3)
    assert bc_lib.BiasConstraints(num_slices=4).num_slices == 4
