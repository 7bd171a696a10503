"""Low-rank DCNv2 cross layers with a ReZero-style ramped residual scalar.

DCNv2 low-rank cross (Wang et al., "DCN V2: Improved Deep & Cross Network",
2021, Eq. (2); Anil et al., "On the Factory Floor", 2022, §4.3):

```
x_{l+1} = x0 ⊙ (U_l V_l x_l + b_l) + x_l
```

with U_l, V_l of rank k. That is `tfrs.layers.dcn.Cross(projection_dim=k)`,
which this module wraps rather than reimplements. What TFRS lacks, and is added
here by hand, is the ReZero-style scalar on the cross branch (Bachlechner et
al., "ReZero is All You Need", 2020, as applied to the cross layers in the
Factory Floor paper §4.3):

```
x_{l+1} = alpha(step) · (x0 ⊙ (U_l V_l x_l + b_l)) + x_l
alpha(step) = min(1, step / ramp_steps)      (alpha = 1 if ramp_steps == 0)
```

So a freshly initialised stack is the identity map, and the crosses are blended
in linearly over the first `ramp_steps` training steps. Unlike ReZero, alpha is
a fixed schedule, not a trained scalar.

It is computed as the TFRS cross of a scaled base input, with no op of its own per layer:

```
alpha · (x0 ⊙ (U_l V_l x_l + b_l)) = (alpha · x0) ⊙ (U_l V_l x_l + b_l)
x_{l+1} = Cross(alpha · x0, x_l)
```

so a stack scales x0 once and then runs `tfrs.layers.dcn.Cross` as it is. Taking the
branch back out of `Cross(x0, x) − x` and adding it again cost 3 element-wise ops on
[batch, d] per layer, forward and backward: on [954, 120], 2 layers of rank 32, forward +
gradient on 2 cores, 1.37 ms a step against 1.48–1.49 ms in that form and 1.30–1.40 ms for
the two TFRS layers alone (`bench/cross_stack_cost.py`, interleaved rounds).

The schedule is explicit: `alpha_at(step)`. The step comes either from the
`step` argument of `call` (pass `optimizer.iterations` when the model is called
more than once per training step, e.g. with LSPR's perturbed copy), or from the
layer's own non-trainable counter, which advances by one on every call with
`training=True` and is frozen otherwise. The counter is saved with the model, so
a served model uses the alpha reached at the end of training (1 after the ramp).
"""

from typing import Optional

import tensorflow as tf
import tensorflow_recommenders as tfrs


def alpha_schedule(step, ramp_steps: int) -> tf.Tensor:
    """alpha(step) = clip(step / ramp_steps, 0, 1), or 1 if ramp_steps == 0."""
    if ramp_steps < 0:
        raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps}.")
    step = tf.cast(step, tf.float32)
    if ramp_steps == 0:
        return tf.ones_like(step)
    return tf.clip_by_value(step / float(ramp_steps), 0.0, 1.0)


def cross_stack_flops(num_layers: int, width: int, projection_dim: Optional[int]) -> int:
    """FLOPs per row of a `CrossStack` in tf.profiler's convention (a matmul 2·m·k·n, a bias add
    or an element-wise op one per element): each layer on width D is V (2·D·k), U (2·k·D) + its
    bias (D), x0 ⊙ (D) and + x (D) = 4·D·k + 3·D, or 2·D² + 3·D at full rank (the TFRS cross);
    the stack adds alpha · x0 once (D). 0 layers: 0."""
    if num_layers == 0:
        return 0
    d, k = width, projection_dim
    layer = (4 * d * k if k else 2 * d * d) + 3 * d
    return num_layers * layer + d


def _new_step_counter(layer: tf.keras.layers.Layer) -> tf.Variable:
    return layer.add_weight(
        name="step",
        shape=(),
        dtype=tf.int64,
        initializer="zeros",
        trainable=False,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


@tf.keras.utils.register_keras_serializable(package="cascade_ranking")
class ReZeroCross(tf.keras.layers.Layer):
    """One low-rank DCNv2 cross layer whose cross branch is scaled by alpha(step).

    Args:
        projection_dim: Rank k of W = U V (`None` gives the full-rank cross).
        ramp_steps: Number of training steps over which alpha goes 0 -> 1.
        diag_scale, use_bias, kernel_initializer, bias_initializer,
        kernel_regularizer, bias_regularizer: passed to `tfrs.layers.dcn.Cross`.

    Call args:
        x0: [batch, d] base input.
        x: [batch, d] previous cross output (defaults to x0).
        training: the counter advances only when True.
        step: optional scalar step overriding the internal counter (which is then
            left unchanged).
    """

    def __init__(self,
                 projection_dim: Optional[int] = None,
                 ramp_steps: int = 0,
                 diag_scale: float = 0.0,
                 use_bias: bool = True,
                 kernel_initializer="truncated_normal",
                 bias_initializer="zeros",
                 kernel_regularizer=None,
                 bias_regularizer=None,
                 **kwargs):
        super().__init__(**kwargs)
        if ramp_steps < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps}.")
        self.projection_dim = projection_dim
        self.ramp_steps = int(ramp_steps)
        self.cross = tfrs.layers.dcn.Cross(
            projection_dim=projection_dim,
            diag_scale=diag_scale,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            name="cross")

    def build(self, input_shape):
        self.step = _new_step_counter(self)
        super().build(input_shape)

    def alpha_at(self, step) -> tf.Tensor:
        """The residual scalar at `step` (float32 scalar tensor)."""
        return alpha_schedule(step, self.ramp_steps)

    def call(self, x0, x=None, training=None, step=None):
        if x is None:
            x = x0
        if step is None:
            current = self.step.read_value()
            if training:
                self.step.assign_add(1)
        else:
            current = step
        alpha = tf.cast(self.alpha_at(current), x0.dtype)
        # tfrs Cross returns x0 ⊙ (U V x + b) + x: with alpha · x0 in place of x0 that is
        # alpha · (the cross branch) + x.
        return self.cross(alpha * x0, x)

    def get_config(self):
        cross_config = self.cross.get_config()
        config = super().get_config()
        config.update({
            "projection_dim": self.projection_dim,
            "ramp_steps": self.ramp_steps,
            "diag_scale": cross_config["diag_scale"],
            "use_bias": cross_config["use_bias"],
            "kernel_initializer": cross_config["kernel_initializer"],
            "bias_initializer": cross_config["bias_initializer"],
            "kernel_regularizer": cross_config["kernel_regularizer"],
            "bias_regularizer": cross_config["bias_regularizer"],
        })
        return config


@tf.keras.utils.register_keras_serializable(package="cascade_ranking")
class CrossStack(tf.keras.layers.Layer):
    """`num_layers` ReZeroCross layers, x0 -> x1 -> ... -> x_L, one shared step.

    The stack owns the step counter (same rules as `ReZeroCross`) and passes the
    step to every layer, so all layers share one alpha.

    Args:
        num_layers: Number of cross layers (0 gives the identity).
        projection_dim: Rank k of every layer's U V.
        ramp_steps: Steps over which alpha goes 0 -> 1.
        **cross_kwargs: passed to every `ReZeroCross` (diag_scale, initializers...).
    """

    def __init__(self,
                 num_layers: int,
                 projection_dim: Optional[int] = None,
                 ramp_steps: int = 0,
                 cross_kwargs: Optional[dict] = None,
                 **kwargs):
        super().__init__(**kwargs)
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}.")
        self.num_layers = int(num_layers)
        self.projection_dim = projection_dim
        self.ramp_steps = int(ramp_steps)
        self.cross_kwargs = dict(cross_kwargs or {})
        self.cross_layers = [
            ReZeroCross(projection_dim=projection_dim, ramp_steps=ramp_steps,
                        name=f"rezero_cross_{i}", **self.cross_kwargs)
            for i in range(self.num_layers)
        ]

    def build(self, input_shape):
        self.step = _new_step_counter(self)
        for layer in self.cross_layers:  # `call` runs their crosses directly: build each layer (its counter)
            with tf.name_scope(layer.name):
                layer.build(input_shape)
        super().build(input_shape)

    def alpha_at(self, step) -> tf.Tensor:
        return alpha_schedule(step, self.ramp_steps)

    def call(self, x0, training=None, step=None):
        if step is None:
            step = self.step.read_value()
            if training:
                self.step.assign_add(1)
        if not self.cross_layers:
            return x0
        # One alpha for the stack, so x0 is scaled once and each layer is its TFRS cross alone.
        scaled_x0 = tf.cast(self.alpha_at(step), x0.dtype) * x0
        x = x0
        for layer in self.cross_layers:
            with tf.name_scope(layer.name):
                x = layer.cross(scaled_x0, x)
        return x

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_layers": self.num_layers,
            "projection_dim": self.projection_dim,
            "ramp_steps": self.ramp_steps,
            "cross_kwargs": self.cross_kwargs,
        })
        return config
