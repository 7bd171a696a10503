"""Low-rank bottleneck dense layer.

Anil et al., "On the Factory Floor: ML Engineering for Industrial-Scale Ads
Recommendation Models" (2022), §3.1 (bottlenecks): a wide dense layer
`y = act(W x + b)` with W of shape [units, in] is replaced by a low-rank
product W ≈ U V, U: [units, rank], V: [rank, in]:

```
y = act(U (V x) + b)
```

which costs in·rank + rank·units + units parameters (and FLOPs in proportion)
instead of in·units + units. Keras has no such layer, so it is written here as
two `tf.keras.layers.Dense` (V without bias, then U with bias and activation).
"""

from typing import Optional

import tensorflow as tf

from cascade_ranking.models import activations as activations_lib


def low_rank_param_count(input_dim: int, units: int, rank: int) -> int:
    """Parameters of `LowRankDense`: input_dim*rank + rank*units + units."""
    return input_dim * rank + rank * units + units


def dense_param_count(input_dim: int, units: int) -> int:
    """Parameters of the full `Dense` it replaces: input_dim*units + units."""
    return input_dim * units + units


@tf.keras.utils.register_keras_serializable(package="cascade_ranking")
class LowRankDense(tf.keras.layers.Layer):
    """y = act(U (V x) + b), a rank-`rank` stand-in for `Dense(units)`.

    Args:
        units: Output width.
        rank: Inner (bottleneck) width.
        activation: A name accepted by `models.activations.get_activation`
            (e.g. "relu", "smelu:0.5") or None for linear. Only names are accepted,
            so the layer stays serializable.
        kernel_initializer, bias_initializer, kernel_regularizer: as in Dense.
    """

    def __init__(self,
                 units: int,
                 rank: int,
                 activation: Optional[str] = None,
                 kernel_initializer="glorot_uniform",
                 bias_initializer="zeros",
                 kernel_regularizer=None,
                 **kwargs):
        super().__init__(**kwargs)
        if units <= 0 or rank <= 0:
            raise ValueError(f"units and rank must be > 0, got {units}, {rank}.")
        self.units = int(units)
        self.rank = int(rank)
        self.activation_name = activation
        self.activation = activations_lib.get_activation(activation)
        self.kernel_initializer = tf.keras.initializers.get(kernel_initializer)
        self.bias_initializer = tf.keras.initializers.get(bias_initializer)
        self.kernel_regularizer = tf.keras.regularizers.get(kernel_regularizer)
        self.v = tf.keras.layers.Dense(
            self.rank, use_bias=False,
            kernel_initializer=self.kernel_initializer,
            kernel_regularizer=self.kernel_regularizer, name="v")
        self.u = tf.keras.layers.Dense(
            self.units, use_bias=True,
            kernel_initializer=tf.keras.initializers.get(
                tf.keras.initializers.serialize(self.kernel_initializer)),
            bias_initializer=self.bias_initializer,
            kernel_regularizer=self.kernel_regularizer, name="u")

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return self.activation(self.u(self.v(inputs)))

    def get_config(self):
        config = super().get_config()
        config.update({
            "units": self.units,
            "rank": self.rank,
            "activation": self.activation_name,
            "kernel_initializer":
                tf.keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer":
                tf.keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer":
                tf.keras.regularizers.serialize(self.kernel_regularizer),
        })
        return config
