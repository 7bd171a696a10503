"""Tests for models/bottleneck.py: y = act(U (V x) + b) and its size."""

import numpy as np
import pytest
import tensorflow as tf

from cascade_ranking.models import bottleneck

IN, RANK, UNITS = 7, 2, 5


def _layer_with_known_weights(activation, rng):
    layer = bottleneck.LowRankDense(UNITS, RANK, activation=activation)
    layer(tf.zeros([1, IN]))
    v = rng.normal(size=(IN, RANK)).astype(np.float32)
    u = rng.normal(size=(RANK, UNITS)).astype(np.float32)
    b = rng.normal(size=(UNITS,)).astype(np.float32)
    assert [w.shape for w in layer.get_weights()] == [(IN, RANK), (RANK, UNITS),
                                                      (UNITS,)]
    layer.set_weights([v, u, b])
    return layer, v, u, b


@pytest.mark.parametrize("activation", [None, "relu", "smelu:0.5"])
def test_matches_numpy(activation):
    rng = np.random.default_rng(0)
    layer, v, u, b = _layer_with_known_weights(activation, rng)
    x = rng.normal(size=(4, IN)).astype(np.float32)
    pre = (x @ v) @ u + b
    if activation is None:
        want = pre
    elif activation == "relu":
        want = np.maximum(pre, 0.0)
    else:  # SmeLU, beta = 0.5, written out piecewise
        want = np.where(pre <= -0.5, 0.0,
                        np.where(pre >= 0.5, pre, (pre + 0.5) ** 2 / 2.0))
    np.testing.assert_allclose(layer(x).numpy(), want, rtol=1e-5, atol=1e-6)


def test_parameter_count():
    layer = bottleneck.LowRankDense(UNITS, RANK, activation="relu")
    layer(tf.zeros([1, IN]))
    assert layer.count_params() == IN * RANK + RANK * UNITS + UNITS == 29
    assert bottleneck.low_rank_param_count(IN, UNITS, RANK) == 29
    dense = tf.keras.layers.Dense(UNITS)
    dense(tf.zeros([1, IN]))
    assert bottleneck.dense_param_count(IN, UNITS) == dense.count_params() == 40
    # A real bottleneck: 512 -> 512 at rank 32 is ~8x smaller.
    assert bottleneck.low_rank_param_count(512, 512, 32) == 33280
    assert bottleneck.dense_param_count(512, 512) == 262656


def test_config_round_trip_in_model():
    inputs = tf.keras.Input(shape=(IN,))
    outputs = bottleneck.LowRankDense(UNITS, RANK, activation="smelu:0.5")(inputs)
    model = tf.keras.Model(inputs, outputs)
    clone = tf.keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(1).normal(size=(3, IN)).astype(np.float32)
    np.testing.assert_allclose(clone(x).numpy(), model(x).numpy(), rtol=1e-6)
    assert clone.layers[-1].activation_name == "smelu:0.5"


def test_rejects_bad_sizes():
    with pytest.raises(ValueError):
        bottleneck.LowRankDense(0, 2)
    with pytest.raises(ValueError):
        bottleneck.LowRankDense(4, 0)
