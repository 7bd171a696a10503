"""Trainer module of the pre-ranking stage: HAP (`models.preranking`, light + strong model).

Input: the NegativeSampler's request-list Examples. Training reads them as tf.data
(`models.list_inputs.request_list_dataset`, whole lists per batch, so every group-wise loss term
has its request's positive); the first `list_data.ADAPT_LISTS` train lists are read into numpy to
fit the dense normalisers (`list_data.adaptation_lists`), and the eval lists for the metrics.

The list size is the data's (`list_data.list_size_of_splits`: the NegativeSampler's `list_size`).
custom_config: {"preranking": JSON object}, keys and defaults in `PrerankingTrainerConfig`:
    epochs 3, batch_size 32 (request lists per batch), learning_rate 2e-3 (Adam),
    kind "softmax" ("pairwise"), top_m 30 (the light top M that the strong model rescores),
    embedding_dim 16, light_tower_units [64], light_output_dim 32, light_head_units [32],
    strong_cross_layers 2, strong_projection_dim 16, strong_hidden_units [128, 64],
    eval_quota 20 (the q of the recall figures; e2e_recall is informative only for q < top_m),
    seed 0.

Training: Keras `fit` of `HAPPreranker` (the shared `models.tasks.StageModel` train step) with
TensorBoard + BackupAndRestore.
eval_metrics.json, on the eval lists with GT = the `rerank_pos` tier:
    recall_light@|GT|, recall_light@<q>, recall_strong@<q>, recall_routed@<q>  (Recall@|GT|@m)
    e2e_recall   light keeps its top M, the strong model keeps q of them (quotas (top_m, q))
    requests, requests_without_gt   lists evaluated / lists without a real GT candidate (left
                 out of every recall)
    flops        `models.preranking.hap_flops` for n = list_size candidates (tf.profiler
                 convention, a multiply-add = 2): light_per_candidate, light_per_request,
                 strong_per_candidate, routed_per_request, … (analytic, from the layer shapes)
Export (SavedModel + warmup file), all on serialized candidate-row tf.Examples (input `examples`):
    serving_default  → {score [N]}: the light model's score of each candidate
    rescore          → {score [N]}: the strong model's score. Routing is per request: the caller
                       sends the light top M of a request to `rescore` and orders those M by it
                       above the rest (`models.preranking.route`); the SavedModel does not route.
"""
import dataclasses
import json
from typing import Dict, Mapping, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from cascade_ranking.models import export as export_lib
from cascade_ranking.models import list_inputs as LI
from cascade_ranking.models.cascade_model import cascade_labels
from cascade_ranking.models.metrics import e2e_recall, requests_without_gt, stage_recall
from cascade_ranking.models.preranking import HAPPreranker, LightPreranker, StrongRanker, hap_flops, route
from cascade_ranking.models.retrieval import adapt_towers
from cascade_ranking.models.trainers import common, distribute
from cascade_ranking.models.trainers.epoch_progress import EpochProgress
from cascade_ranking.models.trainers.list_data import adaptation_lists, candidate_examples, candidate_lists, list_size_of_splits, load_lists, save_with_warmup
from cascade_ranking.schema import features as F

CONFIG_KEY = "preranking"


@dataclasses.dataclass
class PrerankingTrainerConfig:
    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 2e-3
    kind: str = "softmax"
    top_m: int = 30
    embedding_dim: int = 16
    light_tower_units: Tuple[int, ...] = (64,)
    light_output_dim: int = 32
    light_head_units: Tuple[int, ...] = (32,)
    strong_cross_layers: int = 2
    strong_projection_dim: int = 16
    strong_hidden_units: Tuple[int, ...] = (128, 64)
    eval_quota: int = 20
    seed: int = 0


def build_model(config: PrerankingTrainerConfig, features: F.FeatureConfig = F.DEFAULT) -> HAPPreranker:
    light = LightPreranker(config.embedding_dim, config.light_tower_units, config.light_output_dim,
                           config.light_head_units, features, name="light")
    strong = StrongRanker(config.embedding_dim, config.strong_cross_layers, config.strong_projection_dim,
                          config.strong_hidden_units, features, name="strong")
    return HAPPreranker(light, strong, top_m=config.top_m, kind=config.kind)


class PrerankingServing(tf.Module):
    def __init__(self, light: LightPreranker, strong: StrongRanker):
        super().__init__()
        self.light = light
        self.strong = strong
        self._features = light.features

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=export_lib.SERVING_INPUT_KEY)], autograph=False)
    def serve(self, examples):
        lists = candidate_lists(examples, features=self._features)
        return {"score": tf.reshape(self.light(lists, training=False), [-1])}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=export_lib.SERVING_INPUT_KEY)], autograph=False)
    def rescore(self, examples):
        lists = candidate_lists(examples, features=self._features)
        return {"score": tf.reshape(self.strong(lists, training=False), [-1])}


def scores_on(layer, lists: Mapping[str, np.ndarray], batch_size: int = 256) -> np.ndarray:
    out = [layer(batch, training=False).numpy() for batch in LI.dataset_from_lists(lists, batch_size)]
    return np.concatenate(out)


def evaluate(model: HAPPreranker, lists: Mapping[str, np.ndarray], quota: int) -> Dict[str, float]:
    light, strong = scores_on(model.light, lists), scores_on(model.strong, lists)
    mask = np.asarray(lists["mask"])
    routed = route(light, strong, model.top_m, mask).numpy()
    gt = cascade_labels(lists).numpy()
    return {
        "requests": int(mask.shape[0]),
        "requests_without_gt": requests_without_gt(gt, mask),
        "recall_light@|GT|": stage_recall(light, gt, m=None, mask=mask),
        f"recall_light@{quota}": stage_recall(light, gt, m=quota, mask=mask),
        f"recall_strong@{quota}": stage_recall(strong, gt, m=quota, mask=mask),
        f"recall_routed@{quota}": stage_recall(routed, gt, m=quota, mask=mask),
        "e2e_recall": e2e_recall([light, strong], gt, (model.top_m, quota), mask),
    }


# One process only (not a Trainer of the pipeline's training_cluster): a TF_CONFIG cluster is refused.
DISTRIBUTE_STRATEGIES = ()


def run_fn(fn_args) -> None:
    """Called by the TFX Trainer (GenericExecutor)."""
    distribute.strategy_for("preranking", DISTRIBUTE_STRATEGIES)
    config = common.config_from(fn_args, CONFIG_KEY, PrerankingTrainerConfig)
    logging.info("Training HAP with %s", config)
    tf.keras.utils.set_random_seed(config.seed)
    features = common.feature_config(fn_args)
    model = build_model(config, features)
    list_size = list_size_of_splits(fn_args)
    adapt_towers(model.light.towers() + [model.strong], adaptation_lists(fn_args.train_files, list_size, features), features)
    model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))
    train = LI.request_list_dataset(fn_args.train_files, config.batch_size, list_size, shuffle_seed=config.seed,
                                    features=features)
    model.build_train_step(next(iter(LI.request_list_dataset(fn_args.train_files, config.batch_size, list_size,
                                                             features=features))))  # so that fit traces its step once
    model.fit(train, epochs=config.epochs, verbose=0,
              callbacks=common.callbacks(fn_args) + [EpochProgress("preranking")])
    evals = load_lists(fn_args.eval_files, list_size, features=features)
    result = evaluate(model, evals, config.eval_quota)
    result["flops"] = hap_flops(model.light, model.strong, model.top_m, list_size)
    logging.info("Eval metrics: %s", json.dumps(result))
    common.write_eval_metrics(fn_args.model_run_dir, result)
    module = PrerankingServing(model.light, model.strong)
    save_with_warmup(module, fn_args.serving_model_dir,
                    {"serving_default": module.serve, "rescore": module.rescore},
                     candidate_examples(evals, features=features))
