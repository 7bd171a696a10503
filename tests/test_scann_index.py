"""The retrieval index choice (models/scann_index.py): a ScaNN export beside BruteForce.

Both indexes are exported through the retrieval Trainer's `export` over a corpus of 2,000 items,
loaded back here and called on serialized requests; the exact top 100 is recomputed in numpy from
the exported query and item embeddings, and ScaNN's top 100 must hold >= 95 % of it on average.
"""
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from cascade_ranking.datasources import synthetic
from cascade_ranking.models import list_inputs as LI
from cascade_ranking.models import retrieval as R
from cascade_ranking.models import scann_index
from cascade_ranking.models.config import ConfigError
from cascade_ranking.models.trainers import retrieval as retrieval_trainer
from cascade_ranking.pipelines.config import load_config

CORPUS, K = 2_000, 100


def _need_scann():
    return pytest.importorskip("scann", reason="scann is not installed (pip install 'cascade-ranking[scann]')")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    _need_scann()
    tmp = tmp_path_factory.mktemp("scann")
    out = str(tmp / "examples")
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=60, seed=3), out)
    split = os.path.join(out, "Split-train")
    lists = LI.request_lists_from_candidates(split)
    raw = [r.numpy() for r in tf.data.TFRecordDataset(tf.io.gfile.glob(split + "/*.gz"), compression_type="GZIP")]
    model = R.train_retrieval(lists, epochs=1, batch_size=32, num_negatives=16, embedding_dim=8,
                              hidden_units=(16,), output_dim=16)
    # 2,000 items: rows of the data's items drawn with replacement, each under a new id (hashed to
    # its own embedding row) and with its dense features jittered.
    seen = R.item_corpus_from_lists(lists)
    rng = np.random.default_rng(0)
    rows = rng.integers(seen.size, size=CORPUS)
    columns = {name: values[rows].copy() for name, values in seen.columns.items()}
    columns["item_id"] = np.arange(CORPUS, dtype=np.int64)[:, None] + 10_000
    columns["item_dense"] = (columns["item_dense"] + rng.normal(0, 0.5, columns["item_dense"].shape)).astype(np.float32)
    corpus = R.ItemCorpus(columns)
    dirs = {}
    for name in scann_index.INDEXES:
        dirs[name] = str(tmp / name / "1")
        retrieval_trainer.export(model, corpus, dirs[name], raw[:4], K, index=scann_index.IndexConfig(index=name))
    # A ScaNN index that does approximate (the automatic parameters search every leaf of so small a
    # corpus): 15 of its 45 leaves searched, 300 candidates rescored; through `export_retrieval`.
    dirs["scann_partial"] = str(tmp / "scann_partial" / "1")
    R.export_retrieval(model.query_tower, model.item_tower, corpus, dirs["scann_partial"], raw[:4], K,
                       index=scann_index.IndexConfig(index="scann", scann_leaves_to_search=15, scann_reorder=300))
    return dirs, _one_row_per_request(raw), corpus


def _one_row_per_request(raw):
    """The first candidate row of each request (its request features are the request's)."""
    first = {}
    for record in raw:
        key = tf.train.Example.FromString(record).features.feature["request_id"].SerializeToString()
        first.setdefault(key, record)
    return list(first.values())


def test_scann_answers_the_exact_top_100_for_at_least_95_percent_of_the_items(exports):
    dirs, requests, corpus = exports
    assert scann_index.uses_scann_ops(dirs["scann"]) and not scann_index.uses_scann_ops(dirs["brute_force"])
    brute = scann_index.load_saved_model(dirs["brute_force"])
    scann = scann_index.load_saved_model(dirs["scann"])
    partial = scann_index.load_saved_model(dirs["scann_partial"])
    examples = tf.constant(requests)
    # The exact answer, from the exported embeddings (float64).
    table = brute.signatures["item_embeddings"]()
    ids, vectors = table["item_ids"].numpy(), table["embeddings"].numpy().astype(np.float64)
    assert sorted(ids) == sorted(corpus.ids)
    query = brute.signatures["query_embedding"](examples=examples)["embedding"].numpy().astype(np.float64)
    scores = query @ vectors.T
    exact = ids[np.argsort(-scores, axis=1)[:, :K]]
    queries = np.unique(query.round(5), axis=0).shape[0]
    assert queries >= 50, f"only {queries} distinct requests"

    exact_out = brute.signatures["serving_default"](examples=examples)
    approx_out = scann.signatures["serving_default"](examples=examples)
    assert approx_out["item_ids"].shape == exact_out["item_ids"].shape == (len(requests), K)
    # BruteForce is exact: the same sets up to float32 ties at the 100th place.
    brute_overlap = np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(exact_out["item_ids"].numpy(), exact)])
    assert brute_overlap >= 0.99
    approx_ids = approx_out["item_ids"].numpy()
    overlap = np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(approx_ids, exact)])
    assert overlap >= 0.95, f"ScaNN shares {overlap:.3f} of the exact top {K}"
    partial_ids = partial.signatures["serving_default"](examples=examples)["item_ids"].numpy()
    partial_overlap = np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(partial_ids, exact)])
    assert partial_overlap >= 0.95, f"ScaNN (15 of 45 leaves) shares {partial_overlap:.3f} of the exact top {K}"
    # Each ScaNN answer lists distinct corpus items scored exactly (the reordering step), best first.
    position = {item: j for j, item in enumerate(ids)}
    for row, answer in enumerate(approx_ids):
        assert len(set(answer)) == K
        expected = scores[row, [position[item] for item in answer]]
        np.testing.assert_allclose(approx_out["scores"].numpy()[row], expected, rtol=1e-4, atol=1e-4)
        assert np.all(np.diff(approx_out["scores"].numpy()[row]) <= 1e-6)
    # The same query tower, and the same corpus table, in both exports.
    np.testing.assert_allclose(scann.signatures["query_embedding"](examples=examples)["embedding"].numpy(), query,
                               rtol=1e-5, atol=1e-6)
    scann_table = scann.signatures["item_embeddings"]()
    np.testing.assert_array_equal(scann_table["item_ids"].numpy(), ids)
    np.testing.assert_array_equal(scann_table["embeddings"].numpy(), table["embeddings"].numpy())
    # The Trainer's `score` signature: u·v of candidate rows, whatever the index.
    np.testing.assert_allclose(scann.signatures["score"](examples=examples)["score"].numpy(),
                               brute.signatures["score"](examples=examples)["score"].numpy(), rtol=1e-5, atol=1e-6)


def test_only_the_scann_export_carries_scann_ops_and_loading_it_without_scann_names_the_fix(exports, monkeypatch):
    dirs, _, _ = exports
    monkeypatch.setitem(sys.modules, "scann", None)  # `import scann` now raises ImportError
    assert scann_index.load_ops(dirs["brute_force"]) is False
    with pytest.raises(scann_index.ScannNotInstalled, match=r"holds a ScaNN index.*pip install 'cascade-ranking\[scann\]'"):
        scann_index.load_saved_model(dirs["scann"])
    with pytest.raises(scann_index.ScannNotInstalled, match=r"pip install 'cascade-ranking\[scann\]'"):
        scann_index.build_index(None, np.ones((10, 4), np.float32), tf.range(10, dtype=tf.int64), 5,
                                scann_index.IndexConfig(index="scann"))


def test_the_config_refuses_an_unknown_index_in_one_line():
    with pytest.raises(ValueError, match=r"^index must be one of 'brute_force', 'scann', got 'faiss'$"):
        retrieval_trainer.RetrievalTrainerConfig(index="faiss")
    with pytest.raises(ConfigError, match=r"retrieval: index must be one of 'brute_force', 'scann', got 'hnsw'"):
        load_config(None, ["retrieval.index=hnsw"])
    with pytest.raises(ValueError, match=r"scann_reorder must be an integer >= 0"):
        retrieval_trainer.RetrievalTrainerConfig(scann_reorder=-1)
    assert load_config(None, ["retrieval.index=scann"]).retrieval.index_config().index == "scann"
    assert retrieval_trainer.RetrievalTrainerConfig().index == "brute_force"


def test_automatic_scann_parameters():
    auto = scann_index.IndexConfig(index="scann")
    # 10^6 items, k = 100: L = √N = 1000, R = 10·k = 1000, S = max(L/5 = 200, 40·R·L/N = 40) = 200.
    assert auto.scann_parameters(1_000_000, 100) == {"num_leaves": 1000, "num_leaves_to_search": 200,
                                                     "num_reordering_candidates": 1000}
    # 10^5 items: L = round(316.2) = 316, S = max(⌈63.2⌉, ⌈40·1000·316/10^5⌉ = ⌈126.4⌉) = 127.
    assert auto.scann_parameters(100_000, 100) == {"num_leaves": 316, "num_leaves_to_search": 127,
                                                   "num_reordering_candidates": 1000}
    # 2,000 items: L = round(44.7) = 45, R = 1000, 40·R·L/N = 900 > L: every leaf is searched.
    assert auto.scann_parameters(2_000, 100) == {"num_leaves": 45, "num_leaves_to_search": 45,
                                                 "num_reordering_candidates": 1000}
    with pytest.raises(ValueError, match=r"needs at least 16 items .*the corpus has 15: use index 'brute_force'"):
        auto.scann_parameters(15, 10)
    with pytest.raises(ValueError, match="scann_reorder 50 is below the index's top k 100"):
        scann_index.IndexConfig(index="scann", scann_reorder=50).scann_parameters(10_000, 100)
    # T = q·√(η₀ / (d − 1 + η₀)): every norm 2 (so q = 2), d = 4, η₀ = 4 → T = 2·√(4/7).
    vectors = np.full((100, 4), 1.0, np.float32)
    assert auto.avq_threshold(vectors) == pytest.approx(2 * np.sqrt(4 / 7))
    assert np.isnan(scann_index.IndexConfig(index="scann", scann_avq_ratio=0).avq_threshold(vectors))
