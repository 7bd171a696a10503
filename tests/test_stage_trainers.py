"""Stage Trainer modules (retrieval, HAP pre-ranking, joint cascade) on tiny request-list data:
run_fn with FnArgs, eval_metrics.json, the exported signatures and the warmup file."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2
from tfx.components.trainer.fn_args_utils import FnArgs

from cascade_ranking.models import export as export_lib
from cascade_ranking.models.trainers import cascade, common, preranking, retrieval
from cascade_ranking.models.trainers.list_data import load_lists
from cascade_ranking.schema import features as F
from cascade_ranking.schema import request_list as RL
from tests.component_fixtures import request_list_splits

GT_TIER = RL.TIER_INDEX[F.GROUND_TRUTH_TIER]

pytestmark = pytest.mark.slow
LIST_SIZE = 64  # not the default 60: the Trainers take the list size from the data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Request-list Examples in the NegativeSampler's layout (Split-train/, Split-eval/ gz files)."""
    root = tmp_path_factory.mktemp("stage_trainer_data")
    return request_list_splits(root, num_requests=40, seed=3, list_size=LIST_SIZE)


@pytest.fixture(scope="module")
def eval_examples(data):
    lists = load_lists([str(data / "Split-eval" / "*")], LIST_SIZE)
    return retrieval.candidate_examples(lists, count=12)


def _fn_args(data, out, custom_config):
    return FnArgs(train_files=[str(data / "Split-train" / "*")], eval_files=[str(data / "Split-eval" / "*")],
                  serving_model_dir=str(out / "serving"), model_run_dir=str(out / "run"),
                  custom_config=custom_config)


def _check_run(out):
    """eval_metrics.json recall figures in [0, 1], TensorBoard logs, a parseable warmup file."""
    metrics = json.load(open(out / "run" / common.EVAL_METRICS_FILE))
    recalls = {k: v for k, v in metrics.items() if "recall" in k}
    assert recalls and all(0.0 <= v <= 1.0 for v in recalls.values()), metrics
    assert tf.io.gfile.glob(str(out / "run" / "logs" / "train" / "events.*"))
    backup = out / "run" / "backup"  # BackupAndRestore removes its checkpoint after success
    assert not os.path.exists(backup) or not os.listdir(backup)
    records = list(tf.data.TFRecordDataset(str(out / "serving" / export_lib.WARMUP_FILE)).as_numpy_iterator())
    assert records
    for raw in records:
        log = prediction_log_pb2.PredictionLog.FromString(raw)
        assert log.predict_log.request.model_spec.signature_name == "serving_default"
        assert log.predict_log.request.inputs[export_lib.SERVING_INPUT_KEY].string_val
    return metrics


def _finite(x, n):
    x = x.numpy()
    assert x.shape == (n,) and np.all(np.isfinite(x))
    return x


def test_retrieval_module(data, eval_examples, tmp_path):
    config = {"epochs": 1, "batch_size": 16, "num_negatives": 16, "top_k": 10}
    retrieval.run_fn(_fn_args(data, tmp_path, {"retrieval": json.dumps(config)}))
    metrics = _check_run(tmp_path)
    assert {"recall_retrieval@|GT|", "recall_retrieval@40", "index_recall@10"} <= set(metrics)
    assert metrics["requests_without_gt"] == 0 < metrics["requests"]  # every synthetic list has its GT tier
    loaded = tf.saved_model.load(str(tmp_path / "serving"))
    assert set(loaded.signatures) == {"serving_default", "query_embedding", "item_embeddings", "score"}
    examples = tf.constant(eval_examples)
    top = loaded.signatures["serving_default"](examples=examples)
    assert top["item_ids"].shape == (len(eval_examples), 10) and np.all(np.isfinite(top["scores"].numpy()))
    # The exported top-K is the brute-force top-K over the exported item embeddings.
    table = loaded.signatures["item_embeddings"]()
    ids, items = table["item_ids"].numpy(), table["embeddings"].numpy()
    u = loaded.signatures["query_embedding"](examples=examples)["embedding"].numpy()
    brute = u[0] @ items.T
    order = np.argsort(-brute)[:10]
    np.testing.assert_allclose(top["scores"].numpy()[0], brute[order], rtol=1e-4, atol=1e-4)
    assert set(top["item_ids"].numpy()[0].tolist()) == set(ids[order].tolist())
    # index_recall@10: the share of the eval split's GT candidates whose item is in the brute-force
    # top 10 of the exported items for its request's query embedding.
    lists = load_lists([str(data / "Split-eval" / "*")], LIST_SIZE)
    real = np.asarray(lists["mask"]) > 0
    every_candidate = tf.constant(retrieval.candidate_examples(lists, count=int(real.sum())))  # in np.nonzero order
    is_gt = (np.asarray(lists["stage"]) == GT_TIER)[real]
    u_all = loaded.signatures["query_embedding"](examples=every_candidate)["embedding"].numpy()[is_gt]
    top10 = ids[np.argsort(-(u_all @ items.T), axis=1)[:, :10]]
    in_top = [item in top for item, top in zip(np.asarray(lists["item_id"])[real][is_gt], top10)]
    assert len(in_top) > 20
    assert abs(metrics["index_recall@10"] - np.mean(in_top)) <= 1.0 / len(in_top) + 1e-9  # one GT row of float slack
    # `score` is u·v of each candidate.
    score = _finite(loaded.signatures["score"](examples=examples)["score"], len(eval_examples))
    row = {int(i): k for k, i in enumerate(ids)}
    for n, raw in enumerate(eval_examples):
        item = tf.train.Example.FromString(raw).features.feature["item_id"].int64_list.value[0]
        np.testing.assert_allclose(score[n], u[n] @ items[row[item]], rtol=1e-4, atol=1e-4)


def test_preranking_module(data, eval_examples, tmp_path):
    config = {"epochs": 1, "batch_size": 8, "top_m": 25}
    preranking.run_fn(_fn_args(data, tmp_path, {"preranking": json.dumps(config)}))
    metrics = _check_run(tmp_path)
    assert {"e2e_recall", "recall_light@20", "recall_routed@20"} <= set(metrics)
    assert metrics["requests_without_gt"] == 0 < metrics["requests"]
    flops = metrics["flops"]  # per candidate: the strong model costs more than the light one
    assert flops["strong_per_candidate"] > flops["light_per_candidate"] > flops["light_per_candidate_cached_items"] > 0
    assert flops["routed_per_request"] == (flops["light_per_request"] + LIST_SIZE * flops["light_per_candidate"]
                                           + 25 * flops["strong_per_candidate"])
    loaded = tf.saved_model.load(str(tmp_path / "serving"))
    assert set(loaded.signatures) == {"serving_default", "rescore"}
    examples = tf.constant(eval_examples)
    light = _finite(loaded.signatures["serving_default"](examples=examples)["score"], len(eval_examples))
    strong = _finite(loaded.signatures["rescore"](examples=examples)["score"], len(eval_examples))
    assert not np.allclose(light, strong)


@pytest.mark.parametrize("method", ["lcron", "bce", "icc", "hap"])
def test_cascade_module(data, eval_examples, tmp_path, method):
    """The joint Trainer exports the ranker (Format-Serving) and the light pre-ranker alone
    (stages/preranking); eval_metrics.json has the cascade recalls, the ranker's CTR on the shown
    eval rows, the training data it read and both stages' FLOPs."""
    config = {"method": method, "epochs": 1, "batch_size": 8}
    ranker = {"hidden_units": [32], "cross_projection_dim": 8, "cascade_head_units": [16]}
    out_dir = tmp_path / "model"
    args = FnArgs(train_files=[str(data / "Split-train" / "*")], eval_files=[str(data / "Split-eval" / "*")],
                  serving_model_dir=str(out_dir / "Format-Serving"), model_run_dir=str(tmp_path / "run"),
                  custom_config={"cascade": json.dumps(config), "ranker": json.dumps(ranker)})
    cascade.run_fn(args)
    metrics = json.load(open(tmp_path / "run" / common.EVAL_METRICS_FILE))
    assert metrics["method"] == method
    assert metrics["requests_without_gt"] == 0 < metrics["requests"]
    assert {"e2e_recall", "recall_prerank@30", "recall_rank@20"} <= set(metrics)
    assert 0.0 <= metrics["ranker"]["auc"] <= 1.0 and metrics["ranker"]["shown_rows"] > 0
    data_read = metrics["train_data"]
    assert data_read["shown_rows"] <= data_read["candidate_rows"] and data_read["lists"] > 0
    assert metrics["flops"]["ranking"]["per_candidate"] > metrics["flops"]["preranking"]["per_candidate"] > 0
    examples = tf.constant(eval_examples)
    ranker_serve = tf.saved_model.load(str(out_dir / "Format-Serving"))
    assert {"serving_default", "quality", "ui", "score_ui_grid"} <= set(ranker_serve.signatures)
    out = ranker_serve.signatures["serving_default"](examples=examples)
    assert set(out) == {"ctr", "logit", "score"}
    for value in out.values():
        _finite(value, len(eval_examples))
    preranker = tf.saved_model.load(str(export_lib.stage_model_dir(args.serving_model_dir, "preranking")))
    assert set(preranker.signatures) == {"serving_default"}
    _finite(preranker.signatures["serving_default"](examples=examples)["score"], len(eval_examples))
    # The light pre-ranker alone: far fewer variables than the ranker it was trained with.
    names = [name for name, _ in tf.train.list_variables(os.path.join(
        export_lib.stage_model_dir(args.serving_model_dir, "preranking"), "variables", "variables"))
        if name != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert names and all(name.startswith("light/") for name in names)  # the light model alone


def test_the_training_data_report_streamed_in_batches_matches_the_whole_split(data):
    """`cascade.train_data_report` sums batches of lists; against a count on the whole split."""
    whole = load_lists([str(data / "Split-train" / "*")], LIST_SIZE)
    batches = [{name: whole[name][i:i + 7] for name in cascade.REPORT_COLUMNS} for i in range(0, len(whole["mask"]), 7)]
    report = cascade.train_data_report(batches)
    real = whole["mask"] > 0
    shown = real & (whole["ui_position"] > 0) & (whole["sample_weight"] > 0)
    w, y = whole["sample_weight"][shown].astype(float), whole["click"][shown].astype(float)
    assert report["lists"] == len(whole["mask"]) and len(batches) > 1
    assert report["candidate_rows"] == real.sum() and report["shown_rows"] == shown.sum() > 0
    assert report["shown_clicks"] == y.sum() and report["shown_weight_sum"] == pytest.approx(w.sum())
    assert report["weighted_click_mean"] == pytest.approx((w * y).sum() / w.sum())


def test_the_normalisers_are_fitted_on_the_first_lists_only(data, monkeypatch):
    """`adaptation_lists` reads at most `ADAPT_LISTS` lists (whole batches of 1,024)."""
    from cascade_ranking.models.trainers import list_data

    files = [str(data / "Split-train" / "*")]
    every = list_data.load_lists(files, LIST_SIZE)
    assert len(list_data.adaptation_lists(files, LIST_SIZE)["mask"]) == len(every["mask"])  # fewer than the cap
    first = list_data.load_lists(files, LIST_SIZE, batch_size=4, max_lists=6)
    assert len(first["mask"]) == 8 < len(every["mask"])
    np.testing.assert_array_equal(first["request_id"], every["request_id"][:8])


def test_the_retrieval_train_split_read_in_batches_keeps_the_counts_and_items_of_the_whole(data):
    """`read_train_split` (7 lists at a time) against `train_split_of` the whole split in memory:
    the same positive counts and corpus; and the counts are those of the GT rows, counted here."""
    files = [str(data / "Split-train" / "*")]
    whole = load_lists(files, LIST_SIZE)
    streamed, reference = retrieval.read_train_split(files, LIST_SIZE, batch_size=7), retrieval.train_split_of(whole)
    np.testing.assert_array_equal(streamed.positives.ids, reference.positives.ids)
    np.testing.assert_array_equal(streamed.positives.counts, reference.positives.counts)
    for name, values in reference.corpus.columns.items():
        np.testing.assert_array_equal(streamed.corpus.columns[name], values)
    real = whole["mask"] > 0
    gt_items = whole["item_id"][real & (whole["stage"] == GT_TIER)]
    ids, counts = np.unique(gt_items, return_counts=True)
    np.testing.assert_array_equal(streamed.positives.ids, ids)
    np.testing.assert_array_equal(streamed.positives.counts, counts)
    assert streamed.positives.total == len(gt_items) > 0
    assert streamed.corpus.size == len(np.unique(whole["item_id"][real]))
    without_gt = retrieval.train_split_of({**whole, "stage": np.full_like(whole["stage"], -1)})
    with pytest.raises(ValueError, match="no positive candidate"):
        retrieval.build_model(retrieval.RetrievalTrainerConfig(), without_gt)


def test_an_empty_eval_split_is_a_one_line_error_naming_its_files(tmp_path):
    """`cascade.evaluate_eval_split` with no list to read stops with an error naming the files: no
    file (FileNotFoundError), or files without a record (ValueError)."""
    from cascade_ranking.models.ranker_config import RankerConfig

    model = cascade.build_model(cascade.CascadeTrainerConfig(), RankerConfig())
    pattern = str(tmp_path / "Split-eval" / "*")
    with pytest.raises(FileNotFoundError, match="no data files match .*Split-eval"):
        cascade.evaluate_eval_split(model, [pattern], LIST_SIZE, (40, 20), "gt")
    os.makedirs(tmp_path / "Split-eval")
    with tf.io.TFRecordWriter(str(tmp_path / "Split-eval" / "empty.gz"), "GZIP"):
        pass
    with pytest.raises(ValueError, match="no request lists in .*Split-eval"):
        cascade.evaluate_eval_split(model, [pattern], LIST_SIZE, (40, 20), "gt")


def test_unknown_config_key_is_an_error(data, tmp_path):
    with pytest.raises(ValueError, match=r"unknown CascadeTrainerConfig field\(s\) epoch;"):
        cascade.run_fn(_fn_args(data, tmp_path, {"cascade": json.dumps({"epoch": 1})}))


def _table_rows(saved_model_dir, name):
    """Rows of the embedding table(s) `name` of a SavedModel (a Keras model, or a serving module
    holding the light pre-ranker or the two towers)."""
    variables = tf.train.list_variables(os.path.join(str(saved_model_dir), "variables", "variables"))
    rows = {int(shape[0]) for path, shape in variables if f"tables/{name}/embeddings/" in path}
    assert rows, (name, sorted(path for path, _ in variables))
    return rows


def test_the_runs_bucket_counts_reach_every_trainers_embeddings(data, tmp_path):
    """custom_config "features" (the run's FeatureConfig) sets the item_id buckets of the ranker, the
    light pre-ranker and the two towers: ids 5 and 10,005 no longer share an embedding."""
    features = json.dumps({"buckets": [["item_id", 50_000]]})
    out_dir = tmp_path / "model"
    cascade.run_fn(FnArgs(train_files=[str(data / "Split-train" / "*")], eval_files=[str(data / "Split-eval" / "*")],
                          serving_model_dir=str(out_dir / "Format-Serving"), model_run_dir=str(tmp_path / "run"),
                          custom_config={"cascade": json.dumps({"epochs": 1, "batch_size": 8}),
                                         "ranker": json.dumps({"hidden_units": [16], "cascade_head_units": [8]}),
                                         common.FEATURES_KEY: features}))
    assert _table_rows(out_dir / "Format-Serving", "item_id") == {50_000}
    assert _table_rows(out_dir / "stages" / "preranking", "item_id") == {50_000}
    retrieval.run_fn(_fn_args(data, tmp_path / "retrieval", {
        "retrieval": json.dumps({"epochs": 1, "batch_size": 16, "num_negatives": 0, "top_k": 10}),
        common.FEATURES_KEY: features}))
    assert _table_rows(tmp_path / "retrieval" / "serving", "item_id") == {50_000}
    assert _table_rows(out_dir / "Format-Serving", "user_id") == {5_000}  # the others keep their defaults


def test_the_cascade_eval_read_a_few_lists_at_a_time_equals_the_whole_split(data, monkeypatch):
    """`cascade.evaluate_eval_split` keeps only scores and labels of each batch of eval lists; its
    metrics equal `evaluate_cascade` and `ctr_metrics` on the whole eval split in memory."""
    config = cascade.CascadeTrainerConfig()
    model = cascade.build_model(config, cascade.ranker_config_from(FnArgs(custom_config={})))
    model.adapt(load_lists([str(data / "Split-train" / "*")], LIST_SIZE))
    files = [str(data / "Split-eval" / "*")]
    whole = load_lists(files, LIST_SIZE)
    assert len(whole["mask"]) == 4  # read 3 and 1
    quotas = tuple(int(q) for q in config.eval_quotas)
    expected = cascade.evaluate_cascade(model.predict_stage_scores(whole), whole, quotas, model.stage_names, "gt")
    expected["ranker"] = cascade.ctr_metrics(model.ranking_stage.ranker, whole)
    monkeypatch.setattr(cascade, "EVAL_LISTS", 3)  # two batches
    got, warmup = cascade.evaluate_eval_split(model, files, LIST_SIZE, quotas, "gt")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
    assert warmup == retrieval.candidate_examples(whole)
