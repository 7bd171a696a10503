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


def _vocabulary_file(path, values):
    """A vocabulary file as `tft.vocabulary` writes it: one id a line, most frequent first."""
    path.write_text("".join(f"{v}\n" for v in values))
    return str(path)


def test_a_vocabulary_feature_gives_each_known_id_its_own_row_and_unseen_ids_the_oov_rows(tmp_path):
    words = ["sku-7", "sku-3", "sku-11", "sku-5"]
    oov = 2
    spec = F.SparseFeature("sku", len(words) + oov, dtype="string", lookup="vocabulary",
                           vocabulary_file=_vocabulary_file(tmp_path / "sku", words), oov_buckets=oov)
    layer = FeatureEmbedding(3, sparse_features=[spec], dense_features=[])
    rows = len(set(words)) + oov  # counted here: distinct vocabulary entries + OOV rows, no mask row
    assert layer.tables["sku"].input_dim == rows == layer.lookups["sku"].vocabulary_size() == 6
    known = layer.bucket("sku", tf.constant(words)).numpy()
    assert sorted(known.tolist()) == list(range(oov, rows))  # distinct rows after the OOV ones, in file order
    assert known.tolist() == [2, 3, 4, 5]
    unseen = layer.bucket("sku", tf.constant(["sku-999", "nope", ""])).numpy()
    assert set(unseen.tolist()) <= set(range(oov))  # OOV rows, no error
    out = layer({"sku": tf.constant([["sku-3"], ["sku-999"]])})["sku"].numpy()
    table = layer.tables["sku"].embeddings.numpy()
    np.testing.assert_allclose(out[0], table[3], atol=1e-7)
    np.testing.assert_allclose(out[1], table[unseen[0]], atol=1e-7)


def test_an_int_vocabulary_keeps_padding_out_of_the_mean_of_a_multivalent_feature(tmp_path):
    vocabulary = [42, 7, 1000, 3]
    spec = F.SparseFeature("keywords", len(vocabulary) + 1, multivalent=True, dtype="int64", max_length=4,
                           lookup="vocabulary", vocabulary_file=_vocabulary_file(tmp_path / "keywords", vocabulary),
                           oov_buckets=1)
    layer = FeatureEmbedding(3, sparse_features=[spec], dense_features=[])
    assert layer.tables["keywords"].input_dim == len(set(vocabulary)) + 1
    row = {v: i + 1 for i, v in enumerate(vocabulary)}  # IntegerLookup: OOV at 0, then file order
    assert layer.bucket("keywords", tf.constant([42, 7, 1000, 3, 5, 0], tf.int64)).numpy().tolist() == \
        [row[42], row[7], row[1000], row[3], 0, 0]
    padded = tf.constant([[42, 7, 0, 0], [1000, 0, 0, 0], [0, 0, 0, 0], [99, 3, 0, 0]], tf.int64)  # 0 pads
    out = layer({"keywords": padded})["keywords"].numpy()
    table = layer.tables["keywords"].embeddings.numpy()
    want = np.stack([table[[row[42], row[7]]].mean(0), table[row[1000]], np.zeros(3), table[[0, row[3]]].mean(0)])
    np.testing.assert_allclose(out, want, atol=1e-6)
    ragged = layer({"keywords": tf.ragged.constant([[42, 7], [1000], [], [99, 3]], tf.int64)})["keywords"].numpy()
    np.testing.assert_allclose(ragged, want, atol=1e-6)


def test_a_vocabulary_feature_without_its_file_or_with_another_size_is_an_error(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="sku have lookup vocabulary but no vocabulary file"):
        FeatureEmbedding(3, [F.SparseFeature("sku", 0, dtype="string", lookup="vocabulary")], [])
    path = _vocabulary_file(tmp_path / "sku", ["a", "b"])
    with pytest.raises(ValueError, match="gives 3 rows .* the registry says 9"):
        FeatureEmbedding(3, [F.SparseFeature("sku", 9, dtype="string", lookup="vocabulary", vocabulary_file=path,
                                             oov_buckets=1)], [])


def test_fit_normalizer_gives_the_mean_and_variance_keras_adapt_gives():
    from cascade_ranking.models.embedding import fit_normalizer

    rng = np.random.default_rng(3)
    values = (rng.normal(5.0, 3.0, size=(10_000, 3)) * np.array([1.0, 10.0, 0.1])).astype(np.float32)
    fitted, adapted = tf.keras.layers.Normalization(axis=-1), tf.keras.layers.Normalization(axis=-1)
    fit_normalizer(fitted, values)
    adapted.adapt(values, batch_size=4096)  # Keras merges batches of 4,096
    np.testing.assert_allclose(fitted.mean.numpy().ravel(), values.mean(axis=0), rtol=1e-5)  # numpy, independent
    np.testing.assert_allclose(fitted.variance.numpy().ravel(), values.var(axis=0), rtol=1e-4)
    np.testing.assert_allclose(fitted(values[:5]).numpy(), adapted(values[:5]).numpy(), rtol=1e-4, atol=1e-5)
    fit_normalizer(fitted, values[:100] * 0 + 2.0)  # a refit replaces the state, as adapt does
    np.testing.assert_allclose(fitted.mean.numpy().ravel(), [2.0, 2.0, 2.0])
    assert fitted.is_adapted
