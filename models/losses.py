"""Ranking-stage losses: RankNet per request, logistic, multi-objective, distillation.

Anil et al., "On the Factory Floor: ML Engineering for Industrial-Scale Ads
Recommendation Models" (2022), §4.1.

* Rank loss (§4.1.1): RankNet (Burges et al., 2005) pairwise logistic loss
  within each request list,

  ```
  L_rank = (1 / n_valid) · Σ_requests Σ_{i,j in request, y_i > y_j}
           w_i · log(1 + exp(-(s_i - s_j)))
  ```

  computed by `tfr.keras.losses.PairwiseLogisticLoss` (padding is passed to it
  as labels < 0, its own convention). Pairs across requests never count:
  requests are rows of a [B, L] tensor. `n_valid` is the number of non-padded
  candidates. TF-Ranking's default Keras reduction (SUM_OVER_BATCH_SIZE)
  divides the same sum by B·L, padded slots included; the two agree when
  nothing is padded, but dividing by B·L would make the value depend on how
  much padding a batch has, so the sum is taken with `Reduction.SUM` and
  divided by `n_valid` here. `w_i` is an optional per-candidate weight which,
  as in TF-Ranking, weights the pairs where candidate i is the preferred one.
* Multi-objective on one logit (§4.1.1): `α·L_rank + (1−α)·L_logistic`.
* Distillation (§4.1.2): binary cross-entropy of the student logit against the
  teacher's soft label `sigmoid(teacher_logit)`; rows whose teacher logit is
  NaN (not recorded) are left out.

Every loss here is "weighted sum over valid items / number of valid items"
(the Keras SUM_OVER_BATCH_SIZE convention restricted to valid items), so the
terms have comparable scales when they are added.

The row -> request-list grouping (`rows_to_lists`) and the masking and
normalisation around the TF-Ranking loss are written here; the pairwise loss
itself is TF-Ranking's.

Loss classes and the registry (as TF-Ranking's `keras/losses.py`). Every loss of
the package is a `tf.keras.losses.Loss` subclass registered by name with
`@register(name)`; `get(name, **kwargs)` builds one (`known()` lists the names).
The classes call the functional forms below (one implementation of each
formula). Convention of their `__call__`:

    loss(y_true, y_pred, sample_weight=None, **inputs) -> scalar

`sample_weight` enters the formula itself (Σ w·ℓ over valid items / number of
valid items): that normalisation is none of Keras' reductions, so, as
TF-Ranking's ranking losses do, `__call__` is overridden and passes the weights
in; `reduction` is not used. Inputs a loss needs beyond (y_true, y_pred) are
keyword arguments: `mask` (padding), `grouping` (RankNet on flat rows),
`groups` (HAP), `w` (LCRON's uncertainty weights). `call(y_true, y_pred)` is
the unweighted, unmasked value (what `Model.compile(loss=...)` would use).
Losses registered in other modules (`models.lcron`, `models.preranking`,
`models.lspr`) are imported by `get`/`known` on first use. Written here: the
registry and the Keras wrappers; the pairwise loss stays TF-Ranking's.
"""

import importlib
from typing import Dict, Optional, Sequence, Tuple, Type

import tensorflow as tf
import tensorflow_ranking as tfr

from cascade_ranking.models.masking import bool_mask


def _f32(x) -> tf.Tensor:
    return tf.cast(tf.convert_to_tensor(x), tf.float32)


def _valid_mask(labels: tf.Tensor, mask) -> tf.Tensor:
    return bool_mask(mask, labels)


def _masked_weighted_mean(per_item: tf.Tensor, valid: tf.Tensor, sample_weight=None) -> tf.Tensor:
    """Σ w·loss over valid items / number of valid items (the convention of every loss here)."""
    weight = tf.ones_like(per_item)
    if sample_weight is not None:
        weight = weight * _f32(sample_weight)
    weight = tf.where(valid, weight, tf.zeros_like(weight))
    n_valid = tf.reduce_sum(tf.cast(valid, tf.float32))
    return tf.math.divide_no_nan(tf.reduce_sum(weight * per_item), n_valid)


def ranknet_loss(labels,
                 logits,
                 mask=None,
                 sample_weight=None) -> tf.Tensor:
    """RankNet (pairwise logistic) loss over request lists.

    Args:
        labels: [B, L] graded relevance (clicks 0/1), one request per row.
        logits: [B, L] scores.
        mask: [B, L], nonzero/True for real candidates, 0/False for padding.
            None means no padding.
        sample_weight: optional [B, L] per-candidate weights (or [B, 1] per list).

    Returns:
        Scalar: Σ over within-request pairs with y_i > y_j of
        w_i·log(1 + exp(-(s_i - s_j))), divided by the number of valid candidates.
        Values in padded slots (labels, logits, weights) never matter.
    """
    labels = _f32(labels)
    logits = _f32(logits)
    labels.shape.assert_has_rank(2)
    valid = _valid_mask(labels, mask)
    # TF-Ranking marks padding with labels < 0. Zero the padded logits so that
    # garbage there (inf/NaN) cannot leak in through 0 * inf.
    tfr_labels = tf.where(valid, labels, -tf.ones_like(labels))
    clean_logits = tf.where(valid, logits, tf.zeros_like(logits))
    if sample_weight is not None:
        sample_weight = _f32(sample_weight)
        sample_weight = tf.where(
            valid, sample_weight * tf.ones_like(labels), tf.zeros_like(labels))
    pairwise = tfr.keras.losses.PairwiseLogisticLoss(
        reduction=tf.keras.losses.Reduction.SUM)
    total = pairwise(tfr_labels, clean_logits, sample_weight=sample_weight)
    n_valid = tf.reduce_sum(tf.cast(valid, tf.float32))
    return tf.math.divide_no_nan(total, n_valid)


def rows_to_lists(request_ids,
                  tensors: Sequence,
                  pad_values: Optional[Sequence[float]] = None
                 ) -> Tuple[list, tf.Tensor]:
    """Groups flat candidate rows into dense per-request lists.

    Args:
        request_ids: [N] request id of every row (any int/string dtype, any order).
        tensors: [N]-shaped tensors to group (labels, logits, weights...).
        pad_values: value for the padded slots of each tensor (default 0).

    Returns:
        (lists, mask): `lists[t]` is [R, max_list] with the rows of request r (in
        their original order) in row r, R = number of distinct request ids in order
        of first appearance; `mask` is a [R, max_list] bool of real slots.
    """
    request_ids = tf.reshape(tf.convert_to_tensor(request_ids), [-1])
    unique_ids, segment = tf.unique(request_ids, out_idx=tf.int64)
    num_requests = tf.size(unique_ids, out_type=tf.int64)
    order = tf.argsort(segment, stable=True)
    rowids = tf.gather(segment, order)
    if pad_values is None:
        pad_values = [0.0] * len(tensors)
    lists = []
    for t, pad in zip(tensors, pad_values):
        t = tf.reshape(tf.convert_to_tensor(t), [-1])
        ragged = tf.RaggedTensor.from_value_rowids(
            tf.gather(t, order), rowids, nrows=num_requests)
        lists.append(ragged.to_tensor(default_value=tf.cast(pad, t.dtype)))
    ones = tf.RaggedTensor.from_value_rowids(
        tf.ones_like(rowids, dtype=tf.bool), rowids, nrows=num_requests)
    mask = ones.to_tensor(default_value=False)
    return lists, mask


def ranknet_loss_from_rows(labels,
                           logits,
                           request_ids,
                           sample_weight=None) -> tf.Tensor:
    """`ranknet_loss` for a flat batch of candidate rows with request ids.

    Rows are grouped into a dense [num_requests, max_list] layout with
    `rows_to_lists`, so only rows of the same request form pairs.

    Args:
        labels: [N] labels.
        logits: [N] scores.
        request_ids: [N] request id per row.
        sample_weight: optional [N] per-row weights.

    Returns:
        Scalar, equal to Σ within-request pairs / N.
    """
    tensors = [_f32(labels), _f32(logits)]
    if sample_weight is not None:
        tensors.append(_f32(sample_weight))
    lists, mask = rows_to_lists(request_ids, tensors)
    weight = lists[2] if sample_weight is not None else None
    return ranknet_loss(lists[0], lists[1], mask, sample_weight=weight)


def weighted_logistic_loss(labels,
                           logits,
                           sample_weight=None,
                           mask=None) -> tf.Tensor:
    """Σ_i w_i · BCE(y_i, sigmoid(s_i)) / (number of valid items).

    Args:
        labels: labels in [0, 1], any shape.
        logits: same shape.
        sample_weight: optional weights broadcastable to labels (e.g. the 1/r
            importance weights of downsampling).
        mask: optional validity mask (padding = 0/False), same shape as labels.
    """
    labels = _f32(labels)
    logits = _f32(logits)
    valid = _valid_mask(labels, mask)
    clean_logits = tf.where(valid, logits, tf.zeros_like(logits))
    clean_labels = tf.where(valid, labels, tf.zeros_like(labels))
    per_item = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=clean_labels, logits=clean_logits)
    return _masked_weighted_mean(per_item, valid, sample_weight)


def multi_objective_loss(labels,
                         logits,
                         mask=None,
                         alpha: float = 0.5,
                         sample_weight=None) -> tf.Tensor:
    """alpha · L_rank + (1 - alpha) · L_logistic, both on the same [B, L] logits."""
    if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    alpha = _f32(alpha)
    rank = ranknet_loss(labels, logits, mask, sample_weight=sample_weight)
    logistic = weighted_logistic_loss(
        labels, logits, sample_weight=sample_weight, mask=mask)
    return alpha * rank + (1.0 - alpha) * logistic


def distillation_loss(teacher_logit,
                      student_logit,
                      sample_weight=None) -> tf.Tensor:
    """Cross-entropy of the student against the soft label sigmoid(teacher_logit).

    ```
    p_i = sigmoid(t_i)
    L = Σ_{i: t_i not NaN} w_i · [-p_i log σ(s_i) - (1 - p_i) log(1 - σ(s_i))]
            / #{i: t_i not NaN}
    ```

    Rows with a NaN teacher logit (the teacher pass did not score them)
    contribute to neither the sum nor the count. No gradient flows to the
    teacher logit.

    Args:
        teacher_logit: [N] teacher logits, NaN where missing.
        student_logit: [N] student logits.
        sample_weight: optional [N] weights.
    """
    teacher_logit = _f32(teacher_logit)
    student_logit = _f32(student_logit)
    present = tf.logical_not(tf.math.is_nan(teacher_logit))
    soft = tf.stop_gradient(tf.sigmoid(
        tf.where(present, teacher_logit, tf.zeros_like(teacher_logit))))
    per_row = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=soft, logits=student_logit)
    return _masked_weighted_mean(per_row, present, sample_weight)


# ---------------------------------------------------------------------------------------------
# Registry and Loss classes.
# ---------------------------------------------------------------------------------------------
_REGISTRY: Dict[str, Type[tf.keras.losses.Loss]] = {}
# Modules that register losses of their own technique (imported by `get` / `known`).
_REGISTERING_MODULES = ("cascade_ranking.models.lcron", "cascade_ranking.models.preranking",
                        "cascade_ranking.models.lspr")


def register(name: str):
    """Class decorator: registers a `tf.keras.losses.Loss` subclass under `name`."""
    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, tf.keras.losses.Loss)):
            raise TypeError(f"{cls!r} is not a tf.keras.losses.Loss subclass")
        if _REGISTRY.get(name, cls) is not cls:
            raise ValueError(f"loss {name!r} is already registered ({_REGISTRY[name].__name__})")
        _REGISTRY[name] = cls
        cls.registered_name = name
        return cls
    return decorate


def _load_all() -> None:
    for module in _REGISTERING_MODULES:
        importlib.import_module(module)


def known() -> Tuple[str, ...]:
    """The registered loss names, sorted."""
    _load_all()
    return tuple(sorted(_REGISTRY))


def get_class(name: str) -> Type[tf.keras.losses.Loss]:
    """The Loss class registered as `name`; ValueError naming it and the known ones otherwise."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get(name: str, **kwargs) -> tf.keras.losses.Loss:
    """A new instance of the loss registered as `name`, built with `kwargs`."""
    return get_class(name)(**kwargs)


class ExplicitLoss(tf.keras.losses.Loss):
    """Base of the package's losses: `__call__(y_true, y_pred, sample_weight=None, **inputs)`
    returns `self.compute(...)`, a scalar already normalised by the formula (module docstring);
    Keras' reduction is not applied. `call` is `compute` without weights or extra inputs."""

    def __init__(self, name: Optional[str] = None, **kwargs):
        super().__init__(name=name or getattr(type(self), "registered_name", None),
                         reduction=tf.keras.losses.Reduction.NONE, **kwargs)

    def compute(self, y_true, y_pred, sample_weight=None, **inputs) -> tf.Tensor:
        raise NotImplementedError

    def __call__(self, y_true, y_pred, sample_weight=None, **inputs) -> tf.Tensor:
        with tf.name_scope(self.name or "loss"):
            return self.compute(y_true, y_pred, sample_weight=sample_weight, **inputs)

    def call(self, y_true, y_pred):
        return self.compute(y_true, y_pred)

    def get_config(self):
        return {"name": self.name}


@register("ranknet")
class RankNetLoss(ExplicitLoss):
    """RankNet per request (module docstring). y_true, y_pred: [B, L] request lists with `mask`,
    or flat [N] rows with `grouping` = the [N] request ids (`ranknet_loss_from_rows`) or a
    precomputed layout (list_index [R, L], mask [R, L]) of `rows_to_lists` (both give the same
    value)."""

    def compute(self, y_true, y_pred, sample_weight=None, mask=None, grouping=None):
        if grouping is None:
            return ranknet_loss(y_true, y_pred, mask, sample_weight=sample_weight)
        if isinstance(grouping, tuple):
            index, list_mask = grouping
            gather = lambda x: tf.gather(_f32(x), index)  # noqa: E731
            weight = None if sample_weight is None else gather(sample_weight)
            return ranknet_loss(gather(y_true), gather(y_pred), list_mask, sample_weight=weight)
        return ranknet_loss_from_rows(y_true, y_pred, grouping, sample_weight=sample_weight)


@register("logistic")
class LogisticLoss(ExplicitLoss):
    """`weighted_logistic_loss`: Σ_i w_i BCE(y_i, σ(s_i)) / (number of valid items)."""

    def compute(self, y_true, y_pred, sample_weight=None, mask=None):
        return weighted_logistic_loss(y_true, y_pred, sample_weight=sample_weight, mask=mask)


@register("multi_objective")
class MultiObjectiveLoss(ExplicitLoss):
    """`multi_objective_loss`: α·L_rank + (1 − α)·L_logistic on one [B, L] logit."""

    def __init__(self, alpha: float = 0.5, name: Optional[str] = None, **kwargs):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        super().__init__(name=name, **kwargs)
        self.alpha = float(alpha)

    def compute(self, y_true, y_pred, sample_weight=None, mask=None):
        return multi_objective_loss(y_true, y_pred, mask, alpha=self.alpha, sample_weight=sample_weight)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha}


@register("distillation")
class DistillationLoss(ExplicitLoss):
    """`distillation_loss`: y_true = teacher logits (NaN = absent), y_pred = student logits."""

    def compute(self, y_true, y_pred, sample_weight=None):
        return distillation_loss(y_true, y_pred, sample_weight=sample_weight)


def __getattr__(name):
    """`losses.lcron_losses` stays importable from here (it lives in `models.lcron`)."""
    if name == "lcron_losses":
        from cascade_ranking.models.lcron import lcron_losses
        return lcron_losses
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
