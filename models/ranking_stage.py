"""The Factory Floor ranker as the last stage of a cascade trained as one network.

DESIGN §11 "each stage is trained for what it does in serving": the ranking stage reorders the
survivors of pre-ranking (candidates that have not been shown) and gives a calibrated CTR on the
shown rows. One `models.ranker.FactoryFloorRanker` does both, from one batch of request lists:

    cascade score   s_c = cascade_logit(x_c)     every real candidate c of a list (RankerConfig.
                                                 cascade_score: the CTR logit at a reference UI
                                                 treatment, a head on the quality body, or a DCN
                                                 tower on the shared embeddings); the logged UI is
                                                 never read: in logs it leaks the label
    row losses      L_FF = (1 − α_t)·L_logistic + α_t·L_rank + w_d,t·L_distill + T_bias + λ·L_LSPR
                                                 on the shown candidates (ui_position > 0) of the lists
                                                 that the NegativeSampler kept (sample_weight > 0), at
                                                 their logged UI treatment, weighted by `sample_weight`
                                                 (DESIGN §5; the ranker's own `loss_terms`, curriculum
                                                 included)

`models.cascade_model.CascadeModel` adds L_FF to its cascade objective (LCRON's L_e2e and
L_single^i over the stages' scores s, the last stage's being s_c above). The RankNet term groups
the shown rows of each list by the list they come from (LIST_INDEX_KEY / LIST_MASK_KEY), never by
file order. Teacher logits of rows that were not shown are never distilled: the teacher only
learned CTR on shown rows.

Optimisation: the ranker keeps its own optimizer (`RankerConfig.optimizer`, Adagrad with an EMA
of the weights by default, as the Factory Floor ranker trains); with "shampoo" two of them, as the
ranker alone has (`models.ranker`): Shampoo (`self.optimizer`, whose step drives the curriculum)
for its dense weights and an Adagrad (`embedding_optimizer`) for its embedding tables. A cascade
head or tower, which only the cascade loss trains, steps with the cascade's optimizer, as the
other stages do.
After each step the bias-constraint duals take their ascent step and the cross stack's ramp moves
(`FactoryFloorRanker.after_step`). `finalize` writes the EMA weights into the ranker after training.

Written here: the flattening of lists into the ranker's rows and the shown-row selection; the
losses are the ranker's (TF-Ranking's RankNet, `models.losses`), the layers TFRS/Keras.
"""
from typing import Dict, Tuple

import numpy as np
import tensorflow as tf

from cascade_ranking.models import losses
from cascade_ranking.models.embedding import fit_normalizer
from cascade_ranking.models.ranker import (LIST_INDEX_KEY, LIST_MASK_KEY, FactoryFloorRanker, apply_split, finalize_ema,
                                           make_embedding_optimizer, make_optimizer, optimizer_split)
from cascade_ranking.schema import features as F
from cascade_ranking.schema import request_list as RL

ROW_EXTRAS = (F.LABEL_KEY, F.SAMPLE_WEIGHT_KEY, F.TEACHER_LOGIT_KEY, F.REQUEST_ID_KEY)


def list_rows(lists: Dict[str, tf.Tensor], features: F.FeatureConfig = F.DEFAULT) -> Dict[str, tf.Tensor]:
    """A batch of request lists [B, L] → candidate rows [B·L] in the candidate-row layout the
    ranker reads (request features repeated per slot; `RL.flatten_to_candidates`)."""
    return RL.flatten_to_candidates(lists, tf.shape(lists["mask"])[1], features)


def shown_row_index(lists: Dict[str, tf.Tensor]) -> tf.Tensor:
    """[n] int64: the flat index (b·L + j) of every real, shown candidate of the lists that the
    NegativeSampler kept for the CTR losses (sample_weight > 0; a sampled-out row keeps its slot in
    the list, for the cascade losses, with weight 0: `components.sampling`)."""
    shown = (tf.convert_to_tensor(lists["mask"]) > 0) & (tf.convert_to_tensor(lists["ui_position"])
                                                         > F.NOT_SHOWN_POSITION)
    if F.SAMPLE_WEIGHT_KEY in lists:
        shown &= tf.convert_to_tensor(lists[F.SAMPLE_WEIGHT_KEY]) > 0
    return tf.where(tf.reshape(shown, [-1]))[:, 0]


class RankingStage(tf.keras.layers.Layer):
    """A cascade stage layer (lists [B, L] → scores [B, L]) around a FactoryFloorRanker."""

    def __init__(self, ranker: FactoryFloorRanker, **kwargs):
        super().__init__(**kwargs)
        self.ranker = ranker
        self.optimizer = make_optimizer(ranker.config)
        self.embedding_optimizer = make_embedding_optimizer(ranker.config)  # the tables' Adagrad of "shampoo", else None

    @property
    def step(self) -> tf.Variable:
        return self.optimizer.iterations

    @property
    def ranker_variables(self):
        """The variables the ranker's optimizer(s) step: all but a cascade head's, which is trained by
        the cascade loss alone and steps with the cascade's optimizer (`cascade_variables`)."""
        head = {id(v) for v in self.cascade_variables}
        return [v for v in self.trainable_variables if id(v) not in head]

    @property
    def cascade_variables(self):
        head = self.ranker.cascade_head
        return list(head.trainable_variables) if head is not None else []

    def call(self, lists, training=None) -> tf.Tensor:
        """[B, L] cascade scores of every slot (padding included; callers mask it)."""
        scores = self.ranker.cascade_logit(list_rows(lists, self.ranker.features), training=training)
        return tf.reshape(scores, tf.shape(lists["mask"]))

    def shown_rows(self, lists, rows=None) -> Dict[str, tf.Tensor]:
        """The shown candidates of the lists as a row batch for `FactoryFloorRanker.loss_terms`,
        with their list layout (LIST_INDEX_KEY [R, M], LIST_MASK_KEY [R, M]) for the rank loss.
        Teacher logits and weights of padded or unshown slots never enter."""
        rows = list_rows(lists, self.ranker.features) if rows is None else rows
        index = shown_row_index(lists)
        names = tuple(self.ranker.feature_names) + tuple(n for n in ROW_EXTRAS if n in rows)
        out = {name: tf.gather(rows[name], index) for name in names}
        list_of_row = index // tf.cast(tf.shape(lists["mask"])[1], tf.int64)
        (layout,), mask = losses.rows_to_lists(list_of_row, [tf.range(tf.size(index, out_type=tf.int64))])
        out[LIST_INDEX_KEY], out[LIST_MASK_KEY] = layout, mask
        return out

    def training_terms(self, lists, training=True) -> Tuple[tf.Tensor, Dict[str, tf.Tensor]]:
        """([B, L] cascade scores, the ranker's loss terms on the shown rows) at the ranker's step."""
        rows = list_rows(lists, self.ranker.features)
        step = self.step
        scores = tf.reshape(self.ranker.cascade_logit(rows, training=training, step=step), tf.shape(lists["mask"]))
        terms = self.ranker.loss_terms(self.shown_rows(lists, rows), step=step, training=training)
        return scores, terms

    def optimizer_variables(self, variables) -> list:
        """(optimizer, variables) pairs of the ranker's `variables`: the embedding tables with
        `embedding_optimizer` when there is one, the others with `self.optimizer`."""
        return optimizer_split(self.optimizer, self.embedding_optimizer, self.ranker.embedding.trainable_variables,
                               variables)

    def apply_gradients(self, grads_and_vars) -> None:
        """The ranker's optimizer step(s) on `ranker_variables`."""
        apply_split(self.optimizer_variables([v for _, v in grads_and_vars]), grads_and_vars)

    def after_step(self, terms: Dict[str, tf.Tensor]) -> None:
        self.ranker.after_step(terms, self.optimizer.iterations)

    def finalize(self) -> None:
        """Writes the EMA of the ranker's weights into them (no-op without EMA), as Keras `fit`
        does for a compiled model's own optimizer."""
        if self.embedding_optimizer is None:
            if getattr(self.optimizer, "use_ema", False):
                self.optimizer.finalize_variable_values(self.ranker_variables)
            return
        for optimizer, variables in self.optimizer_variables(self.ranker_variables):
            finalize_ema(optimizer, variables)

    def adapt(self, lists) -> None:
        """Fits the ranker's dense normalisers on the real candidates of training lists (numpy)."""
        mask = np.asarray(lists["mask"]) > 0
        size = mask.shape[1]
        values = {}
        for f in self.ranker.features.resolved():
            if f.is_dense:
                x = np.asarray(lists[f.name], np.float32)
                x = np.repeat(x, size, axis=0) if f.role == "query" else x.reshape(-1, f.width)
                values[f.name] = x[mask.reshape(-1)]
        for name, normalizer in self.ranker.embedding.normalizers.items():
            x = values[name]
            fit_normalizer(normalizer, np.where(np.isnan(x), 0.0, x))
