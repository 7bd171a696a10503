"""Tests for models/embedding.py: average pooling of multivalent ids, by hand in numpy."""
import numpy as np
import tensorflow as tf

from models.embedding import FeatureEmbedding
from schema import features as F

TOKENS = next(f for f in F.SPARSE_FEATURES if f.name == "query_tokens")


def test_multivalent_mean_pooling_folds_ids_and_gives_zero_for_empty_lists():
    layer = FeatureEmbedding(3, sparse_features=[TOKENS], dense_features=[])
    n = TOKENS.num_buckets
    lists = [[3, -5, n + 7], [], [7], [3, 3]]
    ids = tf.ragged.constant(lists, dtype=tf.int64)
    with tf.GradientTape() as tape:
        out = layer({"query_tokens": ids})["query_tokens"]
        total = tf.reduce_sum(out)
    table = layer.tables["query_tokens"].embeddings.numpy()
    want = np.stack([table[[t % n for t in ts]].mean(0) if ts else np.zeros(3) for ts in lists])
    np.testing.assert_allclose(out.numpy(), want, atol=1e-6)
    # d total / d E[t] = Σ over lists containing t of (its count in the list) / |list|.
    grad = tf.convert_to_tensor(tape.gradient(total, layer.tables["query_tokens"].embeddings)).numpy()
    want_grad = np.zeros(n)
    for ts in lists:
        for t in ts:
            want_grad[t % n] += 1 / len(ts)
    np.testing.assert_allclose(grad[:, 0], want_grad, atol=1e-6)
    assert np.isclose(want_grad[7], 1 / 3 + 1) and np.isclose(want_grad[3], 1 / 3 + 1)  # n + 7 folds onto 7
