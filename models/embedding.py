"""FeatureEmbedding: the schema-driven input layer of every stage model.

For each sparse feature f of the run's feature registry (`schema.features.FeatureConfig`):
    b_f(id) = id mod num_buckets_f                       (lookup hash, int64 ids)
    b_f(id) = FarmHash64(id) mod num_buckets_f           (lookup hash, string ids: Keras `Hashing`)
    b_f(id) = K + rank_f(id)  if id ∈ V_f                (lookup vocabulary: Keras `IntegerLookup` /
            = one of K OOV rows  otherwise                `StringLookup` on the file of V_f, K =
                                                          oov_buckets; num_buckets_f = |V_f| + K)
    e_f = E_f[b_f(id)]                                   (univalent id)
    e_f = (1/max(|T|, 1)) Σ_{t∈T} E_f[b_f(t)]            (multivalent list T, average pooling;
                                                          an empty list gives 0; the padding
                                                          value, 0 or "", is no id)
For each dense feature: NaN → 0 (counted in `nan_count` during training), then (x − μ)/σ with μ, σ adapted on
training data (`tf.keras.layers.Normalization`).

Learning-rate multiplier c (`lr_multiplier`): each table stores E' and serves E = c·E', with E'
initialised at 1/c of the usual scale (so E starts as it would without c). Adagrad's and Adam's
steps do not depend on the gradient's scale, so a step of size η on E' moves E by about c·η: the
tables learn c times faster than the rest of the model under one optimizer (and one EMA).
The vocabulary file (the pipeline's `tft.vocabulary` output, `schema.vocabulary`) is read by the
lookup layer and saved with the model as a SavedModel asset, so serving needs no external file.
Returns a dict feature name → [B, d] tensor, so towers can pick their own features (the Q·U
factorisation reads the quality features in Q and the UI features in U).
"""
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import tensorflow as tf

from cascade_ranking.schema import features as F


def fit_normalizer(normalizer: tf.keras.layers.Normalization, values) -> None:
    """`normalizer.adapt(values)` for values already in memory ([N, width]).

    Written by hand because Keras's `adapt` builds a tf.data pipeline and traces an adapt function
    on every call (about 0.5 s each; the cascade Trainer adapts a dozen normalisers, which took 11 s
    of its 35). This calls the layer's own `update_state` once on the whole array and then
    `finalize_state`: the same mean and variance (Keras merges its batches with the exact pooled
    formula), in a few eager ops."""
    values = tf.convert_to_tensor(np.asarray(values, np.float32))
    if values.shape[0] == 0:
        normalizer.adapt(values)  # Keras's own handling of no data
        return
    if normalizer.built:
        normalizer.reset_state()
    else:
        normalizer._adapt_maybe_build(values)  # pylint: disable=protected-access  (what `adapt` calls)
    normalizer.update_state(values)
    normalizer.finalize_state()
    normalizer._is_adapted = True  # pylint: disable=protected-access  (what `adapt` sets)


class FeatureEmbedding(tf.keras.layers.Layer):
    def __init__(
        self,
        embedding_dim: int = 16,
        sparse_features: Sequence[F.SparseFeature] = F.SPARSE_FEATURES,
        dense_features: Sequence[F.DenseFeature] = F.DENSE_FEATURES,
        lr_multiplier: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not lr_multiplier > 0:
            raise ValueError(f"lr_multiplier must be > 0, got {lr_multiplier}")
        self.embedding_dim = embedding_dim
        self.sparse_features = tuple(sparse_features)
        self.dense_features = tuple(dense_features)
        self.lr_multiplier = float(lr_multiplier)
        unresolved = [f.name for f in self.sparse_features if f.lookup == "vocabulary" and not f.vocabulary_file]
        if unresolved:
            raise ValueError(f"FeatureEmbedding: {', '.join(unresolved)} have lookup vocabulary but no vocabulary file")
        scale = 0.05 / self.lr_multiplier  # Keras Embedding's default RandomUniform(−0.05, 0.05), over c
        self.tables = {
            f.name: tf.keras.layers.Embedding(f.num_buckets, embedding_dim, name=f"{f.name}_embedding",
                                              embeddings_initializer=tf.keras.initializers.RandomUniform(-scale, scale))
            for f in self.sparse_features
        }
        self.hashers = {f.name: tf.keras.layers.Hashing(f.num_buckets, name=f"{f.name}_hashing")
                        for f in self.sparse_features if f.dtype == "string" and f.lookup == "hash"}
        # mask_token None: the padding of multivalent lists is masked before pooling (embed_sparse),
        # so it needs no row of its own (a pad that reaches the lookup lands in an OOV row, weighted 0).
        self.lookups = {f.name: (tf.keras.layers.StringLookup if f.dtype == "string" else tf.keras.layers.IntegerLookup)(
                            vocabulary=f.vocabulary_file, num_oov_indices=f.oov_buckets, mask_token=None,
                            name=f"{f.name}_lookup")
                        for f in self.sparse_features if f.lookup == "vocabulary"}
        for name, lookup in self.lookups.items():
            spec = next(f for f in self.sparse_features if f.name == name)
            if lookup.vocabulary_size() != spec.num_buckets:
                raise ValueError(f"feature {name}: its vocabulary file gives {lookup.vocabulary_size()} rows "
                                 f"(ids + OOV), the registry says {spec.num_buckets}")
        self.normalizers = {f.name: tf.keras.layers.Normalization(axis=-1, name=f"{f.name}_norm") for f in self.dense_features}
        self.nan_count = tf.Variable(0, dtype=tf.int64, trainable=False, name="dense_nan_count",
                                     aggregation=tf.VariableAggregation.SUM)  # replicas' counts add up

    def adapt(self, batches: tf.data.Dataset, steps: int = 50) -> None:
        """Fits the dense normalisers on the first `steps` training batches of parsed features (NaN
        read as 0), read once for all of them."""
        columns = {f.name: [] for f in self.dense_features}
        if not columns:
            return
        for batch in batches.take(steps):
            for name, parts in columns.items():
                parts.append(np.asarray(batch[name], np.float32))
        for name, parts in columns.items():
            values = np.concatenate(parts)
            fit_normalizer(self.normalizers[name], np.where(np.isnan(values), 0.0, values))

    def bucket(self, name: str, ids: tf.Tensor) -> tf.Tensor:
        """b_f(ids): vocabulary ids looked up, int64 ids mod the bucket count, string ids hashed into it."""
        if name in self.lookups:
            return self.lookups[name](ids)
        if name in self.hashers:
            return self.hashers[name](ids)
        spec = next(f for f in self.sparse_features if f.name == name)
        return tf.math.floormod(ids, spec.num_buckets)

    def embed_sparse(self, name: str, ids) -> tf.Tensor:
        spec = next(f for f in self.sparse_features if f.name == name)
        if spec.multivalent and not isinstance(ids, tf.RaggedTensor):  # [N, w] padded with the pad value
            ids = tf.convert_to_tensor(ids)
            ids = tf.RaggedTensor.from_tensor(ids, padding=tf.constant("" if ids.dtype == tf.string else 0, ids.dtype))
        if isinstance(ids, tf.RaggedTensor):
            # Padded to [B, L_max] with a sentinel and masked: the same mean as a ragged reduce_sum,
            # in about a quarter of the graph ops (12 vs 50), which matters in small serving calls.
            # The int sentinel is one no real id takes (negative ids still fold, as univalent ones do);
            # for strings it is the empty string, the registry's pad value.
            pad = "" if ids.dtype == tf.string else ids.dtype.min
            padded = ids.to_tensor(default_value=pad)
            present = tf.cast(tf.not_equal(padded, pad), tf.float32)
            vectors = self.tables[name](self.bucket(name, padded)) * present[..., tf.newaxis]
            counts = tf.maximum(tf.reduce_sum(present, axis=1), 1.0)[:, tf.newaxis]
            return self._scaled(tf.reduce_sum(vectors, axis=1) / counts)
        ids = tf.reshape(ids, [-1])
        return self._scaled(self.tables[name](self.bucket(name, ids)))

    def _scaled(self, vectors: tf.Tensor) -> tf.Tensor:
        """E = c·E' (the learning-rate multiplier of the module docstring; c = 1 adds no op)."""
        return vectors if self.lr_multiplier == 1.0 else vectors * self.lr_multiplier

    def normalize_dense(self, name: str, values: tf.Tensor, training=None) -> tf.Tensor:
        nans = tf.math.is_nan(values)
        if training:  # counted while training only: the serving graph stays stateless
            self.nan_count.assign_add(tf.reduce_sum(tf.cast(nans, tf.int64)))
        return self.normalizers[name](tf.where(nans, tf.zeros_like(values), values))

    def call(self, features: Dict[str, tf.Tensor], names: Optional[Iterable[str]] = None, training=None) -> Dict[str, tf.Tensor]:
        wanted = set(names) if names is not None else None
        out = {}
        for f in self.sparse_features:
            if wanted is None or f.name in wanted:
                out[f.name] = self.embed_sparse(f.name, features[f.name])
        for f in self.dense_features:
            if wanted is None or f.name in wanted:
                values = tf.cast(features[f.name], tf.float32)
                out[f.name] = self.normalize_dense(f.name, tf.reshape(values, [-1, f.size]), training)
        return out
