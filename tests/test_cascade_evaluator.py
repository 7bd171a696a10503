"""CascadeEvaluator on DirectRunner: its metrics equal independent numpy computations, each stage's
blessing follows that stage's thresholds and baseline, and the TFMA config is valid."""
import dataclasses
import itertools
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_analysis as tfma
from tfx.types import standard_artifacts

from cascade_ranking.components import cascade_evaluator, evaluation, record_io
from cascade_ranking.components.evaluation import EvaluatorConfig
from cascade_ranking.datasources import example_io
from cascade_ranking.schema import features as F
from tests.component_fixtures import candidate_blind_model, exported_model, synthetic_examples

OPEN = EvaluatorConfig(thresholds=(), change_thresholds=())  # blesses every stage that has a model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluator")
    examples = synthetic_examples(str(root / "examples"), num_requests=40, seed=6)
    model = exported_model(str(root / "examples"), str(root / "model"))
    tf.keras.utils.set_random_seed(1)
    baseline = exported_model(str(root / "examples"), str(root / "baseline"))
    blind = candidate_blind_model(str(root / "blind"))
    model.id, baseline.id, blind.id = 11, 7, 5
    return root, examples, model, baseline, blind


def _run(tmp_path, config, examples, **inputs):
    outputs = {}
    for key, cls in (("evaluation", standard_artifacts.ModelEvaluation), ("dead_letters", record_io.DeadLetters),
                     *((key, standard_artifacts.ModelBlessing) for key in cascade_evaluator.BLESSING_OUTPUTS.values())):
        artifact = cls()
        artifact.uri = str(tmp_path / key)
        os.makedirs(artifact.uri, exist_ok=True)
        outputs[key] = [artifact]
    cascade_evaluator.Executor().Do({"examples": [examples], **inputs}, outputs, {"config": config.to_json()})
    metrics = json.load(open(os.path.join(outputs["evaluation"][0].uri, record_io.METRICS_FILE)))
    blessings = {stage: outputs[key][0] for stage, key in cascade_evaluator.BLESSING_OUTPUTS.items()}
    return metrics, outputs, blessings


def _ctr_blessing(tmp_path, blessed: int, model_id: int):
    """A ModelBlessing as TFX's Evaluator writes it."""
    artifact = standard_artifacts.ModelBlessing()
    artifact.uri = str(tmp_path / "tfma_blessing")
    artifact.set_int_custom_property("blessed", blessed)
    artifact.set_int_custom_property("current_model_id", model_id)
    return artifact


def _scores(examples, model_path):
    rows = list(example_io.read_examples(os.path.join(examples.uri, "Split-eval", "data_*")))
    serve = tf.saved_model.load(os.path.join(model_path, "Format-Serving")).signatures["serving_default"]
    ctr = serve(examples=tf.constant([e.SerializeToString() for e in rows]))["ctr"].numpy()
    f = lambda name: np.array([e.features.feature[name].int64_list.value[0] for e in rows])
    stage = np.array([e.features.feature["stage"].bytes_list.value[0].decode() for e in rows])
    return f("request_id"), f("click"), f("ui_position"), stage, ctr


def _recall(req, stage, scores, q):
    """Recall@|GT|@q by plain per-request sorting."""
    recalls = []
    for r in np.unique(req):
        gt = stage[req == r] == "rerank_pos"
        if gt.any():
            recalls.append(gt[np.argsort(-scores[req == r], kind="stable")[:q]].sum() / gt.sum())
    return np.mean(recalls)


def _pairwise_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    return np.mean([(a > b) + 0.5 * (a == b) for a, b in itertools.product(pos, neg)])


def _assert_blessing(blessing, blessed: bool, model_id=None, baseline_id=None):
    assert blessing.get_int_custom_property("blessed") == int(blessed)
    assert os.path.exists(os.path.join(blessing.uri, "BLESSED" if blessed else "NOT_BLESSED"))
    assert not os.path.exists(os.path.join(blessing.uri, "NOT_BLESSED" if blessed else "BLESSED"))
    assert blessing.has_custom_property("current_model_id") == (model_id is not None)
    if model_id is not None:
        assert blessing.get_int_custom_property("current_model_id") == model_id
    assert blessing.has_custom_property("baseline_model_id") == (baseline_id is not None)
    if baseline_id is not None:
        assert blessing.get_int_custom_property("baseline_model_id") == baseline_id


def test_metrics_equal_independent_computations(setup, tmp_path):
    root, examples, model, baseline, _ = setup
    config = EvaluatorConfig(quotas=(30, 20), calibration_boundaries=(0.1, 0.2))
    metrics, outputs, _ = _run(tmp_path, config, examples, model=[model], preranking_model=[baseline],
                               baseline_model=[baseline])
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
    # Per stage: Recall@|GT|@q, the chance level mean(min(q, n_r) / n_r) and the lift over it.
    cascade = metrics["cascade"]
    sizes = np.array([(req == r).sum() for r in np.unique(req)])
    for key, scores, q in (("preranking_model", base, 30), ("model", ctr, 20)):
        recall, chance = _recall(req, stage, scores, q), np.mean(np.minimum(q, sizes) / sizes)
        assert cascade[f"recall_at_{q}/{key}"] == pytest.approx(recall, abs=1e-9)
        assert cascade[f"chance_at_{q}/{key}"] == pytest.approx(chance, abs=1e-9)
        assert cascade[f"recall_lift_at_{q}/{key}"] == pytest.approx((recall - chance) / (1 - chance), abs=1e-9)
    assert metrics["baseline_cascade"]["stages"] == ["model"]
    assert "e2e_recall" not in metrics["baseline_cascade"]  # the pre-ranking stage had no baseline
    assert metrics["baseline_cascade"]["recall_at_20/model"] == pytest.approx(_recall(req, stage, base, 20), abs=1e-9)
    assert metrics["counters"]["records_scored"] == len(req)
    assert metrics["blessed"] == metrics["blessings"]["ranking"]["blessed"]
    assert metrics["blessing_reasons"] == metrics["blessings"]["ranking"]["reasons"]
    for name in ("calibration.png", "recall_at_k.png"):
        with open(os.path.join(outputs["evaluation"][0].uri, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_baselines_cascade_gets_its_e2e_recall_when_every_stage_has_a_baseline():
    """On spans the baselines are the previous span's models: their chained e2e recall on the new
    span is the progressive figure `cascade stream` prints. Checked against a hand-made chain."""
    rng = np.random.default_rng(4)
    n, requests = 40, 25
    rows = {"request_id": np.repeat(np.arange(requests), n), "click": np.zeros(n * requests, int),
            "ui_position": np.tile(np.where(np.arange(n) < 10, np.arange(n) + 1, 0), requests),
            "true_ctr": -np.ones(n * requests)}
    gt = np.zeros(n * requests, bool)
    for r in range(requests):
        gt[r * n + rng.choice(n, 4, replace=False)] = True
    rows["stage"] = np.where(gt, "rerank_pos", "prerank_neg")
    rows["click"][gt & (rows["ui_position"] > 0)] = 1
    rows["click"][rows["ui_position"] == 1] = 1  # every request has a click and a non-click among its shown rows
    rows["click"][rows["ui_position"] == 2] = 0
    for key in ("preranking_model", "model", "baseline_preranking_model", "baseline_model"):
        rows[key] = gt * rng.uniform(0.0, 1.5) + rng.random(n * requests)
    for key in ("model", "baseline_model"):
        rows[f"{key}/ctr"] = 1 / (1 + np.exp(-rows[key]))
    config = EvaluatorConfig(quotas=(12, 5))
    both = evaluation.evaluate(rows, ["preranking_model", "model"], config,
                               baselines={"preranking_model": "baseline_preranking_model", "model": "baseline_model"})
    recalls = []
    for r in range(requests):
        sel = rows["request_id"] == r
        survivors = np.argsort(-rows["baseline_preranking_model"][sel], kind="stable")[:12]
        final = survivors[np.argsort(-rows["baseline_model"][sel][survivors], kind="stable")[:5]]
        recalls.append(gt[sel][final].sum() / gt[sel].sum())
    assert both["baseline_cascade"]["e2e_recall"] == pytest.approx(np.mean(recalls), abs=1e-12)
    assert both["baseline_cascade"]["e2e_recall"] != pytest.approx(both["cascade"]["e2e_recall"], abs=1e-6)
    one = evaluation.evaluate(rows, ["preranking_model", "model"], config, baselines={"model": "baseline_model"})
    assert "e2e_recall" not in one["baseline_cascade"]


def test_each_stage_is_blessed_by_its_own_thresholds(setup, tmp_path):
    root, examples, model, baseline, _ = setup
    req, _, _, stage, ctr = _scores(examples, model.uri)
    _, _, _, _, base = _scores(examples, baseline.uri)
    pre_recall, rank_recall = _recall(req, stage, base, 30), _recall(req, stage, ctr, 20)  # quotas (…, 30, 20)
    for pre_ok in (True, False):
        config = dataclasses.replace(OPEN, thresholds=(
            ("preranking", "recall", "min", pre_recall + (-0.01 if pre_ok else 0.01)),
            ("ranking", "recall", "min", rank_recall + (0.01 if pre_ok else -0.01))))
        metrics, _, blessings = _run(tmp_path / str(pre_ok), config, examples, model=[model],
                                     preranking_model=[baseline])
        verdicts = metrics["blessings"]
        assert verdicts["preranking"]["blessed"] is pre_ok and verdicts["ranking"]["blessed"] is not pre_ok
        failed = "ranking" if pre_ok else "preranking"
        (reason,) = verdicts[failed]["reasons"]
        assert reason.startswith("recall = ") and " fails min " in reason
        _assert_blessing(blessings["preranking"], pre_ok, model_id=7)
        _assert_blessing(blessings["ranking"], not pre_ok, model_id=11)
        # No retrieval model was given: its stage is not blessed.
        assert verdicts["retrieval"] == {"blessed": False, "reasons": ["no model"], "notes": [],
                                         "model_uri": None, "baseline_uri": None}
        _assert_blessing(blessings["retrieval"], False)
        # Neither stage had a baseline: each is the first of its kind. No TFMA blessing was given.
        assert evaluation.NO_BASELINE_NOTE in verdicts["preranking"]["notes"]
        assert verdicts["ranking"]["notes"] == [evaluation.NO_BASELINE_NOTE, evaluation.NO_CTR_BLESSING_NOTE]
        assert (verdicts["ranking"]["model_uri"], verdicts["preranking"]["model_uri"]) == (model.uri, baseline.uri)
        assert metrics["blessed"] is (not pre_ok) and metrics["blessing_reasons"] == verdicts["ranking"]["reasons"]


def test_a_stage_baseline_adds_its_change_threshold(setup, tmp_path):
    root, examples, model, baseline, _ = setup
    req, _, _, stage, ctr = _scores(examples, model.uri)
    _, _, _, _, base = _scores(examples, baseline.uri)
    # Pre-ranking candidate: the `baseline` ranker; the stage's baseline (latest blessed): `model`.
    worse_by = _recall(req, stage, ctr, 30) - _recall(req, stage, base, 30)
    for tolerance, blessed in ((worse_by + 0.01, True), (worse_by - 0.01, False)):
        config = dataclasses.replace(OPEN, change_thresholds=(("preranking", "recall", tolerance),))
        metrics, _, blessings = _run(tmp_path / str(blessed), config, examples, model=[model],
                                     preranking_model=[baseline], baseline_preranking_model=[model],
                                     ctr_blessing=[_ctr_blessing(tmp_path, 1, model.id)])
        verdicts = metrics["blessings"]
        assert verdicts["preranking"]["blessed"] is blessed
        if not blessed:
            assert "worse than the baseline's" in verdicts["preranking"]["reasons"][0]
        assert verdicts["preranking"]["notes"] == []
        assert verdicts["preranking"]["baseline_uri"] == model.uri
        _assert_blessing(blessings["preranking"], blessed, model_id=7, baseline_id=11)
        assert blessings["preranking"].get_string_custom_property("baseline_model") == model.uri
        # The ranking stage has no baseline: blessed as the first of its kind, with a note; the
        # TFMA blessing (blessed) is the only CTR gate it needs.
        assert verdicts["ranking"] == {"blessed": True, "reasons": [], "notes": [evaluation.NO_BASELINE_NOTE],
                                       "model_uri": model.uri, "baseline_uri": None}
        _assert_blessing(blessings["ranking"], True, model_id=11)
        assert metrics["baseline_cascade"]["stages"] == ["preranking_model"]
        assert metrics["baseline_cascade"]["recall_at_30/preranking_model"] == pytest.approx(
            _recall(req, stage, ctr, 30), abs=1e-9)
        assert "baseline" not in metrics  # the CTR sections compare ranking baselines only


def test_a_failed_tfma_blessing_stops_only_the_ranking_stage(setup, tmp_path):
    root, examples, model, baseline, blind = setup
    # The pre-ranker scores by its "score" output; its baseline, an older architecture without one,
    # is dropped with a note rather than failing the run.
    config = dataclasses.replace(OPEN, score_outputs=(("preranking_model", "serving_default", "score"),))
    metrics, _, blessings = _run(tmp_path, config, examples, model=[model], preranking_model=[blind],
                                 retrieval_model=[baseline], baseline_preranking_model=[model],
                                 ctr_blessing=[_ctr_blessing(tmp_path, 0, model.id)])
    verdicts = metrics["blessings"]
    assert [verdicts[s]["blessed"] for s in ("retrieval", "preranking", "ranking")] == [True, True, False]
    assert len(verdicts["ranking"]["reasons"]) == 1 and "TFMA Evaluator" in verdicts["ranking"]["reasons"][0]
    _assert_blessing(blessings["ranking"], False, model_id=11)
    _assert_blessing(blessings["retrieval"], True, model_id=7)
    _assert_blessing(blessings["preranking"], True, model_id=5)  # no baseline_model_id: it was dropped
    dropped, first = verdicts["preranking"]["notes"]
    assert dropped.startswith("baseline dropped") and "'score'" in dropped and first == evaluation.NO_BASELINE_NOTE
    assert verdicts["preranking"]["baseline_uri"] is None and metrics["baseline_cascade"]["stages"] == []
    assert blessings["ranking"].get_string_custom_property("blessing_message").startswith("not blessed: the TFMA")


def test_a_model_that_cannot_rank_is_not_blessed(setup, tmp_path):
    root, _, _, _, blind = setup
    # 200 requests (29 in eval) so that a random order's recall is close to its chance level.
    examples = synthetic_examples(str(tmp_path / "examples"), num_requests=200, seed=3)
    metrics, _, blessings = _run(tmp_path, EvaluatorConfig(), examples, model=[blind], preranking_model=[blind],
                                 baseline_model=[], baseline_preranking_model=[])  # [] = a Resolver's first run
    cascade = metrics["cascade"]
    assert cascade["chance_at_20/model"] == pytest.approx(0.4) and cascade["chance_at_30/preranking_model"] == pytest.approx(0.6)
    for stage, name in (("ranking", "recall_lift_at_20/model"), ("preranking", "recall_lift_at_30/preranking_model")):
        assert abs(cascade[name]) < 0.15
        verdict = metrics["blessings"][stage]
        assert not verdict["blessed"] and verdict["reasons"][0].startswith("recall_lift = ")
        # An empty baseline list is no baseline.
        assert evaluation.NO_BASELINE_NOTE in verdict["notes"] and verdict["baseline_uri"] is None
        _assert_blessing(blessings[stage], False, model_id=5)
    assert "baseline" not in metrics and metrics["baseline_cascade"]["stages"] == []


def test_a_schema_diverts_rows_that_miss_a_required_model_input(setup, tmp_path):
    root, _, model, _, _ = setup
    row = next(example_io.read_examples(os.path.join(root / "examples", "Split-eval", "data_*")))
    del row.features.feature["item_tags"]  # a required model input (presence.min_fraction = 1)
    examples = synthetic_examples(str(tmp_path / "examples"), num_requests=10, seed=2,
                                  extra_records={"eval": [row.SerializeToString()]})
    schema = standard_artifacts.Schema()
    schema.uri = str(tmp_path / "schema")
    os.makedirs(schema.uri)
    shutil.copy(F.SCHEMA_PATH, schema.uri)
    config = dataclasses.replace(OPEN, max_bad_fraction=0.05)
    metrics, outputs, _ = _run(tmp_path / "with_schema", config, examples, model=[model], schema=[schema])
    assert metrics["counters"]["records_bad"] == 1 and metrics["counters"]["records_scored"] == metrics["examples"]
    dead = tf.io.gfile.glob(os.path.join(outputs["dead_letters"][0].uri, "dead_letters-eval*"))
    assert "item_tags" in json.loads(open(dead[0]).readline())["reason"]
    with pytest.raises(Exception, match="item_tags"):  # without the schema the row fails its scoring batch
        _run(tmp_path / "without_schema", config, examples, model=[model])


def test_config_json_round_trip_and_validation():
    config = EvaluatorConfig(quotas=(30, 20), thresholds=(("ranking", "auc", "min", 0.6),),
                             change_thresholds=(("ranking", "ne", 0.02),), ctr_output=("serving_default", "p"),
                             score_outputs=(("retrieval_model", "score", "score"),), tfma_calibration_range=(0.9, 1.1))
    assert EvaluatorConfig.from_json(config.to_json()) == config
    assert EvaluatorConfig.from_json(EvaluatorConfig().to_json()) == EvaluatorConfig()
    with pytest.raises(ValueError, match="no metric 'auc'"):
        EvaluatorConfig(thresholds=(("retrieval", "auc", "min", 0.6),))  # CTR metrics are the ranker's
    with pytest.raises(ValueError, match="unknown stage"):
        EvaluatorConfig(change_thresholds=(("rank", "recall", 0.0),))
    with pytest.raises(ValueError, match="better direction"):
        EvaluatorConfig(change_thresholds=(("ranking", "calibration", 0.1),))


def test_tfma_eval_config_gates_the_ctr_against_the_baseline():
    config = cascade_evaluator.tfma_eval_config(EvaluatorConfig(tfma_min_auc=0.7, tfma_auc_tolerance=0.02,
                                                                tfma_calibration_range=(0.9, 1.1)))
    assert [(s.name, s.is_baseline, s.signature_name, s.label_key, s.prediction_key) for s in config.model_specs] == [
        ("candidate", False, "serving_default", "click", "ctr"), ("baseline", True, "serving_default", "click", "ctr")]
    assert all(list(s.preprocessing_function_names) == [] for s in config.model_specs)
    assert [list(s.feature_keys) for s in config.slicing_specs] == [[]]  # the gated slice only, by default
    metrics = {m.class_name: m for m in config.metrics_specs[0].metrics}
    assert set(metrics) == {"ExampleCount", "AUC", "Calibration", "BinaryCrossentropy", "MeanLabel", "MeanPrediction"}
    for name in ("AUC", "Calibration"):  # the overall slice is gated; the others are only reported
        (per_slice,) = metrics[name].per_slice_thresholds
        assert [list(s.feature_keys) for s in per_slice.slicing_specs] == [[]] and not metrics[name].HasField("threshold")
    auc = metrics["AUC"].per_slice_thresholds[0].threshold
    assert auc.value_threshold.lower_bound.value == 0.7
    assert auc.change_threshold.direction == tfma.MetricDirection.HIGHER_IS_BETTER
    assert auc.change_threshold.absolute.value == pytest.approx(-0.02)
    calibration = metrics["Calibration"].per_slice_thresholds[0].threshold.value_threshold
    assert (calibration.lower_bound.value, calibration.upper_bound.value) == (0.9, 1.1)
    # What TFX's Evaluator does with it, with a baseline and on the first run (rubber stamp).
    tfma.utils.verify_eval_config(config)
    first_run = tfma.utils.update_eval_config_with_defaults(config, has_baseline=False, rubber_stamp=True)
    tfma.utils.verify_eval_config(first_run)
    assert len(first_run.model_specs) == 1 and not first_run.model_specs[0].is_baseline
    assert not tfma.utils.has_change_threshold(first_run)  # the AUC change threshold is dropped
    tfma.utils.verify_eval_config(tfma.utils.update_eval_config_with_defaults(config, has_baseline=True, rubber_stamp=True))


def test_tfma_slices_are_the_ui_ids_asked_for_and_an_unknown_one_is_a_one_line_error():
    sliced = cascade_evaluator.tfma_eval_config(EvaluatorConfig(tfma_slice_features=("ui_format", "ui_position")))
    assert [list(s.feature_keys) for s in sliced.slicing_specs] == [[], ["ui_format"], ["ui_position"]]
    tfma.utils.verify_eval_config(sliced)
    with pytest.raises(ValueError, match=r"'item_id' is not a univalent UI id feature of the registry; those are "
                                         r"\['ui_position', 'ui_format'\]"):
        cascade_evaluator.tfma_eval_config(EvaluatorConfig(tfma_slice_features=("item_id",)))
    with pytest.raises(ValueError, match="tfma_slice_features must be a list of feature names"):
        EvaluatorConfig(tfma_slice_features="ui_position")
    with pytest.raises(ValueError, match="tfma_slice_features names ui_position more than once"):
        EvaluatorConfig(tfma_slice_features=("ui_position", "ui_format", "ui_position"))


def test_a_baseline_with_another_stages_signatures_is_dropped(setup, tmp_path):
    """On KFP v2 a stage's Resolver can return another stage's blessed model: a baseline whose
    signatures are not those of the stage's model is not compared, and the verdict says why."""
    root, examples, model, baseline, blind = setup

    class TwoSignatures(tf.Module):  # a retrieval-like interface: serving_default and `score`
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
        def serve(self, examples):
            return {"ctr": tf.fill(tf.shape(examples), 0.1)}

    module = TwoSignatures()
    tf.saved_model.save(module, str(tmp_path / "other" / "Format-Serving"),
                        signatures={"serving_default": module.serve, "score": module.serve})
    other = standard_artifacts.Model()
    other.uri, other.id = str(tmp_path / "other"), 3
    metrics, _, blessings = _run(tmp_path, OPEN, examples, model=[model], baseline_model=[other])
    verdict = metrics["blessings"]["ranking"]
    assert verdict["baseline_uri"] is None and "baseline" not in metrics
    assert any(note.startswith("baseline dropped, its signatures") for note in verdict["notes"]), verdict
    assert verdict["blessed"]


def test_a_stage_whose_quota_keeps_every_candidate_is_not_judged_by_its_lift():
    """Retrieval's quota 40 on lists of at most 40 candidates (MovieLens) cuts nothing: its chance
    recall is 1 and its lift undefined, which is noted rather than failing the stage forever."""
    cascade = {"stages": ["retrieval_model", "preranking_model", "model"], "quotas": [40, 30, 20]}
    for key, q, recall, chance in (("retrieval_model", 40, 1.0, 1.0), ("preranking_model", 30, 0.9, 0.75),
                                   ("model", 20, 0.5, 0.5)):
        cascade.update({f"recall_at_{q}/{key}": recall, f"chance_at_{q}/{key}": chance,
                        f"recall_lift_at_{q}/{key}": (recall - chance) / (1 - chance) if chance < 1 else float("nan")})
    result = {"cascade": cascade, "baseline_cascade": {"stages": [], "quotas": []}}
    verdicts = evaluation.bless_stages(result, EvaluatorConfig())
    assert verdicts["retrieval"]["blessed"] and any("cuts nothing" in n for n in verdicts["retrieval"]["notes"])
    assert verdicts["preranking"]["blessed"]  # lift 0.6
    assert not verdicts["ranking"]["blessed"] and "recall_lift = 0.0000 fails min 0.25" in verdicts["ranking"]["reasons"]
