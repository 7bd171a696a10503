"""LCRON: learning a cascade ranking system as one network.

Wang et al., "LCRON: Learning Cascade Ranking as One Network", ICML 2025 (Kuaishou), §3–§4;
the exact definitions used here are the ones of DESIGN §5. Reimplemented from those formulas.

For each stage i and request, with the stage's scores s over the request's n real candidates:

    NeuralSort (Grover et al., ICLR 2019, Eq. 4), k = 1..n:
        P̂[k, :] = softmax(((n + 1 − 2k)·s − A_s·1) / τ),        A_s[a, b] = |s_a − s_b|
    Selection probabilities under a quota q (candidate c in the top q / not in the top q):
        P_i(c) = Σ_{k≤q} P̂[k, c] / sg(Σ_k P̂[k, c])
        D_i(c) = Σ_{k>q} P̂[k, c] / sg(Σ_k P̂[k, c])                  (sg = stop-gradient)
    Losses (y = 1 for the GT candidates):
        L_e2e      = mean_c[ −y·log(∏_i P_i + ε) − (1 − y)·log(1 − ∏_i (1 − D_i) + ε) ]
        L_single^i = mean_c[ −y·log(P_i + ε) − (1 − y)·log(D_i + ε) ]
        L = Σ_i L_single^i / (2 w_i²) + L_e2e + log ∏_i w_i          (w_i trainable, start at 1)

What comes from the libraries and what is written here:
* P̂ is `tensorflow_ranking.python.losses_impl.neural_sort(s / τ, mask)`. The formula is linear in
  s, so dividing the scores by τ is the temperature. With a mask, TF-Ranking computes the matrix of
  the real candidates only (n = number of real ones, padded columns get probability 0 in real rows)
  and moves the padded rows to the end, so rows 1..n are the n sorting ranks.
* The selection probabilities, the losses, the masking and the uncertainty weighting
  (Kendall et al., CVPR 2018, as LCRON §4.3 uses it) are written here: no library has them.
* `LCRONLoss` (registry name "lcron", `models.losses.get`) is the objective as a Keras Loss:
  y_true = labels [B, L], y_pred = the stages' scores [B, S, L] (or a list of [B, L]), with
  `mask=` and the weights `w=` (default 1: L_e2e + Σ_i L_single^i / 2); the trainable w_i live on
  the `UncertaintyWeighting` layer of the model that trains them.

Conventions (documented choices, where the formulas leave room):
* Masking: padded candidates (mask 0) are left out of every sum and mean, and they do not
  enter the NeuralSort of the real candidates (their scores never matter).
* mean_c is the mean over the real candidates of a request; the batch loss is the mean over
  the requests that have at least one real candidate (every request weighs the same).
* ε (default 1e-8) also guards the logs of L_single: in float32, P or D can underflow to 0,
  and log 0 would make the loss infinite. This moves a term by at most ε / x.
* The quota q is one int for all stages (the reference code trains with q = 10 everywhere) or
  one per stage. 1 ≤ q ≤ n is required for every request with real candidates.
* w_i is stored as is (initialised to 1) and log ∏ w_i is computed as Σ log|w_i|, which is the
  formula for w_i > 0 and keeps the loss defined if a step ever crosses 0.
"""
from typing import List, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf
from tensorflow_ranking.python import losses_impl

from cascade_ranking.models import losses as losses_lib
from cascade_ranking.models.masking import bool_mask

DEFAULT_TAU = 50.0  # the reference code's temperature on logits (DESIGN §5)
DEFAULT_QUOTA = 10  # the reference code's quota on every stage
DEFAULT_EPSILON = 1e-8

Quota = Union[int, Sequence[int]]


def check_tau(tau) -> None:
    """ValueError unless τ > 0 (a tensor τ is checked when its value is known)."""
    value = tf.get_static_value(tau) if tf.is_tensor(tau) else tau
    if value is None:
        return
    if not np.all(np.asarray(value, dtype=np.float64) > 0):
        raise ValueError(f"tau must be > 0, got {value}")


def _check_same_shape(name: str, tensor: tf.Tensor, reference: tf.Tensor) -> None:
    if tensor.shape.rank != 2:
        raise ValueError(f"{name} must be [batch, list_size], got shape {tensor.shape}")
    if not tensor.shape.is_compatible_with(reference.shape):
        raise ValueError(f"{name} has shape {tensor.shape} but labels have shape {reference.shape}")


def stage_quotas(quota: Quota, num_stages: int) -> List[int]:
    """One quota per stage from an int or a sequence; ValueError on a wrong length or q < 1."""
    if isinstance(quota, (int, np.integer)):
        quotas = [int(quota)] * num_stages
    else:
        quotas = [int(q) for q in quota]
        if len(quotas) != num_stages:
            raise ValueError(f"quota has {len(quotas)} entries but there are {num_stages} stages")
    for q in quotas:
        if q < 1:
            raise ValueError(f"quota must be >= 1, got {q}")
    return quotas


def _check_quota_fits(max_quota: int, valid: tf.Tensor):
    """quota > the number of real candidates of a request → ValueError (eager) / assert (graph).

    Requests without any real candidate (batch padding) are not checked. Inside a tf.function the
    counts are not known when tracing, so the check becomes a `tf.debugging` assertion that raises
    InvalidArgumentError with the same message at run time.
    """
    counts = tf.reduce_sum(tf.cast(valid, tf.int32), axis=1)
    smallest = tf.reduce_min(tf.where(counts > 0, counts, tf.int32.max))
    message = f"quota {max_quota} > number of real candidates of a request"
    static = tf.get_static_value(smallest)
    if static is not None:
        if max_quota > int(static):
            raise ValueError(f"{message} ({int(static)})")
        return []
    return [tf.debugging.assert_less_equal(tf.constant(max_quota, tf.int32), smallest, message=message)]


def neural_sort(scores, mask=None, tau: float = DEFAULT_TAU) -> tf.Tensor:
    """P̂ = NeuralSort(s) at temperature τ, [B, L, L] (rows = ranks, columns = candidates).

    TF-Ranking's `neural_sort(s / τ, mask)`. Real rows come first; in them padded columns have
    probability 0. Every row sums to 1.
    """
    check_tau(tau)
    scores = tf.cast(tf.convert_to_tensor(scores), tf.float32)
    valid = bool_mask(mask, scores)
    return losses_impl.neural_sort(scores / tf.cast(tau, tf.float32), mask=valid)


def selection_probabilities(
    scores, mask=None, quota: int = DEFAULT_QUOTA, tau: float = DEFAULT_TAU, normalize: bool = True
) -> Tuple[tf.Tensor, tf.Tensor]:
    """(P, D), each [B, L]: the probabilities that a candidate is in / outside the top `quota`.

        P(c) = Σ_{k≤q} P̂[k, c] / sg(Σ_k P̂[k, c]),   D(c) = Σ_{k>q} P̂[k, c] / sg(Σ_k P̂[k, c])

    With normalize=False the denominators are left out: then P sums to exactly q over a request's
    real candidates (each of the q top rows of P̂ sums to 1). The column normalisation makes
    P + D = 1 for every real candidate; it keeps Σ_c P(c) close to, not exactly, q, because P̂ is
    not doubly stochastic. Padded candidates get P = D = 0.
    """
    scores = tf.cast(tf.convert_to_tensor(scores), tf.float32)
    valid = bool_mask(mask, scores)
    perm = neural_sort(scores, valid, tau)
    top = tf.reduce_sum(perm[:, :quota, :], axis=1)
    rest = tf.reduce_sum(perm[:, quota:, :], axis=1)
    if normalize:
        column = tf.stop_gradient(top + rest)
        column = tf.where(valid, column, tf.ones_like(column))
        top, rest = top / column, rest / column
    zeros = tf.zeros_like(top)
    return tf.where(valid, top, zeros), tf.where(valid, rest, zeros)


def _request_mean(per_candidate: tf.Tensor, valid_f: tf.Tensor) -> tf.Tensor:
    """Mean over real candidates per request, then over requests with a real candidate."""
    counts = tf.reduce_sum(valid_f, axis=1)
    per_candidate = tf.where(valid_f > 0, per_candidate, tf.zeros_like(per_candidate))
    per_request = tf.math.divide_no_nan(tf.reduce_sum(per_candidate, axis=1), counts)
    has_any = tf.cast(counts > 0, tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(per_request * has_any), tf.reduce_sum(has_any))


def lcron_losses(
    stage_scores: Sequence,
    labels,
    mask=None,
    quota: Quota = DEFAULT_QUOTA,
    tau: float = DEFAULT_TAU,
    epsilon: float = DEFAULT_EPSILON,
) -> Tuple[tf.Tensor, List[tf.Tensor]]:
    """LCRON's end-to-end and single-stage losses (DESIGN §5).

    Args:
        stage_scores: one [B, L] score tensor (logits) per cascade stage, earliest stage first.
        labels: [B, L], nonzero for the ground-truth candidates (y = 1).
        mask: [B, L], nonzero for real candidates, 0 for padding (None: no padding).
        quota: q, an int for every stage or one per stage; 1 ≤ q ≤ real candidates per request.
        tau: NeuralSort temperature τ > 0.
        epsilon: ε of the logs.

    Returns:
        (L_e2e, [L_single^1, …, L_single^m]), scalars. Combine them with `UncertaintyWeighting`.

    Raises:
        ValueError: no stages, shapes that differ, tau ≤ 0, quota < 1, or quota > the number of
            real candidates of a request (in graph mode that last check is a runtime assertion).
    """
    if isinstance(stage_scores, (tf.Tensor, np.ndarray)) or not len(stage_scores):
        raise ValueError("stage_scores must be a non-empty list of [batch, list_size] tensors, one per stage")
    check_tau(tau)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.float32)
    if labels.shape.rank != 2:
        raise ValueError(f"labels must be [batch, list_size], got shape {labels.shape}")
    scores = [tf.cast(tf.convert_to_tensor(s), tf.float32) for s in stage_scores]
    for i, s in enumerate(scores):
        _check_same_shape(f"stage_scores[{i}]", s, labels)
    if mask is not None:
        mask = tf.convert_to_tensor(mask)
        _check_same_shape("mask", mask, labels)
    valid = bool_mask(mask, labels)
    quotas = stage_quotas(quota, len(scores))
    if labels.shape[1] is not None and max(quotas) > labels.shape[1]:
        raise ValueError(f"quota {max(quotas)} > list size {labels.shape[1]}")
    checks = _check_quota_fits(max(quotas), valid)

    with tf.control_dependencies(checks):
        y = tf.where(valid, tf.cast(labels > 0, tf.float32), tf.zeros_like(labels))
        valid_f = tf.cast(valid, tf.float32)
        selected, dropped = zip(*(selection_probabilities(s, valid, q, tau) for s, q in zip(scores, quotas)))
        all_selected = tf.reduce_prod(tf.stack(selected), axis=0)
        all_kept_by_d = tf.reduce_prod(tf.stack([1.0 - d for d in dropped]), axis=0)
        # tf.maximum keeps grappler from folding (1 − x) + ε into (1 + ε) − x, which is 0 in float32.
        not_all_kept = tf.maximum(1.0 - all_kept_by_d, 0.0)
        e2e = -y * tf.math.log(all_selected + epsilon) - (1.0 - y) * tf.math.log(not_all_kept + epsilon)
        l_e2e = _request_mean(e2e, valid_f)
        singles = [
            _request_mean(-y * tf.math.log(p + epsilon) - (1.0 - y) * tf.math.log(d + epsilon), valid_f)
            for p, d in zip(selected, dropped)
        ]
    return l_e2e, singles


def uncertainty_weighted(l_e2e, singles, w) -> tf.Tensor:
    """Σ_i L_single^i / (2 w_i²) + L_e2e + Σ_i log|w_i| (Kendall et al.; LCRON §4.3)."""
    stacked = tf.stack([tf.cast(s, tf.float32) for s in singles])
    return (
        tf.reduce_sum(stacked / (2.0 * tf.square(w)))
        + tf.cast(l_e2e, tf.float32)
        + tf.reduce_sum(tf.math.log(tf.abs(w)))
    )


class UncertaintyWeighting(tf.keras.layers.Layer):
    """L = Σ_i L_single^i / (2 w_i²) + L_e2e + log ∏_i w_i, with trainable w_i starting at 1.

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses", CVPR 2018,
    as LCRON §4.3 applies it to the single-stage losses. log ∏ w_i is computed as Σ_i log|w_i|.
    """

    def __init__(self, num_stages: int, **kwargs):
        super().__init__(**kwargs)
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        self.num_stages = int(num_stages)
        self.w = self.add_weight(name="w", shape=[self.num_stages], initializer="ones", trainable=True)

    def call(self, l_e2e, singles):
        if len(singles) != self.num_stages:
            raise ValueError(f"{len(singles)} single-stage losses for {self.num_stages} weights")
        return uncertainty_weighted(l_e2e, singles, self.w)

    def get_config(self):
        config = super().get_config()
        config.update({"num_stages": self.num_stages})
        return config


@losses_lib.register("lcron")
class LCRONLoss(losses_lib.ExplicitLoss):
    """L = Σ_i L_single^i / (2 w_i²) + L_e2e + log ∏ w_i (module docstring) as a Keras Loss.

    y_true: labels [B, L]; y_pred: stage scores [B, S, L] or a list of S [B, L] tensors; `mask`
    [B, L]; `w` [S] (default ones). sample_weight is not part of the formula (None only).
    """

    def __init__(self, quota: Quota = DEFAULT_QUOTA, tau: float = DEFAULT_TAU, epsilon: float = DEFAULT_EPSILON,
                 name=None, **kwargs):
        check_tau(tau)
        super().__init__(name=name, **kwargs)
        self.quota = quota if isinstance(quota, (int, np.integer)) else tuple(int(q) for q in quota)
        self.tau = float(tau)
        self.epsilon = float(epsilon)

    @staticmethod
    def _stages(y_pred):
        if isinstance(y_pred, (list, tuple)):
            return list(y_pred)
        return tf.unstack(tf.convert_to_tensor(y_pred), axis=1)

    def terms(self, y_true, y_pred, mask=None, weighting=None, w=None):
        """(L, L_e2e, [L_single^i]) with the w_i of `weighting` (a layer) or `w` (default 1)."""
        stages = self._stages(y_pred)
        l_e2e, singles = lcron_losses(stages, y_true, mask, self.quota, self.tau, self.epsilon)
        if weighting is not None:
            total = weighting(l_e2e, singles)
        else:
            total = uncertainty_weighted(l_e2e, singles, tf.ones([len(stages)]) if w is None else w)
        return total, l_e2e, singles

    def compute(self, y_true, y_pred, sample_weight=None, mask=None, w=None):
        if sample_weight is not None:
            raise ValueError("the LCRON loss takes no sample_weight")
        return self.terms(y_true, y_pred, mask=mask, w=w)[0]

    def get_config(self):
        return {**super().get_config(), "quota": self.quota, "tau": self.tau, "epsilon": self.epsilon}
