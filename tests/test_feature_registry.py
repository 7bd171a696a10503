"""schema/features.py's feature registry: a log of another shape (tests/own_logs.py: its own feature
names, string ids, a dense feature of width 7, a multivalent feature of up to 20 values,
100-candidate requests, no tiers) through the request-list contract, every stage model and the
serving exports, with no change to package code; and the registry's checks."""
import math

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_metadata.proto.v0 import schema_pb2

from cascade_ranking.datasources.example_io import make_example
from cascade_ranking.models import list_inputs as LI
from cascade_ranking.models import ranker_export
from cascade_ranking.models import retrieval as R
from cascade_ranking.models.config import ConfigError, config_from_dict
from cascade_ranking.models.embedding import FeatureEmbedding
from cascade_ranking.models.preranking import LightPreranker, StrongRanker
from cascade_ranking.models.ranker import FactoryFloorRanker
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.models.ranking_stage import RankingStage
from cascade_ranking.models.trainers import list_data
from cascade_ranking.schema import features as F
from cascade_ranking.schema import request_list as RL
from tests import own_logs

LIST_SIZE = 120


@pytest.fixture(scope="module")
def registry():
    return own_logs.registry()


@pytest.fixture(scope="module")
def lists(registry):
    rows = own_logs.rows(4, candidates=100, seed=3)
    by_request = {}
    for row in rows:
        by_request.setdefault(row["request_id"][0], []).append(
            {**row, "stage": F.tier_without_stage(row["click"][0]), F.SHOWN_KEY: [F.SHOWN_WITHOUT_POSITION]})
    packed = [RL.build_request_list(r, LIST_SIZE, registry) for r in by_request.values()]
    serialized = [make_example(p).SerializeToString() for p in packed]
    parsed = tf.io.parse_example(tf.constant(serialized), RL.parse_spec(LIST_SIZE, registry))
    return rows, parsed


def test_the_request_list_layout_follows_the_registry(registry, lists):
    rows, parsed = lists
    assert parsed["sku"].dtype == tf.string and parsed["sku"].shape == (4, LIST_SIZE)
    assert parsed["vector"].shape == (4, LIST_SIZE * 7) and parsed["keywords"].shape == (4, LIST_SIZE * 20)
    assert parsed["context"].shape == (4, 3) and parsed["visitor"].shape == (4, 1)
    assert "item_id" not in parsed and "ui_position" in parsed  # the shown key rides along, not a model input
    first = rows[0]  # request 0, slot 0 (build_request_list keeps the rows' order)
    assert parsed["sku"][0, 0].numpy() == first["sku"][0]
    np.testing.assert_allclose(parsed["vector"][0, :7].numpy(), first["vector"], rtol=1e-6)
    keywords = parsed["keywords"][0, :20].numpy()
    assert keywords[:len(first["keywords"])].tolist() == first["keywords"]
    assert (keywords[len(first["keywords"]):] == 0).all()  # padded with the pad value
    assert parsed["mask"].numpy().sum(axis=1).tolist() == [100] * 4
    assert (parsed["sku"][:, 100:].numpy() == b"").all()  # padded slots: the string pad value
    clicked = np.asarray([r["click"][0] for r in rows[:100]])
    assert (parsed["stage"][0, :100].numpy() == np.where(clicked > 0, 0, 1)).all()  # no tiers: GT = click


def test_candidate_features_flatten_every_registry_input(registry, lists):
    _, parsed = lists
    item = LI.candidate_features(parsed, registry)
    assert set(item) == {"sku", "brand", "keywords", "vector"}
    assert item["vector"].shape == (4 * LIST_SIZE, 7)
    assert isinstance(item["keywords"], tf.RaggedTensor)
    lengths = item["keywords"].row_lengths().numpy()[:100]
    rows, _ = lists
    assert lengths.tolist() == [len(r["keywords"]) for r in rows[:100]]  # the padding is dropped
    query = LI.request_features(parsed, registry)
    assert set(query) == {"visitor", "region", "context"}


def test_every_stage_model_reads_a_registry_of_string_ids_and_wide_features(registry, lists):
    _, parsed = lists
    light = LightPreranker(8, (16,), 8, (8,), registry)
    strong = StrongRanker(8, 1, 4, (16,), registry)
    ranker = FactoryFloorRanker(RankerConfig.cascade_stage(hidden_units=(16,), cascade_head_units=(8,),
                                                           embedding_dim=8, bias_slice_feature="slot"), registry)
    retrieval = R.TwoTowerScorer(8, (16,), 8, registry)
    for model in (light, strong, RankingStage(ranker), retrieval):
        scores = model(parsed, training=False)
        assert scores.shape == (4, LIST_SIZE) and np.isfinite(scores.numpy()).all()
    # The ranker's Q·U: Q reads the query and item features, U the UI slot.
    assert ranker.ui_names == ("slot",)
    assert set(ranker.quality_names) == {"visitor", "region", "context", "sku", "brand", "keywords", "vector"}
    # Each id feature has a table of its own bucket count; strings go through Keras Hashing.
    assert ranker.embedding.tables["sku"].input_dim == 4096
    assert set(ranker.embedding.hashers) == {"visitor", "region", "sku", "brand"}


def test_the_ranker_exports_and_serves_the_registrys_features(registry, lists, tmp_path):
    rows, parsed = lists
    ranker = FactoryFloorRanker(RankerConfig.cascade_stage(hidden_units=(16,), cascade_head_units=(8,),
                                                           embedding_dim=8, bias_slice_feature="slot"), registry)
    numpy_lists = {k: (v.numpy() if not isinstance(v, tf.RaggedTensor) else v.to_tensor().numpy())
                   for k, v in parsed.items()}
    warmup = list_data.candidate_examples(numpy_lists, count=4, features=registry)
    schema = own_schema(registry)
    RankingStage(ranker)(parsed, training=False)  # builds the variables
    path = ranker_export.export_ranker(ranker, str(tmp_path / "ranker"), warmup, schema=schema)
    served = tf.saved_model.load(path).signatures
    assert set(served) == {"serving_default", "quality", "ui", "score_ui_grid"}
    out = served["serving_default"](examples=tf.constant(warmup))
    direct = ranker(list_data.candidate_lists(tf.constant(warmup), schema=schema, features=registry), training=False)
    np.testing.assert_allclose(out["logit"].numpy(), tf.reshape(direct, [-1]).numpy(), rtol=1e-5, atol=1e-5)
    example = tf.train.Example.FromString(warmup[0])
    assert example.features.feature["sku"].bytes_list.value[0].startswith(b"sku-")
    assert len(example.features.feature["vector"].float_list.value) == 7


def own_schema(registry: F.FeatureConfig) -> schema_pb2.Schema:
    """A TFMD schema of the own log's serving inputs (as `cascade init` would infer it)."""
    schema = schema_pb2.Schema()
    for f in registry.resolved():
        feature = schema.feature.add(name=f.name, type=f.schema_type)
        if f.kind == "ids":
            feature.value_count.min, feature.value_count.max = 1, f.width
        else:
            feature.shape.dim.add(size=f.width)
    return schema


def test_million_string_ids_hash_into_their_configured_buckets_without_a_small_fold():
    """10^6 distinct string ids into B = 2^23 buckets: the distinct buckets used are what uniform
    hashing gives, B·(1 − e^(−N/B)) (no forced fold below B), and int64 ids 0..N−1 with N buckets
    never share one (where the package's old 10,000-bucket default folded them 100 to a row)."""
    n, buckets = 1_000_000, 1 << 23
    strings = FeatureEmbedding(4, [F.SparseFeature("sku", buckets, dtype="string")], [])
    ids = tf.constant([f"sku-{i}".encode() for i in range(n)])
    used = np.unique(strings.bucket("sku", ids).numpy())
    expected = buckets * (1 - math.exp(-n / buckets))
    assert used.min() >= 0 and used.max() < buckets
    assert abs(used.size - expected) < 0.002 * n, (used.size, expected)
    ints = FeatureEmbedding(4, [F.SparseFeature("item_id", n)], [])
    assert np.unique(ints.bucket("item_id", tf.range(n, dtype=tf.int64)).numpy()).size == n
    folded = FeatureEmbedding(4, [F.SparseFeature("item_id", 10_000)], [])
    assert np.unique(folded.bucket("item_id", tf.range(n, dtype=tf.int64)).numpy()).size == 10_000


def test_the_registry_is_checked_against_the_schema(registry):
    schema = own_schema(registry)
    registry.check_schema(schema)
    with pytest.raises(ValueError, match=r"discount is not in the schema"):
        F.FeatureConfig(inputs=registry.inputs + (F.InputFeature("discount", "item", "dense", width=1),),
                        item_key="sku").check_schema(schema)
    with pytest.raises(ValueError, match=r"sku is BYTES in the schema, declared id int64"):
        F.FeatureConfig(inputs=tuple(F.InputFeature("sku", "item", buckets=10) if f.name == "sku" else f
                                     for f in registry.inputs), item_key="sku").check_schema(schema)


@pytest.mark.parametrize("values, message", [
    ({"inputs": [{"name": "x", "role": "side", "buckets": 3}]}, "role must be one of query, item, ui"),
    ({"inputs": [{"name": "x", "role": "item"}]}, "an id feature needs buckets > 0"),
    ({"inputs": [{"name": "click", "role": "item", "buckets": 2}]}, "click is a key or label"),
    ({"inputs": [{"name": "u", "role": "query", "buckets": 2}, {"name": "i", "role": "item", "kind": "dense",
                                                                  "width": 2}]}, "item_key"),
    ({"inputs": [{"role": "item"}]}, "InputFeature needs name"),
])
def test_a_bad_registry_is_one_config_error_naming_the_field(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(F.FeatureConfig, values)
