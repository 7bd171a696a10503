"""Trainer module of the joint cascade: pre-ranking and ranking trained as one network (LCRON),
the ranking stage being the Factory Floor ranker. It trains the two stages the pipeline serves
after retrieval (DESIGN §11 "each stage is trained for what it does in serving"):

    prerank  `models.preranking.LightPreranker` (two towers + a small MLP): served alone
    rank     `models.ranking_stage.RankingStage` around `models.ranker.FactoryFloorRanker`
             (DCNv2 + ReZero, Q·U, RankNet + logistic, distillation, curriculum, bias constraints,
             optional LSPR; `RankerConfig.cascade_stage()`): orders the pre-ranking survivors by
             its cascade score (a DCN tower on its shared embeddings) and gives the calibrated CTR
             of the shown rows (Q·U)

Objective (`models.cascade_model.CascadeModel`): the cascade loss of `method` over the stages'
scores on the request lists (LCRON: Σ_i L_single^i/(2w_i²) + L_e2e + log ∏ w_i; or "bce", "icc",
"hap") plus the ranker's own losses on the shown rows of the same lists, weighted by the
NegativeSampler's `sample_weight` (Factory Floor §3.3 sampling reaches the served ranker).

Input: the NegativeSampler's request-list Examples (`fn_args.train_files` / `eval_files`), one
list per request with every kept candidate: a request never arrives in pieces, and every train
request is read once per epoch (`models.list_inputs.request_list_dataset`, shuffled by list). The
train split is also read once more, a batch of lists at a time (`list_data.scan_train_split`), to
count the training data (`TrainDataReport`) and keep its first `list_data.ADAPT_LISTS` lists for
the dense normalisers: the Trainer never holds the train split. The eval split is read and scored
`EVAL_LISTS` lists at a time (`evaluate_eval_split`): only the scores and labels are kept. The
pipeline's Schema artifact (`fn_args.schema_path`) gives the serving parse specs.

custom_config:
    {"cascade": CascadeTrainerConfig JSON, "ranker": RankerConfig JSON (overrides RankerConfig.cascade_stage())}

Outputs:
    <model>/Format-Serving        the ranker (`models.ranker_export`): serving_default → ctr, logit,
                                  score; quality, ui, score_ui_grid
    <model>/stages/preranking     the light pre-ranker alone: serving_default → score
                                  (`models.export.stage_model_dir`; the pipeline's
                                  `components.stage_model.StageModel` publishes it as a Model)
    <model_run>/eval_metrics.json evaluate_cascade on the eval lists (e2e recall of the two stages,
                                  recall_<stage>@<q>), the ranker's CTR metrics on the shown eval
                                  rows, the training data it read (`train_data_report`), each served
                                  stage's FLOPs per candidate, the schema path, method and quotas,
                                  and for vocabulary features the eval ids out of vocabulary.
"""
import dataclasses
import json
from typing import Dict, Iterable, Mapping, Tuple, Union

import numpy as np
import tensorflow as tf
from absl import logging

from cascade_ranking.models import export as export_lib
from cascade_ranking.models import lcron, metrics, ranker_export
from cascade_ranking.models import list_inputs as LI
from cascade_ranking.models.cascade_model import METHODS, CascadeModel, evaluate_cascade
from cascade_ranking.models.preranking import LightPreranker
from cascade_ranking.models.ranker import FactoryFloorRanker
from cascade_ranking.models.config import check_positive
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.models.ranking_stage import RankingStage
from cascade_ranking.models.trainers import common, distribute, warm_start
from cascade_ranking.models.trainers.epoch_progress import EpochProgress
from cascade_ranking.models.trainers.list_data import (candidate_examples, candidate_lists, candidate_parse_spec, list_size_of_splits,
                                      concatenate_batches, iterate_lists, save_with_warmup, scan_train_split)
from cascade_ranking.schema import features as F

CONFIG_KEY = "cascade"
# The strategies it trains under on a training cluster (`models.trainers.distribute`).
DISTRIBUTE_STRATEGIES = (distribute.MIRRORED, distribute.PARAMETER_SERVER)
RANKER_KEY = "ranker"
STAGES = ("prerank", "rank")


@dataclasses.dataclass
class CascadeTrainerConfig:
    """The joint training; the ranker's own switches are its RankerConfig (custom_config "ranker")."""

    method: str = "lcron"  # cascade loss: "lcron", "bce", "icc" or "hap" (`CascadeModel`)
    epochs: int = 3
    batch_size: int = 16  # request lists per step (~160 shown rows for the ranker's row losses)
    learning_rate: float = 2e-3  # Adam of the pre-ranker and of LCRON's w_i; the ranker steps with its own
    quota: Union[int, Tuple[int, ...]] = lcron.DEFAULT_QUOTA  # LCRON's training quota (one, or per stage)
    tau: float = lcron.DEFAULT_TAU
    embedding_dim: int = 16  # the pre-ranker's
    label: str = "gt"  # the cascade's positives: the GT tier ("click": clicked candidates)
    eval_quotas: Tuple[int, ...] = (30, 20)  # pre-ranking and ranking quotas of the e2e recall (DESIGN §8)
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.label not in ("gt", "click"):
            raise ValueError(f"label must be 'gt' or 'click', got {self.label!r}")
        check_positive(self, "epochs", "batch_size", "learning_rate", "tau", "embedding_dim")


class PrerankerServing(tf.Module):
    """The served pre-ranker: the light model alone (no ranking tower)."""

    def __init__(self, light: LightPreranker, schema=None):
        super().__init__()
        self.light = light
        self._schema = schema
        self._features = light.features
        self._spec = candidate_parse_spec(schema, light.features)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=export_lib.SERVING_INPUT_KEY)], autograph=False)
    def serve(self, examples):
        lists = candidate_lists(examples, self._spec, self._schema, self._features)
        return {"score": tf.reshape(self.light(lists, training=False), [-1])}


class FinalizeRanker(tf.keras.callbacks.Callback):
    """Writes the ranker's EMA weights into it when training ends (`RankingStage.finalize`)."""

    def __init__(self, stage: RankingStage):
        super().__init__()
        self.stage = stage

    def on_train_end(self, logs=None):
        self.stage.finalize()


def ranker_config_from(fn_args) -> RankerConfig:
    """`RankerConfig.cascade_stage()` with the custom_config "ranker" overrides."""
    return RankerConfig.from_dict({**RankerConfig.cascade_stage().to_dict(), **common.config_json(fn_args, RANKER_KEY)})


def build_model(config: CascadeTrainerConfig, ranker_config: RankerConfig,
                features: F.FeatureConfig = F.DEFAULT) -> CascadeModel:
    """The two-stage CascadeModel of `config` (seeds TF first); `features` embeds both stages' inputs."""
    if len(config.eval_quotas) != len(STAGES):
        raise ValueError(f"eval_quotas {config.eval_quotas} must give one quota per stage {STAGES}")
    tf.keras.utils.set_random_seed(config.seed)
    stages = {
        "prerank": LightPreranker(config.embedding_dim, tower_units=(64,), output_dim=32, head_units=(32,),
                                  features=features, name="prerank"),
        "rank": RankingStage(FactoryFloorRanker(ranker_config, features), name="rank"),
    }
    return CascadeModel(stages, method=config.method, quota=config.quota, tau=config.tau, label=config.label)


_REPORT_SUMS = ("lists", "candidate_rows", "shown_rows", "sampled_out_rows", "shown_clicks", "shown_weight_sum",
                "weighted_clicks", "reweighted_rows")


REPORT_COLUMNS = ("mask", "sample_weight", "ui_position", "click")  # what `train_data_report` reads


def _report_sums(lists: Mapping[str, np.ndarray]) -> Dict[str, float]:
    real = np.asarray(lists["mask"]) > 0
    weights = np.asarray(lists["sample_weight"], np.float64)
    all_shown = real & (np.asarray(lists["ui_position"]) > F.NOT_SHOWN_POSITION)
    shown = all_shown & (weights > 0)  # a sampled-out row keeps its slot with weight 0
    w = weights[shown]
    y = np.asarray(lists["click"], np.float64)[shown]
    return dict(zip(_REPORT_SUMS, (real.shape[0], real.sum(), shown.sum(), (all_shown & (weights == 0)).sum(),
                                   y.sum(), w.sum(), (w * y).sum(), (w != 1.0).sum())))


class TrainDataReport:
    """`train_data_report` kept as running sums: `add` one batch of lists at a time, then `result`."""

    def __init__(self):
        self.totals = dict.fromkeys(_REPORT_SUMS, 0.0)

    def add(self, lists: Mapping[str, np.ndarray]) -> None:
        for name, value in _report_sums(lists).items():
            self.totals[name] += float(value)

    def result(self) -> Dict[str, float]:
        totals = self.totals
        report = {name: int(totals[name]) for name in _REPORT_SUMS if name not in ("shown_weight_sum", "weighted_clicks")}
        report["shown_weight_sum"] = totals["shown_weight_sum"]
        report["weighted_click_mean"] = (totals["weighted_clicks"] / totals["shown_weight_sum"]
                                         if totals["shown_weight_sum"] else float("nan"))
        return report


def train_data_report(batches: Iterable[Mapping[str, np.ndarray]]) -> Dict[str, float]:
    """What the Trainer reads, summed over `batches` of request lists (read one at a time, so the
    split is never held whole): lists, candidate rows (every one trains the cascade losses), the
    shown rows its CTR losses train on (those the NegativeSampler kept: weight > 0) and those it
    sampled out (weight 0), their clicks, Σ sample_weight, and the weighted click mean Σw·y / Σw, an
    unbiased estimate of the unsampled shown click rate (Factory Floor §3.3)."""
    report = TrainDataReport()
    for batch in batches:
        report.add(batch)
    return report.result()


def ctr_metrics(ranker: FactoryFloorRanker, lists: Mapping[str, np.ndarray], batch_size: int = 256) -> Dict[str, float]:
    """The ranker's CTR at the logged UI treatment on every shown eval row of the lists (sampled out
    or not: the metric is of the data, not of the sample): AUC, PerQueryAUC (grouped by the list each
    row is in), NE and Σŷ/Σy (`models.metrics`)."""
    return ctr_metrics_of(*ctr_rows(ranker, lists, batch_size))


def ctr_rows(ranker: FactoryFloorRanker, lists: Mapping[str, np.ndarray],
             batch_size: int = 256) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(click, predicted CTR, request id) of every shown row of the lists, for `ctr_metrics_of`."""
    stage = RankingStage(ranker)
    y, p, q = [], [], []
    for batch in LI.dataset_from_lists(lists, batch_size):
        rows = stage.shown_rows({**batch, F.SAMPLE_WEIGHT_KEY: tf.ones_like(batch[F.SAMPLE_WEIGHT_KEY])})
        y.append(tf.reshape(rows[F.LABEL_KEY], [-1]).numpy())
        p.append(tf.sigmoid(tf.reshape(ranker(rows, training=False), [-1])).numpy())
        q.append(tf.reshape(rows[F.REQUEST_ID_KEY], [-1]).numpy())
    return tuple(np.concatenate(a) for a in (y, p, q))


def ctr_metrics_of(y: np.ndarray, p: np.ndarray, q: np.ndarray) -> Dict[str, float]:
    return {"shown_rows": int(y.size), "auc": metrics.auc(y, p), "per_query_auc": metrics.per_query_auc(y, p, q),
            "ne": metrics.normalized_entropy(y, p), "calibration": float(p.sum() / max(y.sum(), 1e-12))}


EVAL_LISTS = 1024  # eval lists read and scored at a time
LABEL_COLUMNS = ("mask", "stage", "click")  # what `evaluate_cascade` reads of the lists beside the scores


def evaluate_eval_split(model: CascadeModel, file_patterns, list_size: int, quotas: Tuple[int, ...], label: str,
                        features: F.FeatureConfig = F.DEFAULT) -> Tuple[Dict, list]:
    """(metrics, warmup examples) of the eval split, read `EVAL_LISTS` lists at a time: of each
    batch it keeps each stage's scores, the label columns ([R, L] each) and the ranker's (click,
    CTR, request) of the shown rows, never the lists themselves. The metrics: `evaluate_cascade`,
    `ranker` (`ctr_metrics`) and, for vocabulary features, `eval_ids_out_of_vocabulary`."""
    ranker = model.ranking_stage.ranker
    kept, oov, warmup = [], None, []
    for lists in iterate_lists(file_patterns, list_size, EVAL_LISTS, features):
        scores = model.predict_stage_scores(lists)
        y, p, q = ctr_rows(ranker, lists)
        kept.append({**{f"scores_{i}": np.asarray(s) for i, s in enumerate(scores)},
                     **{name: np.asarray(lists[name]) for name in LABEL_COLUMNS}, "ctr_y": y, "ctr_p": p, "ctr_q": q})
        if features.vocabulary_features():  # eval ids that share the OOV rows, per vocabulary feature
            from cascade_ranking.schema import vocabulary

            oov = _add_counts(oov, vocabulary.out_of_vocabulary(lists, features))
        warmup = warmup or candidate_examples(lists, features=features)
    columns = concatenate_batches(kept, file_patterns)
    stage_scores = [columns[f"scores_{i}"] for i in range(len(model.stage_names))]
    result = evaluate_cascade(stage_scores, {name: columns[name] for name in LABEL_COLUMNS}, quotas,
                              model.stage_names, label)
    result["ranker"] = ctr_metrics_of(columns["ctr_y"], columns["ctr_p"], columns["ctr_q"])
    if oov is not None:
        result["eval_ids_out_of_vocabulary"] = oov
    return result, warmup


def _add_counts(total, counts):
    """`vocabulary.out_of_vocabulary` of two batches as one: ids and values read summed."""
    if total is None:
        return counts
    return {name: {**value, "ids": total[name]["ids"] + value["ids"], "of": total[name]["of"] + value["of"]}
            for name, value in counts.items()}


def run_fn(fn_args) -> None:
    """Called by the TFX Trainer (GenericExecutor)."""
    config = common.config_from(fn_args, CONFIG_KEY, CascadeTrainerConfig)
    ranker_config = ranker_config_from(fn_args)
    schema, schema_path = common.pipeline_schema(fn_args)
    logging.info("Training the joint cascade with %s; ranker %s; schema %s", config, ranker_config, schema_path)
    features = common.feature_config(fn_args)
    cluster = distribute.cluster_config(fn_args)
    strategy = distribute.strategy_for("cascade", DISTRIBUTE_STRATEGIES, cluster.min_shard_bytes)
    list_size = list_size_of_splits(fn_args)
    report = TrainDataReport()  # summed over the split while it is read once; the first lists kept
    sample = scan_train_split(fn_args.train_files, list_size, report.add, features)
    data = report.result()
    logging.info("Training data: %d lists, %d candidate rows read; %d shown rows kept for the CTR losses "
                 "(%d clicks), sample_weight sum %.1f, weighted click mean %.4f", data["lists"],
                 data["candidate_rows"], data["shown_rows"], data["shown_clicks"], data["shown_weight_sum"],
                 data["weighted_click_mean"])
    with distribute.scope(strategy):
        model = build_model(config, ranker_config, features)
        model.adapt(sample)
        model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))
        model.build_train_step(next(iter(LI.dataset_from_lists(sample, config.batch_size))))
        del sample
        warm = warm_start.restore(model, fn_args, "Trainer.cascade")

    def train():
        return LI.request_list_dataset(fn_args.train_files, config.batch_size, list_size, shuffle_seed=config.seed,
                                       features=features)

    ranking = model.ranking_stage
    distribute.fit(model, train, strategy, epochs=warm_start.epochs(fn_args, config.epochs, warm),
                   callbacks=common.callbacks(fn_args) + [
                       FinalizeRanker(ranking), EpochProgress("cascade", ("loss", "e2e", "ranker_loss"))],
                   steps_per_epoch=-(-data["lists"] // config.batch_size))

    quotas = tuple(int(q) for q in config.eval_quotas)
    light = model.stage_models[0]
    if distribute.is_chief():  # only the chief evaluates
        result, warmup = evaluate_eval_split(model, fn_args.eval_files, list_size, quotas, config.label, features)
        result.update(
            method=config.method, quotas=dict(zip(model.stage_names, quotas)), schema_path=schema_path,
            train_data=data, flops={"preranking": light.flops(), "ranking": ranking.ranker.flops()},
        )
        logging.info("Eval metrics: %s", json.dumps(result))
        common.write_eval_metrics(fn_args.model_run_dir, result)
    else:
        warmup = candidate_examples(next(iter(iterate_lists(fn_args.eval_files, list_size, EVAL_LISTS, features))),
                                    features=features)
    with distribute.chief_outputs(fn_args) as outputs:  # only the chief's export is kept
        ranker_export.export_ranker(ranking.ranker, outputs.serving_model_dir, warmup, schema=schema)
        preranker = PrerankerServing(light, schema)
        save_with_warmup(preranker, export_lib.stage_model_dir(outputs.serving_model_dir, "preranking"),
                         {"serving_default": preranker.serve}, warmup)
        warm_start.save(model, outputs)
