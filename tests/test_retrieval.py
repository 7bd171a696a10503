"""Retrieval (models/retrieval.py): log-q corrected in-batch softmax, export of query tower + index."""
import os

import numpy as np
import pytest
import tensorflow as tf

from cascade_ranking.datasources import synthetic
from cascade_ranking.models import list_inputs as LI
from cascade_ranking.models import retrieval as R
from cascade_ranking.schema import features as F
from cascade_ranking.schema import request_list as RL
from cascade_ranking.models.trainers.list_data import load_lists
from tests.component_fixtures import request_list_splits


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("retrieval") / "examples")
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=40, seed=5), out)
    split = os.path.join(out, "Split-train")
    lists = LI.request_lists_from_candidates(split)
    raw = [r for r in tf.data.TFRecordDataset(tf.io.gfile.glob(split + "/*.gz"), compression_type="GZIP").take(7)]
    return lists, [r.numpy() for r in raw]


def _batch(lists, n_pos, n_neg, rng):
    """n_pos pairs with distinct items and n_neg corpus items that are none of them."""
    pairs = R.retrieval_pairs(lists, batch_size=n_pos)
    _, first = np.unique(pairs["item"]["item_id"][:, 0], return_index=True)
    pick = rng.choice(first, n_pos, replace=False)
    corpus = R.item_corpus_from_lists(lists)
    others = np.flatnonzero(~np.isin(corpus.ids, pairs["item"]["item_id"][pick, 0]))
    neg = rng.choice(others, n_neg, replace=False)
    return {
        "query": {k: tf.constant(v[pick]) for k, v in pairs["query"].items()},
        "item": {k: tf.constant(v[pick]) for k, v in pairs["item"].items()},
        "sampling_probability": tf.constant(rng.uniform(0.01, 1.0, n_pos), tf.float32),
        "negative": {k: tf.constant(v[neg]) for k, v in corpus.features().items()},
        "negative_sampling_probability": tf.constant(rng.uniform(1e-3, 0.2, n_neg), tf.float32),
    }


def _np_softmax_loss(q, c, log_q):
    logits = q @ c.T - log_q[None, :]
    logits = logits - logits.max(axis=1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -np.sum(log_softmax[np.arange(q.shape[0]), np.arange(q.shape[0])])


def test_log_q_correction_changes_the_loss_as_the_formula_says(data):
    lists, _ = data
    tf.keras.utils.set_random_seed(0)
    model = R.RetrievalModel(embedding_dim=8, hidden_units=(16,), output_dim=8)
    rng = np.random.default_rng(0)
    batch = _batch(lists, 6, 5, rng)
    loss = float(model.compute_loss(batch))
    q = model.query_tower(LI.request_features(batch["query"])).numpy().astype(np.float64)
    c = np.concatenate([
        model.item_tower(LI.candidate_features(batch["item"])).numpy(),
        model.item_tower(LI.candidate_features(batch["negative"])).numpy(),
    ]).astype(np.float64)
    p = np.concatenate([batch["sampling_probability"].numpy(), batch["negative_sampling_probability"].numpy()])
    np.testing.assert_allclose(loss, _np_softmax_loss(q, c, np.log(p)), rtol=1e-5)
    # Without correction (q = 1 for every candidate): the plain in-batch softmax, a different number.
    plain = dict(batch, sampling_probability=tf.ones(6), negative_sampling_probability=tf.ones(5))
    plain_loss = float(model.compute_loss(plain))
    np.testing.assert_allclose(plain_loss, _np_softmax_loss(q, c, np.zeros(11)), rtol=1e-5)
    assert abs(plain_loss - loss) > 1e-3
    # Only in-batch candidates (no sampled negatives) → the B×B softmax.
    in_batch = {k: v for k, v in batch.items() if not k.startswith("negative")}
    np.testing.assert_allclose(float(model.compute_loss(in_batch)),
                               _np_softmax_loss(q, c[:6], np.log(p[:6])), rtol=1e-5)


def test_an_accidental_hit_is_not_a_negative(data):
    lists, _ = data
    tf.keras.utils.set_random_seed(1)
    model = R.RetrievalModel(embedding_dim=8, hidden_units=(16,), output_dim=8)
    batch = _batch(lists, 4, 3, np.random.default_rng(1))
    # Make sampled negative 0 the same item as positive 2: it must drop out of query 2's softmax.
    batch["negative"] = {k: tf.concat([v[:0], batch["item"][k][2:3], v[1:]], 0) for k, v in batch["negative"].items()}
    loss = float(model.compute_loss(batch))
    q = model.query_tower(LI.request_features(batch["query"])).numpy().astype(np.float64)
    c = np.concatenate([model.item_tower(LI.candidate_features(batch["item"])).numpy(),
                        model.item_tower(LI.candidate_features(batch["negative"])).numpy()]).astype(np.float64)
    log_q = np.log(np.concatenate([batch["sampling_probability"].numpy(), batch["negative_sampling_probability"].numpy()]))
    logits = q @ c.T - log_q
    logits[2, 4] = -np.inf
    expected = -sum(logits[b, b] - np.log(np.exp(logits[b]).sum()) for b in range(4))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_pairs_record_the_in_batch_sampling_probability(data):
    lists, _ = data
    pairs = R.retrieval_pairs(lists, batch_size=16)
    gt = (lists["stage"] == RL.TIER_INDEX["rerank_pos"]) & (lists["mask"] > 0)
    assert len(pairs["sampling_probability"]) == gt.sum()
    ids = pairs["item"]["item_id"][:, 0]
    for j in np.unique(ids)[:20]:
        expected = min(1.0, 16 * np.mean(ids == j))
        np.testing.assert_allclose(pairs["sampling_probability"][ids == j], expected, rtol=1e-6)
    negatives = R.UniformNegatives(R.item_corpus_from_lists(lists), 32)
    assert negatives.probability() == pytest.approx(32 / negatives.corpus.size)


def test_exported_top_k_equals_numpy_brute_force_over_the_exported_item_embeddings(data, tmp_path):
    lists, raw = data
    model = R.train_retrieval(lists, epochs=1, batch_size=32, num_negatives=16,
                              embedding_dim=8, hidden_units=(16,), output_dim=8)
    corpus = R.item_corpus_from_lists(lists)
    export_dir = str(tmp_path / "retrieval" / "1")
    R.export_retrieval(model.query_tower, model.item_tower, corpus, export_dir, raw[:2], k=10)
    assert os.path.exists(os.path.join(export_dir, "assets.extra", "tf_serving_warmup_requests"))
    loaded = tf.saved_model.load(export_dir)
    examples = tf.constant(raw)
    out = loaded.signatures["serving_default"](examples=examples)
    table = loaded.signatures["item_embeddings"]()
    item_ids, item_emb = table["item_ids"].numpy(), table["embeddings"].numpy()
    assert sorted(item_ids) == sorted(corpus.ids)
    query = loaded.signatures["query_embedding"](examples=examples)["embedding"].numpy()
    # The exported query tower is the trained one.
    parsed = tf.io.parse_example(examples, R.request_context_spec())
    np.testing.assert_allclose(query, model.query_tower(parsed).numpy(), rtol=1e-5, atol=1e-6)
    scores = query.astype(np.float64) @ item_emb.T.astype(np.float64)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    assert out["item_ids"].shape == (7, 10)
    np.testing.assert_array_equal(out["item_ids"].numpy(), item_ids[top])
    np.testing.assert_allclose(out["scores"].numpy(), np.take_along_axis(scores, top, 1), rtol=1e-4, atol=1e-5)


def test_a_list_without_positives_is_refused(data):
    lists, _ = data
    empty = dict(lists, stage=np.full_like(lists["stage"], 3))
    with pytest.raises(ValueError, match="no positive"):
        R.retrieval_pairs(empty, 8)
    with pytest.raises(ValueError, match="positive must be"):
        R.positive_mask(lists, "rating")


def test_trainer_evaluation_leaves_out_and_counts_requests_without_gt(data):
    """Requests 0 and 1 lose their GT: they are counted, and the recalls are the means over the
    other requests, computed here by hand from u·v."""
    from cascade_ranking.models.trainers import retrieval as trainer
    lists, _ = data
    lists = LI.take_lists(lists, slice(0, 6))
    lists["stage"] = lists["stage"].copy()
    lists["stage"][:2][lists["stage"][:2] == RL.TIER_INDEX["rerank_pos"]] = RL.TIER_INDEX["rerank_neg"]
    tf.keras.utils.set_random_seed(0)
    model = R.RetrievalModel(embedding_dim=4, hidden_units=(8,), output_dim=4)
    corpus = R.item_corpus_from_lists(lists)
    out = trainer.evaluate(model, corpus, lists, k=5, quota=20)
    assert out["requests"] == 6 and out["requests_without_gt"] == 2
    u = model.query_tower(LI.request_features({n: tf.constant(lists[n]) for n in LI.QUERY_FEATURES})).numpy()
    v = model.item_tower(LI.candidate_features({n: tf.constant(lists[n]) for n in LI.ITEM_FEATURES})).numpy()
    scores = np.einsum("bd,bld->bl", u, v.reshape(6, 50, -1))
    gt = (lists["stage"] == RL.TIER_INDEX["rerank_pos"]) & (lists["mask"] > 0)
    top = np.argsort(-scores, axis=1)[:, :20]
    by_hand = np.mean([np.isin(np.flatnonzero(gt[r]), top[r]).mean() for r in range(2, 6)])
    assert out["recall_retrieval@20"] == pytest.approx(by_hand)


def _pair_rows(batches):
    """Each pair of a list of batches as one tuple: its query and item values (a multivalent one
    without its padding: dense padded in memory, ragged when parsed) and its probability."""
    def cells(values, name):
        feature = F.DEFAULT.feature(name)
        if isinstance(values, tf.RaggedTensor):
            return [tuple(row) for row in values.to_list()]
        values = np.asarray(values)
        if feature.multivalent:
            return [tuple(v for v in row if v != feature.pad_value) for row in values.tolist()]
        return [tuple(np.ravel(row).tolist()) for row in values]

    rows = []
    for b in batches:
        columns = [cells(b[side][k], k) for side in ("query", "item") for k in sorted(b[side])]
        probability = np.asarray(b["sampling_probability"])
        rows += [tuple(c[i] for c in columns) + (float(probability[i]),) for i in range(len(probability))]
    return rows


@pytest.mark.parametrize("lists_per_chunk", [4096, 7])
def test_streamed_pairs_are_the_pairs_in_memory_every_pass_in_a_new_order(tmp_path, lists_per_chunk):
    """`streamed_pair_dataset` from request-list files against `retrieval_pairs` of the same lists
    in memory: each pass gives P // B batches of B pairs, the pairs of the whole split (each at most
    once, those left out only the remainder) with the same sampling probabilities, in a new order on
    each pass; whole-split chunks (4,096 lists) and chunks of 7 lists alike."""
    root = request_list_splits(tmp_path, num_requests=30, seed=4, list_size=64)
    files = [str(root / "Split-train" / "*")]
    lists = load_lists(files, 64)
    batch_size = 8
    reference = R.retrieval_pairs(lists, batch_size)
    count = len(reference["sampling_probability"])
    want = _pair_rows([reference])
    positives = R.count_positives(None, lists)
    dataset = R.streamed_pair_dataset(files, 64, batch_size, positives, shuffle_seed=3, lists_per_chunk=lists_per_chunk)
    passes = []
    for _ in range(2):
        batches = list(dataset)
        assert len(batches) == count // batch_size
        assert all(len(b["sampling_probability"]) == batch_size for b in batches)
        got = _pair_rows(batches)
        remaining = list(want)
        for row in got:  # each streamed pair is a distinct pair of the split, probability included
            remaining.remove(row)
        assert len(remaining) == count % batch_size
        passes.append(got)
    assert passes[0] != passes[1]
    unshuffled = _pair_rows(list(R.streamed_pair_dataset(files, 64, batch_size, positives, lists_per_chunk=lists_per_chunk)))
    assert unshuffled == want[:len(unshuffled)]  # without a seed: the files' order, as positive_pairs


def test_shuffled_pairs_are_the_element_shuffle_of_the_pairs_in_each_pass(data):
    """`retrieval_dataset` shuffles pair indices and gathers: each pass holds every pair once, in the
    order tf.data's shuffle of the pairs themselves gives with the same seed, and passes differ."""
    lists, _ = data
    pairs = R.retrieval_pairs(lists, 8)
    count = len(pairs["sampling_probability"])
    dataset = R.retrieval_dataset(pairs, 8, shuffle_seed=3)
    reference = tf.data.Dataset.from_tensor_slices(dict(pairs)).shuffle(count, seed=3, reshuffle_each_iteration=True)
    reference = reference.batch(8, drop_remainder=True)
    key = F.DEFAULT.item_key
    passes = []
    for _ in range(2):
        got = [(b["item"][key].numpy(), b["sampling_probability"].numpy()) for b in dataset]
        want = [(b["item"][key].numpy(), b["sampling_probability"].numpy()) for b in reference]
        assert len(got) == len(want) == count // 8
        for (g, gp), (w, wp) in zip(got, want):
            np.testing.assert_array_equal(g, w)
            np.testing.assert_array_equal(gp, wp)
        passes.append(np.concatenate([g for g, _ in got]))
    assert not np.array_equal(passes[0], passes[1])
