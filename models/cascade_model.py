"""A cascade of stage models trained over request lists: jointly with LCRON, or stage by stage.

Stages (earliest first), each a Keras layer mapping a batch of request lists to [B, L] logits:
    retrieval (optional)  `models.retrieval.TwoTowerScorer`      s = u·v
    pre-ranking           `models.preranking.LightPreranker`     two towers + small MLP
    ranking               `models.preranking.StrongRanker`       DCNv2 cross stack + MLP
The label is the ground truth of the RecFlow layout: y = 1 for the `rerank_pos` tier (the shown
items on synthetic data; the ratings >= 4 on MovieLens), 0 for every other real candidate. Padded
slots never count. (`label="click"` uses clicks instead.)

Methods (`method=`), all on the same stages and data, so they differ only in the loss:
* "lcron": Wang et al., ICML 2025 (`models.lcron`):
      L = Σ_i L_single^i / (2 w_i²) + L_e2e + log ∏ w_i
  trains every stage jointly through the end-to-end term.
* "bce": the baseline, each stage on its own with binary cross-entropy on y,
      L = Σ_i BCE(y, σ(s_i))   (mean over real candidates)
  The stages share no weights, so the sum trains each one on its own loss (Adam is per variable).
* "icc": ICC-style joint baseline (Gallagher et al., "Joint Optimization of Cascade Ranking
  Models", WSDM 2019, simplified): the per-stage BCE terms plus a BCE on the product of the stage
  probabilities, L = Σ_i BCE(y, σ(s_i)) + BCE(y, ∏_i σ(s_i)).
* "hap": HAP pre-ranking (`models.preranking`) on the last two stages: the second-to-last stage
  (the light model) with the group-wise loss over all four negative groups, the last stage (the
  strong model) with it over the hard groups only, positives = `label` (`hap_groups(label=…)`);
  earlier stages (retrieval) with BCE as in "bce". The cascade cut then is HAP's routing: the
  light model keeps its top q of the survivors and the strong model orders those.
      L = Σ_{i < m−1} BCE(y, σ(s_i)) + L_group(s_{m−1}; all groups) + L_group(s_m; hard groups)

Distillation (optional, any method; DESIGN §5, Factory Floor §4.1.2): with distill_weight λ > 0,
    L += λ · Σ_{c ∈ T} BCE(σ(t_c), σ(s_m,c)) / |T|,   T = real candidates with a finite teacher_logit t_c
where s_m is the last stage's logit (`models.losses.distillation_loss`; NaN teacher logits and
padded slots are left out of the sum and the count; no gradient reaches the teacher).

Factory Floor ranker as the last stage (`models.ranking_stage.RankingStage`, what the pipeline
trains): the stage's scores are its cascade score, and the ranker's own loss on the list's shown
rows is added, L += L_FF (logistic, RankNet, distillation, bias constraints, LSPR; weighted by
`sample_weight`). The ranker steps with its own optimizer(s) (Adagrad + EMA by default; with
"shampoo", Shampoo for its dense weights and Adagrad for its embedding tables), every other
variable (the other stages, LCRON's w_i, the ranker's cascade tower) with the model's; after each
step the ranker's duals and ramp move. Its distillation replaces the `distill_weight` term.

`predict_stage_scores` gives every stage's scores on lists for the cascade metrics of
`models.metrics` (e2e_recall, stage_recall, ndcg_at_k).
"""
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from cascade_ranking.models import lcron
from cascade_ranking.models import list_inputs as LI
from cascade_ranking.models import losses
from cascade_ranking.models.metrics import e2e_recall, ndcg_at_k, requests_without_gt, stage_recall
from cascade_ranking.models.preranking import LightPreranker, StrongRanker, hap_groups
from cascade_ranking.models.ranking_stage import RankingStage
from cascade_ranking.models.retrieval import TwoTowerScorer, adapt_towers
from cascade_ranking.models.tasks import CascadeTask, StageModel, list_distillation
from cascade_ranking.schema import features as F
from cascade_ranking.schema import request_list as RL

METHODS = ("lcron", "bce", "icc", "hap")
RANKER_LOG_TERMS = ("loss", "logistic", "rank", "distillation", "bias", "lspr", "rank_weight", "distill_weight")


def cascade_labels(lists: Mapping, label: str = "gt"):
    """y [B, L] float: GT (tier rerank_pos) or click, 0 on padded slots."""
    real = tf.convert_to_tensor(lists["mask"]) > 0
    if label == "gt":
        y = tf.equal(tf.convert_to_tensor(lists["stage"]), RL.TIER_INDEX[F.GROUND_TRUTH_TIER])
    elif label == "click":
        y = tf.convert_to_tensor(lists["click"]) > 0
    else:
        raise ValueError(f"label must be 'gt' or 'click', got {label!r}")
    return tf.cast(real & y, tf.float32)


def default_stages(with_retrieval: bool = True, embedding_dim: int = 16) -> Dict[str, tf.keras.layers.Layer]:
    """The stage models of the benchmark, weakest first."""
    stages = {}
    if with_retrieval:
        stages["retrieval"] = TwoTowerScorer(embedding_dim, hidden_units=(64,), output_dim=32, name="retrieval")
    stages["prerank"] = LightPreranker(embedding_dim, tower_units=(64,), output_dim=32, head_units=(32,), name="prerank")
    stages["rank"] = StrongRanker(embedding_dim, num_cross_layers=2, projection_dim=16, hidden_units=(128, 64),
                                  name="rank")
    return stages


class CascadeModel(StageModel):
    """Stage models plus the training objective of `method` (module docstring), computed by
    `models.tasks.CascadeTask` and stepped by the shared `models.tasks.StageModel.train_step`:
    with a RankingStage last, its variables step with the ranker's optimizer (`apply_gradients`)
    and its duals and ramp move after the step (`after_step`)."""

    def __init__(self, stages: Mapping[str, tf.keras.layers.Layer], method: str = "lcron",
                 quota: lcron.Quota = lcron.DEFAULT_QUOTA, tau: float = lcron.DEFAULT_TAU, label: str = "gt",
                 distill_weight: float = 0.0, hap_kind: str = "softmax", **kwargs):
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        if method == "hap" and len(stages) < 2:
            raise ValueError("method 'hap' needs at least two stages (a light and a strong model)")
        if not float(distill_weight) >= 0.0:
            raise ValueError(f"distill_weight must be >= 0, got {distill_weight}")
        if hap_kind not in ("softmax", "pairwise"):
            raise ValueError(f"hap_kind must be 'softmax' or 'pairwise', got {hap_kind!r}")
        if label not in ("gt", "click"):
            raise ValueError(f"label must be 'gt' or 'click', got {label!r}")
        lcron.check_tau(tau)
        self.stage_names = tuple(stages)
        self.stage_models = [stages[n] for n in self.stage_names]
        self.method = method
        self.quota = quota
        self.tau = float(tau)
        self.label = label
        self.distill_weight = float(distill_weight)
        self.hap_kind = hap_kind
        lcron.stage_quotas(quota, len(self.stage_names))  # validates now rather than at the first step
        self.weighting = lcron.UncertaintyWeighting(len(self.stage_names), name="uncertainty") if method == "lcron" else None
        if self.distill_weight > 0.0 and isinstance(self.stage_models[-1], RankingStage):
            raise ValueError("distill_weight must be 0 when the last stage is a RankingStage: the Factory Floor "
                             "ranker distills on its shown rows itself (RankerConfig.distill_weight)")
        self.task = CascadeTask(self.stage_names, method, quota=quota, tau=tau, hap_kind=hap_kind,
                                distill_weight=self.distill_weight, weighting=self.weighting, name="task")

    @property
    def metrics(self):
        """No Keras metrics: the train step logs the task's loss terms itself (`step_logs`), and a
        nested ranker's own loss trackers, which nothing updates here, must not be read by `fit`."""
        return []

    @property
    def ranking_stage(self) -> Optional[RankingStage]:
        """The last stage when it is a Factory Floor ranker (`models.ranking_stage`), else None."""
        last = self.stage_models[-1]
        return last if isinstance(last, RankingStage) else None

    def adapt(self, lists: Mapping[str, np.ndarray]) -> None:
        """Fits every stage's dense-feature normalisers on the real rows of training lists."""
        for stage in self.stage_models:
            if isinstance(stage, RankingStage):
                stage.adapt(lists)
            elif hasattr(stage, "towers"):
                adapt_towers(stage.towers(), lists, stage.features)
            else:
                adapt_towers([stage], lists, stage.features)

    def call(self, lists, training=None) -> tf.Tensor:
        """[B, S, L]: the scores of every stage."""
        return tf.stack([stage(lists, training=training) for stage in self.stage_models], axis=1)

    def compute_terms(self, lists, training: bool = False) -> Dict[str, tf.Tensor]:
        ranking = self.ranking_stage
        scores = [stage(lists, training=training) for stage in self.stage_models[:-1 if ranking else None]]
        if ranking is not None:
            last, ranker_terms = ranking.training_terms(lists, training=training)
            scores.append(last)
        y = cascade_labels(lists, self.label)
        mask = tf.convert_to_tensor(lists["mask"])
        groups = hap_groups(lists, self.label) if self.method == "hap" else None
        if self.distill_weight > 0.0 and "teacher_logit" not in lists:
            raise ValueError("distill_weight > 0 needs a teacher_logit feature in the request lists")
        out = self.task(scores, y, mask, hap_groups=groups, teacher=lists.get("teacher_logit"))
        if ranking is not None:  # L_FF on the shown rows (models.ranking_stage)
            total = out.pop("loss")
            for name in RANKER_LOG_TERMS:
                out[f"ranker_{name}"] = ranker_terms[name]
            out["loss"] = total + ranker_terms["loss"]
            out["_ranker_terms"] = ranker_terms
        return out

    compute_losses = compute_terms  # the terms of a batch ("loss" and every logged term)

    @staticmethod
    def distillation(lists, last_logits) -> tf.Tensor:
        """Mean BCE of the last stage's logits against σ(teacher_logit) over the real candidates
        with a finite teacher_logit (module docstring); 0 when there are none."""
        if "teacher_logit" not in lists:
            raise ValueError("distill_weight > 0 needs a teacher_logit feature in the request lists")
        return list_distillation(losses.get("distillation"), lists["teacher_logit"], lists["mask"], last_logits)

    def apply_gradients(self, grads_and_vars) -> None:
        """The ranker steps with its own optimizer, the other stages (and LCRON's w_i) with the cascade's."""
        ranking = self.ranking_stage
        if ranking is None:
            self.optimizer.apply_gradients(grads_and_vars)
            return
        ranker_vars = {id(v) for v in ranking.ranker_variables}
        self.optimizer.apply_gradients([(g, v) for g, v in grads_and_vars if id(v) not in ranker_vars])
        ranking.apply_gradients([(g, v) for g, v in grads_and_vars if id(v) in ranker_vars])

    def optimizer_variables(self, variables) -> list:
        ranking = self.ranking_stage
        if ranking is None:
            return [(self.optimizer, variables)]
        ranker_vars = {id(v) for v in ranking.ranker_variables}
        return [(self.optimizer, [v for v in variables if id(v) not in ranker_vars])] + \
            ranking.optimizer_variables([v for v in variables if id(v) in ranker_vars])

    def after_step(self, terms) -> None:
        if self.ranking_stage is not None:
            self.ranking_stage.after_step(terms["_ranker_terms"])

    def predict_stage_scores(self, lists: Mapping[str, np.ndarray], batch_size: int = 256) -> List[np.ndarray]:
        """Every stage's [R, L] scores on in-memory request lists. The model is called in a
        tf.function of its own, not through Keras `predict`, which under MultiWorkerMirroredStrategy
        would need every worker (only the chief evaluates: `models.trainers.distribute`)."""
        if getattr(self, "_score_lists", None) is None:
            self._score_lists = tf.function(lambda batch: self(batch, training=False), autograph=False)
        stacked = np.concatenate([self._score_lists(batch).numpy()
                                  for batch in LI.dataset_from_lists(lists, batch_size)])
        return [stacked[:, i] for i in range(stacked.shape[1])]


def evaluate_cascade(stage_scores: Sequence[np.ndarray], lists: Mapping[str, np.ndarray],
                     quotas: Sequence[int], stage_names: Sequence[str], label: str = "gt",
                     ndcg_k: int = 10) -> Dict[str, float]:
    """e2e recall, per-stage Recall@|GT|@q_i (each stage alone on the whole list) and the last
    stage's NDCG@k, all against `label` and with padding masked; plus `requests` (lists
    evaluated) and `requests_without_gt` (lists without a real GT candidate: left out of every
    recall and NDCG mean, DESIGN §8).

    A request with fewer real candidates than q_i keeps them all at stage i; a quota larger than
    the list size L itself cuts nothing in any request and is refused (ValueError).
    """
    mask = np.asarray(lists["mask"])
    if len(quotas) != len(stage_names) or len(stage_scores) != len(stage_names):
        raise ValueError(f"{len(stage_scores)} stage scores, {len(quotas)} quotas and {len(stage_names)} stage names")
    for name, q in zip(stage_names, quotas):
        if int(q) > mask.shape[1]:
            raise ValueError(f"quota {int(q)} of stage {name!r} > list size {mask.shape[1]}")
    gt = cascade_labels(lists, label).numpy()
    out = {"e2e_recall": e2e_recall(stage_scores, gt, quotas, mask),
           "requests": int(mask.shape[0]), "requests_without_gt": requests_without_gt(gt, mask)}
    for name, scores, q in zip(stage_names, stage_scores, quotas):
        out[f"recall_{name}@{q}"] = stage_recall(scores, gt, m=q, mask=mask)
    out[f"ndcg@{ndcg_k}_{stage_names[-1]}"] = ndcg_at_k(stage_scores[-1], gt, ndcg_k, mask)
    return out


def train_cascade(train_lists: Mapping[str, np.ndarray], method: str, seed: int = 0, epochs: int = 5,
                  batch_size: int = 64, learning_rate: float = 2e-3, quota: lcron.Quota = lcron.DEFAULT_QUOTA,
                  tau: float = lcron.DEFAULT_TAU, with_retrieval: bool = True, embedding_dim: int = 16,
                  label: str = "gt", stages: Optional[Mapping[str, tf.keras.layers.Layer]] = None,
                  valid_lists: Optional[Mapping[str, np.ndarray]] = None,
                  valid_quotas: Optional[Sequence[int]] = None, distill_weight: float = 0.0) -> CascadeModel:
    """Builds the default stages (seeded), fits them with `method` and returns the model.

    With `valid_lists` (and the cascade's `valid_quotas`), the e2e recall on them is measured
    after every epoch and the weights of the best epoch are kept (early stopping by model
    selection, the same rule for every method); `model.history_` records the curve.
    """
    tf.keras.utils.set_random_seed(seed)
    stages = stages or default_stages(with_retrieval, embedding_dim)
    model = CascadeModel(stages, method=method, quota=quota, tau=tau, label=label, distill_weight=distill_weight)
    model.adapt(train_lists)
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate))
    model.history_ = []
    if valid_lists is None:
        model.fit(LI.dataset_from_lists(train_lists, batch_size, shuffle_seed=seed, num_epochs=epochs), verbose=0)
        return model
    if valid_quotas is None or len(valid_quotas) != len(model.stage_names):
        raise ValueError(f"valid_quotas must give one quota per stage {model.stage_names}")
    data = LI.dataset_from_lists(train_lists, batch_size, shuffle_seed=seed)
    valid_gt = cascade_labels(valid_lists, label).numpy()
    best, best_weights = -1.0, None
    for _ in range(epochs):
        model.fit(data, verbose=0)
        recall = e2e_recall(model.predict_stage_scores(valid_lists), valid_gt, valid_quotas, valid_lists["mask"])
        model.history_.append(recall)
        if recall > best:
            best, best_weights = recall, model.get_weights()
    model.set_weights(best_weights)
    return model
