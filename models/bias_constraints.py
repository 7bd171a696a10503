"""Slice-level calibration constraints trained with dual variables.

Anil et al., "On the Factory Floor: ML Engineering for Industrial-Scale Ads
Recommendation Models" (2022), §7: the model is trained on the saddle point

```
min_W max_λ  Σ_i L(y_i, ŷ_i) + Σ_k Σ_{i∈S_k} (λ_k (y_i − ŷ_i) − α/2 · λ_k²)
```

with one dual λ_k per slice S_k (buckets of predicted CTR, values of a UI
feature such as `ui_position`, ...). With per-row weights w_i (the
`sample_weight` of the importance-weighted sampling; 1 when absent),
r_k = Σ_{i∈S_k} w_i (y_i − ŷ_i) and c_k = Σ_{i∈S_k} w_i in a batch of N rows,
the term added to the model's loss is

```
T = m/N · Σ_k (λ_k r_k − α/2 · λ_k² c_k)
```

and the duals take a gradient *ascent* step of their own learning rate η:

```
λ_k ← λ_k + η · ∂T/∂λ_k = λ_k + η · m/N · (r_k − α λ_k c_k)
```

m is the ramp-up multiplier (e.g. `curriculum.bias_constraint(step)`). A slice
that is under-predicted (r_k > 0) gets λ_k > 0, and then ∂T/∂ŷ_i = −m λ_k/N < 0
pushes its predictions up; at a fixed point λ_k = r_k / (α c_k), so the slice's
weighted mean residual r_k / c_k is driven to α·λ_k (small α = tight
constraint). N is the row count, the normaliser of the weighted logistic loss
(`losses.weighted_logistic_loss`), so T has the data loss's scale; with w ≡ 1
it is the unweighted formula.

The duals are plain non-trainable `tf.Variable`s on a `tf.Module`: they are not
in a model's `trainable_variables` (the primal optimizer never touches them),
and nothing in a serving signature reads them. The ranker tracks this module
for checkpoints only (`models.ranker.FactoryFloorRanker._trackable_children`),
so a training checkpoint (BackupAndRestore) restores them while the SavedModel
leaves them out. Written by hand: no TF library ships it.

`slice_bias` is the calibration-bias metric of DESIGN §8, Σ(y − ŷ)/Σy per slice.
"""

from typing import Optional, Sequence

import numpy as np
import tensorflow as tf


def slice_bias(labels, predictions, slice_ids, num_slices: int) -> tf.Tensor:
    """Σ_{i∈S_k}(y_i − ŷ_i) / Σ_{i∈S_k} y_i per slice k (NaN where Σy = 0).

    Args:
        labels: [N] labels.
        predictions: [N] predicted probabilities.
        slice_ids: [N] int slice of every row; ids outside [0, num_slices) are
            ignored.
        num_slices: K.

    Returns:
        [K] float32 tensor.
    """
    labels = tf.reshape(tf.cast(labels, tf.float32), [-1])
    predictions = tf.reshape(tf.cast(predictions, tf.float32), [-1])
    slice_ids = tf.reshape(tf.cast(slice_ids, tf.int32), [-1])
    member = tf.one_hot(slice_ids, num_slices, dtype=tf.float32)  # [N, K]
    residual = tf.linalg.matvec(member, labels - predictions, transpose_a=True)
    positives = tf.linalg.matvec(member, labels, transpose_a=True)
    nan = tf.fill(tf.shape(positives), float("nan"))
    return tf.where(positives > 0, residual / tf.where(
        positives > 0, positives, tf.ones_like(positives)), nan)


def slice_bias_np(labels, predictions, slice_ids, num_slices: int) -> np.ndarray:
    """NumPy version of `slice_bias` (for evaluators that do not run TF)."""
    labels = np.asarray(labels, np.float64).reshape(-1)
    predictions = np.asarray(predictions, np.float64).reshape(-1)
    slice_ids = np.asarray(slice_ids).reshape(-1)
    out = np.full(num_slices, np.nan)
    for k in range(num_slices):
        in_k = slice_ids == k
        positives = labels[in_k].sum()
        if positives > 0:
            out[k] = (labels[in_k] - predictions[in_k]).sum() / positives
    return out


class BiasConstraints(tf.Module):
    """Duals λ_k for slices of predicted-CTR buckets and/or a categorical feature.

    Slices are numbered: first the `len(ctr_boundaries) + 1` buckets of the
    predicted CTR (bucket b holds boundaries[b-1] <= ŷ < boundaries[b]), then the
    `num_categories` values of the categorical feature. A row belongs to one
    slice of each family in use. Pass your own ids to `lagrangian`/`update_duals`
    to slice differently (shape [N] or [N, F], ids in [0, num_slices)).

    Args:
        ctr_boundaries: Increasing predicted-CTR bucket boundaries; empty for no
            CTR buckets.
        num_categories: Number of values of the categorical slice feature (0 for
            none). Values outside [0, num_categories) belong to no slice.
        alpha: Weight of the −α/2·λ² regulariser (> 0 keeps the duals bounded).
        dual_learning_rate: η, the duals' own ascent step size.
        num_slices: Total number of slices when neither of the above is given
            (caller-provided ids only).
    """

    def __init__(self,
                 ctr_boundaries: Sequence[float] = (),
                 num_categories: int = 0,
                 alpha: float = 1.0,
                 dual_learning_rate: float = 0.01,
                 num_slices: Optional[int] = None,
                 name: Optional[str] = None):
        super().__init__(name=name)
        self.ctr_boundaries = [float(b) for b in ctr_boundaries]
        if any(b2 <= b1 for b1, b2 in zip(self.ctr_boundaries,
                                           self.ctr_boundaries[1:])):
            raise ValueError("ctr_boundaries must be strictly increasing.")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}.")
        self.num_buckets = len(self.ctr_boundaries) + 1 if self.ctr_boundaries else 0
        self.num_categories = int(num_categories)
        derived = self.num_buckets + self.num_categories
        if num_slices is None:
            num_slices = derived
        elif derived and num_slices != derived:
            raise ValueError(f"num_slices={num_slices} but the slicing gives {derived}.")
        if num_slices <= 0:
            raise ValueError("No slices: give ctr_boundaries, num_categories or "
                             "num_slices.")
        self.num_slices = int(num_slices)
        self.alpha = float(alpha)
        self.dual_learning_rate = float(dual_learning_rate)
        self.duals = tf.Variable(
            tf.zeros([self.num_slices], tf.float32), trainable=False,
            name="bias_duals",
            # Under a multi-replica strategy each replica ascends on its share of the batch: the
            # replicas' steps are averaged (the ascent step on the global batch).
            aggregation=tf.VariableAggregation.MEAN)

    def slice_ids(self, predictions, categories=None) -> tf.Tensor:
        """[N, F] slice ids: CTR bucket of `predictions`, then offset `categories`."""
        predictions = tf.reshape(tf.cast(predictions, tf.float32), [-1])
        columns = []
        if self.num_buckets:
            buckets = tf.searchsorted(
                tf.constant(self.ctr_boundaries, tf.float32), predictions,
                side="right", out_type=tf.int32)
            columns.append(buckets)
        if self.num_categories:
            if categories is None:
                raise ValueError("This BiasConstraints slices by a categorical "
                                 "feature: pass `categories`.")
            cats = tf.reshape(tf.cast(categories, tf.int32), [-1])
            ok = tf.logical_and(cats >= 0, cats < self.num_categories)
            columns.append(tf.where(ok, cats + self.num_buckets,
                                    tf.fill(tf.shape(cats), self.num_slices)))
        return tf.stack(columns, axis=1)

    def _membership(self, slice_ids) -> tf.Tensor:
        slice_ids = tf.cast(slice_ids, tf.int32)
        if slice_ids.shape.rank == 1:
            slice_ids = slice_ids[:, tf.newaxis]
        # [N, F, K] -> [N, K]; out-of-range ids one-hot to zeros.
        return tf.reduce_sum(
            tf.one_hot(slice_ids, self.num_slices, dtype=tf.float32), axis=1)

    def _residuals_and_counts(self, labels, predictions, slice_ids,
                              sample_weight=None):
        """(r [K], c [K], N): weighted residual sums, weight sums, row count."""
        labels = tf.reshape(tf.cast(labels, tf.float32), [-1])
        predictions = tf.reshape(tf.cast(predictions, tf.float32), [-1])
        weights = (tf.ones_like(labels) if sample_weight is None else
                   tf.reshape(tf.cast(sample_weight, tf.float32), [-1]))
        member = self._membership(slice_ids)
        r = tf.linalg.matvec(member, weights * (labels - predictions),
                             transpose_a=True)
        c = tf.linalg.matvec(member, weights, transpose_a=True)
        n = tf.cast(tf.size(labels), tf.float32)
        return r, c, n

    def lagrangian(self, labels, predictions, slice_ids, ramp=1.0,
                   sample_weight=None) -> tf.Tensor:
        """T = m/N · Σ_k (λ_k r_k − α/2 λ_k² c_k); differentiable in `predictions`."""
        r, c, n = self._residuals_and_counts(labels, predictions, slice_ids,
                                             sample_weight)
        lam = tf.stop_gradient(self.duals.read_value())
        term = tf.reduce_sum(lam * r - 0.5 * self.alpha * tf.square(lam) * c)
        return tf.cast(ramp, tf.float32) * tf.math.divide_no_nan(term, n)

    def dual_gradient(self, labels, predictions, slice_ids, ramp=1.0,
                      sample_weight=None) -> tf.Tensor:
        """∂T/∂λ_k = m/N · (r_k − α λ_k c_k)."""
        r, c, n = self._residuals_and_counts(
            labels, tf.stop_gradient(predictions), slice_ids, sample_weight)
        lam = self.duals.read_value()
        grad = tf.math.divide_no_nan(r - self.alpha * lam * c, n)
        return tf.cast(ramp, tf.float32) * grad

    def update_duals(self, labels, predictions, slice_ids, ramp=1.0,
                     sample_weight=None) -> tf.Tensor:
        """One ascent step λ ← λ + η ∂T/∂λ; returns the new duals."""
        grad = self.dual_gradient(labels, predictions, slice_ids, ramp,
                                  sample_weight)
        return self.duals.assign_add(self.dual_learning_rate * grad)

    def __call__(self, labels, predictions, slice_ids, ramp=1.0,
                 training: bool = True, sample_weight=None) -> tf.Tensor:
        """Returns T for the primal loss and, if training, then ascends the duals.

        T is computed with the duals before the update (simultaneous
        gradient descent-ascent).
        """
        term = self.lagrangian(labels, predictions, slice_ids, ramp,
                               sample_weight)
        if training:
            with tf.control_dependencies([term]):
                self.update_duals(labels, predictions, slice_ids, ramp,
                                  sample_weight)
        return term
