"""Tests for models/cross.py: ReZero-scaled low-rank DCNv2 cross layers."""

import numpy as np
import pytest
import tensorflow as tf

from cascade_ranking.models import cross

D, K = 4, 2


def _set_weights(layer, rng):
    """Gives the wrapped tfrs Cross known U, V, b; returns them as numpy."""
    u = rng.normal(size=(D, K)).astype(np.float32)   # x -> k   (x @ u)
    v = rng.normal(size=(K, D)).astype(np.float32)   # k -> d   (. @ v)
    b = rng.normal(size=(D,)).astype(np.float32)
    shapes = [w.shape for w in layer.cross.get_weights()]
    assert shapes == [(D, K), (K, D), (D,)]
    layer.cross.set_weights([u, v, b])
    return u, v, b


def _numpy_cross(x0, x, u, v, b, alpha):
    return alpha * (x0 * ((x @ u) @ v + b)) + x


@pytest.fixture
def inputs():
    rng = np.random.default_rng(1)
    return (rng.normal(size=(3, D)).astype(np.float32),
            rng.normal(size=(3, D)).astype(np.float32))


@pytest.mark.parametrize("step,alpha", [(0, 0.0), (3, 0.3), (5, 0.5),
                                        (10, 1.0), (25, 1.0)])
def test_rezero_cross_matches_numpy_formula(inputs, step, alpha):
    x0, x = inputs
    layer = cross.ReZeroCross(projection_dim=K, ramp_steps=10)
    layer(x0, x, step=0)  # build
    u, v, b = _set_weights(layer, np.random.default_rng(2))
    got = layer(x0, x, step=step).numpy()
    np.testing.assert_allclose(got, _numpy_cross(x0, x, u, v, b, alpha),
                               rtol=1e-5, atol=1e-5)
    if step == 0:
        np.testing.assert_array_equal(got, x)  # exactly the identity


@pytest.mark.parametrize("ramp,step,alpha", [
    (10, 0, 0.0), (10, 1, 0.1), (10, 7, 0.7), (10, 10, 1.0), (10, 11, 1.0),
    (4, 2, 0.5), (0, 0, 1.0), (0, 100, 1.0)])
def test_alpha_schedule(ramp, step, alpha):
    layer = cross.ReZeroCross(projection_dim=K, ramp_steps=ramp)
    assert float(layer.alpha_at(step)) == pytest.approx(alpha)
    assert float(cross.CrossStack(1, K, ramp).alpha_at(step)) == pytest.approx(
        alpha)


def test_internal_counter_advances_only_in_training(inputs):
    x0, _ = inputs
    layer = cross.ReZeroCross(projection_dim=K, ramp_steps=4)
    # First training call runs at step 0: the identity.
    out0 = layer(x0, training=True).numpy()
    np.testing.assert_array_equal(out0, x0)
    assert int(layer.step.numpy()) == 1
    u, v, b = _set_weights(layer, np.random.default_rng(3))
    out_eval = layer(x0, training=False).numpy()   # alpha(1) = 0.25
    assert int(layer.step.numpy()) == 1
    np.testing.assert_allclose(out_eval, _numpy_cross(x0, x0, u, v, b, 0.25),
                               rtol=1e-5, atol=1e-5)
    layer(x0, training=True)                       # runs at step 1
    out_train = layer(x0, training=True).numpy()   # runs at step 2 -> 0.5
    assert int(layer.step.numpy()) == 3
    np.testing.assert_allclose(out_train, _numpy_cross(x0, x0, u, v, b, 0.5),
                               rtol=1e-5, atol=1e-5)
    # An explicit step overrides the counter and leaves it alone.
    layer(x0, training=True, step=tf.constant(4, tf.int64))
    assert int(layer.step.numpy()) == 3
    assert not layer.step.trainable


def test_counter_advances_inside_tf_function(inputs):
    x0, _ = inputs
    layer = cross.ReZeroCross(projection_dim=K, ramp_steps=4)

    @tf.function
    def train_call(x):
        return layer(x, training=True)

    for _ in range(3):
        train_call(x0)
    assert int(layer.step.numpy()) == 3


def test_cross_stack_matches_numpy(inputs):
    x0, _ = inputs
    stack = cross.CrossStack(num_layers=2, projection_dim=K, ramp_steps=4)
    np.testing.assert_array_equal(stack(x0, step=0).numpy(), x0)
    rng = np.random.default_rng(4)
    weights = [_set_weights(layer, rng) for layer in stack.cross_layers]
    for step, alpha in [(0, 0.0), (2, 0.5), (9, 1.0)]:
        x = x0
        for u, v, b in weights:
            x = _numpy_cross(x0, x, u, v, b, alpha)
        np.testing.assert_allclose(stack(x0, step=step).numpy(), x,
                                   rtol=1e-5, atol=1e-5)
    # One shared counter in the stack; the layers' own counters stay at 0.
    stack(x0, training=True)
    stack(x0, training=True)
    assert int(stack.step.numpy()) == 2
    assert [int(layer.step.numpy()) for layer in stack.cross_layers] == [0, 0]
    # Trainable: U, V, b per layer; the counters are not trainable.
    assert len(stack.trainable_weights) == 6


def test_layers_round_trip_through_config():
    layer = cross.ReZeroCross(projection_dim=3, ramp_steps=7, diag_scale=0.5)
    clone = cross.ReZeroCross.from_config(layer.get_config())
    assert (clone.projection_dim, clone.ramp_steps) == (3, 7)
    assert clone.cross.get_config()["diag_scale"] == 0.5
    stack = cross.CrossStack(2, 3, 7, cross_kwargs={"diag_scale": 0.5})
    clone = cross.CrossStack.from_config(stack.get_config())
    assert clone.num_layers == 2 and clone.ramp_steps == 7
    assert clone.cross_layers[1].cross.get_config()["diag_scale"] == 0.5


def test_rejects_negative_ramp():
    with pytest.raises(ValueError):
        cross.ReZeroCross(projection_dim=2, ramp_steps=-1)


def test_counter_counts_keras_fit_steps_and_not_predict():
    inputs = tf.keras.Input(shape=(D,))
    stack = cross.CrossStack(num_layers=1, projection_dim=K, ramp_steps=100)
    outputs = tf.keras.layers.Dense(1)(stack(inputs))
    model = tf.keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((8, D), np.float32)
    y = np.zeros((8, 1), np.float32)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)   # 2 steps
    assert int(stack.step.numpy()) == 2
    model.predict(x, verbose=0)
    assert int(stack.step.numpy()) == 2
