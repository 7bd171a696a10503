"""TFRS-style tasks of the stage models and their one shared train/test step.

As `tfrs.Model` and `tfrs.tasks.*` (e.g. `models.retrieval.RetrievalModel` with
`tfrs.tasks.Retrieval`): each stage model implements `compute_loss(inputs, training)`, and a task
layer (a `tfrs.tasks.Task`) holds the stage's Loss objects (from the registry,
`models.losses.get`) and turns the model's outputs into the objective:

    FactoryFloorTask  L = (1 − α_t)·L_logistic + α_t·L_rank + w_d,t·L_distill + T_bias + λ·L_data(x̃)
                      (`models.ranker`, DESIGN §5)
    HAPTask           L = L_group(light; all groups) + L_group(strong; hard groups)
                      (`models.preranking`)
    CascadeTask       LCRON / BCE / ICC / HAP objective of a cascade (+ distillation)
                      (`models.cascade_model`)

Every task returns a dict of terms: "loss" (the objective, the sum of its weighted terms) plus
one entry per logged term; entries whose names start with "_" are step-internal (e.g. the
pre-update logits for the bias-constraint duals) and never logged.

`StageModel(tfrs.Model)` is the one train_step/test_step of the three stage models. tfrs.Model's
own step computes one scalar, applies every gradient with `self.optimizer` and logs the Keras
metrics; written here is only what it lacks:
  (a) `apply_gradients(grads_and_vars)`: a hook to step some variables with another optimizer
      (`CascadeModel` steps a nested ranker's variables with the ranker's own);
  (b) `after_step(terms)`: a hook run after the optimizer step with the step's terms (the
      ranker's bias-constraint dual ascent on the pre-update predictions, the cross-stack ramp);
  (c) variables without a gradient are left out of the step (tfrs passes None gradients on);
  (d) `step_logs(terms, training)`: the logged names and values (by default every term not
      starting with "_", the values of this batch), so trainers, callbacks and TensorBoard keep
      reading the names they read;
  (e) `build_train_step(batch)`: the step's variables created before `fit`, so it is traced once;
  (f) under a synchronous multi-replica strategy (`models.trainers.distribute`), the gradient of a
      replica's loss is divided by the number of replicas, so their sum is the gradient of the
      global batch's mean loss (Keras's compiled losses do the same; tfrs.Model does not);
  (g) the logs of a step are the mean over the replicas (`replica_mean`), not Keras's sum.
The steps are plain TF code (no Python control flow on tensors), so they are not converted by
autograph (`do_not_convert`): converting the stage models' code cost seconds per trace.
Like the hand-written steps it replaces, and unlike tfrs.Model's, it adds no `regularization_loss`
(no stage layer has a regularizer) and logs no `total_loss`.
"""
from typing import Dict, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from cascade_ranking.models import lcron, lspr
from cascade_ranking.models import losses as losses_lib

Terms = Dict[str, tf.Tensor]


def build_train_step(model: tfrs.Model, batch) -> None:
    """Creates every variable of a tfrs.Model's train step before `fit` traces it: the layers' (one
    eager `compute_loss` on `batch`, training=False) and the optimizers' slots (over
    `model.optimizer_variables(...)` where the model splits its variables between optimizers). A
    tf.function whose first trace creates variables is traced a second time without them; built
    first, the step is traced once (measured on the demo's cascade: its first epoch took 8.5 s with
    two traces, 6.5 s with one; the same losses to the last digit)."""
    model.compute_loss(batch, training=False)
    pairs = model.optimizer_variables(model.trainable_variables) if hasattr(model, "optimizer_variables") \
        else [(model.optimizer, model.trainable_variables)]
    for optimizer, variables in pairs:
        optimizer.build(variables)


def replica_mean(logs: Terms) -> Terms:
    """(g) Keras sums a step's logs over the replicas of a (non-TPU) strategy; each float log is
    divided by the replicas, so the logged value is their mean (unchanged in one process)."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas == 1:
        return logs
    return {name: value / replicas if value.dtype.is_floating else value for name, value in logs.items()}


class StageModel(tfrs.Model):
    """tfrs.Model plus the hooks (a)–(d) of the module docstring; subclasses implement
    `compute_terms(inputs, training) -> Terms` (with "loss")."""

    def compute_terms(self, inputs, training: bool = False) -> Terms:
        raise NotImplementedError("StageModel subclasses implement compute_terms")

    def compute_loss(self, inputs, training: bool = False) -> tf.Tensor:
        """The tfrs.Model contract: the scalar objective of a batch."""
        return self.compute_terms(inputs, training=training)["loss"]

    def apply_gradients(self, grads_and_vars) -> None:
        """(a) One optimizer step; override to split the variables between optimizers."""
        self.optimizer.apply_gradients(grads_and_vars)

    def after_step(self, terms: Terms) -> None:
        """(b) Runs after the optimizer step, with the terms of the step (pre-update values)."""

    def optimizer_variables(self, variables) -> list:
        """(optimizer, the variables it steps) pairs of `apply_gradients` (a)."""
        return [(self.optimizer, variables)]

    def build_train_step(self, batch) -> None:
        """(e) The step's variables, created before `fit` traces it (`build_train_step`)."""
        build_train_step(self, batch)

    def step_logs(self, terms: Terms, training: bool) -> Terms:
        """(d) The logs of a train (training=True) or test step."""
        return {name: value for name, value in terms.items() if not name.startswith("_")}

    @tf.autograph.experimental.do_not_convert
    def train_step(self, inputs):
        with tf.GradientTape() as tape:
            terms = self.compute_terms(inputs, training=True)
            # (f) Under MultiWorkerMirroredStrategy the replicas' gradients are summed: the loss of a
            # replica's share of the batch is divided by the replicas (1 without a strategy).
            objective = terms["loss"] / tf.distribute.get_strategy().num_replicas_in_sync
        variables = self.trainable_variables
        gradients = tape.gradient(objective, variables)
        self.apply_gradients([(g, v) for g, v in zip(gradients, variables) if g is not None])  # (c)
        self.after_step(terms)
        return replica_mean(self.step_logs(terms, training=True))

    @tf.autograph.experimental.do_not_convert
    def predict_step(self, data):
        return super().predict_step(data)

    @tf.autograph.experimental.do_not_convert
    def test_step(self, inputs):
        return replica_mean(self.step_logs(self.compute_terms(inputs, training=False), training=False))


class FactoryFloorTask(tf.keras.layers.Layer, tfrs.tasks.Task):
    """The Factory Floor objective (`models.ranker` docstring) from the model's outputs.

    Losses: "logistic", the per-request `list_loss` ("ranknet" by default; rows grouped by request)
    and "distillation" from the registry: a new per-request loss is one registered class, named
    by `RankerConfig.list_loss`.
    `data_loss` is L_data of one forward pass; `call` adds T_bias (computed by the model's
    `BiasConstraints`, which stay outside the model's variables) and the LSPR term λ·L_data(x̃)
    (`lspr.perturbed_term`). Terms: logistic, rank, distillation, bias, lspr, loss.
    """

    def __init__(self, rank_loss: bool = True, distillation: bool = False, lspr_weight: float = 0.0,
                 list_loss: str = "ranknet", **kwargs):
        super().__init__(**kwargs)
        self.rank_on = bool(rank_loss)
        self.distillation_on = bool(distillation)
        self.lspr_weight = float(lspr_weight)
        self.logistic = losses_lib.get("logistic")
        self.list_loss = losses_lib.get(list_loss)
        self.distillation = losses_lib.get("distillation")

    def data_loss(self, logit, rank_logit, labels, weights, grouping, teacher, alpha, w_distill):
        """(L_data, L_logistic, L_rank, L_distill) of one forward pass (0 for a term that is off)."""
        logistic = self.logistic(labels, logit, sample_weight=weights)
        rank = self.list_loss(labels, rank_logit, sample_weight=weights, grouping=grouping) if self.rank_on \
            else tf.constant(0.0)
        distill = self.distillation(teacher, logit, sample_weight=weights) if self.distillation_on \
            else tf.constant(0.0)
        total = (1.0 - alpha) * logistic + alpha * rank + w_distill * distill
        return total, logistic, rank, distill

    def call(self, outputs, labels, weights, grouping, teacher, loss_weights: Terms, bias=None,
             perturbed=None) -> Terms:
        """`outputs` / `perturbed`: (logit, rank_logit) of the batch and of its LSPR copy (None:
        no LSPR term); `loss_weights`: the curriculum's rank_weight and distill_weight."""
        alpha, w_distill = loss_weights["rank_weight"], loss_weights["distill_weight"]
        total, logistic, rank, distill = self.data_loss(*outputs, labels, weights, grouping, teacher,
                                                        alpha, w_distill)
        bias = tf.constant(0.0) if bias is None else bias
        total = total + bias
        if perturbed is not None:
            data = lambda out, y: self.data_loss(*out, y, weights, grouping, teacher, alpha, w_distill)[0]  # noqa: E731
            lspr_term = lspr.perturbed_term(data, perturbed, labels, self.lspr_weight)
        else:
            lspr_term = tf.constant(0.0)
        total = total + lspr_term
        return {"logistic": logistic, "rank": rank, "distillation": distill, "bias": bias, "lspr": lspr_term,
                "loss": total}


class HAPTask(tf.keras.layers.Layer, tfrs.tasks.Task):
    """HAP's objective: the light model's group-wise loss over all groups plus the strong model's
    over the hard groups (`models.preranking`). Terms: loss, light_loss, strong_loss, light_<group>."""

    def __init__(self, kind: str = "softmax", **kwargs):
        super().__init__(**kwargs)
        from cascade_ranking.models import preranking  # noqa: PLC0415 (preranking imports this module)
        self.groups = preranking.GROUPS
        self.light_loss = losses_lib.get("hap_group_wise", kind=kind)
        self.strong_loss = losses_lib.get("hap_group_wise", kind=kind, group_weights=preranking.hard_group_weights())

    def call(self, light_scores, strong_scores, positives, groups) -> Terms:
        light, light_terms = self.light_loss.terms(positives, light_scores, groups)
        strong, _ = self.strong_loss.terms(positives, strong_scores, groups)
        out = {"loss": light + strong, "light_loss": light, "strong_loss": strong}
        out.update({f"light_{g}": light_terms[i] for i, g in enumerate(self.groups)})
        return out


def list_distillation(loss: tf.keras.losses.Loss, teacher, mask, last_logits) -> tf.Tensor:
    """`loss` ("distillation") of the last stage's [B, L] logits on the real candidates with a
    finite teacher logit (the others become NaN, which the loss leaves out)."""
    teacher = tf.cast(tf.convert_to_tensor(teacher), tf.float32)
    keep = (tf.convert_to_tensor(mask) > 0) & tf.math.is_finite(teacher)
    teacher = tf.where(keep, teacher, tf.fill(tf.shape(teacher), np.float32(np.nan)))
    return loss(tf.reshape(teacher, [-1]), tf.reshape(last_logits, [-1]))


class CascadeTask(tf.keras.layers.Layer, tfrs.tasks.Task):
    """A cascade's objective over its stages' scores (`models.cascade_model` docstring).

    Losses: "lcron" (with the model's `UncertaintyWeighting` w_i), "logistic" per stage ("bce",
    "icc", the stages before HAP's two), `HAPTask` on the last two stages ("hap"), "distillation". The ICC joint term BCE(y, ∏_i σ(s_i)) is written here (no library has it).
    Terms as the cascade logs them: e2e, single_<stage>, w_<stage>; bce_<stage>; joint;
    hap_<stage>, hap_<light stage>_<group>; distill; loss.
    """

    def __init__(self, stage_names: Sequence[str], method: str, quota: lcron.Quota = lcron.DEFAULT_QUOTA,
                 tau: float = lcron.DEFAULT_TAU, hap_kind: str = "softmax", distill_weight: float = 0.0,
                 weighting: Optional[lcron.UncertaintyWeighting] = None, **kwargs):
        super().__init__(**kwargs)
        self.stage_names = tuple(stage_names)
        self.method = method
        self.distill_weight = float(distill_weight)
        self.weighting = weighting
        self.logistic = losses_lib.get("logistic")
        self.distillation = losses_lib.get("distillation")
        self.lcron = losses_lib.get("lcron", quota=quota, tau=tau) if method == "lcron" else None
        self.hap = HAPTask(hap_kind, name="hap") if method == "hap" else None  # the last two stages

    def distill(self, teacher, mask, last_logits) -> tf.Tensor:
        return list_distillation(self.distillation, teacher, mask, last_logits)

    def call(self, scores: Sequence[tf.Tensor], y, mask, hap_groups=None, teacher=None) -> Terms:
        """`scores`: one [B, L] per stage; `hap_groups`: (positives, groups) for method "hap";
        `teacher`: [B, L] teacher logits when distill_weight > 0."""
        out: Terms = {}
        if self.method == "lcron":
            total, e2e, singles = self.lcron.terms(y, list(scores), mask=mask, weighting=self.weighting)
            out["e2e"] = e2e
            for name, single, w in zip(self.stage_names, singles, tf.unstack(self.weighting.w)):
                out[f"single_{name}"] = single
                out[f"w_{name}"] = w
        elif self.method == "hap":
            positives, groups = hap_groups
            terms = [self.logistic(y, s, mask=mask) for s in scores[:-2]]
            for name, term in zip(self.stage_names, terms):
                out[f"bce_{name}"] = term
            hap = self.hap(scores[-2], scores[-1], positives, groups)
            light_stage, strong_stage = self.stage_names[-2:]
            out[f"hap_{light_stage}"] = hap["light_loss"]
            out[f"hap_{strong_stage}"] = hap["strong_loss"]
            for g in self.hap.groups:
                out[f"hap_{light_stage}_{g}"] = hap[f"light_{g}"]
            total = tf.add_n(terms + [hap["light_loss"], hap["strong_loss"]])
        else:
            singles = [self.logistic(y, s, mask=mask) for s in scores]
            total = tf.add_n(singles)
            for name, single in zip(self.stage_names, singles):
                out[f"bce_{name}"] = single
            if self.method == "icc":
                log_p = tf.add_n([tf.math.log_sigmoid(s) for s in scores])  # log ∏ σ(s_i)
                p = tf.exp(log_p)
                joint = -y * log_p - (1.0 - y) * tf.math.log(tf.maximum(1.0 - p, 0.0) + 1e-8)
                valid = tf.cast(mask > 0, tf.float32)
                joint = tf.math.divide_no_nan(tf.reduce_sum(tf.where(valid > 0, joint, 0.0)), tf.reduce_sum(valid))
                out["joint"] = joint
                total = total + joint
        if self.distill_weight > 0.0:
            out["distill"] = self.distill(teacher, mask, scores[-1])
            total = total + self.distill_weight * out["distill"]
        out["loss"] = total
        return out
