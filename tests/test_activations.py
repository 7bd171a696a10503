"""Tests for models/activations.py: SmeLU values, C1 continuity, name lookup."""

import math

import numpy as np
import pytest
import tensorflow as tf

from cascade_ranking.models import activations


@pytest.mark.parametrize("beta,z,expected", [
    # z <= -beta -> 0
    (1.0, -2.0, 0.0),
    (1.0, -1.0, 0.0),
    # |z| <= beta -> (z + beta)^2 / (4 beta)
    (1.0, -0.5, 0.25 / 4.0),    # 0.0625
    (1.0, 0.0, 1.0 / 4.0),      # 0.25
    (1.0, 0.5, 2.25 / 4.0),     # 0.5625
    (1.0, 1.0, 1.0),
    # z >= beta -> z
    (1.0, 3.0, 3.0),
    (0.5, 0.0, 0.25 / 2.0),     # 0.125
    (0.5, 0.25, 0.5625 / 2.0),  # 0.28125
    (0.5, -0.6, 0.0),
    (2.0, 1.0, 9.0 / 8.0),      # (1+2)^2/8 = 1.125
    (2.0, 2.5, 2.5),
])
def test_smelu_values(beta, z, expected):
    got = activations.smelu(tf.constant([z], tf.float64), beta).numpy()[0]
    assert got == pytest.approx(expected, abs=1e-12)
    layer_got = activations.SmeLU(beta)(tf.constant([[z]], tf.float32)).numpy()
    assert layer_got[0, 0] == pytest.approx(expected, abs=1e-6)


def _value_and_grad(z, beta):
    z = tf.constant(z, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(z)
        y = activations.smelu(z, beta)
    return y.numpy(), tape.gradient(y, z).numpy()


@pytest.mark.parametrize("beta", [0.25, 1.0, 3.0])
def test_smelu_value_and_gradient_continuous_at_joins(beta):
    eps = 1e-7
    # Hand-derived one-sided limits: at -beta value 0, slope 0; at +beta value
    # beta, slope (z + beta) / (2 beta) = 1.
    for join, value, slope in [(-beta, 0.0, 0.0), (beta, beta, 1.0)]:
        (y_left, y_right), (g_left, g_right) = _value_and_grad(
            [join - eps, join + eps], beta)
        assert y_left == pytest.approx(value, abs=1e-6)
        assert y_right == pytest.approx(value, abs=1e-6)
        assert g_left == pytest.approx(slope, abs=1e-6)
        assert g_right == pytest.approx(slope, abs=1e-6)
    # Inside the quadratic region the slope is (z + beta) / (2 beta).
    _, g_mid = _value_and_grad([0.3 * beta], beta)
    assert g_mid[0] == pytest.approx(1.3 / 2.0, abs=1e-12)


def test_smelu_gradient_finite_far_out():
    _, grad = _value_and_grad([-1e30, -5.0, 5.0, 1e30], 1.0)
    np.testing.assert_array_equal(grad, [0.0, 0.0, 1.0, 1.0])


def test_get_activation_names():
    z = np.array([-1.5, -0.2, 0.0, 0.7, 2.0], np.float64)
    zt = tf.constant(z)
    sigmoid = 1.0 / (1.0 + np.exp(-z))
    phi = np.array([0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in z])
    expected = {
        "relu": np.maximum(z, 0.0),
        "swish": z * sigmoid,
        "tanh": np.tanh(z),
        "gelu": z * phi,
        "linear": z,
        # beta = 1: -1.5 -> 0, -0.2 -> 0.64/4, 0 -> 0.25, 0.7 -> 2.89/4, 2 -> 2
        "smelu": np.array([0.0, 0.16, 0.25, 0.7225, 2.0]),
        # beta = 0.5: -1.5 -> 0, -0.2 -> 0.09/2, 0 -> 0.125, 0.7 -> 0.7, 2 -> 2
        "smelu:0.5": np.array([0.0, 0.045, 0.125, 0.7, 2.0]),
        "SmeLU:0.5": np.array([0.0, 0.045, 0.125, 0.7, 2.0]),
    }
    for name, want in expected.items():
        got = activations.get_activation(name)(zt).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("bad", ["softplus", "smelu:abc", "smelu:0", "smelu:-1"])
def test_get_activation_rejects(bad):
    with pytest.raises(ValueError):
        activations.get_activation(bad)


def test_smelu_layer_serializes_in_a_model():
    inputs = tf.keras.Input(shape=(3,))
    outputs = activations.SmeLU(beta=0.5)(inputs)
    model = tf.keras.Model(inputs, outputs)
    clone = tf.keras.Model.from_config(model.get_config())
    x = np.array([[-1.0, 0.0, 0.25]], np.float32)
    np.testing.assert_allclose(clone(x).numpy(), [[0.0, 0.125, 0.28125]],
                               rtol=1e-6)
