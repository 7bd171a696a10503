"""NegativeSampler with a non-default feature registry: string ids (item key, user, a UI feature),
a dense item feature of width 7, multivalent features longer than their width (string and int),
requests of 100 candidates in lists of 120, executed on DirectRunner and read back."""
import collections
import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_metadata.proto.v0 import schema_pb2
from tfx.dsl.components.base import base_beam_executor

from cascade_ranking.components import negative_sampler, record_io, sampling
from cascade_ranking.components.sampling import SamplerConfig
from cascade_ranking.datasources import example_io
from cascade_ranking.models.config import to_dict
from cascade_ranking.schema import features as F
from cascade_ranking.schema import request_list as RL
from tests.component_fixtures import examples_artifact, schema_artifact

IF = F.InputFeature
FEATURES = F.FeatureConfig(
    inputs=(
        IF("user", "query", dtype="string", buckets=1_000),
        IF("query_terms", "query", "ids", width=3, buckets=100),
        IF("context", "query", "dense", width=2),
        IF("sku", "item", dtype="string", buckets=5_000),
        IF("brand", "item", buckets=50),
        IF("labels", "item", "ids", dtype="string", width=20, buckets=1_000),
        IF("item_vec", "item", "dense", width=7),
        IF("widget", "ui", dtype="string", buckets=8),
    ),
    item_key="sku",
)  # ui_position is not an input here: the lists carry it as a key
LIST_SIZE, CANDIDATES, REQUESTS, ITEMS = 120, 100, 12, 400
CONFIG = SamplerConfig(list_size=LIST_SIZE, random_negatives=15, nonclick_keep_rate=0.5, seed=7)
KEYS = ("request_id", "request_time", "ui_position", "click", "stage", "true_ctr", "teacher_logit", "sample_weight",
        "sampling_probability", "propensity_score", "logging_policy")
BAD_VEC = b"sku-bad"  # the item of the row whose item_vec has 6 values


def _schema() -> schema_pb2.Schema:
    """The packaged schema's keys and labels, and the registry's inputs (typed as declared)."""
    schema = schema_pb2.Schema()
    schema.feature.extend(f for f in F.load_schema().feature if f.name in KEYS)
    for f in FEATURES.resolved():
        feature = schema.feature.add(name=f.name, type=f.schema_type)
        if f.is_dense:
            feature.shape.dim.add(size=f.width)
        elif f.multivalent:
            feature.value_count.min = 1
        else:
            feature.value_count.min = feature.value_count.max = 1
        if f.name != "labels":  # a row may have no labels
            feature.presence.min_fraction, feature.presence.min_count = 1.0, 1
    return schema


def _item(k: int) -> dict:
    """Item k's features: the same in every row that shows it (so the corpus's choice is them)."""
    rng = np.random.default_rng(k)
    return {"sku": f"sku-{k:04d}".encode(), "brand": k % 60,  # brands 50..59 fold into the 50 buckets
            "labels": [f"label-{(k * 7 + j) % 97}".encode() for j in range(k % 26)],  # 0..25 labels, cut at 20
            "item_vec": rng.normal(size=7).astype(np.float32).tolist()}


def _rows(request_id: int) -> list:
    rng = np.random.default_rng(1000 + request_id)
    items = rng.choice(ITEMS, size=CANDIDATES, replace=False)
    query = {"request_id": request_id, "request_time": 1_000 + request_id, "user": f"user-{request_id % 5}".encode(),
             "query_terms": [int(t) for t in rng.integers(0, 100, size=1 + request_id % 5)],  # 1..5, cut at 3
             "context": rng.normal(size=2).astype(np.float32).tolist()}
    rows = []
    for slot, k in enumerate(items.tolist()):
        shown = slot < 10
        row = dict(query, **_item(k), widget=f"w{slot % 3}".encode(), ui_position=slot + 1 if shown else 0,
                   click=int(shown and slot % 4 == 0), stage=F.STAGE_TIERS[slot // 20].encode(),
                   true_ctr=float(rng.random()), teacher_logit=float(rng.normal()))
        if not row["labels"]:
            del row["labels"]  # an empty list is an absent feature
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Writes the rows (requests 0..5 train, 6..11 eval, plus one row with a 6-value item_vec) and
    runs the executor with the registry and its schema."""
    root = tmp_path_factory.mktemp("registry")
    rows = {split: [r for q in ids for r in _rows(q)] for split, ids in (("train", range(6)), ("eval", range(6, 12)))}
    bad = dict(rows["train"][0], sku=BAD_VEC, item_vec=[0.5] * 6)
    for split, split_rows in rows.items():
        os.makedirs(root / "examples" / f"Split-{split}")
        with tf.io.TFRecordWriter(str(root / "examples" / f"Split-{split}" / example_io.RECORD_FILE), options="GZIP") as w:
            for row in split_rows + ([bad] if split == "train" else []):
                w.write(example_io.make_example(row).SerializeToString())
    schema = schema_artifact(str(root / "schema"), _schema())
    dead = record_io.DeadLetters()
    dead.uri = str(root / "dead")
    outputs = {"request_lists": [examples_artifact(str(root / "lists"), splits=())],
               "shown_rows": [examples_artifact(str(root / "shown"), splits=())], "dead_letters": [dead]}
    context = base_beam_executor.BaseBeamExecutor.Context(beam_pipeline_args=[], tmp_dir=str(root / "tmp"))
    negative_sampler.Executor(context).Do(
        {"examples": [examples_artifact(str(root / "examples"))], "schema": [schema]}, outputs,
        {"config": json.dumps(dataclasses.asdict(CONFIG)), "input_splits": json.dumps(["train", "eval"]),
         "features": json.dumps(to_dict(FEATURES), sort_keys=True)})
    def request_id(raw):
        return tf.train.Example.FromString(raw).features.feature["request_id"].int64_list.value[0]

    lists = {split: sorted((e.SerializeToString(deterministic=True)
                            for e in example_io.read_examples(str(root / "lists" / f"Split-{split}" / "*"))),
                           key=request_id)
             for split in ("train", "eval")}
    letters = [json.loads(line) for path in tf.io.gfile.glob(str(root / "dead" / "*.jsonl")) for line in open(path)]
    metrics = json.load(open(root / "lists" / record_io.METRICS_FILE))
    return {"rows": rows, "lists": lists, "dead": letters, "metrics": metrics, "bad": bad}


def test_lists_are_the_row_reference_of_the_registry_byte_for_byte(run):
    """Every list is `RL.build_request_list(sample_request(rows))` with the registry: the request's
    rows (read back through the schema, strings as str) with the corpus of every good row."""
    scalars = negative_sampler._scalar_features(_schema())
    rows = {split: [dict({"labels": []}, **negative_sampler.example_to_row(example_io.make_example(r), scalars))
                    for r in split_rows]  # an absent list is an empty one
            for split, split_rows in run["rows"].items()}
    items = collections.defaultdict(lambda: [0, None])
    for r in rows["train"] + rows["eval"]:
        items[r["sku"]][0] += 1
        items[r["sku"]][1] = {f.name: r[f.name] for f in sampling.item_features(FEATURES)}
    corpus = sampling.ItemCorpus.from_items([(i, c, f) for i, (c, f) in items.items()], features=FEATURES)
    assert corpus.item_ids.dtype == object and corpus.columns["labels"].shape == (len(items), 20)
    counts = collections.Counter()
    for split, split_rows in rows.items():
        by_request = collections.defaultdict(list)
        for r in split_rows:
            by_request[r["request_id"]].append(r)
        reference = []
        for request_id in sorted(by_request):
            packed = RL.build_request_list(sampling.sample_request(by_request[request_id], corpus, CONFIG, counts,
                                                                   features=FEATURES), LIST_SIZE, FEATURES)
            reference.append(example_io.make_example(packed).SerializeToString(deterministic=True))
        assert len(reference) == REQUESTS // 2 and run["lists"][split] == reference
    metrics = run["metrics"]
    assert metrics["candidates_kept"] == counts["candidates_kept"] == REQUESTS * CANDIDATES
    assert metrics["random_negatives_added"] == counts["random_negatives_added"] == REQUESTS * 15
    assert metrics["candidates_sampled_out"] == counts["candidates_sampled_out"] > 0


def test_lists_parse_with_the_registry_spec_and_carry_its_values(run):
    raw = run["lists"]["train"] + run["lists"]["eval"]
    parsed = tf.io.parse_example(raw, RL.parse_spec(LIST_SIZE, FEATURES))
    lists = {k: (v.to_list() if isinstance(v, tf.RaggedTensor) else v.numpy()) for k, v in parsed.items()}
    assert lists["request_id"][:, 0].tolist() == list(range(REQUESTS))
    assert lists["item_vec"].shape == (REQUESTS, LIST_SIZE * 7) and lists["labels"].shape == (REQUESTS, LIST_SIZE * 20)
    for i in range(REQUESTS):
        source = {r["sku"]: r for r in _rows(i)}
        assert lists["user"][i, 0] == f"user-{i % 5}".encode()
        assert lists["query_terms"][i] == source[next(iter(source))]["query_terms"][:3]  # var-len, cut to 3
        np.testing.assert_array_equal(lists["context"][i], source[next(iter(source))]["context"])
        mask = lists["mask"][i].astype(bool)
        assert mask.sum() == CANDIDATES + 15
        stage = lists["stage"][i]
        random = stage == RL.TIER_INDEX[RL.RANDOM_NEG_TIER]
        assert random.sum() == 15 and (stage[~mask] == RL.PAD_STAGE).all()
        skus = lists["sku"][i]
        assert set(skus[mask & ~random]) == set(source) and not set(skus[random]) & set(source)
        assert (skus[~mask] == b"").all()
        vec, labels = lists["item_vec"][i].reshape(LIST_SIZE, 7), lists["labels"][i].reshape(LIST_SIZE, 20)
        for slot in np.flatnonzero(mask).tolist():  # logged and random candidates: the item's own features
            item = _item(int(skus[slot][4:]))
            np.testing.assert_array_equal(vec[slot], np.float32(item["item_vec"]))
            assert labels[slot].tolist() == item["labels"][:20] + [b""] * (20 - min(20, len(item["labels"])))
            assert lists["brand"][i, slot] == item["brand"]
        assert (vec[~mask] == 0).all() and (labels[~mask] == b"").all()
        widgets = lists["widget"][i]
        assert (widgets[random] == b"").all() and set(widgets[mask & ~random]) <= {b"w0", b"w1", b"w2"}
        assert (lists["ui_position"][i][random] == 0).all() and (lists["click"][i][random] == 0).all()
        assert (lists["ui_position"][i][mask] > 0).sum() == 10


def test_wrong_dense_width_is_a_dead_letter_naming_the_feature_and_long_lists_are_counted(run):
    bad = [d for d in run["dead"]]
    assert len(bad) == 1 and "item_vec needs 7 values" in bad[0]["reason"]
    example = tf.train.Example.FromString(bytes.fromhex(bad[0]["record_hex"]))
    assert example.features.feature["sku"].bytes_list.value[0] == BAD_VEC
    metrics = run["metrics"]
    every_row = run["rows"]["train"] + run["rows"]["eval"]
    assert metrics["records_bad"] == 1 and metrics["records_parsed"] == len(every_row) == REQUESTS * CANDIDATES
    cut_labels = sum(max(0, len(r.get("labels", [])) - 20) for r in every_row)
    cut_terms = sum(max(0, len(r["query_terms"]) - 3) for r in every_row)
    folded = sum(r["brand"] >= 50 for r in every_row)
    assert cut_labels > 0 and cut_terms > 0 and folded > 0
    assert metrics["values_cut_labels"] == cut_labels and metrics["values_cut_query_terms"] == cut_terms
    assert metrics["ids_folded_brand"] == folded
    assert not {"ids_folded_sku", "ids_folded_user", "ids_folded_labels", "ids_folded_widget"} & set(metrics)
    counts = negative_sampler.data_counts(metrics, FEATURES)
    assert set(counts["ids_folded"]) == {"query_terms", "brand"}  # string ids are hashed, never folded
    assert counts["nan_values_read_as_0"] == {"context": 0, "item_vec": 0}
    assert counts["values_cut"] == {"query_terms": {"values": cut_terms, "width": 3},
                                    "labels": {"values": cut_labels, "width": 20}}
    assert f"{cut_labels:,} values of labels cut to its width 20" in negative_sampler.data_warnings(counts)


def test_a_schema_that_types_the_registry_otherwise_is_a_one_line_error(tmp_path):
    schema = _schema()
    next(f for f in schema.feature if f.name == "sku").type = schema_pb2.INT
    with pytest.raises(record_io.BadInputError) as error:
        negative_sampler._load_schema([schema_artifact(str(tmp_path / "s"), schema)], FEATURES)
    assert str(error.value) == "features.inputs do not match the schema: sku is INT in the schema, declared id string"
    with pytest.raises(record_io.BadInputError, match="user is not in the schema"):
        negative_sampler._load_schema(None, FEATURES)  # the packaged schema has the default registry's features


def test_hash_of_int_ids_is_unchanged_and_bytes_ids_hash_deterministically():
    old = int.from_bytes(hashlib.blake2b(b"3|class|5|7", digest_size=8).digest(), "big") / 2.0**64
    assert sampling.uniform_hash(3, "class", 5, 7) == sampling.uniform_hash(3, "class", np.int64(5), 7) == old
    value = sampling.uniform_hash(3, "class", 5, b"sku-7")
    assert 0 <= value < 1 and value == sampling.uniform_hash(3, "class", 5, "sku-7") == sampling.uniform_hash(
        3, "class", np.int64(5), np.bytes_(b"sku-7"))
    assert len({value, sampling.uniform_hash(3, "class", 5, b"7"), sampling.uniform_hash(3, "class", 5, b"sku-8")}) == 3


def test_corpus_of_string_ids_looks_up_and_draws_deterministically():
    corpus = sampling.ItemCorpus.from_items([(b"b", 3, {}), ("a", 1, {}), (b"c", 6, {})], features=FEATURES)
    assert corpus.item_ids.tolist() == [b"a", b"b", b"c"] and corpus.columns == {}
    assert corpus.probability(b"c") == pytest.approx(0.6) and corpus.probability(b"z") == 0.0
    assert corpus.index_of([b"c", b"x", b"a"]).tolist() == [2, -1, 0]
    draws = [corpus.draw(r, 2, {b"c"}, seed=0) for r in range(20)]
    assert all(sorted(d) == [b"a", b"b"] for d in draws) and draws == [corpus.draw(r, 2, {b"c"}, 0) for r in range(20)]


def test_a_registry_the_sampler_cannot_decode_is_a_one_line_error(tmp_path):
    shown_as_string = F.FeatureConfig(inputs=FEATURES.inputs + (IF("ui_position", "ui", dtype="string", buckets=11),),
                                      item_key="sku")
    with pytest.raises(record_io.BadInputError, match="ui_position is the shown indicator, an int64 id; declared id string"):
        negative_sampler._load_schema([schema_artifact(str(tmp_path / "s"), _schema())], shown_as_string)
    clash = F.FeatureConfig(inputs=FEATURES.inputs + (IF("labels_values", "item", buckets=3),), item_key="sku")
    with pytest.raises(ValueError, match="labels_values clashes with a column the NegativeSampler decodes"):
        negative_sampler.CandidateDecoder(_schema(), clash)


def test_a_log_without_tiers_or_positions_takes_its_ground_truth_from_the_clicks(tmp_path):
    """tests/own_logs.py's clicks-only log (no stage, no ui_position): every logged row was shown
    (ui_position 1), a clicked row is ground truth (tier rerank_pos) and another logged row a logged
    negative (rerank_neg); random negatives are not shown; no row is diverted."""
    from tests import own_logs

    registry = own_logs.registry()
    data = own_logs.write(str(tmp_path / "examples"), train_requests=3, eval_requests=2, candidates=30)
    schema = schema_pb2.Schema()
    schema.feature.extend(f for f in F.load_schema().feature if f.name in KEYS and f.name not in ("stage", "ui_position"))
    for f in registry.resolved():
        feature = schema.feature.add(name=f.name, type=f.schema_type)
        if not f.multivalent:
            feature.shape.dim.add(size=f.width)
    dead = record_io.DeadLetters()
    dead.uri = str(tmp_path / "dead")
    outputs = {"request_lists": [examples_artifact(str(tmp_path / "lists"), splits=())],
               "shown_rows": [examples_artifact(str(tmp_path / "shown"), splits=())], "dead_letters": [dead]}
    context = base_beam_executor.BaseBeamExecutor.Context(beam_pipeline_args=[], tmp_dir=str(tmp_path / "tmp"))
    config = SamplerConfig(list_size=40, random_negatives=5)
    negative_sampler.Executor(context).Do(
        {"examples": [examples_artifact(data)], "schema": [schema_artifact(str(tmp_path / "schema"), schema)]},
        outputs, {"config": json.dumps(dataclasses.asdict(config)), "input_splits": json.dumps(["train", "eval"]),
                  "features": json.dumps(to_dict(registry), sort_keys=True)})
    clicks = {(r["request_id"][0], r["sku"][0]): r["click"][0] for r in own_logs.rows(3, 30, 0)}
    clicks.update({(r["request_id"][0], r["sku"][0]): r["click"][0] for r in own_logs.rows(2, 30, 1, first_request=3)})
    spec = RL.parse_spec(40, registry)
    checked = 0
    for split in ("train", "eval"):
        for example in example_io.read_examples(str(tmp_path / "lists" / f"Split-{split}" / "*")):
            lists = tf.io.parse_example(tf.constant([example.SerializeToString()]), spec)
            request = int(lists["request_id"][0, 0])
            real = lists["mask"][0].numpy() > 0
            stage, shown = lists["stage"][0].numpy()[real], lists["ui_position"][0].numpy()[real]
            sku = lists["sku"][0].numpy()[real]
            logged = stage != RL.TIER_INDEX[RL.RANDOM_NEG_TIER]
            assert logged.sum() == 30 and (~logged).sum() == 5
            assert (shown[logged] == F.SHOWN_WITHOUT_POSITION).all() and (shown[~logged] == 0).all()
            expected = [RL.TIER_INDEX["rerank_pos"] if clicks[(request, s)] else RL.TIER_INDEX["rerank_neg"]
                        for s in sku[logged]]
            assert stage[logged].tolist() == expected
            checked += 1
    assert checked == 5
    assert not [line for path in tf.io.gfile.glob(str(tmp_path / "dead" / "*")) if not tf.io.gfile.isdir(path)
                for line in open(path) if line.strip()]
