"""Retrieval: a two-tower model trained with TFRS's Retrieval task, exported as query tower + index.

Two towers (Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations", RecSys 2019, §3–§4; TFRS `tfrs.tasks.Retrieval`):

    u = Q(request features),  v_j = V(item features of j),  s(u, j) = u·v_j
    in-batch softmax with log-q correction, for the B (request, positive item) pairs of a batch
    and M extra sampled negatives:
        L = Σ_b −log( exp(s(u_b, j_b) − log q_{j_b}) / Σ_{j ∈ C} exp(s(u_b, j) − log q_j) )
    C = the B positives of the batch (the in-batch negatives) ∪ the M sampled negatives,
    q_j = the recorded sampling probability of candidate j (TFRS clips it to [1e-6, 1]).

`tfrs.tasks.Retrieval` computes L (its `candidate_sampling_probability` argument is the log-q
correction; extra candidate rows beyond the B positives are negatives for every query;
`remove_accidental_hits` masks a sampled or in-batch negative with the positive's id). What is
written here: the towers, the pair and negative streams, and the export.

Sampling probabilities (the `sampling_probability` feature, DESIGN §4):
* an in-batch candidate is present because it is some request's positive; its probability of
  being in a batch of B pairs is q_j = B·f_j, f_j its frequency among the training positives
  (`retrieval_pairs` records it in memory, `streamed_pair_dataset` looks it up from the split's
  `PositiveCounts`; Yi et al. §4 estimate f_j by streaming, here it is counted);
* a sampled negative records the probability with which it was drawn: q_j = M/N for M
  uniform draws from a corpus of N items (`UniformNegatives`), or the `sampling_probability`
  a NegativeSampler wrote on a `random_neg` candidate (`random_negatives_from_lists`).

Serving (DESIGN §7, §10): the query tower and a top-k index over the item corpus are saved, not a
`tfrs.Model` with FactorizedTopK metrics. The index is `tfrs.layers.factorized_top_k.BruteForce`
(exact, the default) or ScaNN (approximate), as `models.scann_index.IndexConfig` says
(`corpus_index`); it is called once before saving. Signatures:
    serving_default(examples: serialized request-context tf.Examples) → {item_ids [N, K], scores [N, K]}
    query_embedding(examples) → {embedding [N, d]}
    item_embeddings() → {item_ids [I], embeddings [I, d]}   (the corpus table the index was built
                        from, kept on the serving module: with either index, no ScaNN op)
"""
import dataclasses
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from cascade_ranking.models import export as export_lib
from cascade_ranking.models import list_inputs as LI
from cascade_ranking.models import scann_index
from cascade_ranking.models.embedding import FeatureEmbedding, fit_normalizer
from cascade_ranking.schema import features as F
from cascade_ranking.schema import request_list as RL


def build_mlp(units: Sequence[int], name: str, final_activation=None) -> tf.keras.Sequential:
    layers = [tf.keras.layers.Dense(u, activation="relu", name=f"{name}_{i}") for i, u in enumerate(units[:-1])]
    layers.append(tf.keras.layers.Dense(units[-1], activation=final_activation, name=f"{name}_{len(units) - 1}"))
    return tf.keras.Sequential(layers, name=name)


def dense_flops(dims: Sequence[int]) -> int:
    """FLOPs of an MLP with layer widths dims[0] → dims[1] → …, per input row, in tf.profiler's
    convention: a matmul is 2·in·out, a bias add out, activations (ReLU) 0."""
    return int(sum(2 * a * b + b for a, b in zip(dims[:-1], dims[1:])))


class Tower(tf.keras.layers.Layer):
    """Embeddings of the tower's features (`FeatureEmbedding`), concatenated, then an MLP.

        x = [e_f for f in features] (concatenated),  out = MLP(x)       (ReLU hidden layers)

    `feature_names` picks the tower's inputs from the registry `features`.
    """

    def __init__(self, feature_names: Sequence[str], embedding_dim: int = 16,
                 hidden_units: Sequence[int] = (64,), output_dim: int = 32,
                 features: F.FeatureConfig = F.DEFAULT, **kwargs):
        super().__init__(**kwargs)
        self.feature_names = tuple(feature_names)
        sparse = [f for f in features.sparse_features() if f.name in self.feature_names]
        dense = [f for f in features.dense_features() if f.name in self.feature_names]
        self.embedding = FeatureEmbedding(embedding_dim, sparse, dense, name="embedding")
        self.input_dim = embedding_dim * len(sparse) + sum(f.size for f in dense)
        self.units = tuple(hidden_units) + (output_dim,)
        self.mlp = build_mlp(self.units, name="mlp")

    def embed(self, features: Mapping[str, tf.Tensor], training=None) -> tf.Tensor:
        embedded = self.embedding(features, training=training)
        return tf.concat([embedded[n] for n in sorted(embedded)], axis=-1)

    def call(self, features: Mapping[str, tf.Tensor], training=None) -> tf.Tensor:
        return self.mlp(self.embed(features, training), training=training)

    def flops(self) -> int:
        """Per row, from the concatenated embeddings up (lookups and pooling not counted)."""
        return dense_flops((self.input_dim,) + self.units)


def dense_values(lists: Mapping[str, np.ndarray], features: F.FeatureConfig = F.DEFAULT) -> Dict[str, np.ndarray]:
    """Each dense input's values on the real rows of request lists ([N, width]): what the
    normalisers adapt on (query-side per request, item-side per real candidate)."""
    mask = np.asarray(lists["mask"]) > 0
    out = {}
    for f in features.of_role("query", "item", "ui"):
        if f.is_dense:
            values = np.asarray(lists[f.name], np.float32)
            out[f.name] = values if f.role == "query" else values.reshape(mask.shape + (f.width,))[mask]
    return out


def adapt_towers(towers: Sequence[Tower], lists: Mapping[str, np.ndarray], features: F.FeatureConfig = F.DEFAULT) -> None:
    """Fits the dense normalisers of the towers on the real rows of request lists."""
    values = dense_values(lists, features)
    for tower in towers:
        for f in tower.embedding.dense_features:
            fit_normalizer(tower.embedding.normalizers[f.name], values[f.name])


class TwoTowerScorer(tf.keras.layers.Layer):
    """A cascade stage scoring each candidate of a request list by u·v ([B, L] logits)."""

    def __init__(self, embedding_dim: int = 16, hidden_units: Sequence[int] = (64,), output_dim: int = 32,
                 features: F.FeatureConfig = F.DEFAULT, **kwargs):
        super().__init__(**kwargs)
        self.features = features
        self.query_tower = Tower(features.query_names, embedding_dim, hidden_units, output_dim, features, name="query_tower")
        self.item_tower = Tower(features.item_names, embedding_dim, hidden_units, output_dim, features, name="item_tower")

    def call(self, lists: Mapping[str, tf.Tensor], training=None) -> tf.Tensor:
        size = tf.shape(lists["mask"])[1]
        u = self.query_tower(LI.request_features(lists, self.features), training=training)  # [B, d]
        v = self.item_tower(LI.candidate_features(lists, self.features), training=training)  # [B·L, d]
        v = tf.reshape(v, [-1, size, v.shape[-1]])
        return tf.einsum("bd,bld->bl", u, v)

    def towers(self):
        return [self.query_tower, self.item_tower]


# ---------------------------------------------------------------------------------------------
# Training data: (request, positive item) pairs, and sampled negatives.
# ---------------------------------------------------------------------------------------------
def positive_mask(lists: Mapping[str, np.ndarray], positive: str = "gt") -> np.ndarray:
    """[R, L] bool: GT candidates (stage rerank_pos) or clicked ones ('click'), real only."""
    real = np.asarray(lists["mask"]) > 0
    if positive == "gt":
        return real & (np.asarray(lists["stage"]) == RL.TIER_INDEX[F.GROUND_TRUTH_TIER])
    if positive == "click":
        return real & (np.asarray(lists["click"]) > 0)
    raise ValueError(f"positive must be 'gt' or 'click', got {positive!r}")


def _item_columns(lists: Mapping[str, np.ndarray], rows: np.ndarray, slots: np.ndarray,
                  features: F.FeatureConfig = F.DEFAULT) -> Dict[str, np.ndarray]:
    """The item-side inputs of the candidates (rows, slots) of request lists, [N, width] each."""
    size = LI.list_size_of(lists)
    return {f.name: np.asarray(lists[f.name]).reshape(-1, size, f.width)[rows, slots] for f in features.of_role("item")}


def positive_pairs(lists: Mapping[str, np.ndarray], positive: str = "gt",
                   features: F.FeatureConfig = F.DEFAULT) -> Dict[str, Dict[str, np.ndarray]]:
    """{"query": request features [P, ...], "item": item features [P, ...]}: one (request,
    positive item) pair per positive candidate of the lists (none: P = 0)."""
    rows, slots = np.nonzero(positive_mask(lists, positive))
    return {"query": {name: np.asarray(lists[name])[rows] for name in features.query_names},
            "item": _item_columns(lists, rows, slots, features)}


def with_sampling_probability(pairs: Mapping[str, Mapping[str, np.ndarray]], batch_size: int,
                              features: F.FeatureConfig = F.DEFAULT) -> Dict[str, object]:
    """`pairs` with "sampling_probability" [P]: q_j = batch_size·f_j (f_j = frequency of item j
    among the positives, capped at 1), the probability that j is an in-batch candidate."""
    ids = pairs["item"][features.item_key][:, 0]
    if ids.size == 0:
        raise ValueError("the request lists have no positive candidate")
    unique, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    probability = PositiveCounts(unique, counts).sampling_probability(batch_size)[inverse.reshape(-1)]
    return {"query": dict(pairs["query"]), "item": dict(pairs["item"]), "sampling_probability": probability}


def retrieval_pairs(lists: Mapping[str, np.ndarray], batch_size: int, positive: str = "gt",
                    features: F.FeatureConfig = F.DEFAULT) -> Dict[str, object]:
    """One (request, positive item) pair per positive candidate of the lists, with its in-batch
    sampling probability: `with_sampling_probability(positive_pairs(lists))`.

    Returns {"query": request features [P, ...], "item": item features [P, ...],
    "sampling_probability": [P]}.
    """
    return with_sampling_probability(positive_pairs(lists, positive, features), batch_size, features)


@dataclasses.dataclass
class PositiveCounts:
    """How often each item is a positive of a train split: `ids` [J] (sorted, int64 or bytes) and
    `counts` [J]. What the log-q correction of a streamed split needs (q_j = B·f_j, f_j =
    counts_j / total), in memory of the items' number, not the pairs'."""

    ids: np.ndarray
    counts: np.ndarray

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def sampling_probability(self, batch_size: int) -> np.ndarray:
        """[J] float32 q_j = min(batch_size·counts_j / total, 1), as `with_sampling_probability`."""
        return np.minimum(batch_size * self.counts / self.total, 1.0).astype(np.float32)


def count_positives(counts: Optional[PositiveCounts], lists: Mapping[str, np.ndarray], positive: str = "gt",
                    features: F.FeatureConfig = F.DEFAULT) -> PositiveCounts:
    """`counts` (None: empty) plus the positives of `lists`: batches added one by one give the
    counts of all of them at once."""
    rows, slots = np.nonzero(positive_mask(lists, positive))
    ids = np.asarray(lists[features.item_key]).reshape(-1, LI.list_size_of(lists))[rows, slots]
    if counts is not None:
        merged_ids = np.concatenate([counts.ids, ids])
        weights = np.concatenate([counts.counts, np.ones(len(ids), np.int64)])
    else:
        merged_ids, weights = ids, np.ones(len(ids), np.int64)
    unique, inverse = np.unique(merged_ids, return_inverse=True)
    return PositiveCounts(unique, np.bincount(inverse.reshape(-1), weights=weights, minlength=len(unique)).astype(np.int64))


@dataclasses.dataclass
class ItemCorpus:
    """The item-side inputs of every distinct item (one row per id, sorted by id): `columns`
    maps each item-side feature of the registry to [N, width]; `key` names the item id."""

    columns: Dict[str, np.ndarray]
    key: str = F.ITEM_KEY

    @property
    def ids(self) -> np.ndarray:
        """[N] item ids (int64 or bytes)."""
        return self.columns[self.key][:, 0]

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    def features(self) -> Dict[str, np.ndarray]:
        return dict(self.columns)


def item_corpus_from_lists(*list_sets: Mapping[str, np.ndarray], features: F.FeatureConfig = F.DEFAULT) -> ItemCorpus:
    """The distinct items of request lists (the first occurrence of each item id)."""
    corpus = None
    for lists in list_sets:
        corpus = add_to_corpus(corpus, lists, features)
    return corpus


def add_to_corpus(corpus: Optional[ItemCorpus], lists: Mapping[str, np.ndarray],
                  features: F.FeatureConfig = F.DEFAULT) -> ItemCorpus:
    """`corpus` (None: empty) with the items of `lists` it lacks; an item keeps its first
    occurrence, so batches added one by one give the corpus of all of them at once, in memory of
    the corpus's size (not the lists')."""
    rows, slots = np.nonzero(np.asarray(lists["mask"]) > 0)
    columns = _item_columns(lists, rows, slots, features)
    if corpus is not None:
        columns = {k: np.concatenate([corpus.columns[k], v]) for k, v in columns.items()}
    _, first = np.unique(columns[features.item_key][:, 0], return_index=True)
    return ItemCorpus({k: v[first] for k, v in columns.items()}, features.item_key)


class UniformNegatives:
    """M items drawn uniformly (with replacement) from the corpus per batch; q = M / N recorded."""

    def __init__(self, corpus: ItemCorpus, num_negatives: int, seed: int = 0):
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        self.corpus = corpus
        self.num_negatives = int(num_negatives)
        self.seed = seed
        self._table = {k: tf.constant(v) for k, v in corpus.features().items()}

    def probability(self) -> float:
        return min(1.0, self.num_negatives / self.corpus.size)

    def __call__(self, batch: Dict, index: tf.Tensor) -> Dict:
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(index, tf.int64)])
        picks = tf.random.stateless_uniform([self.num_negatives], seed, 0, self.corpus.size, dtype=tf.int64)
        batch = dict(batch)
        batch["negative"] = {k: tf.gather(v, picks) for k, v in self._table.items()}
        batch["negative_sampling_probability"] = tf.fill([self.num_negatives], self.probability())
        return batch


def random_negatives_from_lists(lists: Mapping[str, np.ndarray], features: F.FeatureConfig = F.DEFAULT) -> Dict[str, np.ndarray]:
    """The `random_neg` candidates of the lists with their recorded sampling_probability."""
    real = np.asarray(lists["mask"]) > 0
    rows, slots = np.nonzero(real & (np.asarray(lists["stage"]) == RL.TIER_INDEX[RL.RANDOM_NEG_TIER]))
    out = _item_columns(lists, rows, slots, features)
    out["sampling_probability"] = np.asarray(lists["sampling_probability"])[rows, slots].astype(np.float32)
    return out


def retrieval_dataset(pairs: Mapping, batch_size: int, negatives: Optional[UniformNegatives] = None,
                      shuffle_seed: Optional[int] = None, num_epochs: int = 1) -> tf.data.Dataset:
    """Batches of pairs (query tokens ragged), each with the sampled negatives of that batch.

    With `shuffle_seed`, each pass takes the pairs in a new order: tf.data shuffles the pair
    indices (one int64 each) and each batch gathers its pairs, where shuffling the pairs themselves
    buffered every pair as an element of some 15 tensors (0.7 GB more at 16× the demo's data)."""
    if shuffle_seed is None:
        return _with_negatives(tf.data.Dataset.from_tensor_slices(dict(pairs)).repeat(num_epochs).batch(
            batch_size, drop_remainder=True), negatives)
    tensors = tf.nest.map_structure(tf.convert_to_tensor, dict(pairs))
    count = int(tensors["sampling_probability"].shape[0])
    ds = (tf.data.Dataset.range(count).shuffle(count, seed=shuffle_seed, reshuffle_each_iteration=True)
          .repeat(num_epochs).batch(batch_size, drop_remainder=True)
          .map(lambda index: tf.nest.map_structure(lambda t: tf.gather(t, index), tensors)))
    return _with_negatives(ds, negatives)


LISTS_PER_CHUNK = 4096  # request lists parsed, and their pairs shuffled, at a time by `streamed_pair_dataset`


def pairs_of_parsed_lists(lists: Mapping[str, tf.Tensor], list_size: int, positive: str = "gt",
                          features: F.FeatureConfig = F.DEFAULT) -> Dict[str, Dict[str, tf.Tensor]]:
    """`positive_pairs` in the graph, for a batch of parsed request lists: {"query": [P, ...],
    "item": [P, ...]}, one pair per positive candidate, in the same (list, slot) order."""
    real = lists["mask"] > 0
    if positive == "gt":
        stage = lists["stage"]
        chosen = real & tf.equal(stage, tf.cast(RL.TIER_INDEX[F.GROUND_TRUTH_TIER], stage.dtype))
    elif positive == "click":
        chosen = real & (lists["click"] > 0)
    else:
        raise ValueError(f"positive must be 'gt' or 'click', got {positive!r}")
    index = tf.where(chosen)
    return {"query": {name: tf.gather(lists[name], index[:, 0]) for name in features.query_names},
            "item": {f.name: tf.gather_nd(tf.reshape(lists[f.name], [-1, list_size, f.width]), index)
                     for f in features.of_role("item")}}


def streamed_pair_dataset(file_patterns, list_size: int, batch_size: int, positives: PositiveCounts,
                          negatives: Optional[UniformNegatives] = None, shuffle_seed: Optional[int] = None,
                          num_epochs: int = 1, positive: str = "gt", features: F.FeatureConfig = F.DEFAULT,
                          lists_per_chunk: int = LISTS_PER_CHUNK) -> tf.data.Dataset:
    """`retrieval_dataset`'s batches, streamed from request-list files on every pass instead of
    held in memory. The lists are read `lists_per_chunk` at a time (`list_inputs.request_list_dataset`,
    which shuffles them with a buffer of 10,000 lists when `shuffle_seed` is set); each chunk's
    positive pairs are taken out in the graph (`pairs_of_parsed_lists`), permuted as a whole (a
    stateless shuffle seeded per chunk by `tf.data.Dataset.random`, new on every pass) and cut into
    batches of `batch_size` pairs (`Dataset.rebatch`, which carries a chunk's remainder into the
    next batch: P // batch_size batches a pass, as in memory). Memory is bounded by the list buffer
    and one chunk whatever the split's size, and no step handles one pair at a time (on the demo's
    lists an unbatch + per-pair `shuffle` ran at 1.5× the Trainer's step rate; this at 3–5×,
    bench/input_rates.py).

    A split of at most `lists_per_chunk` lists is shuffled whole on each pass, as in memory; a
    larger one within chunks of shuffled lists. Each pair's sampling probability is looked up
    from `positives`, the counts of the whole split: q_j = min(B·f_j, 1), the value
    `with_sampling_probability` gives the pairs in memory."""
    key = features.item_key
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(positives.ids), tf.constant(positives.sampling_probability(batch_size))),
        default_value=0.0)
    needed = ["mask", "stage" if positive == "gt" else "click", *features.query_names,
              *(f.name for f in features.of_role("item"))]
    ds = LI.request_list_dataset(file_patterns, lists_per_chunk, list_size, shuffle_seed=shuffle_seed,
                                 num_epochs=num_epochs, features=features, keys=needed)
    ds = ds.map(lambda lists: pairs_of_parsed_lists(lists, list_size, positive, features))
    if shuffle_seed is not None:
        def permuted(pairs, seed):
            count = tf.shape(pairs["item"][key])[0]
            order = tf.random.experimental.stateless_shuffle(tf.range(count), tf.stack([seed, tf.constant(0, tf.int64)]))
            return tf.nest.map_structure(lambda t: tf.gather(t, order), pairs)

        seeds = tf.data.Dataset.random(seed=shuffle_seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, seeds)).map(permuted)

    def with_probability(batch):
        return {**batch, "sampling_probability": table.lookup(tf.reshape(batch["item"][key], [-1]))}

    return _with_negatives(ds.rebatch(batch_size, drop_remainder=True).map(with_probability), negatives)


def _with_negatives(ds: tf.data.Dataset, negatives: Optional[UniformNegatives]) -> tf.data.Dataset:
    if negatives is not None:
        ds = ds.enumerate().map(lambda i, b: negatives(b, i))
    return ds.prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------
class RetrievalModel(tfrs.Model):
    """Two towers + `tfrs.tasks.Retrieval` (in-batch softmax, sampled negatives, log-q)."""

    def __init__(self, embedding_dim: int = 16, hidden_units: Sequence[int] = (64,), output_dim: int = 32,
                 temperature: Optional[float] = None, remove_accidental_hits: bool = True,
                 features: F.FeatureConfig = F.DEFAULT):
        super().__init__()
        self.features = features
        self.query_tower = Tower(features.query_names, embedding_dim, hidden_units, output_dim, features,
                                 name="query_tower")
        self.item_tower = Tower(features.item_names, embedding_dim, hidden_units, output_dim, features,
                                name="item_tower")
        self.task = tfrs.tasks.Retrieval(temperature=temperature, remove_accidental_hits=remove_accidental_hits)

    def call(self, features, training=None):
        return self.query_tower(features, training=training)

    def candidates(self, features: Mapping, training=None):
        """(candidate embeddings, sampling probabilities, ids): positives, then sampled negatives."""
        key = self.features.item_key
        embeddings = [self.item_tower(LI.candidate_features(features["item"], self.features), training=training)]
        probabilities = [tf.reshape(tf.cast(features["sampling_probability"], tf.float32), [-1])]
        ids = [tf.reshape(features["item"][key], [-1])]
        if "negative" in features:
            embeddings.append(self.item_tower(LI.candidate_features(features["negative"], self.features), training=training))
            probabilities.append(tf.reshape(tf.cast(features["negative_sampling_probability"], tf.float32), [-1]))
            ids.append(tf.reshape(features["negative"][key], [-1]))
        return tf.concat(embeddings, 0), tf.concat(probabilities, 0), tf.concat(ids, 0)

    def compute_loss(self, features, training=False) -> tf.Tensor:
        query = self.query_tower(LI.request_features(features["query"], self.features), training=training)
        candidates, probability, ids = self.candidates(features, training)
        return self.task(query, candidates, candidate_sampling_probability=probability, candidate_ids=ids,
                         compute_metrics=False, compute_batch_metrics=False)

    # tfrs.Model's steps, not converted by autograph: plain TF code, as `models.tasks.StageModel`'s.
    @tf.autograph.experimental.do_not_convert
    def train_step(self, inputs):
        return super().train_step(inputs)

    @tf.autograph.experimental.do_not_convert
    def test_step(self, inputs):
        return super().test_step(inputs)


def train_retrieval(train_lists: Mapping[str, np.ndarray], epochs: int = 3, batch_size: int = 256,
                    num_negatives: int = 256, corpus: Optional[ItemCorpus] = None, seed: int = 0,
                    learning_rate: float = 0.05, **model_kwargs) -> RetrievalModel:
    """Fits a RetrievalModel on the GT pairs of request lists (Adagrad, as the TFRS tutorials)."""
    tf.keras.utils.set_random_seed(seed)
    model = RetrievalModel(**model_kwargs)
    corpus = corpus or item_corpus_from_lists(train_lists, features=model.features)
    pairs = retrieval_pairs(train_lists, batch_size, features=model.features)
    adapt_towers([model.query_tower, model.item_tower], train_lists, model.features)
    negatives = UniformNegatives(corpus, num_negatives, seed) if num_negatives else None
    model.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate))
    model.fit(retrieval_dataset(pairs, batch_size, negatives, shuffle_seed=seed, num_epochs=epochs), verbose=0)
    return model


# ---------------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------------
def request_context_spec(schema=None, features: F.FeatureConfig = F.DEFAULT) -> Dict:
    """Parse spec of the registry's query-side inputs (what a retrieval request carries), from
    `schema` (default: the packaged one)."""
    spec = F.serving_parse_spec(schema, features)
    return {name: spec[name] for name in features.query_names}


class RetrievalServing(tf.Module):
    """What is saved: the query tower, a top-k index over the item embeddings (BruteForce or ScaNN,
    `scann_index.build_index`) and the corpus table it was built from, `item_ids` [I] and
    `embeddings` [I, d] (what `item_embeddings` returns): BruteForce's own two variables, or for
    ScaNN a copy held by this module."""

    def __init__(self, query_tower: Tower, index: tfrs.layers.factorized_top_k.TopK, item_ids: tf.Tensor,
                 embeddings: np.ndarray, schema=None, features: F.FeatureConfig = F.DEFAULT):
        super().__init__()
        self.query_tower = query_tower
        self.index = index
        if isinstance(index, tfrs.layers.factorized_top_k.BruteForce):
            # BruteForce keeps the table in these two variables (tfrs 0.7.3): the same objects, saved once.
            self.corpus_ids, self.corpus_embeddings = index._identifiers, index._candidates
        else:  # ScaNN's table is inside its searcher: a copy of the table, read with no ScaNN op
            self.corpus_ids = tf.Variable(item_ids, trainable=False, name="corpus_ids")
            self.corpus_embeddings = tf.Variable(tf.constant(embeddings, tf.float32), trainable=False,
                                                 name="corpus_embeddings")
        self._schema = schema
        self._features = features
        self._spec = request_context_spec(schema, features)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=export_lib.SERVING_INPUT_KEY)], autograph=False)
    def serve(self, examples):
        scores, ids = self.index(self._request(examples))
        return {"scores": scores, "item_ids": ids}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=export_lib.SERVING_INPUT_KEY)], autograph=False)
    def query_embedding(self, examples):
        return {"embedding": self.query_tower(self._request(examples), training=False)}

    def _request(self, examples):
        parsed = export_lib.parse_examples(examples, self._spec, self._schema)
        return LI.request_features(parsed, self._features)

    @tf.function(input_signature=[], autograph=False)
    def item_embeddings(self):
        return {"item_ids": tf.identity(self.corpus_ids), "embeddings": tf.identity(self.corpus_embeddings)}

    def signatures(self) -> Dict:
        return {"serving_default": self.serve, "query_embedding": self.query_embedding,
                "item_embeddings": self.item_embeddings}


def item_embeddings(item_tower: Tower, corpus: ItemCorpus, batch_size: int = 4096,
                    features: F.FeatureConfig = F.DEFAULT) -> np.ndarray:
    feats = corpus.features()
    out = []
    for start in range(0, corpus.size, batch_size):
        part = {k: v[start:start + batch_size] for k, v in feats.items()}
        out.append(item_tower(LI.candidate_features(part, features), training=False).numpy())
    return np.concatenate(out)


def corpus_identifiers(corpus: ItemCorpus) -> tf.Tensor:
    """The index's identifiers: the item ids, int64 or string."""
    ids = corpus.ids
    if ids.dtype == object or ids.dtype.kind == "S":
        return tf.constant([bytes(i) for i in ids], tf.string)
    return tf.constant(ids.astype(np.int64))


def corpus_index(query_tower: Tower, item_tower: Tower, corpus: ItemCorpus, k: int,
                 index: Optional[scann_index.IndexConfig] = None, features: F.FeatureConfig = F.DEFAULT):
    """(index, item ids [I], item embeddings [I, d]): the top-min(k, I) index `index` names
    (default BruteForce; `scann_index.build_index`) over the item tower's embeddings of the corpus,
    queried through the query tower. What both retrieval exporters save."""
    embeddings = item_embeddings(item_tower, corpus, features=features)
    ids = corpus_identifiers(corpus)
    return scann_index.build_index(query_tower, embeddings, ids, k, index), ids, embeddings


def save_serving(module: RetrievalServing, export_dir: str, warmup_examples: Sequence[bytes]) -> str:
    """Calls the module's index once on the warmup examples (building its graph), then saves the
    module's signatures atomically with the warmup file; a ScaNN index is saved with the options
    its ops need (`scann_index.save_options`; none for BruteForce)."""
    module.serve(tf.constant(list(warmup_examples)))
    return export_lib.save_atomically(module, export_dir, module.signatures(),
                                      lambda tmp: export_lib.write_warmup_requests(tmp, list(warmup_examples)),
                                      options=scann_index.save_options(module.index))


def export_retrieval(query_tower: Tower, item_tower: Tower, corpus: ItemCorpus, export_dir: str,
                     warmup_examples: Sequence[bytes], k: int = 100, features: F.FeatureConfig = F.DEFAULT,
                     index: Optional[scann_index.IndexConfig] = None) -> str:
    """Saves query tower + top-k index over the corpus (BruteForce, or what `index` names),
    atomically, with a warmup file.

    `warmup_examples`: serialized tf.Examples holding request features; the index is called on
    them once before saving (DESIGN §10) and they become the TF Serving warmup requests.
    """
    if not warmup_examples:
        raise ValueError("export_retrieval needs at least one warmup example")
    built, ids, embeddings = corpus_index(query_tower, item_tower, corpus, k, index, features)
    return save_serving(RetrievalServing(query_tower, built, ids, embeddings, features=features), export_dir,
                        warmup_examples)
