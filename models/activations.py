"""Smooth ReLU (SmeLU) and a name -> activation lookup.

SmeLU, as used in Anil et al., "On the Factory Floor: ML Engineering for
Industrial-Scale Ads Recommendation Models" (2022), §5, and introduced in
Shamir, Lin & Coviello, "Smooth Activations and Reproducibility in Deep
Networks" (2020):

```
smelu(z) = 0                        if z <= -beta
         = (z + beta)^2 / (4 beta)  if |z| <= beta
         = z                        if z >= beta
```

The quadratic piece joins both linear pieces with matching value and slope
(value 0 and slope 0 at z = -beta, value beta and slope 1 at z = +beta), so the
function is continuously differentiable, which is what makes it reproducible
across retrains where ReLU is not. Neither Keras nor TFRS ships it, so it is
written here by hand.

`get_activation(name)` maps the names used in `custom_config` to callables:
"relu", "smelu" (beta 1.0), "smelu:<beta>" (e.g. "smelu:0.5"), "gelu",
"swish", "tanh", and "linear".
"""

from typing import Callable, Optional

import tensorflow as tf


def smelu(z: tf.Tensor, beta: float = 1.0) -> tf.Tensor:
    """SmeLU of `z`: 0 below -beta, (z+beta)^2/(4 beta) on [-beta, beta], z above."""
    if beta <= 0:
        raise ValueError(f"SmeLU needs beta > 0, got {beta}.")
    z = tf.convert_to_tensor(z)
    beta_t = tf.cast(beta, z.dtype)
    # Clip before squaring so the unused branch stays finite for large |z| (and
    # its gradient through tf.where is exactly 0 there).
    zc = tf.clip_by_value(z, -beta_t, beta_t)
    quadratic = tf.square(zc + beta_t) / (4.0 * beta_t)
    return tf.where(z >= beta_t, z, quadratic)


@tf.keras.utils.register_keras_serializable(package="cascade_ranking")
class SmeLU(tf.keras.layers.Layer):
    """Keras layer applying `smelu(z, beta)` elementwise.

    Args:
        beta: Half-width of the quadratic region, > 0.
    """

    def __init__(self, beta: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if beta <= 0:
            raise ValueError(f"SmeLU needs beta > 0, got {beta}.")
        self.beta = float(beta)
        self.supports_masking = True

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return smelu(inputs, self.beta)

    def get_config(self):
        config = super().get_config()
        config.update({"beta": self.beta})
        return config


def _identity(z):
    return tf.convert_to_tensor(z)


def get_activation(name: Optional[str]) -> Callable[[tf.Tensor], tf.Tensor]:
    """Returns the activation callable for `name`.

    Args:
        name: One of "relu", "smelu", "smelu:<beta>", "gelu", "swish", "tanh",
            "linear" (case-insensitive). `None` or "" means "linear".

    Returns:
        A function tensor -> tensor.

    Raises:
        ValueError: for an unknown name or a bad SmeLU beta.
    """
    if name is None:
        return _identity
    key = name.strip().lower()
    if key in ("", "linear", "none"):
        return _identity
    if key == "relu":
        return tf.nn.relu
    if key == "gelu":
        return tf.nn.gelu
    if key in ("swish", "silu"):
        return tf.nn.silu
    if key == "tanh":
        return tf.math.tanh
    if key == "smelu" or key.startswith("smelu:"):
        beta = 1.0
        if ":" in key:
            try:
                beta = float(key.split(":", 1)[1])
            except ValueError as e:
                raise ValueError(f"Bad SmeLU beta in activation {name!r}.") from e
        if beta <= 0:
            raise ValueError(f"SmeLU needs beta > 0, got {name!r}.")
        return SmeLU(beta)
    raise ValueError(
        f"Unknown activation {name!r}; expected relu, smelu[:beta], gelu, swish, "
        "tanh or linear.")
