"""NegativeSampler: sampling decisions, and the executor on DirectRunner read back from its output."""
import collections
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_metadata.proto.v0 import schema_pb2
from tfx.dsl.components.base import base_beam_executor
from tfx.types import artifact_utils

from cascade_ranking.components import negative_sampler, record_io, sampling
from cascade_ranking.components.sampling import SamplerConfig
from cascade_ranking.datasources import example_io
from cascade_ranking.schema import features as F
from cascade_ranking.schema import request_list as RL
from tests.component_fixtures import examples_artifact, schema_artifact, synthetic_examples

GARBAGE = b"\x12\x34 definitely not a tf.Example"


def _outputs(tmp_path):
    """The executor's output artifacts under `tmp_path` (lists/, shown/, dead/)."""
    dead = record_io.DeadLetters()
    dead.uri = str(tmp_path / "dead")
    return {"request_lists": [examples_artifact(str(tmp_path / "lists"), splits=())],
            "shown_rows": [examples_artifact(str(tmp_path / "shown"), splits=())], "dead_letters": [dead]}


def _run(tmp_path, examples, config: SamplerConfig, beam_args=None, input_splits=("train", "eval"), schema=None,
         outputs=None, features=None):
    """Runs the executor (with the Schema artifact `schema` if given) into `outputs` (default: new
    ones under `tmp_path`); returns the request_lists and dead_letters artifacts."""
    outputs = outputs or _outputs(tmp_path)
    context = base_beam_executor.BaseBeamExecutor.Context(beam_pipeline_args=beam_args or [], tmp_dir=str(tmp_path / "tmp"))
    inputs = {"examples": [examples]}
    if schema is not None:
        inputs["schema"] = [schema]
    negative_sampler.Executor(context).Do(
        inputs, outputs,
        {"config": json.dumps(dataclasses.asdict(config)), "input_splits": json.dumps(list(input_splits)),
         **({"features": json.dumps(features)} if features is not None else {})},
    )
    return outputs["request_lists"][0], outputs["dead_letters"][0]


def _raw_records(pattern):
    """The records of the gzipped TFRecord files matching `pattern`, as stored (bytes)."""
    return [raw for path in sorted(tf.io.gfile.glob(pattern))
            for raw in tf.data.TFRecordDataset(path, compression_type="GZIP").as_numpy_iterator()]


def _dead_letters(dead):
    return [json.loads(l) for f in tf.io.gfile.glob(os.path.join(dead.uri, "*.jsonl")) for l in open(f)]


def _lists(out, split, list_size=RL.LIST_SIZE):
    raw = [e.SerializeToString() for e in example_io.read_examples(os.path.join(out.uri, f"Split-{split}"))]
    if not raw:
        return {}
    parsed = tf.io.parse_example(raw, RL.parse_spec(list_size))
    return {k: (v.numpy() if not isinstance(v, tf.RaggedTensor) else v.to_list()) for k, v in parsed.items()}


def _rows(examples, split):
    scalars = negative_sampler._scalar_features()
    return [negative_sampler.example_to_row(e, scalars)
            for e in example_io.read_examples(os.path.join(examples.uri, f"Split-{split}", "data_*"))]


# ---- sampling decisions ------------------------------------------------------------------------

def test_teacher_log_loss_matches_cross_entropy():
    for z in (-3.0, 0.0, 2.5):
        p = 1 / (1 + math.exp(-z))
        assert sampling.teacher_log_loss(z, 1) == pytest.approx(-math.log(p))
        assert sampling.teacher_log_loss(z, 0) == pytest.approx(-math.log(1 - p))


def test_only_shown_nonclicks_are_sampled_and_weights_are_inverse_rates():
    config = SamplerConfig(nonclick_keep_rate=0.25, unseen_position_from=6, unseen_position_keep_rate=0.5)
    base = {"request_id": 1, "item_id": 2, "click": 0, "ui_position": 3}
    assert sampling.sampling_decision(dict(base, ui_position=0), config) == (True, 1.0, [])
    assert sampling.sampling_decision(dict(base, click=1), config) == (True, 1.0, [])
    decisions = [sampling.sampling_decision(dict(base, item_id=i, ui_position=8), config) for i in range(4000)]
    kept = [w for keep, w, _ in decisions if keep]
    assert set(kept) == {8.0}  # 1 / (0.25 · 0.5)
    assert len(kept) / 4000 == pytest.approx(0.125, abs=0.02)
    # Deterministic: the same row gives the same decision.
    assert decisions == [sampling.sampling_decision(dict(base, item_id=i, ui_position=8), config) for i in range(4000)]


def test_corpus_draws_by_frequency_without_excluded_items():
    corpus = sampling.ItemCorpus.from_items([(i, c, {}) for i, c in [(5, 1), (7, 3), (9, 6)]])
    assert corpus.probability(9) == pytest.approx(0.6) and corpus.probability(8) == 0.0
    draws = collections.Counter(corpus.draw(r, 1, set(), seed=0)[0] for r in range(3000))
    assert draws[9] / 3000 == pytest.approx(0.6, abs=0.03)
    assert all(corpus.draw(r, 2, {9}, seed=0) == [7, 5] or corpus.draw(r, 2, {9}, seed=0) == [5, 7] for r in range(20))


# ---- executor ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler")
    examples = synthetic_examples(str(root / "examples"), num_requests=40, extra_records={"eval": [GARBAGE]})
    return examples


def test_lists_keep_tiers_add_random_negatives_and_counters_match(small, tmp_path):
    config = SamplerConfig(nonclick_keep_rate=0.5, random_negatives=10, seed=3)
    out, dead = _run(tmp_path, small, config)
    metrics = json.load(open(os.path.join(out.uri, record_io.METRICS_FILE)))
    all_rows = _rows(small, "train") + _rows(small, "eval")
    counts = collections.Counter(r["item_id"] for r in all_rows)
    total = sum(counts.values())
    n_lists = 0
    kept_candidates = random_added = dropped = 0
    for split in ("train", "eval"):
        lists = _lists(out, split)
        source = {}
        for r in _rows(small, split):
            source.setdefault(r["request_id"], []).append(r)
        assert sorted(lists["request_id"][:, 0]) == sorted(source)  # "keep": requests stay in their split
        for i, request_id in enumerate(lists["request_id"][:, 0]):
            n_lists += 1
            mask = lists["mask"][i].astype(bool)
            stage = lists["stage"][i][mask]
            tiers = collections.Counter(RL.TIERS[s] for s in stage)
            for tier in ("rerank_neg", "rank_neg", "coarse_neg", "prerank_neg"):
                assert tiers[tier] == 10  # unshown tiers are never sampled
            assert tiers["random_neg"] == 10
            logged_items = {r["item_id"] for r in source[request_id]}
            items = lists["item_id"][i][mask]
            randoms = items[stage == RL.TIER_INDEX["random_neg"]]
            assert not set(randoms) & logged_items
            np.testing.assert_allclose(lists["sampling_probability"][i][mask], [counts[x] / total for x in items], rtol=1e-6)
            # Shown non-clicks: kept ones weigh 1/0.5, sampled-out ones stay in the list with weight 0
            # (out of the CTR losses, still candidates of the cascade), clicks weigh 1.
            shown = lists["ui_position"][i][mask] > 0
            clicks = lists["click"][i][mask] == 1
            weights = lists["sample_weight"][i][mask]
            assert set(weights[shown & ~clicks].tolist()) <= {0.0, 2.0} and np.all(weights[clicks] == 1.0)
            sampled_out = sum(1 for r in source[request_id] if r["ui_position"] > 0 and r["click"] == 0
                              and not sampling.uniform_hash(3, "class", request_id, r["item_id"]) < 0.5)
            assert (weights[shown & ~clicks] == 0).sum() == sampled_out
            assert mask.sum() == len(source[request_id]) + 10  # every logged candidate, and the randoms
            kept_candidates += len(source[request_id])
            dropped += sampled_out
            random_added += 10
    assert metrics["lists_train"] + metrics["lists_eval"] == n_lists == 40
    assert metrics["candidates_kept"] == kept_candidates == 40 * 50
    assert metrics["random_negatives_added"] == random_added
    assert metrics["candidates_sampled_out"] == metrics["sampled_out_class"] == dropped > 0
    assert metrics["records_parsed"] == 40 * 50 and metrics["records_bad"] == 1
    assert out.get_string_custom_property("layout") == "request_list"
    assert [bytes.fromhex(d["record_hex"]) for d in _dead_letters(dead)] == [GARBAGE]


def test_teacher_loss_sampling_drops_easy_nonclicks(tmp_path):
    root = tmp_path / "examples"
    examples = synthetic_examples(str(root), num_requests=30, seed=5)
    # Give every candidate a teacher logit: easy non-clicks (low loss) are those with very low logits.
    for split in ("train", "eval"):
        path = os.path.join(root, f"Split-{split}", example_io.RECORD_FILE)
        rows = list(example_io.read_examples(path))
        with tf.io.TFRecordWriter(path, options="GZIP") as w:
            for e in rows:
                item = e.features.feature["item_id"].int64_list.value[0]
                e.features.feature["teacher_logit"].float_list.value.append(-6.0 if item % 2 else 0.0)
                w.write(e.SerializeToString())
    config = SamplerConfig(low_loss_keep_rate=0.2, low_loss_threshold=0.05, random_negatives=0)
    out, _ = _run(tmp_path, examples, config)
    kept_easy = kept_hard = easy = hard = 0
    for split in ("train", "eval"):
        for r in _rows(examples, split):
            if r["ui_position"] > 0 and r["click"] == 0:
                if r["item_id"] % 2:
                    easy += 1
                else:
                    hard += 1
        lists = _lists(out, split)
        mask = lists["mask"].astype(bool)
        shown_nonclick = mask & (lists["ui_position"] > 0) & (lists["click"] == 0)
        odd = lists["item_id"] % 2 == 1
        kept = lists["sample_weight"] > 0  # a sampled-out row stays in its list with weight 0
        kept_easy += int((shown_nonclick & odd & kept).sum())
        kept_hard += int((shown_nonclick & ~odd & kept).sum())
        assert np.all(lists["sample_weight"][shown_nonclick & odd & kept] == pytest.approx(5.0))
        assert np.all(lists["sample_weight"][shown_nonclick & ~odd] == 1.0)
    assert kept_hard == hard
    assert 0.08 < kept_easy / easy < 0.35


def test_time_split_puts_the_latest_requests_in_eval(small, tmp_path):
    out, _ = _run(tmp_path, small, SamplerConfig(split="time", eval_fraction=0.25, random_negatives=0))
    train, evals = _lists(out, "train"), _lists(out, "eval")
    assert train["request_time"].max() < evals["request_time"].min()
    assert len(evals["request_id"]) == pytest.approx(10, abs=2)


@pytest.mark.parametrize("split", ["keep", "hash"])
def test_shown_rows_are_the_raw_shown_rows_of_the_eval_requests(small, tmp_path, split):
    """`shown_rows` holds, byte for byte, the rows with ui_position > 0 of the requests whose list
    went to eval: under "keep" the input eval split's shown rows, under "hash" those of the
    requests in the eval request-list split (drawn from both input splits)."""
    outputs = _outputs(tmp_path)
    out, _ = _run(tmp_path, small, SamplerConfig(split=split, nonclick_keep_rate=0.5, eval_fraction=0.3),
                  outputs=outputs)
    shown = outputs["shown_rows"][0]
    eval_requests = set(_lists(out, "eval")["request_id"][:, 0].tolist())
    input_splits = ("eval",) if split == "keep" else ("train", "eval")
    expected = []
    for input_split in input_splits:
        for raw in _raw_records(os.path.join(small.uri, f"Split-{input_split}", "data_*")):
            feature = tf.train.Example.FromString(raw).features.feature
            if feature["request_id"].int64_list.value[0] in eval_requests and feature["ui_position"].int64_list.value[0] > 0:
                expected.append(raw)
    written = _raw_records(os.path.join(artifact_utils.get_split_uri([shown], "eval"), "data_tfrecord-*.gz"))
    assert expected and sorted(written) == sorted(expected)
    assert artifact_utils.decode_split_names(shown.split_names) == ["eval"]
    assert out.get_int_custom_property("shown_rows_eval") == len(expected)
    if split == "hash":
        assert 0 < len(eval_requests) < 40  # both list splits, each with requests of both input splits
        assert {r["request_id"] for r in _rows(small, "train")} & eval_requests


def test_schema_input_decides_the_required_features(small, tmp_path):
    """With a Schema artifact that requires a feature the rows lack, every row is dead-lettered and
    the executor fails on the bad fraction; without the schema channel the same data passes (with
    the packaged schema). `schema_path` names the schema file read."""
    strict = schema_pb2.Schema()
    strict.CopyFrom(F.load_schema())
    extra = strict.feature.add()
    extra.name, extra.type = "required_extra", schema_pb2.INT
    extra.value_count.min = extra.value_count.max = 1
    extra.presence.min_fraction, extra.presence.min_count = 1.0, 1
    schema = schema_artifact(str(tmp_path / "schema"), strict)
    outputs = _outputs(tmp_path / "strict")
    with pytest.raises(record_io.BadInputError, match="NegativeSampler: 2001 of 2001 records were diverted"):
        _run(tmp_path / "strict", small, SamplerConfig(), schema=schema, outputs=outputs)
    out, dead = outputs["request_lists"][0], outputs["dead_letters"][0]
    assert out.get_string_custom_property("schema_path") == str(tmp_path / "schema" / "schema.pbtxt")
    reasons = collections.Counter(d["reason"] for d in _dead_letters(dead) if bytes.fromhex(d["record_hex"]) != GARBAGE)
    assert reasons == {"missing required feature(s): required_extra": 40 * 50}
    assert _lists(out, "train") == {} and _lists(out, "eval") == {}

    out, _ = _run(tmp_path / "packaged", small, SamplerConfig())
    assert out.get_string_custom_property("schema_path") == F.SCHEMA_PATH
    assert out.get_int_custom_property("lists_train") + out.get_int_custom_property("lists_eval") == 40

    lacking = schema_pb2.Schema()
    lacking.CopyFrom(F.load_schema())
    del lacking.feature[[f.name for f in lacking.feature].index("teacher_logit")]
    with pytest.raises(record_io.BadInputError, match="lacks or retypes features the NegativeSampler decodes: teacher_logit"):
        _run(tmp_path / "lacking", small, SamplerConfig(), schema=schema_artifact(str(tmp_path / "lacking_schema"), lacking))


def test_missing_split_and_too_many_bad_records_are_clear_errors(small, tmp_path):
    with pytest.raises(record_io.BadInputError, match="required split 'test' is missing") as error:
        _run(tmp_path / "a", small, SamplerConfig(), input_splits=("train", "test"))
    assert "\n" not in str(error.value)
    with pytest.raises(record_io.BadInputError, match="1 of 2001 records were diverted"):
        _run(tmp_path / "b", small, SamplerConfig(max_bad_fraction=0.0001))


@pytest.mark.slow
def test_weighted_mean_label_is_unbiased(tmp_path):
    examples = synthetic_examples(str(tmp_path / "examples"), num_requests=2000, seed=8)
    out, _ = _run(tmp_path, examples, SamplerConfig(nonclick_keep_rate=0.5, random_negatives=0))
    rows = _rows(examples, "train") + _rows(examples, "eval")
    original = np.mean([r["click"] for r in rows if r["ui_position"] > 0])
    num = den = 0.0
    for split in ("train", "eval"):
        lists = _lists(out, split)
        shown = lists["mask"].astype(bool) & (lists["ui_position"] > 0)
        num += float((lists["sample_weight"][shown] * lists["click"][shown]).sum())
        den += float(lists["sample_weight"][shown].sum())
    assert abs(num / den - original) / original < 0.02


@pytest.mark.slow
def test_output_is_identical_with_one_and_two_workers(small, tmp_path):
    config = SamplerConfig(nonclick_keep_rate=0.5, seed=1)
    outputs = []
    for workers in (1, 2):
        out, _ = _run(tmp_path / f"w{workers}", small, config,
                      beam_args=["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"])
        outputs.append({split: sorted(e.SerializeToString(deterministic=True)
                                      for e in example_io.read_examples(os.path.join(out.uri, f"Split-{split}")))
                        for split in ("train", "eval")})
    assert outputs[0] == outputs[1]
    assert len(outputs[0]["train"]) + len(outputs[0]["eval"]) == 40


# ---- bad input: dead letters, the default 1% threshold, over-long requests ---------------------

def _variant(example: tf.train.Example, drop=(), **replace) -> bytes:
    e = tf.train.Example()
    e.CopyFrom(example)
    for name in drop:
        del e.features.feature[name]
    for name, feature in replace.items():
        e.features.feature[name].CopyFrom(feature)
    return e.SerializeToString()


def test_bad_records_and_cut_rows_over_one_percent_fail_and_land_in_dead_letters(tmp_path):
    """20 requests (1000 rows) plus 12 bad records: unparseable bytes, and rows of request 0 without
    request_id, without item_id, with a float item_id and with 3 user_dense values. With list_size
    45 every request (50 candidates) is too long for a list: it keeps its shown rows and best tiers
    (`truncation_order`) and its 5 worst rows go to the dead letters, bytes and all. Every diverted
    row counts against the bad fraction: 112 of 1012 > 1 %."""
    root = tmp_path / "examples"
    examples = synthetic_examples(str(root), num_requests=20, seed=2)
    first = next(iter(example_io.read_examples(str(root / "Split-train" / "data_*"))))
    bad_rows = {
        _variant(first, drop=["request_id"]): "missing required feature(s): request_id",
        _variant(first, drop=["item_id"]): "missing required feature(s): item_id",
        _variant(first, item_id=tf.train.Feature(float_list=tf.train.FloatList(value=[1.5]))): "undecodable",
        _variant(first, user_dense=tf.train.Feature(float_list=tf.train.FloatList(value=[1.0, 2.0, 3.0]))):
            "user_dense needs 4 values",
    }
    garbage = [GARBAGE + bytes([i]) for i in range(8)]
    with tf.io.TFRecordWriter(str(root / "Split-train" / "extra.gz"), options="GZIP") as w:
        for raw in garbage + list(bad_rows):
            w.write(raw)
    config = SamplerConfig(list_size=45, random_negatives=0)
    assert config.max_bad_fraction == 0.01  # the default
    outputs = _outputs(tmp_path)
    with pytest.raises(record_io.BadInputError) as error:
        _run(tmp_path, examples, config, outputs=outputs)
    message = str(error.value)
    assert "\n" not in message
    assert "NegativeSampler: 112 of 1012 records were diverted (11.07% > 1.00%" in message
    assert "records_bad 12" in message and "candidates_truncated 100" in message
    letters = _dead_letters(outputs["dead_letters"][0])
    cut = [d for d in letters if "more than the list size 45: cut" in d["reason"]]
    records = {bytes.fromhex(d["record_hex"]): d["reason"] for d in letters if d not in cut}
    assert set(records) == set(garbage) | set(bad_rows)
    assert all(records[g].startswith("unparseable tf.Example") for g in garbage)
    for raw, reason in bad_rows.items():
        assert reason in records[raw], (reason, records[raw])
    # The cut rows are real rows: per request, its 5 worst by the rule (unshown, worst tier, top item ids).
    source = {}
    for split in ("train", "eval"):
        for r in _rows(examples, split):
            source.setdefault(r["request_id"], []).append(r)
    cut_rows = [tf.train.Example.FromString(bytes.fromhex(d["record_hex"])) for d in cut]
    by_request = collections.defaultdict(list)
    for e in cut_rows:
        by_request[e.features.feature["request_id"].int64_list.value[0]].append(e.features.feature["item_id"].int64_list.value[0])
    assert set(by_request) == set(source)
    for request_id, items in by_request.items():
        ranked = sorted(source[request_id], key=lambda r: (r["ui_position"] == 0, r["ui_position"] or 0,
                                                            RL.TIER_INDEX[r["stage"]], r["item_id"]))
        assert sorted(items) == sorted(r["item_id"] for r in ranked[45:])
    metrics = json.load(open(tmp_path / "lists" / record_io.METRICS_FILE))
    assert metrics["records_bad"] == 12 and metrics["records_parsed"] == 1000
    assert metrics["requests_truncated"] == 20 and metrics["candidates_truncated"] == 100
    assert metrics["candidates_kept"] == 20 * 45  # the kept counter counts what the lists hold


def test_a_request_that_spans_input_splits_is_diverted_with_its_rows(tmp_path):
    root = tmp_path / "examples"
    examples = synthetic_examples(str(root), num_requests=10, seed=4)
    train = list(example_io.read_examples(str(root / "Split-train" / "data_*")))
    moved = train[0]  # one row of a train request written to eval as well
    request_id = moved.features.feature["request_id"].int64_list.value[0]
    with tf.io.TFRecordWriter(str(root / "Split-eval" / "extra.gz"), options="GZIP") as w:
        w.write(moved.SerializeToString())
    outputs = _outputs(tmp_path)
    _run(tmp_path, examples, SamplerConfig(random_negatives=0, max_bad_fraction=1.0), outputs=outputs)
    letters = [d for d in _dead_letters(outputs["dead_letters"][0]) if "spans input splits" in d["reason"]]
    rows = [tf.train.Example.FromString(bytes.fromhex(d["record_hex"])) for d in letters]
    assert len(rows) == 51 and {r.features.feature["request_id"].int64_list.value[0] for r in rows} == {request_id}
    metrics = json.load(open(tmp_path / "lists" / record_io.METRICS_FILE))
    assert metrics["candidates_diverted_split"] == 51 and metrics["requests_bad"] == 1


def test_columnar_path_matches_the_row_reference(small):
    """`sample_request_columns` (what the executor runs) gives the same request lists, byte for
    byte, as the row-based reference `build_request_list(sample_request(rows))`, and the same
    counts; the corpus's cached draw is numpy's `Generator.choice`."""
    config = SamplerConfig(nonclick_keep_rate=0.4, unseen_position_from=5, unseen_position_keep_rate=0.5, seed=9,
                           random_negatives=12)
    decoder = negative_sampler.CandidateDecoder(F.load_schema())
    scalars = negative_sampler._scalar_features()
    examples = list(example_io.read_examples(os.path.join(small.uri, "Split-train", "data_*")))
    by_request = {}
    for e in examples:
        by_request.setdefault(e.features.feature["request_id"].int64_list.value[0], []).append(e)
    rows = [negative_sampler.example_to_row(e, scalars) for e in examples]
    items = collections.defaultdict(lambda: [0, None])
    for r in rows:
        items[r["item_id"]][0] += 1
        items[r["item_id"]][1] = {k: r[k] for k in sampling.ITEM_FEATURES}
    corpus = sampling.ItemCorpus.from_items([(i, c, f) for i, (c, f) in items.items()])
    for request_id, group in sorted(by_request.items())[:12]:
        group = sorted(group, key=lambda e: e.features.feature["item_id"].int64_list.value[0])
        cols, good, bad = decoder.decode([e.SerializeToString() for e in group])
        assert not bad and good.tolist() == list(range(len(group)))
        counts_fast, counts_ref = {}, {}
        fast = negative_sampler.packed_example(sampling.sample_request_columns(cols, corpus, config, counts_fast))
        reference = RL.build_request_list(
            sampling.sample_request([negative_sampler.example_to_row(e, scalars) for e in group], corpus, config,
                                    counts_ref), config.list_size)
        assert fast.SerializeToString(deterministic=True) == \
            example_io.make_example(reference).SerializeToString(deterministic=True)
        assert {k: v for k, v in counts_fast.items() if v} == {k: v for k, v in counts_ref.items() if v}
    rng_a, rng_b = np.random.default_rng([4, 2]), np.random.default_rng([4, 2])
    np.testing.assert_array_equal(corpus._choice(rng_a, 200), rng_b.choice(corpus.item_ids, size=200, p=corpus.probabilities))


def test_nan_values_folded_ids_and_requests_without_ground_truth_are_counted_and_printed(tmp_path, capsys):
    """What the models would change without a trace is counted per feature, from the rows themselves
    (an independent count over the written input here), and the executor prints one warning line."""
    root = tmp_path / "examples"
    examples = synthetic_examples(str(root), num_requests=10, seed=5)
    rows = list(example_io.read_examples(str(root / "Split-train" / "data_*")))
    by_request = collections.defaultdict(list)
    for e in rows:
        by_request[e.features.feature["request_id"].int64_list.value[0]].append(e)
    first, second = sorted(by_request)[:2]
    for e in by_request[first][:3]:  # NaN in 3 rows: 2 values each
        e.features.feature["user_dense"].float_list.value[1] = float("nan")
        e.features.feature["user_dense"].float_list.value[3] = float("nan")
    for e in by_request[first][:4]:  # item ids above the 10,000 buckets, and one tag above 512
        e.features.feature["item_id"].int64_list.value[0] = 10_000 + e.features.feature["item_id"].int64_list.value[0]
    by_request[first][0].features.feature["item_tags"].int64_list.value.append(700)
    for e in by_request[second]:  # no ground truth: its rerank_pos rows become rerank_neg
        if e.features.feature["stage"].bytes_list.value[0] == b"rerank_pos":
            e.features.feature["stage"].bytes_list.value[0] = b"rerank_neg"
    path = root / "Split-train" / example_io.RECORD_FILE
    with tf.io.TFRecordWriter(str(path), options="GZIP") as w:
        for e in rows:
            w.write(e.SerializeToString())
    _run(tmp_path, examples, SamplerConfig(random_negatives=0))
    metrics = json.load(open(tmp_path / "lists" / record_io.METRICS_FILE))
    counts = negative_sampler.data_counts(metrics)
    every_row = rows + list(example_io.read_examples(str(root / "Split-eval" / "data_*")))
    nan = sum(int(np.isnan(list(e.features.feature["user_dense"].float_list.value)).sum()) for e in every_row)
    folded = sum(e.features.feature["item_id"].int64_list.value[0] >= 10_000 for e in every_row)
    assert (nan, folded) == (6, 4)
    assert counts["nan_values_read_as_0"] == {"user_dense": nan, "item_dense": 0}
    assert counts["ids_folded"]["item_id"] == {"ids": folded, "buckets": 10_000}
    assert counts["ids_folded"]["item_tags"]["ids"] == 1 and counts["ids_folded"]["user_id"]["ids"] == 0
    assert counts["requests_without_ground_truth"] == {"total": 1, "train": 1}
    assert counts["rows_read"] == len(every_row) == counts["rows_used"] + sum(counts["rows_diverted"].values())
    out = capsys.readouterr().out
    assert ("NegativeSampler: warning: 1 requests without ground truth; 6 NaN values of user_dense read as 0; "
            "4 ids of item_id folded into its 10,000 buckets; 1 ids of item_tags folded into its 512 buckets") in out
    # With the run's FeatureConfig giving item_id 20,000 buckets, those ids are no longer folded.
    _run(tmp_path / "wide", examples, SamplerConfig(random_negatives=0), features={"buckets": [["item_id", 20_000]]})
    wide = negative_sampler.data_counts(json.load(open(tmp_path / "wide" / "lists" / record_io.METRICS_FILE)))
    assert wide["ids_folded"]["item_id"] == {"ids": 0, "buckets": 20_000}
    assert wide["ids_folded"]["item_tags"] == {"ids": 1, "buckets": 512}


# ---- the shuffle by request through bucket files -------------------------------------------------

@pytest.mark.parametrize("request_id", [0, 7, -3, 2**62, b"req-\x00\xff", b""])
def test_bucket_records_round_trip_and_buckets_hash_the_id_bytes(request_id):
    raw = b"\x0a\x05 a row"
    record = negative_sampler.bucket_record(3, request_id, raw)
    assert negative_sampler.parse_bucket_record(record) == (request_id, 3, raw)
    key = (b"s" + request_id) if isinstance(request_id, bytes) else b"i" + request_id.to_bytes(8, "little", signed=True)
    import zlib
    assert negative_sampler.bucket_of(request_id, 7) == zlib.crc32(key) % 7  # the same in every process


@pytest.mark.parametrize("id_type", [schema_pb2.INT, schema_pb2.BYTES])
def test_write_buckets_reads_each_request_id_and_names_each_bad_record(id_type):
    """A block with bad records in it: the good rows keep their ids (int or string, whichever the
    schema says) and each bad one gets its own reason, as when the block is all good."""
    schema = schema_pb2.Schema()
    schema.feature.add(name=F.REQUEST_ID_KEY, type=id_type)
    writer = negative_sampler._WriteBuckets(schema.SerializeToString(), 0, "unused", 2)
    writer.setup()

    def row(request_id=None, other_type=False):
        example = tf.train.Example()
        feature = example.features.feature
        feature["item_id"].int64_list.value.append(1)
        if request_id is not None:
            wants_bytes = (id_type == schema_pb2.BYTES) != other_type
            if wants_bytes:
                feature[F.REQUEST_ID_KEY].bytes_list.value.append(f"r{request_id}".encode())
            else:
                feature[F.REQUEST_ID_KEY].int64_list.value.append(request_id)
        return example.SerializeToString()

    ids = [(f"r{i}".encode() if id_type == schema_pb2.BYTES else i) for i in range(4)]
    good = [row(i) for i in range(4)]
    assert writer._request_ids(good) == ids
    block = good[:2] + [b"\x08\x96\x01 not an Example", row(), row(9, other_type=True)] + good[2:]
    got = writer._request_ids(block)
    assert got[:2] + got[5:] == ids
    assert got[2].startswith("unparseable tf.Example")
    assert got[3] == "missing required feature(s): request_id"
    assert got[4] == f"request_id is not {'string' if id_type == schema_pb2.BYTES else 'int64'}"


def test_bucket_count_follows_the_input_size_with_two_per_worker(tmp_path):
    gz, plain = tmp_path / "a.gz", tmp_path / "b"
    gz.write_bytes(b"x" * 1000)
    plain.write_bytes(b"x" * 5000)
    assert negative_sampler.bucket_count([str(gz), str(plain)], parallelism=3) == 6
    size = negative_sampler.BUCKET_BYTES
    expected = -(-(1000 * negative_sampler.GZIP_RATIO + 5000) // size)
    assert negative_sampler.bucket_count([str(gz), str(plain)], parallelism=1) == max(2, expected)
    big = tmp_path / "big"
    with open(big, "wb") as f:  # sparse: 40 GB of apparent size, no disk
        f.truncate(40 << 30)
    assert negative_sampler.bucket_count([str(big)], parallelism=2) == negative_sampler.MAX_BUCKETS


def test_output_does_not_depend_on_the_bucket_count_and_the_buckets_are_removed(small, tmp_path, monkeypatch):
    """One bucket per few requests against two buckets: the same lists, shown rows and dead letters,
    and no bucket file left under the output artifact."""
    config = SamplerConfig(nonclick_keep_rate=0.5, random_negatives=5, seed=4, split="hash")
    outputs, buckets = [], []
    files = [path for split in ("train", "eval") for path in record_io.split_files(os.path.join(small.uri, f"Split-{split}"))]
    for name, bucket_bytes in (("many", 20_000), ("two", 1 << 40)):
        monkeypatch.setattr(negative_sampler, "BUCKET_BYTES", bucket_bytes)
        buckets.append(negative_sampler.bucket_count(files, 1))
        shown = examples_artifact(str(tmp_path / name / "shown"), splits=())
        out, dead = _run(tmp_path / name, small, config, outputs={
            **_outputs(tmp_path / name), "shown_rows": [shown]})
        assert not tf.io.gfile.exists(os.path.join(out.uri, negative_sampler.BUCKETS_DIR))
        outputs.append((
            {split: sorted(_raw_records(os.path.join(out.uri, f"Split-{split}", "*"))) for split in ("train", "eval")},
            sorted(_raw_records(os.path.join(shown.uri, "Split-eval", "*"))),
            sorted(json.dumps(d, sort_keys=True) for d in _dead_letters(dead))))
    assert buckets[0] > 10 and buckets[1] == 2
    assert outputs[0] == outputs[1]
    assert sum(len(v) for v in outputs[0][0].values()) == 40 and outputs[0][1] and outputs[0][2]


def test_corpus_counts_the_rows_cut_from_long_requests(small, tmp_path):
    """Every request is cut to 40 of its 50 candidates; the corpus (each candidate's
    sampling_probability) still counts every row of the input, counted independently here."""
    config = SamplerConfig(list_size=40, random_negatives=10, seed=2, max_bad_fraction=1.0)
    out, dead = _run(tmp_path, small, config)
    counts = collections.Counter(r["item_id"] for split in ("train", "eval") for r in _rows(small, split))
    total = sum(counts.values())
    metrics = json.load(open(os.path.join(out.uri, record_io.METRICS_FILE)))
    assert metrics["candidates_truncated"] == 40 * 10
    for split in ("train", "eval"):
        lists = _lists(out, split, list_size=40)
        for i in range(len(lists["request_id"])):
            mask = lists["mask"][i].astype(bool)
            assert mask.sum() == 40
            np.testing.assert_allclose(lists["sampling_probability"][i][mask],
                                       [counts[x] / total for x in lists["item_id"][i][mask]], rtol=1e-6)


def test_item_columns_decoder_matches_the_candidate_decoder_and_flags_bad_records(small):
    """The corpus pass's `tf.io.parse_example` decoder gives the columns tfx_bsl's decoder gives for
    the same features, and calls a garbage record and a wrongly typed item feature bad."""
    raws = _raw_records(os.path.join(small.uri, "Split-train", "data_*"))[:200]
    example = tf.train.Example.FromString(raws[0])
    example.features.feature["item_category"].Clear()
    example.features.feature["item_category"].float_list.value.append(1.5)
    raws = raws + [GARBAGE, example.SerializeToString()]
    schema = F.load_schema()
    reference = negative_sampler.CandidateDecoder(schema, columns=negative_sampler.corpus_columns())
    fast = negative_sampler.ItemColumnsDecoder(schema)
    want, want_rows, want_bad = reference.decode(raws)
    got, got_rows, got_bad = fast.decode(raws)
    assert got_rows.tolist() == want_rows.tolist() == list(range(200))
    assert sorted(got_bad) == sorted(want_bad) == [200, 201]
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
        assert got[name].dtype == want[name].dtype, name
    assert negative_sampler.item_feature_tuples(got) == negative_sampler.item_feature_tuples(want)
