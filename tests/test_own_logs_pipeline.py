"""Bring your own logs, as a new user would: `cascade init` on a log of another shape
(tests/own_logs.py: its own feature names and key names, string ids and a string request key, a
dense feature of width 7, up to 20 keywords, 100-candidate requests, no tiers, no ui_position), then `cascade run --config`, then
`cascade serve-check`, with no change to package code; a 2-stage cascade; a feature added by the
config alone; a declared feature the data lacks stopped before training; ids looked up in
vocabularies that a TFX Transform step computes."""
import glob
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
import yaml

from cascade_ranking.datasources import example_io
from cascade_ranking.pipelines import cli
from cascade_ranking.schema import request_list as RL
from tests import own_logs

LIST_SIZE = 120
# Tiny data (24 train requests) cannot pass the default gates; these bless any model, so that the
# run pushes and serve-check has something to check. The gates themselves are tested elsewhere.
SMALL_RUN = [
    "--beam-mode", "in_process",
    "--set", f"sampler.list_size={LIST_SIZE}",
    "--set", "teacher.epochs=2", "--set", "cascade.epochs=2", "--set", "retrieval.epochs=2",
    "--set", "evaluator.thresholds=[]", "--set", "evaluator.change_thresholds=[]",
    "--set", "evaluator.tfma_min_auc=0.0", "--set", "evaluator.tfma_auc_tolerance=1.0",
    "--set", "evaluator.tfma_calibration_range=[0.0, 1000.0]",
]


def _main(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _promo(row) -> dict:
    """A feature the log carries but the first config does not declare: the item's promotion."""
    return {"promo": [f"promo-{int(row['sku'][0][4:]) % 3}".encode()]}


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """The log and the starter config `cascade init` writes for it (every feature declared)."""
    root = tmp_path_factory.mktemp("own")
    data = own_logs.write(str(root / "data"), train_requests=24, eval_requests=8, extra=_promo)
    assert cli.main(["init", "--examples-dir", data, "--out", str(root / "start")]) == 0
    with open(root / "start" / "cascade.yaml") as f:
        config = yaml.safe_load(f)
    return root, data, config


def _write_config(path, config) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return str(path)


def _without(config, name):
    config = json.loads(json.dumps(config))
    config["features"]["inputs"] = [f for f in config["features"]["inputs"] if f["name"] != name]
    return config


def _pushed(output_dir, stage):
    stage_dir = os.path.join(output_dir, "serving", stage)
    versions = sorted(os.listdir(stage_dir)) if os.path.isdir(stage_dir) else []
    return os.path.join(stage_dir, versions[-1]) if versions else None


def _embedding_rows(model_dir):
    """{feature name: rows of its embedding table} of a pushed ranker, read from its checkpoint."""
    variables = tf.train.list_variables(os.path.join(model_dir, "variables", "variables"))
    return {path.split("/tables/")[1].split("/")[0]: shape[0] for path, shape in variables
            if "/tables/" in path and path.endswith("/embeddings/.ATTRIBUTES/VARIABLE_VALUE")}


@pytest.mark.slow
def test_a_log_of_another_shape_trains_serves_and_prints_the_cascade_table(tmp_path, capsys):
    """The log names its own keys too: a string `session` key, `clicked`, `ts` (the KeyMapper)."""
    root = tmp_path
    data = own_logs.write(str(root / "data"), train_requests=24, eval_requests=8, own_keys=True)
    code, out, err = _main(capsys, "init", "--examples-dir", data, "--out", str(root / "start"))
    assert code == 0, err
    assert "keys: request_id from 'session', click from 'clicked', request_time from 'ts'" in out
    with open(root / "start" / "cascade.yaml") as f:
        config = yaml.safe_load(f)
    assert config["keys"] == {"request_id": "session", "click": "clicked", "request_time": "ts"}
    declared = {f["name"]: f for f in config["features"]["inputs"]}
    assert declared["sku"]["dtype"] == "string" and declared["vector"]["width"] == 7
    assert declared["keywords"]["kind"] == "ids" and declared["keywords"]["width"] == 20
    out_dir = str(root / "three")
    code, out, err = _main(capsys, "run", "--config", _write_config(root / "three.yaml", config),
                           "--output-dir", out_dir, *SMALL_RUN)
    assert code == 0, err + out
    assert "KeyMapper" in out  # the progress line of the component that adds the pipeline's keys
    assert "e2e recall (quotas 40/30/20)" in out and "retrieval Recall@|GT|@40" in out
    assert "requests without ground truth   0 of 32" in out
    for stage in ("retrieval", "preranking", "ranking"):
        assert _pushed(out_dir, stage), stage
    # The request lists are the registry's layout: string ids, width 7, 20 keywords per slot.
    (lists_dir,) = tf.io.gfile.glob(os.path.join(out_dir, "pipeline_root", "NegativeSampler", "request_lists", "*",
                                                 "Split-train"))
    example = next(example_io.read_examples(lists_dir))
    feature = example.features.feature
    assert len(feature["sku"].bytes_list.value) == LIST_SIZE and feature["sku"].bytes_list.value[0].startswith(b"sku-")
    assert len(feature["vector"].float_list.value) == 7 * LIST_SIZE
    assert len(feature["keywords"].int64_list.value) == 20 * LIST_SIZE
    assert sum(feature["mask"].int64_list.value) == 100 + 10  # the logged rows and 10 random negatives
    stages = np.asarray(feature["stage"].int64_list.value)[:100]
    assert set(stages.tolist()) <= {RL.TIER_INDEX["rerank_pos"], RL.TIER_INDEX["rerank_neg"]}  # no tiers: clicks
    # Every pushed model serves real eval rows of the log (string ids parsed, hashed, scored).
    code, out, err = _main(capsys, "serve-check", out_dir)
    assert code == 0, err + out
    assert "retrieval" in out and "ranking" in out
    ranker = tf.saved_model.load(_pushed(out_dir, "ranking")).signatures["serving_default"]
    eval_rows = [e.SerializeToString() for e, _ in zip(example_io.read_examples(os.path.join(data, "Split-eval")),
                                                      range(4))]
    ctr = ranker(examples=tf.constant(eval_rows))["ctr"].numpy()
    assert ctr.shape == (4,) and np.all((ctr > 0) & (ctr < 1))


@pytest.mark.slow
def test_a_two_stage_cascade_and_a_feature_added_by_the_config_alone(started, capsys):
    """Run 1: pre-ranking and ranking only, `promo` not declared; run 2: the same config with
    `promo` added to features.inputs (the only change). The second ranker embeds it."""
    root, _, config = started
    first = _without(config, "promo")
    first["stages"] = ["preranking", "ranking"]
    first["evaluator"] = {"quotas": [30, 20]}
    first["cascade"] = {"eval_quotas": [30, 20]}
    out_dir = str(root / "two")
    code, out, err = _main(capsys, "run", "--config", _write_config(root / "two.yaml", first), "--output-dir", out_dir,
                           *SMALL_RUN)
    assert code == 0, err + out
    assert "e2e recall (quotas 30/20)" in out and "retrieval Recall" not in out
    assert _pushed(out_dir, "retrieval") is None and _pushed(out_dir, "preranking") and _pushed(out_dir, "ranking")
    assert not os.path.exists(os.path.join(out_dir, "pipeline_root", "Trainer.retrieval"))
    first_rows = _embedding_rows(_pushed(out_dir, "ranking"))
    assert "sku" in first_rows and "promo" not in first_rows

    second = json.loads(json.dumps(first))
    second["features"]["inputs"] = config["features"]["inputs"]  # promo declared: the only change
    code, out, err = _main(capsys, "run", "--config", _write_config(root / "two_promo.yaml", second),
                           "--output-dir", out_dir, *SMALL_RUN)
    assert code == 0, err + out
    assert "promo" in _embedding_rows(_pushed(out_dir, "ranking"))


def test_a_declared_feature_the_data_lacks_stops_the_run_before_training_with_one_line(started, tmp_path, capsys):
    root, _, config = started
    # Declared, but in neither the schema nor the data.
    missing = json.loads(json.dumps(config))
    missing["features"]["inputs"].append({"name": "discount", "role": "item", "kind": "dense", "dtype": "float32",
                                          "width": 1, "buckets": 0})
    code, out, err = _main(capsys, "run", "--config", _write_config(tmp_path / "a.yaml", missing),
                           "--output-dir", str(tmp_path / "a"), "--beam-mode", "in_process")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "discount is not in the schema" in err
    # Declared and in the schema, but no row carries it.
    schema_path = tmp_path / "schema.pbtxt"
    text = open(missing["schema_file"]).read()
    schema_path.write_text(text + 'feature {\n  name: "discount"\n  type: FLOAT\n}\n')
    missing["schema_file"] = str(schema_path)
    code, out, err = _main(capsys, "run", "--config", _write_config(tmp_path / "b.yaml", missing),
                           "--output-dir", str(tmp_path / "b"), "--beam-mode", "in_process")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "declared feature(s) discount" in err
    assert not os.path.exists(tmp_path / "b" / "pipeline_root" / "Trainer.teacher")


def _vocabulary_config(config, names=("sku", "keywords")):
    """`config` with `names` (a string item id, a multivalent int id) looked up in vocabularies."""
    config = json.loads(json.dumps(config))
    for f in config["features"]["inputs"]:
        if f["name"] in names:
            f.update(lookup="vocabulary", buckets=0, oov_buckets=1)
    return config


@pytest.mark.slow
def test_vocabulary_features_get_their_vocabularies_from_transform_and_serve_unseen_ids(started, capsys):
    """sku (string item id) and keywords (int ids, up to 20 a row) declared `lookup: vocabulary`:
    the run adds a TFX Transform whose output holds each vocabulary (the distinct train values,
    counted here), every stage (retrieval, pre-ranking, ranking) embeds them in vocabulary + OOV rows
    (not buckets) and carries the files as SavedModel assets, and the pushed ranker serves an unseen
    sku once the Transform output is deleted."""
    root, data, config = started
    run = _vocabulary_config(_without(config, "promo"))
    out_dir = str(root / "vocab")
    code, out, err = _main(capsys, "run", "--config", _write_config(root / "vocab.yaml", run), "--output-dir", out_dir,
                           *SMALL_RUN)
    assert code == 0, err + out
    train = list(example_io.read_examples(os.path.join(data, "Split-train")))
    skus = {e.features.feature["sku"].bytes_list.value[0] for e in train}
    keywords = {k for e in train for k in e.features.feature["keywords"].int64_list.value}
    (graph,) = tf.io.gfile.glob(os.path.join(out_dir, "pipeline_root", "Transform", "transform_graph", "*"))
    output = tft.TFTransformOutput(graph)
    assert set(output.vocabulary_by_name("sku")) == skus  # the train split's, not eval's
    assert {int(k) for k in output.vocabulary_by_name("keywords")} == keywords
    assert not os.path.exists(os.path.join(out_dir, "pipeline_root", "Transform", "transformed_examples"))
    # Eval ids the train split never had share the OOV rows, and the run counts them.
    (eval_metrics,) = glob.glob(os.path.join(out_dir, "pipeline_root", "Trainer.cascade", "model_run", "*",
                                             "eval_metrics.json"))
    oov = json.load(open(eval_metrics))["eval_ids_out_of_vocabulary"]
    eval_rows = list(example_io.read_examples(os.path.join(data, "Split-eval")))
    unseen = sum(e.features.feature["sku"].bytes_list.value[0] not in skus for e in eval_rows)
    added = oov["sku"]["of"] - len(eval_rows)  # the lists hold every eval row (none cut) and random negatives
    assert oov["sku"]["vocabulary_size"] == len(skus) and 0 <= added <= 8 * 10  # 8 requests, ≤ 10 negatives each
    assert unseen <= oov["sku"]["ids"] <= unseen + added and set(oov) == {"sku", "keywords"}
    assert f"sku {oov['sku']['ids']:,} of {oov['sku']['of']:,}" in out  # the run's data counts
    ranking = _pushed(out_dir, "ranking")
    rows = _embedding_rows(ranking)
    assert rows["sku"] == len(skus) + 1 and rows["keywords"] == len(keywords) + 1
    assert rows["visitor"] == next(f["buckets"] for f in run["features"]["inputs"] if f["name"] == "visitor")
    for stage in ("retrieval", "preranking"):  # tf.Module exports: their tables by row count, their assets
        path = _pushed(out_dir, stage)
        tables = {shape[0] for _, shape in tf.train.list_variables(os.path.join(path, "variables", "variables"))
                  if len(shape) == 2}
        assert {len(skus) + 1, len(keywords) + 1} <= tables, stage
        assert {"sku", "keywords"} <= set(os.listdir(os.path.join(path, "assets"))), stage
    shutil.rmtree(graph)  # serving reads the SavedModel's own vocabulary assets
    ranker = tf.saved_model.load(ranking).signatures["serving_default"]
    known = next(example_io.read_examples(os.path.join(data, "Split-eval")))
    unseen = tf.train.Example()
    unseen.CopyFrom(known)
    unseen.features.feature["sku"].bytes_list.value[:] = [b"sku-never-seen"]
    ctr = ranker(examples=tf.constant([known.SerializeToString(), unseen.SerializeToString()]))["ctr"].numpy()
    assert ctr.shape == (2,) and np.all((ctr > 0) & (ctr < 1))
