"""Tests for models/embedding.py: average pooling of multivalent ids, by hand in numpy."""
import numpy as np
import tensorflow as tf

from cascade_ranking.models.embedding import FeatureEmbedding
from cascade_ranking.schema import features as F

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


def test_the_learning_rate_multiplier_serves_c_times_the_stored_table_and_starts_at_the_usual_scale():
    """E = c·E' with E' initialised at 1/c of Keras's RandomUniform(−0.05, 0.05); Adagrad's step on E'
    does not depend on the gradient's scale, so E moves about c times the step a plain table takes."""
    item = next(f for f in F.SPARSE_FEATURES if f.name == "item_id")
    ids = {"item_id": tf.constant([[1], [2], [1]], tf.int64)}
    plain, fast = (FeatureEmbedding(4, sparse_features=[item], dense_features=[], lr_multiplier=c) for c in (1.0, 3.0))
    out = fast(ids)["item_id"].numpy()
    stored = fast.tables["item_id"].embeddings.numpy()
    np.testing.assert_allclose(out, 3.0 * stored[[1, 2, 1]], rtol=1e-6)
    assert np.abs(stored).max() <= 0.05 / 3.0 + 1e-9 and np.abs(out).max() <= 0.05 + 1e-6
    moved = []
    for layer in (plain, fast):
        layer(ids)
        optimizer = tf.keras.optimizers.Adagrad(0.1)
        before = layer(ids)["item_id"].numpy()
        for _ in range(5):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(ids)["item_id"])
            variables = layer.trainable_variables
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        moved.append(np.abs(layer(ids)["item_id"].numpy() - before).mean())
    assert 2.5 < moved[1] / moved[0] < 3.1  # about c = 3 (Adagrad's initial accumulator keeps it under)
