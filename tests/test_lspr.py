"""Tests for models/lspr.py: perturbed copy of the batch and the LSPR loss."""

import numpy as np
import pytest
import tensorflow as tf

from cascade_ranking.models import lspr


def _batch(n=6):
    rng = np.random.default_rng(0)
    dense = {"price": rng.normal(size=(n, 1)).astype(np.float32),
             "age": rng.normal(size=(n, 3)).astype(np.float32)}
    emb = {"item_id": rng.normal(size=(n, 4)).astype(np.float32),
           "user_id": rng.normal(size=(n, 4)).astype(np.float32)}
    return dense, emb


def test_zero_noise_and_zero_dropout_is_the_clean_batch():
    dense, emb = _batch()
    noisy, dropped = lspr.perturb_batch(dense, emb, 0.0, 0.0, seed=3)
    assert set(noisy) == set(dense) and set(dropped) == set(emb)
    for name in dense:
        np.testing.assert_array_equal(noisy[name].numpy(), dense[name])
    for name in emb:
        np.testing.assert_array_equal(dropped[name].numpy(), emb[name])


def test_fixed_seed_is_reproducible_and_seeds_differ():
    dense, emb = _batch()
    a = lspr.perturb_batch(dense, emb, 0.1, 0.3, seed=7)
    b = lspr.perturb_batch(dense, emb, 0.1, 0.3, seed=7)
    c = lspr.perturb_batch(dense, emb, 0.1, 0.3, seed=[7, 1])
    for part in (0, 1):
        for name in a[part]:
            np.testing.assert_array_equal(a[part][name].numpy(),
                                          b[part][name].numpy())
    assert not np.array_equal(a[0]["age"].numpy(), c[0]["age"].numpy())
    # Features get different noise streams.
    da = a[0]["age"].numpy()[:, 0] - dense["age"][:, 0]
    dp = a[0]["price"].numpy()[:, 0] - dense["price"][:, 0]
    assert not np.allclose(da, dp)


def test_noise_scale_and_dropout_statistics():
    n = 20000
    dense = {"x": np.zeros((n, 1), np.float32)}
    emb = {"e": np.full((n, 2), 3.0, np.float32)}
    noisy, dropped = lspr.perturb_batch(dense, emb, 0.2, 0.25, seed=1)
    noise = noisy["x"].numpy().ravel()
    assert abs(noise.mean()) < 0.01
    assert noise.std() == pytest.approx(0.2, rel=0.03)
    d = dropped["e"].numpy().ravel()
    # Inverted dropout: an entry is either 0 or 3 / (1 - 0.25) = 4.
    assert set(np.unique(d).round(5)) == {0.0, 4.0}
    assert (d == 0).mean() == pytest.approx(0.25, abs=0.01)


def test_lspr_loss_is_clean_plus_weighted_perturbed():
    dense, emb = _batch()
    labels = np.array([1, 0, 0, 1, 1, 0], np.float32)
    w_dense = np.array([0.5, -0.3, 0.2, 0.1], np.float32)
    w_emb = np.array([0.2, -0.1, 0.4, 0.3, -0.2, 0.1, 0.05, -0.3], np.float32)

    def features(inputs):
        d, e = inputs
        return (np.concatenate([np.asarray(d["price"]), np.asarray(d["age"])], 1),
                np.concatenate([np.asarray(e["item_id"]),
                                np.asarray(e["user_id"])], 1))

    def loss_fn(inputs, y):  # a fixed linear model + mean logistic loss, in TF
        xd, xe = inputs[0], inputs[1]
        xd = tf.concat([xd["price"], xd["age"]], 1)
        xe = tf.concat([xe["item_id"], xe["user_id"]], 1)
        logit = tf.linalg.matvec(xd, w_dense) + tf.linalg.matvec(xe, w_emb)
        return tf.reduce_mean(
            tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logit))

    def numpy_loss(inputs):
        xd, xe = features(inputs)
        s = (xd @ w_dense + xe @ w_emb).astype(np.float64)
        p = 1 / (1 + np.exp(-s))
        return np.mean(-labels * np.log(p) - (1 - labels) * np.log(1 - p))

    perturbed = lspr.perturb_batch(dense, emb, 0.3, 0.2, seed=11)
    got = lspr.lspr_loss(loss_fn, (dense, emb), perturbed, labels, 0.25).numpy()
    clean_np = numpy_loss((dense, emb))
    perturbed_np = numpy_loss(({k: v.numpy() for k, v in perturbed[0].items()},
                               {k: v.numpy() for k, v in perturbed[1].items()}))
    assert abs(perturbed_np - clean_np) > 1e-3   # the copy really differs
    assert got == pytest.approx(clean_np + 0.25 * perturbed_np, rel=1e-5)
    # weight 0 is the clean loss alone.
    assert lspr.lspr_loss(loss_fn, (dense, emb), perturbed, labels,
                          0.0).numpy() == pytest.approx(clean_np, rel=1e-5)


def test_perturb_batch_inside_tf_function_with_step_seed():
    dense, emb = _batch()

    @tf.function
    def perturb(step):
        return lspr.perturb_batch(dense, emb, 0.1, 0.5, seed=tf.stack(
            [tf.constant(5, tf.int64), step]))

    a = perturb(tf.constant(1, tf.int64))
    b = perturb(tf.constant(1, tf.int64))
    c = perturb(tf.constant(2, tf.int64))
    np.testing.assert_array_equal(a[1]["item_id"].numpy(),
                                  b[1]["item_id"].numpy())
    assert not np.array_equal(a[1]["item_id"].numpy(), c[1]["item_id"].numpy())


def test_validation():
    dense, emb = _batch()
    with pytest.raises(ValueError):
        lspr.perturb_batch(dense, emb, -0.1, 0.0, seed=0)
    with pytest.raises(ValueError):
        lspr.perturb_batch(dense, emb, 0.1, 1.0, seed=0)
    with pytest.raises(ValueError):
        lspr.LSPRConfig(noise_scale=0.1, dropout_rate=0.1, weight=-1.0)
    assert lspr.LSPRConfig(0.05, 0.1, 0.5).weight == 0.5
