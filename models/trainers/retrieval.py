"""Trainer module of the retrieval stage: the two-tower model (`models.retrieval`).

Input: the NegativeSampler's request-list Examples (`fn_args.train_files` / `eval_files`, gzipped
TFRecords in the `schema.request_list` layout). The train split is read one batch of lists at a
time (`read_train_split`), keeping only what training needs: how often each item is a GT positive
(for the log-q correction), the distinct items and the first lists for the normalisers. Training
streams the (request, GT item) pairs from the same files on every epoch
(`models.retrieval.streamed_pair_dataset`), so no pass holds the split in memory. The eval split
is read twice, `EVAL_CHUNK` lists at a time: for its items (the index's corpus), then to score its
requests (`evaluate_batches`, which keeps only the scores, GT and mask of each candidate).

The list size is the data's (`list_data.list_size_of_splits`: the NegativeSampler's `list_size`).
custom_config: {"retrieval": JSON object}, keys and defaults in `RetrievalTrainerConfig`:
    epochs 3, batch_size 256 (capped at the number
    of training pairs), num_negatives 256 (uniform corpus negatives per batch, 0 = in-batch only),
    learning_rate 0.05 (Adagrad), embedding_dim 16, hidden_units [64], output_dim 32,
    top_k 100 (index size of serving_default, capped at the corpus), eval_quota 40 (the stage's
    quota q in the per-list recall), seed 0; index "brute_force" (exact) or "scann" (approximate,
    needs `pip install 'cascade-ranking[scann]'`) and ScaNN's parameters scann_num_leaves,
    scann_leaves_to_search, scann_reorder (0: automatic), scann_dims_per_block 2, scann_avq_ratio 4
    (`models.scann_index`, whose docstring has the method, the automatic values and the TF Serving
    caveat: a stock TF Serving build lacks ScaNN's ops).

Training: `RetrievalModel.fit` (Keras) with TensorBoard + BackupAndRestore (`common.callbacks`).
eval_metrics.json: on the eval lists, with GT = the `rerank_pos` tier,
    recall_retrieval@|GT|   Recall@|GT|@|GT| of u·v within each list
    recall_retrieval@<q>    Recall@|GT|@q within each list (the stage's cascade quota)
    index_recall@<K>        share of the eval GT (request, item) pairs whose item is in the
                            exact top K of u·v over the corpus for that request (corpus-wide
                            retrieval: the BruteForce index's answer; a ScaNN index returns
                            ~98 % of that top K, bench/retrieval_index.py)
    requests, requests_without_gt   lists evaluated / lists without a real GT candidate (left
                            out of the recalls)
Export (`export_retrieval`'s layout, plus one signature, with the index `index` names), with the
warmup file:
    serving_default(examples)  request (or candidate-row) tf.Examples → {item_ids [N, K], scores [N, K]}
    query_embedding(examples)  → {embedding [N, d]}
    item_embeddings()          → {item_ids [I], embeddings [I, d]}
    score(examples)            serialized candidate-row tf.Examples → {score [N]} = u·v, the
                               retrieval stage's score of one candidate (as `TwoTowerScorer`)
The item corpus of the index is every item seen in the train and eval lists.

The list helpers (`iterate_lists`, `candidate_examples`, `candidate_lists`) are
`models.trainers.list_data`'s, shared with the pre-ranking and cascade Trainer modules.
"""
import dataclasses
import json
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from cascade_ranking.models import export as export_lib
from cascade_ranking.models import list_inputs as LI
from cascade_ranking.models import retrieval as R
from cascade_ranking.models import scann_index
from cascade_ranking.models.cascade_model import cascade_labels
from cascade_ranking.models.config import check_positive
from cascade_ranking.models.metrics import requests_without_gt, stage_recall
from cascade_ranking.models.tasks import build_train_step
from cascade_ranking.models.trainers import common, distribute, warm_start
from cascade_ranking.models.trainers.epoch_progress import EpochProgress
from cascade_ranking.models.trainers.list_data import (candidate_examples, candidate_lists, candidate_parse_spec, list_size_of_splits,
                                      ADAPT_LISTS, concatenate_batches, iterate_lists, scan_train_split)
from cascade_ranking.schema import features as F

CONFIG_KEY = "retrieval"
# The strategies it trains under on a training cluster (`models.trainers.distribute`): only
# ParameterServer, where each worker steps on whole batches. Under MultiWorkerMirrored each replica
# would hold part of the batch, and the in-batch softmax (`tfrs.tasks.Retrieval`) would score every
# query against its replica's candidates only: fewer negatives, another objective.
DISTRIBUTE_STRATEGIES = (distribute.PARAMETER_SERVER,)
EVAL_CHUNK = 1024  # eval requests scored against the whole corpus at a time ([chunk, I] scores)


@dataclasses.dataclass
class RetrievalTrainerConfig:
    epochs: int = 3
    batch_size: int = 256
    num_negatives: int = 256
    learning_rate: float = 0.05
    embedding_dim: int = 16
    hidden_units: Tuple[int, ...] = (64,)
    output_dim: int = 32
    top_k: int = 100
    eval_quota: int = 40
    seed: int = 0
    # The exported top-k index (`models.scann_index`): "brute_force" (exact u·v over the whole
    # corpus) or "scann" (approximate, ScaNN: needs the scann package, `pip install
    # 'cascade-ranking[scann]'`, and a TF Serving build with ScaNN's ops to serve it).
    index: str = "brute_force"
    # ScaNN's parameters (ignored by brute_force), for a corpus of N items: k-means leaves L (0: round(√N)),
    scann_num_leaves: int = 0
    # leaves searched per query S (0: a fifth of L, or enough to hold 40·scann_reorder items),
    scann_leaves_to_search: int = 0
    # candidates rescored exactly R (0: min(N, 10·top_k); else >= top_k),
    scann_reorder: int = 0
    # dimensions per product-quantization block (16 centres per block),
    scann_dims_per_block: int = 2
    # and the anisotropic loss's ratio h_∥/h_⊥ at the 5 % quantile of the item norms (0: plain squared error).
    scann_avq_ratio: float = scann_index.DEFAULT_AVQ_RATIO

    def __post_init__(self):
        check_positive(self, "epochs", "batch_size", "learning_rate", "embedding_dim", "output_dim", "top_k", "eval_quota")
        if self.num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {self.num_negatives}")
        self.index_config()  # validates the index fields

    def index_config(self) -> scann_index.IndexConfig:
        """The index fields as `scann_index.IndexConfig` (same names)."""
        return scann_index.IndexConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(scann_index.IndexConfig)})


# ---------------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------------
class ScoringRetrievalServing(R.RetrievalServing):
    """`RetrievalServing` plus `score`: u·v of serialized candidate-row tf.Examples."""

    def __init__(self, query_tower: R.Tower, item_tower: R.Tower, index, item_ids: tf.Tensor, embeddings: np.ndarray,
                 schema=None, features: F.FeatureConfig = F.DEFAULT):
        super().__init__(query_tower, index, item_ids, embeddings, schema, features)
        self.item_tower = item_tower
        self._schema = schema
        self._candidate_spec = candidate_parse_spec(schema, features)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=export_lib.SERVING_INPUT_KEY)], autograph=False)
    def score(self, examples):
        lists = candidate_lists(examples, self._candidate_spec, self._schema, self._features)
        u = self.query_tower(LI.request_features(lists, self._features), training=False)
        v = self.item_tower(LI.candidate_features(lists, self._features), training=False)
        return {"score": tf.reduce_sum(u * v, axis=-1)}

    def signatures(self) -> Dict:
        return {**super().signatures(), "score": self.score}


def export(model: R.RetrievalModel, corpus: R.ItemCorpus, export_dir: str, warmup: Sequence[bytes], k: int,
           schema=None, index: Optional[scann_index.IndexConfig] = None) -> str:
    """`models.retrieval.export_retrieval` with the extra `score` signature (same layout, same index
    choice: `index`, default BruteForce); requests are parsed with `schema` (the pipeline's;
    default: the packaged one)."""
    built, ids, embeddings = R.corpus_index(model.query_tower, model.item_tower, corpus, k, index, model.features)
    module = ScoringRetrievalServing(model.query_tower, model.item_tower, built, ids, embeddings, schema, model.features)
    return R.save_serving(module, export_dir, warmup)


# ---------------------------------------------------------------------------------------------
# Evaluation and run_fn.
# ---------------------------------------------------------------------------------------------
def evaluate(model: R.RetrievalModel, corpus: R.ItemCorpus, lists: Mapping[str, np.ndarray], k: int,
             quota: int) -> Dict[str, float]:
    """The eval metrics (module docstring) of lists in memory: `evaluate_batches` of one batch."""
    return evaluate_batches(model, corpus, [lists], k, quota)


def evaluate_batches(model: R.RetrievalModel, corpus: R.ItemCorpus, batches: Iterable[Mapping[str, np.ndarray]],
                     k: int, quota: int) -> Dict[str, float]:
    """The eval metrics of batches of lists, read one at a time: of each batch it keeps the u·v of
    its candidates, its GT and its mask ([R, L] each) and whether each GT item is in the index's
    top k, so the eval split is never in memory whole."""
    features = model.features
    k = min(int(k), corpus.size)
    items = R.item_embeddings(model.item_tower, corpus, features=features)
    kept, hits = [], []
    for lists in batches:
        scorer_u = model.query_tower(LI.request_features({n: tf.constant(lists[n]) for n in features.query_names},
                                                         features), training=False).numpy()  # [R, d]
        size = LI.list_size_of(lists)
        v = model.item_tower(LI.candidate_features({n: tf.constant(lists[n]) for n in features.item_names}, features),
                             training=False).numpy().reshape(len(scorer_u), size, -1)
        gt = cascade_labels(lists).numpy()
        kept.append({"scores": np.einsum("bd,bld->bl", scorer_u, v), "gt": gt, "mask": np.asarray(lists["mask"])})
        for start in range(0, len(scorer_u), EVAL_CHUNK):
            # The index's top k of each request, unordered (only membership is read): argpartition is
            # linear in the corpus, where a full argsort was n log n (0.8 s of the demo's 10k items).
            top = corpus.ids[np.argpartition(-(scorer_u[start:start + EVAL_CHUNK] @ items.T), k - 1, axis=1)[:, :k]]
            rows, slots = np.nonzero(gt[start:start + EVAL_CHUNK] > 0)
            hits += [lists[features.item_key][start + r, j] in top[r] for r, j in zip(rows, slots)]
    columns = concatenate_batches(kept, "the eval batches")
    scores, gt, mask = columns["scores"], columns["gt"], columns["mask"]
    return {
        "requests": int(mask.shape[0]),
        "requests_without_gt": requests_without_gt(gt, mask),
        "corpus_size": corpus.size,
        "recall_retrieval@|GT|": stage_recall(scores, gt, m=None, mask=mask),
        f"recall_retrieval@{quota}": stage_recall(scores, gt, m=quota, mask=mask),
        f"index_recall@{k}": float(np.mean(hits)) if hits else 0.0,
    }


@dataclasses.dataclass
class TrainSplit:
    """What the retrieval Trainer keeps of its train split: how often each item is a positive
    (`models.retrieval.PositiveCounts`), the distinct items (the negatives' corpus) and the first
    lists (`list_data.adaptation_lists`, for the towers' normalisers). None of them grows with the
    number of candidate rows or of pairs: the counts and the corpus grow with the items."""

    positives: R.PositiveCounts
    corpus: R.ItemCorpus
    sample: Dict[str, np.ndarray]


def read_train_split(file_patterns, list_size: int, features: F.FeatureConfig = F.DEFAULT,
                     batch_size: int = 1024) -> TrainSplit:
    """`TrainSplit` of request-list files, read `batch_size` lists at a time."""
    positives, corpus = None, None

    def visit(batch):
        nonlocal positives, corpus
        positives = R.count_positives(positives, batch, features=features)
        corpus = R.add_to_corpus(corpus, batch, features)

    sample = scan_train_split(file_patterns, list_size, visit, features, batch_size)
    return TrainSplit(positives, corpus, sample)


def train_split_of(lists: Mapping[str, np.ndarray], features: F.FeatureConfig = F.DEFAULT) -> TrainSplit:
    """`TrainSplit` of lists already in memory (benches, tests)."""
    return TrainSplit(R.count_positives(None, lists, features=features), R.item_corpus_from_lists(lists, features=features),
                      {k: v[:ADAPT_LISTS] for k, v in lists.items()})


def build_model(config: RetrievalTrainerConfig, train: TrainSplit, features: F.FeatureConfig = F.DEFAULT):
    """(compiled model with adapted towers, batch size, sampled negatives or None) for the train
    split: what `run_fn` fits, and what bench/stage_throughput.py times."""
    positives = train.positives.total
    if not positives:
        raise ValueError("the request lists have no positive candidate")
    batch_size = min(config.batch_size, positives)
    model = R.RetrievalModel(config.embedding_dim, config.hidden_units, config.output_dim, features=features)
    R.adapt_towers([model.query_tower, model.item_tower], train.sample, features)
    negatives = R.UniformNegatives(train.corpus, config.num_negatives, config.seed) if config.num_negatives else None
    model.compile(optimizer=tf.keras.optimizers.Adagrad(config.learning_rate))
    return model, batch_size, negatives


def flops(model: R.RetrievalModel) -> Dict[str, int]:
    """FLOPs of the served retrieval stage (`models.retrieval.dense_flops` convention): per
    candidate of the index, u·v (2·d, the item vectors are computed once at export); per request,
    the query tower; per corpus item at export, the item tower."""
    d = model.query_tower.units[-1]
    return {"per_candidate": 2 * d, "per_request": model.query_tower.flops(), "per_item_at_export": model.item_tower.flops()}


def run_fn(fn_args) -> None:
    """Called by the TFX Trainer (GenericExecutor)."""
    config = common.config_from(fn_args, CONFIG_KEY, RetrievalTrainerConfig)
    if config.index == "scann":
        scann_index.require_scann()  # before training: one line naming the fix
    schema, schema_path = common.pipeline_schema(fn_args)
    logging.info("Training the retrieval model with %s (schema %s)", config, schema_path)
    tf.keras.utils.set_random_seed(config.seed)
    features = common.feature_config(fn_args)
    list_size = list_size_of_splits(fn_args)
    train = read_train_split(fn_args.train_files, list_size, features)
    corpus, warmup = train.corpus, None
    for lists in iterate_lists(fn_args.eval_files, list_size, EVAL_CHUNK, features):  # the eval items join the index
        corpus = R.add_to_corpus(corpus, lists, features)
        warmup = warmup or candidate_examples(lists, features=features)
    if warmup is None:
        raise ValueError(f"no request lists in {fn_args.eval_files}")
    cluster = distribute.cluster_config(fn_args)
    strategy = distribute.strategy_for("retrieval", DISTRIBUTE_STRATEGIES, cluster.min_shard_bytes)
    with distribute.scope(strategy):
        model, batch_size, negatives = build_model(config, train, features)

    def pairs(shuffle_seed=None, lists_per_chunk=R.LISTS_PER_CHUNK):
        return R.streamed_pair_dataset(fn_args.train_files, list_size, batch_size, train.positives, negatives,
                                       shuffle_seed=shuffle_seed, features=features, lists_per_chunk=lists_per_chunk)

    with distribute.scope(strategy):
        build_train_step(model, next(iter(pairs(lists_per_chunk=64))))  # traced once; one batch needs a few lists
        warm = warm_start.restore(model, fn_args, "Trainer.retrieval")
    distribute.fit(model, lambda: pairs(config.seed), strategy, epochs=warm_start.epochs(fn_args, config.epochs, warm),
                   callbacks=common.callbacks(fn_args) + [EpochProgress("retrieval")],
                   steps_per_epoch=train.positives.total // batch_size)  # the pairs' batches of one pass
    result = evaluate_batches(model, corpus, iterate_lists(fn_args.eval_files, list_size, EVAL_CHUNK, features),
                              config.top_k, config.eval_quota)
    result["flops"] = flops(model)
    result["schema_path"] = schema_path
    logging.info("Eval metrics: %s", json.dumps(result))
    common.write_eval_metrics(fn_args.model_run_dir, result)
    export(model, corpus, fn_args.serving_model_dir, warmup, config.top_k, schema, config.index_config())
    warm_start.save(model, fn_args)
