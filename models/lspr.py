"""LSPR: Loss-balanced Small Perturbation Regularization.

Ramazanli, Eghbalzadeh et al. (Meta), "Beyond Self-Consistency: Loss-Balanced
Small Perturbation Regularization Improves Industrial-Scale Ads Ranking"
(2025, arXiv:2502.18478). A perturbed copy of the batch is trained on with the
same labels and the same loss, at a smaller weight λ:

```
x̃_dense  = x_dense + ω · ε,            ε ~ N(0, I)   (x_dense normalised)
ẽ_sparse = dropout_p(e_sparse)          (inverted dropout: kept entries / (1 − p))
L_LSPR   = L(f(x), y) + λ · L(f(x̃), y),  λ < 1
```

Three hyperparameters: ω (`noise_scale`), p (`dropout_rate`) and λ (`weight`).
The dense features are expected to be normalised already (e.g. z-scored by the
feature pipeline), so one ω fits all of them. Embedding dropout is elementwise.
Perturbations use stateless RNG ops: the same `seed` gives the same batch, and
each feature gets its own stream via `stateless_fold_in`. Written by hand: no
TF library ships it. `LSPRLoss` (registry name "lspr", `models.losses.get`) wraps
any registered loss L as a Keras Loss: `(y_true, y_pred, sample_weight, perturbed=ŷ(x̃))`
gives L(ŷ, y) + λ·L(ŷ(x̃), y); `perturbed_term` is the λ·L(f(x̃), y) part alone.
"""

import dataclasses
from typing import Callable, Dict, Mapping, Tuple, Union

import tensorflow as tf

from cascade_ranking.models import losses as losses_lib

SeedLike = Union[int, tf.Tensor, Tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class LSPRConfig:
    """ω, p and λ of LSPR."""
    noise_scale: float = 0.0
    dropout_rate: float = 0.0
    weight: float = 0.0

    def __post_init__(self):
        if self.noise_scale < 0:
            raise ValueError(f"noise_scale must be >= 0, got {self.noise_scale}.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}.")
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}.")


def _seed_pair(seed: SeedLike) -> tf.Tensor:
    seed = tf.convert_to_tensor(seed)
    seed = tf.cast(seed, tf.int64)
    if seed.shape.rank == 0:
        seed = tf.stack([tf.constant(0, tf.int64), seed])
    return seed


def perturb_batch(dense_features: Mapping[str, tf.Tensor],
                  embeddings: Mapping[str, tf.Tensor],
                  noise_scale: float,
                  dropout_rate: float,
                  seed: SeedLike) -> Tuple[Dict[str, tf.Tensor],
                                           Dict[str, tf.Tensor]]:
    """Returns (dense + ω·N(0,1) noise, dropout_p(embeddings)).

    Args:
        dense_features: name -> float tensor of normalised dense features.
        embeddings: name -> float tensor of looked-up sparse-feature embeddings.
        noise_scale: ω >= 0.
        dropout_rate: p in [0, 1).
        seed: int or [2] int tensor (e.g. [seed, step] to vary per step).

    Returns:
        Two new dicts with the same keys. With ω = 0 and p = 0 the tensors are
        returned unchanged.
    """
    if isinstance(noise_scale, (int, float)) and noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}.")
    if isinstance(dropout_rate, (int, float)) and not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}.")
    base = _seed_pair(seed)
    dense_seed = tf.random.experimental.stateless_fold_in(base, 0)
    emb_seed = tf.random.experimental.stateless_fold_in(base, 1)

    noisy = {}
    for i, name in enumerate(sorted(dense_features)):
        x = tf.convert_to_tensor(dense_features[name])
        if isinstance(noise_scale, (int, float)) and noise_scale == 0:
            noisy[name] = x
            continue
        feature_seed = tf.random.experimental.stateless_fold_in(dense_seed, i)
        noise = tf.random.stateless_normal(
            tf.shape(x), seed=feature_seed, dtype=x.dtype)
        noisy[name] = x + tf.cast(noise_scale, x.dtype) * noise

    dropped = {}
    for i, name in enumerate(sorted(embeddings)):
        e = tf.convert_to_tensor(embeddings[name])
        if isinstance(dropout_rate, (int, float)) and dropout_rate == 0:
            dropped[name] = e
            continue
        feature_seed = tf.random.experimental.stateless_fold_in(emb_seed, i)
        dropped[name] = tf.nn.experimental.stateless_dropout(
            e, rate=dropout_rate, seed=feature_seed)
    return noisy, dropped


def lspr_loss(loss_fn: Callable[..., tf.Tensor],
              clean_inputs,
              perturbed_inputs,
              labels,
              weight: float) -> tf.Tensor:
    """loss_fn(clean_inputs, labels) + weight · loss_fn(perturbed_inputs, labels).

    Args:
        loss_fn: (inputs, labels) -> scalar loss; it runs the model, so both copies
            go through the same model and the same loss.
        clean_inputs: the batch.
        perturbed_inputs: its perturbed copy (e.g. from `perturb_batch`).
        labels: the labels, shared by both copies.
        weight: λ >= 0 (the paper uses λ < 1).
    """
    clean = loss_fn(clean_inputs, labels)
    return clean + perturbed_term(loss_fn, perturbed_inputs, labels, weight)


def perturbed_term(loss_fn: Callable[..., tf.Tensor], perturbed_inputs, labels, weight) -> tf.Tensor:
    """weight · loss_fn(perturbed_inputs, labels): the LSPR term added to the clean loss."""
    if isinstance(weight, (int, float)) and weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}.")
    perturbed = loss_fn(perturbed_inputs, labels)
    return tf.cast(weight, perturbed.dtype) * perturbed


@losses_lib.register("lspr")
class LSPRLoss(losses_lib.ExplicitLoss):
    """L(ŷ, y) + λ·L(ŷ_perturbed, y) (`lspr_loss`), L a registered loss (name or instance).

    `__call__(y_true, y_pred, sample_weight=None, perturbed=..., **inputs)`: `perturbed` is the
    model's output on the perturbed copy of the batch; `inputs` (e.g. mask) go to L unchanged.
    """

    def __init__(self, loss="logistic", weight: float = 0.0, name=None, **kwargs):
        if float(weight) < 0:
            raise ValueError(f"weight must be >= 0, got {weight}.")
        super().__init__(name=name, **kwargs)
        self.loss = losses_lib.get(loss) if isinstance(loss, str) else loss
        self.weight = float(weight)

    def compute(self, y_true, y_pred, sample_weight=None, perturbed=None, **inputs):
        if perturbed is None:
            raise ValueError("the LSPR loss needs perturbed= (the outputs on the perturbed batch)")
        fn = lambda pred, y: self.loss(y, pred, sample_weight=sample_weight, **inputs)  # noqa: E731
        return lspr_loss(fn, y_pred, perturbed, y_true, self.weight)

    def get_config(self):
        return {**super().get_config(), "loss": getattr(self.loss, "registered_name", self.loss.name),
                "weight": self.weight}
