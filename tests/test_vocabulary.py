"""schema/vocabulary.py: the preprocessing_fn run by TFT's own analyzer on DirectRunner
(`tft_beam.AnalyzeDataset`, what the Transform component's executor runs) on tf.Examples of the
own log (tests/own_logs.py), the vocabularies checked against counts made here; the Trainers'
resolution of the files into the registry; and a ranker exported with vocabulary lookups that
serves from its SavedModel alone once the Transform output is gone."""
import collections
import json
import functools
import os
import shutil

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from tfx_bsl.public import tfxio

from cascade_ranking.datasources.example_io import make_example
from cascade_ranking.models import ranker_export
from cascade_ranking.models.config import ConfigError, config_from_dict
from cascade_ranking.models.ranker import FactoryFloorRanker
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.models.ranking_stage import RankingStage
from cascade_ranking.models.trainers import list_data
from cascade_ranking.pipelines.config import to_json
from cascade_ranking.schema import features as F
from cascade_ranking.schema import request_list as RL
from cascade_ranking.schema import vocabulary
from tests import own_logs
from tests.test_feature_registry import own_schema

LIST_SIZE = 120


def vocabulary_registry() -> F.FeatureConfig:
    """The own log's registry with sku (string id), keywords (multivalent int ids, top 50) and
    brand (string ids seen at least 30 times) looked up in vocabularies, the rest hashed."""
    changes = {"sku": {"oov_buckets": 2}, "keywords": {"max_tokens": 50}, "brand": {"min_count": 30}}
    inputs = tuple(F.InputFeature(**{**f.__dict__, "buckets": 0, "lookup": "vocabulary", **changes[f.name]})
                   if f.name in changes else f for f in own_logs.registry().inputs)
    return F.FeatureConfig(inputs=inputs, item_key="sku")


def tft_order(counts: collections.Counter) -> list:
    """TFT's vocabulary order: by descending count, ties by descending value (as bytes)."""
    return [v for v, _ in sorted(counts.items(), key=lambda kv: (kv[1], str(kv[0]).encode()), reverse=True)]


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    """The train rows and the transform output of the preprocessing_fn analyzed on them."""
    root = tmp_path_factory.mktemp("vocab")
    registry = vocabulary_registry()
    rows = own_logs.rows(6, candidates=40, seed=5)
    data = str(root / "train.tfrecord")
    with tf.io.TFRecordWriter(data) as writer:
        for row in rows:
            writer.write(make_example(row).SerializeToString())
    schema = own_schema(registry)
    for feature in schema.feature:  # every row carries every feature (a shape needs presence 1)
        feature.presence.min_fraction = 1.0
    source = tfxio.TFExampleRecord(file_pattern=data, schema=schema)
    fn = functools.partial(vocabulary.preprocessing_fn, custom_config={vocabulary.FEATURES_KEY: to_json(registry)})
    out = str(root / "transform_graph")
    with beam.Pipeline(runner="DirectRunner") as pipeline, tft_beam.Context(temp_dir=str(root / "tmp")):
        examples = pipeline | "Read" >> source.BeamSource()
        transform_fn = (examples, source.TensorAdapterConfig()) | tft_beam.AnalyzeDataset(fn)
        _ = transform_fn | tft_beam.WriteTransformFn(out)
    return registry, rows, out


def _file(path):
    with tf.io.gfile.GFile(path) as f:
        return f.read().splitlines()


def test_the_vocabularies_list_the_distinct_train_ids_by_frequency(analyzed):
    registry, rows, out = analyzed
    output = tft.TFTransformOutput(out)
    skus = collections.Counter(r["sku"][0].decode() for r in rows)
    assert _file(output.vocabulary_file_by_name("sku")) == tft_order(skus)
    assert output.vocabulary_size_by_name("sku") == len(skus) == 40 * 6 - sum(c - 1 for c in skus.values())
    keywords = collections.Counter(k for r in rows for k in r["keywords"])  # every value of every list
    written = [int(v) for v in _file(output.vocabulary_file_by_name("keywords"))]
    assert written == tft_order(keywords)[:50] and len(keywords) > 50  # max_tokens: the 50 most frequent
    brands = collections.Counter(r["brand"][0].decode() for r in rows)
    kept = {b for b, c in brands.items() if c >= 30}
    assert 0 < len(kept) < len(brands)  # min_count drops some brands here
    assert _file(output.vocabulary_file_by_name("brand")) == [b for b in tft_order(brands) if b in kept]
    assert output.vocabulary_file_by_name("visitor") is None  # hashed: no vocabulary


def test_the_trainers_registry_gets_each_vocabulary_file_and_its_table_size(analyzed):
    registry, rows, out = analyzed
    resolved = {f.name: f for f in vocabulary.resolve(registry, out).sparse_features()}
    skus = len({r["sku"][0] for r in rows})
    assert resolved["sku"].num_buckets == skus + 2 and resolved["sku"].vocabulary_file.endswith("sku")
    assert resolved["keywords"].num_buckets == 50 + 1 and resolved["keywords"].multivalent
    assert resolved["visitor"].num_buckets == 4096 and resolved["visitor"].lookup == "hash"
    with pytest.raises(ValueError, match="sku, brand, keywords have lookup vocabulary but no vocabulary"):
        registry.sparse_features()
    with pytest.raises(ValueError, match="the Trainer got no transform_graph"):
        vocabulary.resolve(registry, None)
    assert vocabulary.resolve(own_logs.registry(), None) == own_logs.registry()  # all hashed: nothing to resolve


def _parsed_lists(rows, features):
    """The rows of a log without tiers as parsed request lists (`schema.request_list` layout)."""
    by_request = collections.defaultdict(list)
    for row in rows:
        by_request[row["request_id"][0]].append(
            {**row, "stage": F.tier_without_stage(row["click"][0]), F.SHOWN_KEY: [F.SHOWN_WITHOUT_POSITION]})
    packed = [RL.build_request_list(r, LIST_SIZE, features) for r in by_request.values()]
    return tf.io.parse_example(tf.constant([make_example(p).SerializeToString() for p in packed]),
                               RL.parse_spec(LIST_SIZE, features))


def test_an_exported_ranker_serves_known_and_unseen_ids_from_its_own_assets(analyzed, tmp_path):
    registry, rows, out = analyzed
    copied = str(tmp_path / "transform_graph")
    shutil.copytree(out, copied)
    features = vocabulary.resolve(registry, copied)
    parsed = _parsed_lists(rows, features)
    ranker = FactoryFloorRanker(RankerConfig.cascade_stage(hidden_units=(16,), cascade_head_units=(8,),
                                                           embedding_dim=8, bias_slice_feature="slot"), features)
    RankingStage(ranker)(parsed, training=False)
    lists = {k: (v.to_tensor().numpy() if isinstance(v, tf.RaggedTensor) else v.numpy()) for k, v in parsed.items()}
    warmup = list_data.candidate_examples(lists, count=4, features=features)
    path = ranker_export.export_ranker(ranker, str(tmp_path / "ranker"), warmup, schema=own_schema(features))
    table = ranker.embedding.tables["sku"].embeddings.numpy()
    assert table.shape[0] == len({r["sku"][0] for r in rows}) + 2  # vocabulary + OOV rows, not buckets
    shutil.rmtree(copied)  # the Transform output is gone: the SavedModel carries its vocabularies
    assert {"sku", "keywords", "brand"} <= set(os.listdir(os.path.join(path, "assets")))
    serve = tf.saved_model.load(path).signatures["serving_default"]
    known = tf.train.Example.FromString(warmup[0])
    unseen = tf.train.Example()
    unseen.CopyFrom(known)
    unseen.features.feature["sku"].bytes_list.value[:] = [b"sku-never-seen"]
    unseen.features.feature["keywords"].int64_list.value[:] = [123456789]
    ctr = serve(examples=tf.constant([known.SerializeToString(), unseen.SerializeToString()]))["ctr"].numpy()
    assert ctr.shape == (2,) and np.all((ctr > 0) & (ctr < 1)) and ctr[0] != ctr[1]


def test_eval_ids_out_of_vocabulary_are_counted_per_feature(analyzed):
    """Eval lists with unseen skus and keywords: `out_of_vocabulary` counts the values that are not
    in each vocabulary file (counted here from the rows), over real candidates only."""
    registry, rows, out = analyzed
    features = vocabulary.resolve(registry, out)
    eval_rows = own_logs.rows(3, candidates=30, seed=11)  # another seed: some skus and keywords unseen
    eval_rows[0]["sku"] = [b"sku-never-seen"]
    lists = {k: (v.to_tensor().numpy() if isinstance(v, tf.RaggedTensor) else v.numpy())
             for k, v in _parsed_lists(eval_rows, features).items()}
    counts = vocabulary.out_of_vocabulary(lists, features)

    sku_vocabulary = {r["sku"][0] for r in rows}  # every train sku (no limit on sku)
    keyword_counts = collections.Counter(k for r in rows for k in r["keywords"])
    top_keywords = set(tft_order(keyword_counts)[:50])  # max_tokens 50
    brand_counts = collections.Counter(r["brand"][0] for r in rows)
    brands = {b for b, n in brand_counts.items() if n >= 30}  # min_count 30
    eval_keywords = [k for r in eval_rows for k in r["keywords"] if k != 0]
    assert counts["sku"] == {"ids": sum(r["sku"][0] not in sku_vocabulary for r in eval_rows), "of": len(eval_rows),
                             "vocabulary_size": len(sku_vocabulary)}
    assert counts["sku"]["ids"] >= 1
    assert counts["keywords"] == {"ids": sum(k not in top_keywords for k in eval_keywords), "of": len(eval_keywords),
                                  "vocabulary_size": 50}
    assert counts["brand"] == {"ids": sum(r["brand"][0] not in brands for r in eval_rows), "of": len(eval_rows),
                               "vocabulary_size": len(brands)}
    assert set(counts) == {"sku", "keywords", "brand"}  # visitor is hashed


@pytest.mark.parametrize("values, message", [
    ({"name": "v", "role": "query", "kind": "dense", "width": 2, "lookup": "vocabulary"},
     "lookup vocabulary is for id features, not dense ones"),
    ({"name": "s", "role": "item", "lookup": "table"}, "lookup must be one of hash, vocabulary"),
    ({"name": "p", "role": "ui", "lookup": "vocabulary"}, "a UI feature's ids are its values 0..buckets−1"),
    ({"name": "s", "role": "item", "lookup": "vocabulary", "buckets": 100}, "drop buckets"),
    ({"name": "s", "role": "item", "lookup": "vocabulary", "oov_buckets": 0}, "needs oov_buckets ≥ 1"),
    ({"name": "s", "role": "item", "buckets": 9, "max_tokens": 10}, "min_count and max_tokens need lookup vocabulary"),
    ({"name": "s", "role": "item", "lookup": "vocabulary", "min_count": -1}, "min_count must be an int ≥ 0"),
])
def test_a_bad_vocabulary_declaration_is_one_error_naming_it(values, message):
    inputs = [{"name": "u", "role": "query", "buckets": 3}, {"name": "i", "role": "item", "buckets": 3}, values]
    with pytest.raises(ConfigError, match=message):
        config_from_dict(F.FeatureConfig, {"inputs": inputs, "item_key": "i"})


def test_a_vocabulary_feature_takes_no_bucket_override():
    inputs = [{"name": "u", "role": "query", "buckets": 3}, {"name": "i", "role": "item", "lookup": "vocabulary"}]
    with pytest.raises(ConfigError, match="buckets: i has lookup vocabulary"):
        config_from_dict(F.FeatureConfig, {"inputs": inputs, "item_key": "i", "buckets": [["i", 10]]})
    registry = config_from_dict(F.FeatureConfig, {"inputs": inputs, "item_key": "i"})
    assert [f.name for f in registry.vocabulary_features()] == ["i"] and registry.feature("i").oov_buckets == 1


def test_the_pipeline_adds_transform_only_for_vocabulary_features_and_feeds_every_trainer(tmp_path):
    """Synthetic defaults (all hashed): no Transform node. A vocabulary feature: one standard
    Transform analyzing the train split, nothing materialized, its graph in every Trainer."""
    from cascade_ranking.pipelines.config import PipelineConfig
    from cascade_ranking.pipelines.pipeline import create_pipeline

    plain = PipelineConfig(output_dir=str(tmp_path), schema_file=F.SCHEMA_PATH)
    assert not any(c.id == "Transform" for c in create_pipeline(plain).components)
    inputs = tuple(F.InputFeature(f.name, f.role, f.kind, f.dtype, f.width, 0, "vocabulary")
                   if f.name in ("item_id", "query_tokens") else f for f in F.DEFAULT_INPUTS)
    config = PipelineConfig(output_dir=str(tmp_path), schema_file=F.SCHEMA_PATH,
                            features=F.FeatureConfig(inputs=inputs))
    nodes = {c.id: c for c in create_pipeline(config).components}
    transform = nodes["Transform"]
    assert "transformed_examples" not in transform.outputs
    assert transform.exec_properties["preprocessing_fn"] == vocabulary.PREPROCESSING_FN
    splits = json.loads(transform.exec_properties["splits_config"])
    assert splits["analyze"] == ["train"] and not splits.get("transform")
    trainers = [n for n in nodes if n.startswith("Trainer.")]
    assert sorted(trainers) == ["Trainer.cascade", "Trainer.retrieval", "Trainer.teacher"]
    for name in trainers:
        assert nodes[name].inputs["transform_graph"].producer_component_id == "Transform", name


def test_the_sampler_counts_no_folded_ids_for_a_vocabulary_feature():
    """Vocabulary ids are looked up (unseen ones go to OOV rows), never folded: the NegativeSampler's
    value_counts and data_counts leave them out and keep the hashed int ids' count."""
    from cascade_ranking.components import negative_sampler as NS

    inputs = [{"name": "u", "role": "query", "buckets": 4}, {"name": "i", "role": "item", "lookup": "vocabulary"},
              {"name": "t", "role": "item", "kind": "ids", "width": 2, "lookup": "vocabulary"}]
    registry = config_from_dict(F.FeatureConfig, {"inputs": inputs, "item_key": "i"})
    cols = {"u": np.array([1, 9, -1]), "i": np.array([10**9, 5, 7]), "t_values": np.array([3, 10**6, 4]),
            "t_offsets": np.array([0, 2, 3, 3])}
    counts = NS.value_counts(cols, registry)
    assert counts == {NS.FOLDED_PREFIX + "u": 2, NS.CUT_PREFIX + "t": 0}
    assert set(NS.data_counts(counts, registry)["ids_folded"]) == {"u"}


def test_out_of_vocabulary_counts_of_two_batches_add_up_to_the_whole(analyzed):
    """The cascade Trainer counts eval ids out of vocabulary batch by batch (`cascade._add_counts`):
    two halves of the eval lists give the counts of the whole."""
    from cascade_ranking.models.trainers import cascade

    registry, _, out = analyzed
    features = vocabulary.resolve(registry, out)
    eval_rows = own_logs.rows(4, candidates=30, seed=11)
    lists = {k: (v.to_tensor().numpy() if isinstance(v, tf.RaggedTensor) else v.numpy())
             for k, v in _parsed_lists(eval_rows, features).items()}
    halves = [{k: v[a:b] for k, v in lists.items()} for a, b in ((0, 2), (2, 4))]
    whole = vocabulary.out_of_vocabulary(lists, features)
    added = cascade._add_counts(vocabulary.out_of_vocabulary(halves[0], features),
                                vocabulary.out_of_vocabulary(halves[1], features))
    assert added == whole and whole["sku"]["of"] > 0
