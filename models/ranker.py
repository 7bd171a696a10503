"""The Factory Floor ranking model: Q·U-factorised DCNv2 CTR model with the paper's training losses.

Anil et al., "On the Factory Floor: ML Engineering for Industrial-Scale Ads Recommendation
Models" (2022); the exact definitions are in DESIGN §5. Architecture:

    e = FeatureEmbedding(x)                                       (NaN dense -> nan_replacement)
    Q:  x0 = concat(e_f, f ∈ quality features)
        x_L = CrossStack(x0)       x_{l+1} = α(step)·(x0 ⊙ (U_l V_l x_l + b_l)) + x_l      (§4.3)
        h = DNN(x_L)               Dense or LowRankDense (§3.1) layers, ReLU/SmeLU (§5)
        q = W_q h                  q ∈ R^d
    U:  u = W_u MLP(concat(e_ui_position, e_ui_format))          u ∈ R^d
    ctr = τ(q·u) = σ(a·(q·u) + b),  a, b learned scalars                                (§6)

With `qu_dim = 0` there is no factorisation: one tower reads every input (the UI features
included) and a Dense(1) on h gives the logit. With `rank_loss = "multi_task"` a separate
Dense(1) rank head reads [h, u] (the shared body); the CTR logit keeps the logistic loss.

Training (`compute_loss` through `models.tasks.FactoryFloorTask`, stepped by the shared
`models.tasks.StageModel.train_step`), at step t = optimizer.iterations, with per-row weights w:

    α_t   = rank_alpha · ramp(t; rank_start_step, rank_ramp_steps)        (curriculum, §4.1.3)
    w_d,t = distill_weight · ramp(t; distill_start_step, distill_ramp_steps)
    m_t   = ramp(t; bias_start_step, bias_ramp_steps)
    L_data(batch) = (1 − α_t)·L_logistic(y, logit) + α_t·L_rank(y, rank_logit)
                    + w_d,t · L_distill(σ(teacher_logit), logit)
    L = L_data(x) + λ·L_data(x̃) + T_bias

  * L_logistic = Σ w_i BCE(y_i, σ(s_i)) / N  (registry "logistic", `losses.weighted_logistic_loss`);
  * L_rank = RankNet per request (registry "ranknet", `losses.ranknet_loss_from_rows`, grouping rows
    by request_id);
    in "multi_objective" form rank_logit is the CTR logit, in "multi_task" form its own head;
  * L_distill: rows with a NaN teacher_logit (absent) are left out (registry "distillation",
    `losses.distillation_loss`);
  * x̃ is the LSPR perturbed copy (dense + ω·N(0,1), embedding dropout p; `lspr.perturb_batch`,
    seed [lspr_seed, t]), λ = lspr_weight, 0 when LSPR is off;
  * T_bias = m_t/N · Σ_k (λ_k r_k − α/2 λ_k² c_k) over slices (predicted-CTR buckets and the values
    of `bias_slice_feature`), `bias_constraints.BiasConstraints`. The duals λ_k take one ascent
    step after each primal step (on the pre-update predictions); r_k and c_k are weighted by the
    rows' sample_weight. They live on a `tf.Module` that the model tracks for checkpoints only:
    they are not model variables (`model.variables`), training checkpoints (BackupAndRestore) save
    and restore them, and the SavedModel leaves them out (never read at inference).

Each term is reported in the training logs (`logistic`, `rank`, `distillation`, `bias`, `lspr`,
`loss`) with the ramped weights (`rank_weight`, `distill_weight`, `bias_weight`, `cross_alpha`).

Batches. The train step takes either a dict of parsed features (what `models.inputs.parsed_batches`
and `request_batches` below yield: the model inputs plus `click`, and optionally `request_id`,
`sample_weight`, `teacher_logit`), or a tuple `(features, label)` / `(features, label, weight)` with
the label and weight as tensors (request_id and teacher_logit may then ride in `features`).
`request_id` is required when the rank loss is on. A missing `sample_weight` is 1, a missing
`teacher_logit` is NaN (no distillation term).

The rank loss only has pairs inside a batch: a request's rows must arrive together, and never by
file order (ExampleGen, RunInference and Beam shuffle rows). The pipeline trains the ranker on the
NegativeSampler's request lists as the last stage of the joint cascade (`models.ranking_stage`,
which passes the list layout of each batch's shown rows as LIST_INDEX_KEY / LIST_MASK_KEY).
`request_batches` (the benches' path) groups rows by request_id explicitly in memory.

Cascade score. A candidate that the ranking stage orders in serving has not been shown, so the
score it is ordered by must not read its logged UI features (in logs, ui_position > 0 exactly when
it was shown: reading it would leak the label). `cascade_logit` (RankerConfig.cascade_score) is
    "reference_ui"  the CTR logit at a reference UI treatment (`reference_ui_position`,
                    `reference_ui_format`): τ(q·u_ref) with Q·U, else the one-tower logit with the UI
                    features set to the reference;
    "head"          an MLP on the quality body h (a second task on the shared body);
    "tower"         its own DCNv2 cross stack and MLP on the shared quality embeddings x0 (a
                    second task that shares the embeddings only; `RankerConfig.cascade_stage()`).
A head or tower is trained by a cascade loss only (`models.ranking_stage`): `compile()`, which
prepares training on rows, freezes it.

Optimisation: `compile()` builds the config's optimizer (Adagrad by default, as in the paper);
with `ema_momentum > 0` Keras keeps an exponential moving average of the weights and `fit` ends by
writing it into the model (the served weights). The embedding tables learn at
`embedding_lr_multiplier` × the learning rate (`models.embedding.FeatureEmbedding`).
With `optimizer: shampoo` (Factory Floor §4.2) there are two optimizers: `self.optimizer` is
Shampoo with AdaGrad grafting (`models.shampoo`) for every variable but the embedding tables, and
`embedding_optimizer` an Adagrad at the same learning rate (and EMA) for the tables (FeatureEmbedding's
variables), through the StageModel hooks (a) `apply_gradients` / `optimizer_variables`
(`optimizer_split`). `self.optimizer.iterations` (Shampoo's) stays the step of the curriculum;
the tables' Adagrad counts its own steps, which nothing reads. A checkpoint holds both optimizers
(the second is a checkpoint-only child, as the duals: not in the SavedModel), and `fit` ends by
writing each one's EMA into its own variables.
`build_and_train` does adapt + compile + fit.
"""
import dataclasses
import json
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from cascade_ranking.models import activations, bias_constraints, curriculum, inputs, losses, lspr
from cascade_ranking.models.bottleneck import LowRankDense
from cascade_ranking.models.config import config_from_dict, to_dict
from cascade_ranking.models.cross import CrossStack
from cascade_ranking.models.embedding import FeatureEmbedding
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.models.shampoo import Shampoo
from cascade_ranking.models.tasks import FactoryFloorTask, StageModel
from cascade_ranking.schema import features as F

LOSS_TERMS = ("loss", "logistic", "rank", "distillation", "bias", "lspr")
WEIGHT_TERMS = ("rank_weight", "distill_weight", "bias_weight", "cross_alpha")
# Optional batch entries added by `request_batches`: the request-list layout of the batch's rows
# (`losses.rows_to_lists` of the row indices), computed in the input pipeline, off the train step.
LIST_INDEX_KEY = "_request_list_index"
LIST_MASK_KEY = "_request_list_mask"
BIAS_CHECKPOINT_KEY = "bias_constraints"  # checkpoint-only child holding the duals (not in the SavedModel)
EMBEDDING_OPTIMIZER_KEY = "embedding_optimizer"  # checkpoint-only child: the tables' Adagrad of optimizer "shampoo"
# The default registry's views (the model's own come from its FeatureConfig).
DENSE_NAMES = tuple(f.name for f in F.DENSE_FEATURES)
QUALITY_FEATURES = tuple(f.name for f in F.SPARSE_FEATURES if f.tower == "quality") + DENSE_NAMES  # what Q reads


@dataclasses.dataclass
class ForwardOutput:
    logit: tf.Tensor  # [B] CTR logit
    rank_logit: tf.Tensor  # [B] score the rank loss sees (= logit unless multi_task)
    q: Optional[tf.Tensor]  # [B, d] (None without Q·U)
    u: Optional[tf.Tensor]  # [B, d]


class _Untracked:
    """Holds an object out of reach of Keras/tf.Module attribute tracking: not in `model.variables`
    nor in a SavedModel (`FactoryFloorRanker._trackable_children` adds the duals to checkpoints)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _flat(x, dtype=tf.float32) -> tf.Tensor:
    return tf.reshape(tf.cast(x, dtype), [-1])


class FactoryFloorRanker(StageModel):
    """Ranking model of DESIGN §5 (see the module docstring for the formulas).

    `call(features)` returns the CTR logit [B, 1] (what `models.export.serving_function` serves);
    `quality`, `ui` and `score_grid` are the Q·U serving paths.
    """

    def __init__(self, config: RankerConfig = RankerConfig(), features: F.FeatureConfig = F.DEFAULT, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.features = features
        c = config
        self.embedding = FeatureEmbedding(c.embedding_dim, features.sparse_features(), features.dense_features(),
                                          lr_multiplier=c.embedding_lr_multiplier, name="embedding")
        self.factorized = c.qu_dim > 0
        self.dense_names = tuple(f.name for f in features.dense_features())
        self.ui_names = features.ui_names
        if self.factorized and not self.ui_names:
            raise ValueError("the Q·U factorisation (qu_dim > 0) needs UI features (role ui) in features.inputs; "
                             "set ranker qu_dim: 0 for a one-tower ranker")
        self.quality_names = quality_input_names(c, features)
        self.cross = CrossStack(c.cross_layers, c.cross_projection_dim or None, c.cross_ramp_steps,
                                name="cross") if c.cross_layers else None
        self.activation_fn = activations.get_activation(c.activation)
        self.hidden = []
        for i, units in enumerate(c.hidden_units):
            if c.bottleneck_rank and c.bottleneck_rank < units:
                self.hidden.append(LowRankDense(units, c.bottleneck_rank, activation=c.activation, name=f"hidden_{i}"))
            else:
                self.hidden.append(tf.keras.layers.Dense(units, name=f"hidden_{i}"))
        if self.factorized:
            self.q_projection = tf.keras.layers.Dense(c.qu_dim, name="q")
            self.ui_hidden = [tf.keras.layers.Dense(units, name=f"ui_hidden_{i}") for i, units in enumerate(c.ui_hidden_units)]
            self.u_projection = tf.keras.layers.Dense(c.qu_dim, name="u")
            self.transfer_scale = self.add_weight(name="transfer_scale", shape=(), initializer="ones")
            self.transfer_bias = self.add_weight(name="transfer_bias", shape=(), initializer="zeros")
        else:
            self.logit_head = tf.keras.layers.Dense(1, name="logit")
        head_layers = [tf.keras.layers.Dense(u, activation="relu") for u in c.cascade_head_units] + [tf.keras.layers.Dense(1)]
        if c.cascade_score == "tower":
            head_layers = [CrossStack(c.cross_layers, c.cross_projection_dim or None, 0, name="cascade_cross")] + head_layers
        self.cascade_head = (tf.keras.Sequential(head_layers, name="cascade_head")
                             if c.cascade_score in ("head", "tower") else None)
        self.multi_task = c.rank_loss == "multi_task"
        if self.multi_task:
            self.rank_head = tf.keras.layers.Dense(1, name="rank_logit")
        self.curriculum = curriculum.Curriculum(
            rank=curriculum.Ramp(c.rank_alpha if c.rank_loss != "none" else 0.0, c.rank_start_step, c.rank_ramp_steps),
            distillation=curriculum.Ramp(c.distill_weight, c.distill_start_step, c.distill_ramp_steps),
            bias_constraint=curriculum.Ramp(1.0 if c.bias_constraints else 0.0, c.bias_start_step, c.bias_ramp_steps),
        )
        self._bias = _Untracked(self._make_bias_constraints(c, features) if c.bias_constraints else None)
        self._embedding_optimizer = _Untracked(None)  # set by compile(): the tables' Adagrad of "shampoo"
        self._loss_tracker = tf.keras.metrics.MeanTensor(name="loss_terms")  # running means of LOSS_TERMS
        self._eval_auc = tf.keras.metrics.AUC(from_logits=True, name="auc")
        self.task = FactoryFloorTask(rank_loss=c.rank_loss != "none", distillation=c.distill_weight > 0,
                                     lspr_weight=c.lspr_weight, list_loss=c.list_loss, name="task")

    @staticmethod
    def _make_bias_constraints(c: RankerConfig, features: F.FeatureConfig) -> bias_constraints.BiasConstraints:
        """Slices: the predicted-CTR buckets and the values of `bias_slice_feature`, a UI id
        feature of the registry (its bucket count is its number of values)."""
        ui = {f.name: f for f in features.sparse_features() if f.tower == "ui" and not f.multivalent}
        if c.bias_slice_feature and c.bias_slice_feature not in ui:
            raise ValueError(f"bias_slice_feature {c.bias_slice_feature!r} is not a UI id feature of features.inputs "
                             f"({', '.join(sorted(ui)) or 'none'})")
        if c.bias_slice_feature and ui[c.bias_slice_feature].dtype != "int64":
            raise ValueError(f"bias_slice_feature {c.bias_slice_feature!r} must be an int64 id feature")
        return bias_constraints.BiasConstraints(
            ctr_boundaries=c.bias_ctr_boundaries,
            num_categories=ui[c.bias_slice_feature].num_buckets if c.bias_slice_feature else 0,
            alpha=c.bias_alpha,
            dual_learning_rate=c.bias_dual_lr,
            name="ranker_bias_constraints",
        )

    # ---- Keras plumbing ------------------------------------------------------------------------
    def get_config(self):
        return {"config": self.config.to_json(), "features": json.dumps(to_dict(self.features))}

    @classmethod
    def from_config(cls, config):
        features = config_from_dict(F.FeatureConfig, json.loads(config.get("features", "{}")))
        return cls(RankerConfig.from_json(config["config"]), features)

    def compile(self, optimizer=None, **kwargs):
        """Compiles with the config's optimizer unless one is given; losses are built in. Compiling
        prepares training on candidate rows, where no cascade loss reaches a cascade head: it is
        frozen (a cascade stage trains it: `models.ranking_stage`)."""
        if self.cascade_head is not None:
            self.cascade_head.trainable = False
        if optimizer is None:
            optimizer = make_optimizer(self.config)
            self._embedding_optimizer.value = make_embedding_optimizer(self.config)
        else:  # a given optimizer steps every variable
            self._embedding_optimizer.value = None
        super().compile(optimizer=optimizer, **kwargs)

    @property
    def embedding_optimizer(self) -> Optional[tf.keras.optimizers.Optimizer]:
        """The embedding tables' own optimizer (Adagrad, with optimizer "shampoo"), None when
        `self.optimizer` steps every variable."""
        return self._embedding_optimizer.value

    def optimizer_variables(self, variables) -> list:
        """(optimizer, variables) pairs of `apply_gradients`: the embedding tables with
        `embedding_optimizer` when there is one, every other variable with `self.optimizer`."""
        return optimizer_split(self.optimizer, self.embedding_optimizer, self.embedding.trainable_variables,
                               variables)

    def apply_gradients(self, grads_and_vars) -> None:
        """One step of each optimizer on its variables (`optimizer_variables`)."""
        apply_split(self.optimizer_variables([v for _, v in grads_and_vars]), grads_and_vars)

    def fit(self, *args, **kwargs):
        """Keras `fit`; with an `embedding_optimizer` that keeps an EMA, training ends by writing it
        into the tables too, as Keras does for `self.optimizer`'s (`FinalizeEmbeddingOptimizer`)."""
        optimizer = self.embedding_optimizer
        if optimizer is not None and optimizer.use_ema:
            kwargs["callbacks"] = [FinalizeEmbeddingOptimizer()] + list(kwargs.get("callbacks") or [])
        return super().fit(*args, **kwargs)

    @property
    def metrics(self):
        return [self._loss_tracker, self._eval_auc]

    @property
    def bias_constraints(self) -> Optional[bias_constraints.BiasConstraints]:
        """The duals' module (outside the model's variables, in its checkpoints), or None when off."""
        return self._bias.value

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        """Adds the duals' module to checkpoints only (Keras does the reverse for a layer's
        `_random_generator`): `tf.train.Checkpoint(model=...)`, and so BackupAndRestore, saves and
        restores the duals; a SavedModel (save_type "savedmodel") never sees them."""
        children = super()._trackable_children(save_type, **kwargs)
        if save_type == "checkpoint" and self._bias.value is not None:
            children[BIAS_CHECKPOINT_KEY] = self._bias.value
        if save_type == "checkpoint" and self._embedding_optimizer.value is not None:
            children[EMBEDDING_OPTIMIZER_KEY] = self._embedding_optimizer.value
        return children

    def adapt(self, batches: tf.data.Dataset, steps: int = 50) -> None:
        """Fits the dense-feature normalisers on parsed training batches."""
        self.embedding.adapt(batches, steps)

    # ---- forward -------------------------------------------------------------------------------
    def _clean_dense(self, features: Dict[str, tf.Tensor], training=None) -> Dict[str, tf.Tensor]:
        """Replaces NaN dense inputs by `nan_replacement` (counted in embedding.nan_count in training).

        With nan_replacement == 0 FeatureEmbedding does it (and counts) itself.
        """
        if self.config.nan_replacement == 0.0:
            return features
        out = dict(features)
        for name in self.dense_names:
            if name in out:
                x = tf.cast(out[name], tf.float32)
                nans = tf.math.is_nan(x)
                if training:
                    self.embedding.nan_count.assign_add(tf.reduce_sum(tf.cast(nans, tf.int64)))
                out[name] = tf.where(nans, tf.fill(tf.shape(x), tf.constant(self.config.nan_replacement, tf.float32)), x)
        return out

    def embed(self, features: Dict[str, tf.Tensor], names: Iterable[str], training=None) -> Dict[str, tf.Tensor]:
        """name -> [B, dim]: embeddings of sparse features, normalised values of dense ones."""
        return self.embedding(self._clean_dense(features, training), names=tuple(names), training=training)

    def cross_step(self, step=None) -> tf.Tensor:
        """α of the cross stack at `step` (its own counter when None)."""
        if self.cross is None:
            return tf.constant(1.0)
        return self.cross.alpha_at(self.cross.step if step is None else step)

    def quality_from_embedded(self, embedded: Dict[str, tf.Tensor], training=None, step=None):
        """(h, q): the DNN body output and the Q vector (q is None without Q·U)."""
        x = tf.concat([embedded[name] for name in self.quality_names], axis=-1)
        if self.cross is not None:
            x = self.cross(x, training=training, step=step)
        for layer in self.hidden:
            x = layer(x)
            if not isinstance(layer, LowRankDense):
                x = self.activation_fn(x)
        q = self.q_projection(x) if self.factorized else None
        return x, q

    def ui_from_embedded(self, embedded: Dict[str, tf.Tensor]) -> tf.Tensor:
        x = tf.concat([embedded[name] for name in self.ui_names], axis=-1)
        for layer in self.ui_hidden:
            x = self.activation_fn(layer(x))
        return self.u_projection(x)

    def transfer(self, s: tf.Tensor) -> tf.Tensor:
        """τ before the sigmoid: logit = a·s + b."""
        return self.transfer_scale * s + self.transfer_bias

    def forward_embedded(self, embedded: Dict[str, tf.Tensor], training=None, step=None) -> ForwardOutput:
        h, q = self.quality_from_embedded(embedded, training=training, step=step)
        if self.factorized:
            u = self.ui_from_embedded(embedded)
            logit = self.transfer(tf.reduce_sum(q * u, axis=-1))
            body = tf.concat([h, u], axis=-1)
        else:
            u = None
            logit = tf.reshape(self.logit_head(h), [-1])
            body = h
        rank_logit = tf.reshape(self.rank_head(body), [-1]) if self.multi_task else logit
        return ForwardOutput(logit=logit, rank_logit=rank_logit, q=q, u=u)

    def flops(self) -> Dict[str, int]:
        """FLOPs per candidate and per UI treatment of this ranker: `ranker_flops` of its config and
        features (the layers follow the config, so the count needs no built model)."""
        return ranker_flops(self.config, self.features)

    @property
    def feature_names(self):
        """Every feature the model reads."""
        return tuple(dict.fromkeys(self.quality_names + (self.ui_names if self.factorized else ())))

    def forward(self, features: Dict[str, tf.Tensor], training=None, step=None, perturb_seed=None) -> ForwardOutput:
        """Full forward pass; with `perturb_seed` the LSPR-perturbed copy (stateless, reproducible)."""
        embedded = self.embed(features, self.feature_names, training=training)
        if perturb_seed is not None:
            embedded = self.perturb(embedded, perturb_seed)
        return self.forward_embedded(embedded, training=training, step=step)

    def perturb(self, embedded: Dict[str, tf.Tensor], seed) -> Dict[str, tf.Tensor]:
        """LSPR copy: dense + ω·N(0, 1) on normalised values, dropout p on sparse embeddings."""
        dense = {k: v for k, v in embedded.items() if k in self.dense_names}
        sparse = {k: v for k, v in embedded.items() if k not in self.dense_names}
        noisy, dropped = lspr.perturb_batch(dense, sparse, self.config.lspr_noise_scale,
                                            self.config.lspr_dropout_rate, seed)
        return {**noisy, **dropped}

    def lspr_seed(self, step) -> tf.Tensor:
        """The perturbation seed at `step`: [lspr_seed, step]."""
        return tf.stack([tf.constant(self.config.lspr_seed, tf.int64), tf.cast(step, tf.int64)])

    def reference_ui(self, features: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        """`features` with every UI feature replaced by the reference treatment (module docstring)."""
        anchor = next(v for name, v in sorted(features.items()) if not isinstance(v, tf.RaggedTensor))
        n = tf.shape(anchor)[0]  # rows of the batch (every feature is [N, ...])
        values = {"ui_position": self.config.reference_ui_position, "ui_format": self.config.reference_ui_format}
        out = dict(features)
        for name in self.ui_names:  # another UI feature of the registry takes its pad value (0, "" or 0.0)
            f = self.features.feature(name)
            value = values.get(name, f.pad_value)
            out[name] = tf.fill(tf.stack([n, f.width]), tf.constant(value, f.tf_dtype))  # [N, w] like a parsed value
        return out

    def cascade_logit(self, features: Dict[str, tf.Tensor], training=None, step=None) -> tf.Tensor:
        """[B]: the score the cascade orders by: the CTR logit at the reference UI treatment, or
        (cascade_score="head") the cascade head on the quality body h, or ("tower") the cascade tower
        on the embeddings. Never reads the logged UI: a one-tower ranker (qu_dim 0), whose quality
        inputs include the UI features, reads them at the reference treatment too (a candidate the
        ranking stage orders has not been shown; logged, ui_position > 0 would name the shown ones)."""
        if self.cascade_head is not None:
            if not self.factorized:
                features = self.reference_ui(features)
            embedded = self.embed(features, self.quality_names, training=training)
            if self.config.cascade_score == "tower":
                x0 = tf.concat([embedded[name] for name in self.quality_names], axis=-1)
                return tf.reshape(self.cascade_head(x0, training=training), [-1])
            h, _ = self.quality_from_embedded(embedded, training=training, step=step)
            if self.config.cascade_head_stop_gradient:
                h = tf.stop_gradient(h)
            return tf.reshape(self.cascade_head(h), [-1])
        return self.forward(self.reference_ui(features), training=training, step=step).logit

    def call(self, features: Dict[str, tf.Tensor], training=None) -> tf.Tensor:
        """CTR logit [B, 1]."""
        return self.forward(features, training=training).logit[:, tf.newaxis]

    def predict_ctr(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
        return tf.sigmoid(self.forward(features, training=False).logit)

    # ---- Q·U serving paths ---------------------------------------------------------------------
    def _require_factorized(self):
        if not self.factorized:
            raise ValueError("quality/ui/score_grid need the Q·U factorisation (qu_dim > 0)")

    def quality(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
        """q [B, d] from the quality features only (UI features are not read)."""
        self._require_factorized()
        _, q = self.quality_from_embedded(self.embed(features, self.quality_names, training=False), training=False)
        return q

    def ui(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
        """u [M, d] from the UI features only."""
        self._require_factorized()
        return self.ui_from_embedded(self.embed(features, self.ui_names, training=False))

    def grid_logits(self, quality_features, ui_features) -> tf.Tensor:
        """[A, M] logits of A ads × M UI treatments: Q runs once per ad, U once per treatment."""
        q = self.quality(quality_features)
        u = self.ui(ui_features)
        return self.transfer(tf.matmul(q, u, transpose_b=True))

    def score_grid(self, quality_features, ui_features) -> tf.Tensor:
        """[A, M] CTRs τ(q_a·u_m)."""
        return tf.sigmoid(self.grid_logits(quality_features, ui_features))

    # ---- training ------------------------------------------------------------------------------
    @staticmethod
    def unpack(data) -> Dict[str, tf.Tensor]:
        """A batch as one dict: accepts a features dict or (features, label[, weight])."""
        if isinstance(data, dict):
            return dict(data)
        data = tuple(data)
        batch = dict(data[0])
        if len(data) > 1 and data[1] is not None:
            batch[F.LABEL_KEY] = data[1]
        if len(data) > 2 and data[2] is not None:
            batch[F.SAMPLE_WEIGHT_KEY] = data[2]
        return batch

    def loss_weights(self, step) -> Dict[str, tf.Tensor]:
        """The ramped weights at `step`: rank_weight (α_t), distill_weight, bias_weight, cross_alpha."""
        w = self.curriculum.weights(step)
        return {"rank_weight": w["rank"], "distill_weight": w["distillation"],
                "bias_weight": w["bias_constraint"], "cross_alpha": self.cross_step(step)}

    def _batch_tensors(self, batch: Dict[str, tf.Tensor]):
        labels = _flat(batch[F.LABEL_KEY])
        n = tf.shape(labels)
        weights = _flat(batch[F.SAMPLE_WEIGHT_KEY]) if F.SAMPLE_WEIGHT_KEY in batch else tf.ones(n)
        teacher = (_flat(batch[F.TEACHER_LOGIT_KEY]) if F.TEACHER_LOGIT_KEY in batch
                   else tf.fill(n, float("nan")))
        if LIST_INDEX_KEY in batch and LIST_MASK_KEY in batch:
            request_ids = (batch[LIST_INDEX_KEY], batch[LIST_MASK_KEY])
        elif F.REQUEST_ID_KEY in batch:
            request_ids = tf.reshape(batch[F.REQUEST_ID_KEY], [-1])
        elif self.config.rank_loss != "none":
            raise ValueError(f"the rank loss needs `{F.REQUEST_ID_KEY}` in the batch (rows are grouped by request)")
        else:
            request_ids = None
        return labels, weights, teacher, request_ids

    def bias_slice_ids(self, batch: Dict[str, tf.Tensor], predictions: tf.Tensor) -> tf.Tensor:
        feature = self.config.bias_slice_feature
        categories = batch[feature] if feature else None
        return self.bias_constraints.slice_ids(tf.stop_gradient(predictions), categories)

    def loss_terms(self, data, step=None, training: bool = True) -> Dict[str, tf.Tensor]:
        """Every loss term and the total for one batch at `step` (no variable is updated).

        Returns a dict with LOSS_TERMS (`lspr` is λ·L_data(x̃), `bias` is the ramped T_bias),
        WEIGHT_TERMS, and `_logit` / `_slice_ids` / `_labels` / `_weights` for the dual update.
        """
        batch = self.unpack(data)
        if step is None:
            step = self.optimizer.iterations
        labels, weights, teacher, request_ids = self._batch_tensors(batch)
        w = self.loss_weights(step)
        out = self.forward(batch, training=training, step=step)
        extra = {}
        bias_term = None
        if self.bias_constraints is not None:
            slice_ids = self.bias_slice_ids(batch, tf.sigmoid(out.logit))
            bias_term = self.bias_constraints.lagrangian(labels, tf.sigmoid(out.logit), slice_ids, w["bias_weight"],
                                                         sample_weight=weights)
            extra["_slice_ids"] = slice_ids
        perturbed = None
        if self.config.lspr and training:
            p = self.forward(batch, training=training, step=step, perturb_seed=self.lspr_seed(step))
            perturbed = (p.logit, p.rank_logit)
        terms = self.task((out.logit, out.rank_logit), labels, weights, request_ids, teacher, w, bias=bias_term,
                          perturbed=perturbed)
        terms.update(extra)
        terms.update(_logit=out.logit, _labels=labels, _weights=weights)
        terms.update(w)
        return terms

    def compute_terms(self, data, training: bool = False) -> Dict[str, tf.Tensor]:
        """`loss_terms` at the optimizer's step (`models.tasks.StageModel`)."""
        return self.loss_terms(data, step=self.optimizer.iterations, training=training)

    def step_logs(self, terms, training: bool) -> Dict[str, tf.Tensor]:
        """Running means of LOSS_TERMS, the step's WEIGHT_TERMS, and in evaluation the AUC."""
        if not training:
            self._eval_auc.update_state(terms["_labels"], terms["_logit"])
        self._loss_tracker.update_state(tf.stack([tf.cast(terms[name], tf.float32) for name in LOSS_TERMS]))
        logs = dict(zip(LOSS_TERMS, tf.unstack(self._loss_tracker.result(), num=len(LOSS_TERMS))))
        logs.update({name: terms[name] for name in WEIGHT_TERMS})
        if not training:
            logs["auc"] = self._eval_auc.result()
        return logs

    def after_step(self, terms: Dict[str, tf.Tensor], iterations=None) -> None:
        """What follows a primal step: one ascent step of the bias-constraint duals (with the
        pre-update predictions in `terms`), and the cross stack's ramp step set to `iterations`
        (default: the optimizer's, after its step)."""
        if iterations is None:
            iterations = self.optimizer.iterations
        if self.bias_constraints is not None:
            self.bias_constraints.update_duals(
                terms["_labels"], tf.sigmoid(terms["_logit"]), terms["_slice_ids"], terms["bias_weight"],
                sample_weight=terms["_weights"])
        if self.cross is not None:  # the served α is the one reached by training
            self.cross.step.assign(tf.cast(iterations, tf.int64))


def quality_input_names(config: RankerConfig, features: F.FeatureConfig) -> Tuple[str, ...]:
    """The inputs of the quality tower, in its order: with Q·U the quality features (sparse first, as
    the package always has; U reads the UI ones), without it every input, sparse first."""
    if config.qu_dim > 0:
        return tuple(f.name for f in features.sparse_features() if f.tower == "quality") + \
            tuple(f.name for f in features.dense_features() if f.tower == "quality")
    return tuple(f.name for f in features.sparse_features()) + tuple(f.name for f in features.dense_features())


def input_sizes(config: RankerConfig, features: F.FeatureConfig) -> Dict[str, int]:
    """Width of each input as the ranker concatenates it: an embedding's dimension, a dense feature's size."""
    sizes = {f.name: config.embedding_dim for f in features.sparse_features()}
    sizes.update({f.name: f.size for f in features.dense_features()})
    return sizes


def ranker_flops(config: RankerConfig, features: F.FeatureConfig = F.DEFAULT) -> Dict[str, int]:
    """FLOPs in tf.profiler's convention (a matmul 2·m·k·n, a bias add or an element-wise op one per
    element, activations 0), from the concatenated inputs up; lookups and pooling not counted:
        ctr_per_candidate      cross stack + DNN (+ q projection, q·u and τ for a Q·U model)
        cascade_per_candidate  what the cascade score adds: a head's MLP on h, or a tower's
                               cross stack and MLP on the embeddings (0 for "reference_ui",
                               which is the CTR path at another UI treatment)
        per_candidate          both: what `serving_default` runs per candidate
        per_ui_treatment       the U tower (Q·U only; served from a cached table by `score_ui_grid`)
    A cross stack is `models.cross.cross_stack_flops` (L · (4·D·k + 3·D) + D on width D at rank
    k, L · (2·D² + 3·D) + D at full rank); a LowRankDense(units n, rank r) on width m is
    2·m·r + 2·r·n + n."""
    from cascade_ranking.models.cross import cross_stack_flops
    from cascade_ranking.models.retrieval import dense_flops

    c = config
    sizes = input_sizes(c, features)
    width = sum(sizes[name] for name in quality_input_names(c, features))
    cross_stack = cross_stack_flops(c.cross_layers, width, c.cross_projection_dim)
    cascade = 0
    if c.cascade_score == "tower":
        cascade = cross_stack + dense_flops((width,) + tuple(c.cascade_head_units) + (1,))
    elif c.cascade_score == "head":
        cascade = dense_flops((c.hidden_units[-1] if c.hidden_units else width,) + tuple(c.cascade_head_units) + (1,))
    total = cross_stack  # 0 without cross layers
    for units in c.hidden_units:
        if c.bottleneck_rank and c.bottleneck_rank < units:  # the LowRankDense the ranker builds
            total += 2 * width * c.bottleneck_rank + 2 * c.bottleneck_rank * units + units
        else:
            total += dense_flops((width, units))
        width = units
    out = {"ctr_per_candidate": total, "cascade_per_candidate": cascade}
    if c.qu_dim > 0:
        out["ctr_per_candidate"] += dense_flops((width, c.qu_dim)) + 2 * c.qu_dim + 2
        ui_width = sum(sizes[name] for name in features.ui_names)
        out["per_ui_treatment"] = dense_flops((ui_width,) + tuple(c.ui_hidden_units) + (c.qu_dim,))
    else:
        out["ctr_per_candidate"] += dense_flops((width, 1))
    out["per_candidate"] = out["ctr_per_candidate"] + cascade
    return out


def _ema(config: RankerConfig) -> dict:
    return dict(use_ema=True, ema_momentum=config.ema_momentum) if config.ema_momentum > 0 else {}


def make_optimizer(config: RankerConfig) -> tf.keras.optimizers.Optimizer:
    """The config's optimizer, with the EMA of `ema_momentum`: Adagrad, Adam, Shampoo with AdaGrad
    grafting (`models.shampoo`; with `make_embedding_optimizer` for the embedding tables) or TFRS's
    ClippyAdagrad."""
    name = config.optimizer.lower()
    ema = _ema(config)
    if name == "adagrad":
        return tf.keras.optimizers.Adagrad(config.learning_rate, **ema)
    if name == "adam":
        return tf.keras.optimizers.Adam(config.learning_rate, **ema)
    if name == "shampoo":
        return Shampoo(config.learning_rate, block_size=config.shampoo_block_size,
                       start_preconditioning_step=config.shampoo_start_step,
                       preconditioning_compute_steps=config.shampoo_update_every,
                       matrix_epsilon=config.shampoo_epsilon, beta2=config.shampoo_beta2,
                       momentum=config.shampoo_momentum, **ema)
    if name == "clippy_adagrad":
        try:
            from tensorflow_recommenders.experimental.optimizers import ClippyAdagrad
        except ImportError:
            raise ValueError("optimizer clippy_adagrad needs tensorflow_recommenders.experimental.optimizers."
                             "ClippyAdagrad, which the installed tensorflow-recommenders does not have") from None
        return ClippyAdagrad(config.learning_rate, **ema)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def make_embedding_optimizer(config: RankerConfig) -> Optional[tf.keras.optimizers.Optimizer]:
    """The embedding tables' own optimizer: with optimizer "shampoo", Adagrad at the same learning
    rate and EMA (Factory Floor §4.2: second-order for the dense layers, AdaGrad for the
    embeddings); None otherwise (the config's optimizer steps every variable)."""
    if config.optimizer.lower() != "shampoo":
        return None
    return tf.keras.optimizers.Adagrad(config.learning_rate, name="EmbeddingAdagrad", **_ema(config))


def optimizer_split(primary, tables_optimizer, tables, variables) -> list:
    """(optimizer, variables) pairs: with `tables_optimizer` the variables among `tables` step with it
    and the others with `primary`; without it, `primary` steps every variable. (The split of
    `FactoryFloorRanker.optimizer_variables` and `ranking_stage.RankingStage.optimizer_variables`,
    which `models.tasks.build_train_step` builds.)"""
    variables = list(variables)
    if tables_optimizer is None:
        return [(primary, variables)]
    table_ids = {id(v) for v in tables}
    return [(primary, [v for v in variables if id(v) not in table_ids]),
            (tables_optimizer, [v for v in variables if id(v) in table_ids])]


def apply_split(pairs, grads_and_vars) -> None:
    """One `apply_gradients` of each optimizer of `pairs` ((optimizer, variables), `optimizer_split`)
    with its variables' gradients (one optimizer: its `apply_gradients` on `grads_and_vars` as given)."""
    if len(pairs) == 1:
        pairs[0][0].apply_gradients(grads_and_vars)
        return
    gradients = {id(v): g for g, v in grads_and_vars}
    for optimizer, variables in pairs:
        optimizer.apply_gradients([(gradients[id(v)], v) for v in variables])


def finalize_ema(optimizer: tf.keras.optimizers.Optimizer, variables) -> None:
    """Writes `optimizer`'s EMA into those of `variables` it steps (no-op without EMA or before it
    was built)."""
    if not getattr(optimizer, "use_ema", False) or not getattr(optimizer, "_built", False):
        return
    # pylint: disable=protected-access  (Keras's index of the variables it was built on)
    optimizer.finalize_variable_values([v for v in variables if optimizer._var_key(v) in optimizer._index_dict])


class FinalizeEmbeddingOptimizer(tf.keras.callbacks.Callback):
    """Writes the EMA of the ranker's `embedding_optimizer` into the embedding tables when training
    ends (Keras's `fit` does it for `model.optimizer` only, when it trained at least one epoch)."""

    def on_train_end(self, logs=None):
        if self.model.embedding_optimizer is not None and self.params.get("epochs", 1) > 0:
            finalize_ema(self.model.embedding_optimizer, self.model.embedding.trainable_variables)


# ---- input pipeline that keeps requests whole (bench/ lab path) -----------------------------------
def _request_groups(files: Sequence[str], read_batch: int = 8192):
    """Yields the serialized rows of each request, grouped by an explicit group-by on request_id.

    Every row's (request_id, bytes) is read into memory first, then the rows are sorted by
    request_id (stable: a request's rows keep their file order) and yielded request by request in
    request_id order. No file order is assumed: ExampleGen, RunInference and Beam shuffle rows, and
    a request's rows may lie in several files. This holds the serialized data set in memory: it is
    the benches' path on generator-sized data; the pipeline's ranker reads the NegativeSampler's
    request lists instead (`models.ranking_stage`).
    """
    id_spec = {F.REQUEST_ID_KEY: tf.io.FixedLenFeature([1], tf.int64)}
    ds = tf.data.TFRecordDataset(list(files), compression_type="GZIP").batch(read_batch)
    ds = ds.map(lambda s: (s, tf.io.parse_example(s, id_spec)[F.REQUEST_ID_KEY][:, 0]))
    rows, ids = [], []
    for batch_rows, batch_ids in ds.as_numpy_iterator():
        rows.append(batch_rows)
        ids.append(batch_ids)
    if not rows:
        return
    rows, ids = np.concatenate(rows), np.concatenate(ids)
    order = np.argsort(ids, kind="stable")
    rows, ids = rows[order], ids[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ids)) + 1, [ids.size]])
    for a, b in zip(starts[:-1], starts[1:]):
        yield rows[a:b]


def request_batches(
    file_patterns: Iterable[str],
    requests_per_batch: int = 50,
    shuffle_seed: Optional[int] = None,
    num_epochs: Optional[int] = 1,
    exposed_only: bool = True,
    parse_spec: Optional[Dict] = None,
    shuffle_buffer: int = 10_000,
    with_list_layout: bool = True,
) -> tf.data.Dataset:
    """Parsed batches of whole requests, for the per-request rank loss (bench/ lab path).

    Rows are grouped by request_id explicitly (`_request_groups`: any file order); requests (never
    rows) are shuffled with `shuffle_seed`, and `requests_per_batch` of them make a batch (with
    `exposed_only`, ~10 shown rows per request on the synthetic data). With `with_list_layout`
    each batch also carries the request-list layout of its rows (`add_list_layout`), so the train
    step does not regroup them.
    """
    files = tuple(inputs.list_files(file_patterns))
    spec = parse_spec or F.training_parse_spec()
    ds = tf.data.Dataset.from_generator(lambda: _request_groups(files),
                                        output_signature=tf.TensorSpec([None], tf.string))
    if shuffle_seed is not None:
        ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.repeat(num_epochs)
    ds = ds.ragged_batch(requests_per_batch).map(lambda r: tf.io.parse_example(r.flat_values, spec),
                                                 num_parallel_calls=tf.data.AUTOTUNE)
    if exposed_only:
        ds = ds.map(lambda f: inputs._boolean_mask(f, f["ui_position"][:, 0] > F.NOT_SHOWN_POSITION))
    if with_list_layout:
        ds = ds.map(add_list_layout, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def add_list_layout(features: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """Adds LIST_INDEX_KEY [R, L] (row of each slot) and LIST_MASK_KEY [R, L] (real slots) to a batch."""
    request_ids = tf.reshape(features[F.REQUEST_ID_KEY], [-1])
    (index,), mask = losses.rows_to_lists(request_ids, [tf.range(tf.size(request_ids, out_type=tf.int64))])
    return {**features, LIST_INDEX_KEY: index, LIST_MASK_KEY: mask}


def build_and_train(
    config: RankerConfig,
    train: tf.data.Dataset,
    epochs: int = 1,
    adapt_steps: int = 50,
    verbose: int = 0,
    callbacks=None,
) -> FactoryFloorRanker:
    """Builds, adapts, compiles and fits a ranker on parsed batches (dicts) of training rows."""
    model = FactoryFloorRanker(config)
    model.adapt(train, adapt_steps)
    model.compile()
    model.fit(train, epochs=epochs, verbose=verbose, callbacks=callbacks)
    return model
