"""CascadeEvaluator on DirectRunner: its metrics equal independent numpy computations, and the
blessing follows the thresholds."""
import itertools
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from tfx.types import standard_artifacts

from components import cascade_evaluator, record_io
from components.evaluation import EvaluatorConfig
from datasources import example_io
from tests.component_fixtures import exported_model, synthetic_examples


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluator")
    examples = synthetic_examples(str(root / "examples"), num_requests=40, seed=6)
    model = exported_model(str(root / "examples"), str(root / "model"))
    tf.keras.utils.set_random_seed(1)
    baseline = exported_model(str(root / "examples"), str(root / "baseline"))
    return root, examples, model, baseline


def _run(tmp_path, examples, model, baseline, config):
    outputs = {}
    for key, cls in (("evaluation", standard_artifacts.ModelEvaluation), ("blessing", standard_artifacts.ModelBlessing),
                     ("dead_letters", record_io.DeadLetters)):
        artifact = cls()
        artifact.uri = str(tmp_path / key)
        os.makedirs(artifact.uri, exist_ok=True)
        outputs[key] = [artifact]
    model.id, baseline.id = 11, 7
    cascade_evaluator.Executor().Do(
        {"examples": [examples], "model": [model], "preranking_model": [baseline], "baseline_model": [baseline]},
        outputs, {"config": config.to_json()})
    metrics = json.load(open(os.path.join(outputs["evaluation"][0].uri, record_io.METRICS_FILE)))
    return metrics, outputs


def _scores(examples, model_path):
    rows = list(example_io.read_examples(os.path.join(examples.uri, "Split-eval", "data_*")))
    serve = tf.saved_model.load(os.path.join(model_path, "Format-Serving")).signatures["serving_default"]
    ctr = serve(examples=tf.constant([e.SerializeToString() for e in rows]))["ctr"].numpy()
    f = lambda name: np.array([e.features.feature[name].int64_list.value[0] for e in rows])
    stage = np.array([e.features.feature["stage"].bytes_list.value[0].decode() for e in rows])
    return f("request_id"), f("click"), f("ui_position"), stage, ctr


def _pairwise_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    return np.mean([(a > b) + 0.5 * (a == b) for a, b in itertools.product(pos, neg)])


def test_metrics_equal_independent_computations(setup, tmp_path):
    root, examples, model, baseline = setup
    config = EvaluatorConfig(quotas=(30, 20), calibration_boundaries=(0.1, 0.2))
    metrics, outputs = _run(tmp_path, examples, model, baseline, config)
    req, click, pos, stage, ctr = _scores(examples, model.uri)
    _, _, _, _, base = _scores(examples, baseline.uri)
    shown = pos > 0
    y, p = click[shown], ctr[shown]
    m = metrics["model"]
    assert m["auc"] == pytest.approx(_pairwise_auc(y, p), abs=1e-6)
    per_query = [_pairwise_auc(click[shown & (req == r)], ctr[shown & (req == r)]) for r in np.unique(req[shown])
                 if 0 < click[shown & (req == r)].sum() < (shown & (req == r)).sum()]
    assert m["per_query_auc"] == pytest.approx(np.mean(per_query), abs=1e-6)
    pbar = y.mean()
    ne = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)) / -(pbar * np.log(pbar) + (1 - pbar) * np.log(1 - pbar))
    assert m["ne"] == pytest.approx(ne, rel=1e-5)
    bucket = np.digitize(p, [0.1, 0.2])
    for b, entry in enumerate(m["calibration_by_bucket"]):
        sel = bucket == b
        assert entry["count"] == sel.sum()
        if y[sel].sum() > 0:
            assert entry["bias"] == pytest.approx((y[sel] - p[sel]).sum() / y[sel].sum(), rel=1e-5)
    assert metrics["pd_vs_baseline"] == pytest.approx(np.mean(np.abs(p - base[shown]) / ((p + base[shown]) / 2)), rel=1e-5)
    # e2e recall: the pre-ranker (baseline) keeps its top 30, then the ranker its top 20 of those.
    recalls = []
    for r in np.unique(req):
        sel = req == r
        gt = stage[sel] == "rerank_pos"
        survivors = np.argsort(-base[sel], kind="stable")[:30]
        final = survivors[np.argsort(-ctr[sel][survivors], kind="stable")[:20]]
        recalls.append(gt[final].sum() / gt.sum())
    assert metrics["cascade"]["e2e_recall"] == pytest.approx(np.mean(recalls), abs=1e-9)
    assert metrics["counters"]["records_scored"] == len(req)
    for name in ("calibration.png", "recall_at_k.png"):
        with open(os.path.join(outputs["evaluation"][0].uri, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_blessing_flips_with_the_threshold(setup, tmp_path):
    root, examples, model, baseline = setup
    achieved, _ = _run(tmp_path / "a", examples, model, baseline, EvaluatorConfig(compare_to_baseline=False))
    auc = achieved["model"]["auc"]
    for threshold, blessed in ((auc - 0.01, 1), (auc + 0.01, 0)):
        config = EvaluatorConfig(thresholds=(("auc", "min", threshold),), compare_to_baseline=False)
        _, outputs = _run(tmp_path / f"t{blessed}", examples, model, baseline, config)
        blessing = outputs["blessing"][0]
        assert blessing.get_int_custom_property("blessed") == blessed
        assert blessing.get_int_custom_property("current_model_id") == 11
        assert os.path.exists(os.path.join(blessing.uri, "BLESSED" if blessed else "NOT_BLESSED"))


def test_tfma_eval_config_slices_by_ui_treatment_and_tier():
    config = cascade_evaluator.tfma_eval_config(auc_threshold=0.7)
    slices = [list(s.feature_keys) for s in config.slicing_specs]
    assert slices == [[], ["ui_position"], ["ui_format"], ["stage"]]
    assert config.model_specs[0].label_key == "click" and config.model_specs[0].prediction_key == "ctr"
    metrics = {m.class_name: m for m in config.metrics_specs[0].metrics}
    assert {"AUC", "Calibration", "ExampleCount", "BinaryCrossentropy"} <= set(metrics)
    assert metrics["AUC"].threshold.value_threshold.lower_bound.value == 0.7
