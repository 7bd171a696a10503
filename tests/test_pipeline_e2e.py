"""The whole cascade pipeline at a small scale on LocalDagRunner, checked on its own artifacts.

One output directory goes through four runs, in file order:
  1. a run killed (SIGKILL) while the teacher trains, then rerun to the end: components, resume,
     the contracts between the parts (whole requests, sampled weights, one schema), per-stage
     blessings, pushes, serve-check and the report table;
  2. a second run on the same data with the cache off: each stage is blessed against the first
     run's model of that stage, and the evaluators name it;
  3. cached reruns: every data and training node is answered by the cache;
  4. a run on data whose training labels are shuffled: a model that cannot rank is not blessed,
     not pushed, and the previous version stays the served one.
Plus one run on BeamDagRunner, anomalous data stopping the run, and a missing data path.
"""
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import ml_metadata as mlmd
import numpy as np
import pytest
import tensorflow as tf
from tfx.orchestration import metadata
from tfx.utils import io_utils

from cascade_ranking.components import sampling
from cascade_ranking.components.evaluation import EvaluatorConfig
from cascade_ranking.components.sampling import SamplerConfig
from cascade_ranking.datasources import example_io, synthetic
from cascade_ranking.models import list_inputs as LI
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.models.trainers import common
from cascade_ranking.models.trainers.cascade import CascadeTrainerConfig
from cascade_ranking.models.trainers.retrieval import RetrievalTrainerConfig
from cascade_ranking.pipelines import cli, html_report, local_runner, report, serve_check
from cascade_ranking.pipelines.config import PipelineConfig
from cascade_ranking.pipelines.pipeline import BLESSING_KEYS, MODEL_SOURCES, STAGES
from cascade_ranking.pipelines.run_lock import LOCK_FILE, read_lock
from cascade_ranking.schema import request_list as RL

pytestmark = pytest.mark.slow

NODES = ("SyntheticExampleGen", "StatisticsGen", "ImportSchemaGen", "ExampleValidator", "AnomalyGate",
         "Trainer.teacher", "TeacherInference", "NegativeSampler", "Trainer.retrieval", "Trainer.cascade",
         "StageModel.preranking", "LatestBlessed.retrieval", "LatestBlessed.preranking", "LatestBlessed.ranking",
         "Evaluator.ranking", "CascadeEvaluator", "Pusher.retrieval", "Pusher.preranking", "Pusher.ranking")
DATA_AND_TRAINING_NODES = NODES[:11]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER_EPOCHS = 12  # long enough on small data that the kill lands during the teacher's training
REQUESTS = 200
# Gates at this scale (40 eval requests): a stage must close a sixth of the gap between chance and
# perfect recall (a random order's lift has a std of about 0.04 here; the runs' models reach
# 0.6–0.8), and may fall at most 0.1 below its baseline (the recalls of identical retrains differ by
# a few hundredths on 40 requests; models trained on unlearnable data fall by 0.2–0.35).
# CTR gates are loose: a few hundred training steps do not calibrate a ranker.
SMALL_SCALE_GATES = EvaluatorConfig(
    thresholds=tuple((stage, "recall_lift", "min", 0.15) for stage in STAGES),
    change_thresholds=tuple((stage, "recall", 0.1) for stage in STAGES),
    tfma_min_auc=0.5, tfma_auc_tolerance=0.2, tfma_calibration_range=(0.05, 20.0),
)


def tiny_config(output_dir: str, **changes) -> PipelineConfig:
    """The pipeline at test scale: 200 requests, small models, Factory Floor sampling on, in-process Beam."""
    return PipelineConfig(
        output_dir=output_dir,
        synthetic=synthetic.SyntheticConfig(num_requests=REQUESTS, seed=2),
        teacher=RankerConfig.teacher(epochs=TEACHER_EPOCHS, hidden_units=(32,), cross_layers=1),
        ranker=RankerConfig.cascade_stage(hidden_units=(64,), cascade_head_units=(32,)),
        retrieval=RetrievalTrainerConfig(epochs=5, batch_size=64),
        cascade=CascadeTrainerConfig(epochs=3, batch_size=8),
        sampler=SamplerConfig(nonclick_keep_rate=0.5, low_loss_keep_rate=0.5, low_loss_threshold=0.2),
        evaluator=SMALL_SCALE_GATES,
        beam_mode="in_process",
    ).replace(**changes)


# ---- MLMD and artifact helpers ----------------------------------------------------------------
def _store(config):
    return mlmd.MetadataStore(metadata.sqlite_metadata_connection_config(os.path.abspath(config.metadata_path)))


def _executions_by_node(config):
    store = _store(config)
    return {context.name.split(".", 1)[1]: store.get_executions_by_context(context.id)
            for context in store.get_contexts_by_type("node")}


def _artifacts(config, node, key, event_type=mlmd.proto.Event.OUTPUT):
    """The artifacts a node's executions produced (or read) under `key`, oldest first."""
    store = _store(config)
    context = next(c for c in store.get_contexts_by_type("node") if c.name == f"{config.pipeline_name}.{node}")
    executions = store.get_executions_by_context(context.id)
    events = store.get_events_by_execution_ids([e.id for e in executions])
    ids = {e.artifact_id for e in events if e.type == event_type and e.path.steps[0].key == key}
    return sorted(store.get_artifacts_by_id(list(ids)), key=lambda a: a.id)


def _prop(artifact, name):
    """A custom property of an MLMD artifact (int or string), None when absent."""
    if name not in artifact.custom_properties:
        return None
    value = artifact.custom_properties[name]
    return value.string_value if value.HasField("string_value") else value.int_value


def _split_files(artifact, split):
    return [os.path.join(artifact.uri, f"Split-{split}", "*")]


def _rows(artifact, split):
    return [tf.train.Example.FromString(raw) for raw in
            tf.data.TFRecordDataset(glob.glob(_split_files(artifact, split)[0]), compression_type="GZIP").as_numpy_iterator()]


def _value(example, name, default=None):
    feature = example.features.feature.get(name)
    if feature is None:
        return default
    kind = feature.WhichOneof("kind")
    values = list(getattr(feature, kind).value) if kind else []
    return values[0] if values else default


def _teacher_backups(config):
    """The teacher's saved BackupAndRestore checkpoints (the CheckpointManager's index file, written
    once an epoch's checkpoint is complete; the directories appear at the start of training)."""
    return glob.glob(os.path.join(config.pipeline_root, "Trainer.teacher", "backup", "*", "**", "checkpoint"),
                     recursive=True)


def _first_logged_epoch(model_run_dir: str) -> int:
    """The first epoch the Keras TensorBoard callback logged in a ModelRun (its summary step)."""
    steps = []
    for path in glob.glob(os.path.join(model_run_dir, "logs", "train", "events*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            steps += [event.step for v in event.summary.value if v.tag == "epoch_loss"]
    return min(steps)


def _served_versions(config):
    return {stage: sorted(os.listdir(os.path.join(config.serving_dir, stage))) for stage in STAGES
            if os.path.isdir(os.path.join(config.serving_dir, stage))}


# ---- run 1: killed and resumed ------------------------------------------------------------------
@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A run killed (SIGKILL) while the teacher trains, then rerun to the end in this process."""
    config = tiny_config(str(tmp_path_factory.mktemp("pipeline")))
    code = ("import sys; from tests.test_pipeline_e2e import tiny_config; from pipelines import local_runner; "
            "local_runner.run(tiny_config(sys.argv[1]))")
    log = open(os.path.join(config.output_dir, "killed_run.log"), "w")
    process = subprocess.Popen([sys.executable, "-c", code, config.output_dir], cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not _teacher_backups(config):
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"the run ended (rc {process.returncode}) before the teacher saved a backup; "
                        f"see {log.name}")
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before_kill = {node: [e.id for e in runs if e.last_known_state == mlmd.proto.Execution.COMPLETE]
                   for node, runs in _executions_by_node(config).items()}
    assert _teacher_backups(config), "the teacher finished before the kill"
    lock = os.path.join(config.output_dir, LOCK_FILE)
    assert read_lock(lock)["pid"] == process.pid  # the killed run's lock is left behind, stale
    seconds, timings = local_runner.run_with_timings(config, show_progress=False)  # takes it over
    assert not os.path.exists(lock)
    return config, before_kill, timings


def test_every_component_runs_and_the_rerun_reuses_what_finished_before_the_kill(resumed_run):
    config, before_kill, timings = resumed_run
    finished_before = {node for node, ids in before_kill.items() if ids}
    assert {"SyntheticExampleGen", "StatisticsGen", "AnomalyGate"} <= finished_before
    assert "Trainer.teacher" not in finished_before
    assert {node for node, _, _ in timings} == set(NODES)
    cached = {node for node, _, was_cached in timings if was_cached}
    assert (finished_before - {n for n in NODES if n.startswith("LatestBlessed.")}) <= cached
    assert "Trainer.teacher" not in cached
    for node, runs in _executions_by_node(config).items():
        complete = [e for e in runs if e.last_known_state in (mlmd.proto.Execution.COMPLETE, mlmd.proto.Execution.CACHED)]
        assert complete, node


def test_the_killed_teacher_resumed_from_its_backup(resumed_run):
    config, _, _ = resumed_run
    assert not _teacher_backups(config)  # Keras removes the backup once training finished
    runs = sorted(glob.glob(os.path.join(config.pipeline_root, "Trainer.teacher", "model_run", "*")),
                  key=lambda path: int(os.path.basename(path)))  # by execution id
    assert len(runs) == 2  # the killed execution's ModelRun and the rerun's
    killed, rerun = runs
    assert _first_logged_epoch(killed) == 0
    assert 0 < _first_logged_epoch(rerun) < TEACHER_EPOCHS


def test_every_train_request_reaches_the_ranker_whole_once_per_epoch(resumed_run):
    """DESIGN §11 request grouping, on the run's artifacts: the joint Trainer read the
    NegativeSampler's request lists; each train request of the source is one list holding every
    logged candidate of it, those the sampling took out of the CTR rows with weight 0, and one
    epoch of the Trainer's input yields each list once."""
    config, _, _ = resumed_run
    (lists_artifact,) = _artifacts(config, "NegativeSampler", "request_lists")
    assert [a.id for a in _artifacts(config, "Trainer.cascade", "examples", mlmd.proto.Event.INPUT)] == [lists_artifact.id]
    (scored_rows,) = _artifacts(config, "TeacherInference", "output_examples")
    logged, sampled_out = {}, {}  # request id → its item ids / those the sampler's own rule takes out
    for row in _rows(scored_rows, "train"):
        values = {name: _value(row, name) for name in ("request_id", "item_id", "ui_position", "click", "teacher_logit")}
        logged.setdefault(values["request_id"], []).append(values["item_id"])
        if not sampling.sampling_decision(values, config.sampler)[0]:
            sampled_out.setdefault(values["request_id"], []).append(values["item_id"])
    source = {_value(r, "request_id") for r in _rows(_artifacts(config, "SyntheticExampleGen", "examples")[0], "train")}
    assert set(logged) == source and sampled_out

    lists = _rows(lists_artifact, "train")
    seen, zero_weight = {}, {}
    random_neg = RL.TIER_INDEX[RL.RANDOM_NEG_TIER]
    for example in lists:
        f = example.features.feature
        mask, stage = list(f["mask"].int64_list.value), list(f["stage"].int64_list.value)
        slots = [(i, w) for i, m, s, w in zip(f["item_id"].int64_list.value, mask, stage,
                                               f["sample_weight"].float_list.value) if m and s != random_neg]
        request_id = f["request_id"].int64_list.value[0]
        assert request_id not in seen, f"request {request_id} is in two lists"
        seen[request_id] = sorted(i for i, _ in slots)
        zero = sorted(i for i, w in slots if w == 0)
        if zero:
            zero_weight[request_id] = zero
    assert seen == {r: sorted(items) for r, items in logged.items()}  # whole requests
    assert zero_weight == {r: sorted(items) for r, items in sampled_out.items()}

    trainer_config = config.cascade
    list_size = LI.list_size_in(_split_files(lists_artifact, "train"))
    assert list_size == config.sampler.list_size  # the one place the list size is set, read back from the data
    epoch = LI.request_list_dataset(_split_files(lists_artifact, "train"), trainer_config.batch_size,
                                    list_size, shuffle_seed=trainer_config.seed)
    read = np.concatenate([b["request_id"].numpy().reshape(-1) for b in epoch])
    assert sorted(read.tolist()) == sorted(seen)  # each train request exactly once per epoch
    (run,) = _artifacts(config, "Trainer.cascade", "model_run")
    logged = io_utils.read_string_file(os.path.join(run.uri, common.EVAL_METRICS_FILE))
    assert f'"lists": {len(seen)}' in logged


def test_the_ranker_trains_on_the_sampled_rows_and_their_weights_are_unbiased(resumed_run):
    """Factory Floor §3.3 in the pipeline: the shown rows the ranker's CTR losses read are the
    sampler's kept rows (weight > 0) with their importance weights; the weighted click mean equals
    the unsampled one within sampling error, and the Trainer's log reports the same counts."""
    config, _, _ = resumed_run
    (scored_rows,) = _artifacts(config, "TeacherInference", "output_examples")
    clicks, shown, variance = 0, 0, 0.0
    for row in _rows(scored_rows, "train"):
        values = {name: _value(row, name) for name in ("request_id", "item_id", "ui_position", "click", "teacher_logit")}
        if values["ui_position"] <= 0:
            continue
        shown += 1
        clicks += values["click"]
        if not values["click"]:  # kept with probability p, weight 1/p: Var(Σw) = Σ (1 − p) / p
            p = config.sampler.nonclick_keep_rate
            if sampling.teacher_log_loss(values["teacher_logit"], 0) < config.sampler.low_loss_threshold:
                p *= config.sampler.low_loss_keep_rate
            variance += (1 - p) / p
    (lists_artifact,) = _artifacts(config, "NegativeSampler", "request_lists")
    weights, labels = [], []
    for example in _rows(lists_artifact, "train"):
        f = example.features.feature
        for m, pos, click, w in zip(f["mask"].int64_list.value, f["ui_position"].int64_list.value,
                                    f["click"].int64_list.value, f["sample_weight"].float_list.value):
            if m and pos > 0:
                weights.append(w)
                labels.append(click)
    weights, labels = np.asarray(weights, np.float64), np.asarray(labels)
    assert np.any(weights == 0) and np.any(weights > 1.0)  # rows were sampled out and the kept reweighted
    assert (weights * labels).sum() == pytest.approx(clicks)  # clicks are always kept, weight 1
    sd = math.sqrt(variance)
    assert abs(weights.sum() - shown) < 4 * sd
    assert abs((weights * labels).sum() / weights.sum() - clicks / shown) < 4 * sd * clicks / shown ** 2 + 1e-9
    (run,) = _artifacts(config, "Trainer.cascade", "model_run")
    data = json.loads(io_utils.read_string_file(os.path.join(run.uri, common.EVAL_METRICS_FILE)))["train_data"]
    assert data["shown_rows"] == int((weights > 0).sum()) and data["shown_clicks"] == clicks
    assert data["sampled_out_rows"] == int((weights == 0).sum())
    assert data["shown_weight_sum"] == pytest.approx(weights.sum(), rel=1e-5)
    assert data["weighted_click_mean"] == pytest.approx((weights * labels).sum() / weights.sum(), rel=1e-5)


def test_the_ranker_variants_bench_reads_the_inputs_of_the_runs_joint_trainer(resumed_run):
    """bench/ranker_variants.py keeps its own training loop, on the pipeline's inputs: the request
    lists the run's Trainer.cascade read, and the run's retrieval model."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import ranker_variants

    config, _, _ = resumed_run
    train_files, eval_files, retrieval_dir = ranker_variants.pipeline_inputs(config.output_dir)
    (lists,) = _artifacts(config, "Trainer.cascade", "examples", mlmd.proto.Event.INPUT)
    assert train_files == _split_files(lists, "train") and eval_files == _split_files(lists, "eval")
    (retrieval,) = _artifacts(config, "Trainer.retrieval", "model")
    assert retrieval_dir == os.path.join(retrieval.uri, "Format-Serving")


def test_trainers_sampler_and_evaluator_read_the_pipelines_schema_artifact(resumed_run):
    config, _, _ = resumed_run
    (schema,) = _artifacts(config, "ImportSchemaGen", "schema")
    schema_file = io_utils.get_only_uri_in_dir(schema.uri)
    for node in ("Trainer.teacher", "Trainer.retrieval", "Trainer.cascade", "CascadeEvaluator", "NegativeSampler"):
        assert [a.id for a in _artifacts(config, node, "schema", mlmd.proto.Event.INPUT)] == [schema.id], node
    for node in ("Trainer.teacher", "Trainer.retrieval", "Trainer.cascade"):
        run = _artifacts(config, node, "model_run")[-1]
        logged = json.loads(io_utils.read_string_file(os.path.join(run.uri, common.EVAL_METRICS_FILE)))
        assert logged["schema_path"] == schema_file, node
    (lists_artifact,) = _artifacts(config, "NegativeSampler", "request_lists")
    assert _prop(lists_artifact, "schema_path") == schema_file


def test_each_stage_is_blessed_by_its_own_gate_and_pushed_into_a_versioned_directory(resumed_run):
    config, _, _ = resumed_run
    evaluation = report.collect(config)["evaluation"]
    for stage in STAGES:
        (blessing,) = _artifacts(config, "CascadeEvaluator", BLESSING_KEYS[stage])
        node, key = MODEL_SOURCES[stage]
        (model,) = _artifacts(config, node, key)
        assert _prop(blessing, "current_model_id") == model.id, stage
        assert _prop(blessing, "blessed") == 1, (stage, evaluation["blessings"][stage])
        assert any("no baseline" in note for note in evaluation["blessings"][stage]["notes"]), stage
    assert _prop(_artifacts(config, "Evaluator.ranking", "blessing")[0], "blessed") == 1
    pushed = report.pushed_models(config)
    assert set(pushed) == set(STAGES)
    for stage, path in pushed.items():
        assert os.path.dirname(path) == os.path.join(os.path.abspath(config.serving_dir), stage)
        assert os.path.basename(path).isdigit()


def test_the_served_preranker_is_the_light_model_alone(resumed_run):
    config, _, _ = resumed_run
    pushed = report.pushed_models(config)
    assert set(tf.saved_model.load(pushed["preranking"]).signatures) == {"serving_default"}
    names = [name for name, _ in tf.train.list_variables(os.path.join(pushed["preranking"], "variables", "variables"))
             if name != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert names and all(name.startswith("light/") for name in names)  # the light model's variables only


def test_serve_check_calls_every_signature_of_every_pushed_model(resumed_run, capsys):
    config, _, _ = resumed_run
    checks = {c.stage: c for c in serve_check.serve_check(config.output_dir, count=12)}
    assert set(checks) == set(STAGES)
    assert set(checks["ranking"].signatures) == {"serving_default", "quality", "ui", "score_ui_grid"}
    assert checks["ranking"].signatures["serving_default"]["ctr"] == (12,)
    assert checks["ranking"].signatures["serving_default"]["score"] == (12,)
    assert set(checks["retrieval"].signatures) == {"serving_default", "query_embedding", "item_embeddings", "score"}
    assert checks["preranking"].signatures["serving_default"]["score"] == (12,)
    assert checks["ranking"].warmup_requests == 4
    assert cli.main(["serve-check", config.output_dir]) == 0
    assert "serve-check passed: 3 models" in capsys.readouterr().out


def test_serve_check_skips_only_models_that_passed_before_unchanged(resumed_run, tmp_path):
    """`cascade run --serve-check`'s record: a model that passed with the same files, examples and
    count is not loaded again; touching one file of a model has it checked again."""
    config, _, _ = resumed_run
    cache = str(tmp_path / serve_check.CACHE_FILE)
    first = {c.stage: c for c in serve_check.serve_check(config.output_dir, count=12, cache_file=cache)}
    assert not any(c.cached for c in first.values())
    again = {c.stage: c for c in serve_check.serve_check(config.output_dir, count=12, cache_file=cache)}
    assert all(c.cached for c in again.values())
    assert {s: (c.signatures, c.warmup_requests) for s, c in again.items()} == \
        {s: (c.signatures, c.warmup_requests) for s, c in first.items()}
    fewer = {c.stage: c for c in serve_check.serve_check(config.output_dir, count=11, cache_file=cache)}
    assert not any(c.cached for c in fewer.values())  # another count: a different check
    os.utime(os.path.join(first["ranking"].path, "saved_model.pb"), ns=(1, 1))  # a file of it written again
    touched = {c.stage: c.cached for c in serve_check.serve_check(config.output_dir, count=11, cache_file=cache)}
    assert touched == {"ranking": False, "preranking": True, "retrieval": True}


def test_serve_check_fails_in_one_line_on_a_broken_warmup_file(resumed_run, tmp_path, capsys):
    config, _, _ = resumed_run
    serving = tmp_path / "serving"
    stage_dir = serving / "ranking"
    stage_dir.mkdir(parents=True)
    source = report.pushed_models(config)["ranking"]
    subprocess.run(["cp", "-r", source, str(stage_dir / "7")], check=True)
    with open(stage_dir / "7" / "assets.extra" / "tf_serving_warmup_requests", "wb") as f:
        f.write(b"not a TFRecord")
    examples = serve_check.eval_examples_from_run(config.output_dir)
    assert cli.main(["serve-check", str(serving), "--examples", examples]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tf_serving_warmup_requests" in err and "ranking" in err


def test_a_failed_serve_check_still_writes_the_report_with_the_failure(resumed_run, monkeypatch):
    """`cascade run --serve-check` after the pipeline: a serve-check error does not stop the
    report; report.html shows it for every served model, and the caller gets its one line."""
    config, _, timings = resumed_run

    def broken(*args, **kwargs):
        raise serve_check.ServeCheckError("ranking: signature 'serving_default' output 'ctr' is not finite")

    monkeypatch.setattr(serve_check, "serve_check", broken)
    result, served, checks, failure, path = cli.collect_and_report(config, 1.0, timings, serve_check_wanted=True)
    assert checks is None and failure == "ranking: signature 'serving_default' output 'ctr' is not finite"
    page = open(path, encoding="utf-8").read()
    assert page.count("FAILED: ranking: signature &#x27;serving_default&#x27; output &#x27;ctr&#x27; is not finite") == len(served) == 3
    assert "evaluation" in result and "<h2 id=table>" in page


def test_the_table_reports_the_evaluators_metrics_beside_the_oracle(resumed_run):
    config, _, _ = resumed_run
    result = report.collect(config)
    evaluation = result["evaluation"]
    rows = {name: (model, oracle) for name, model, oracle in report.table_rows(evaluation)}
    assert rows["e2e recall (quotas 40/30/20)"] == (evaluation["cascade"]["e2e_recall"],
                                                    evaluation["oracle_cascade"]["e2e_recall"])
    assert rows["ranking AUC"] == (evaluation["model"]["auc"], evaluation["oracle"]["auc"])
    assert rows["pre-ranking Recall@|GT|@30"][0] == evaluation["cascade"]["recall_at_30/preranking_model"]
    k, ranking, preranking = report.ranking_vs_preranking_at(evaluation)
    assert k == 20 and rows["ranking Recall@|GT|@20"][0] == ranking and rows["pre-ranking Recall@|GT|@20"][0] == preranking
    model_calibration = rows["calibration Σŷ/Σy"][0]
    assert model_calibration == pytest.approx(evaluation["model"]["mean_prediction"] / evaluation["click_rate"])
    for name, (model, _) in rows.items():
        if "bucket" not in name:
            assert np.isfinite(model), name
    text = report.format_table(evaluation)
    assert "e2e recall" in text and f"{evaluation['oracle']['auc']:.4f}" in text
    assert result["tfma"]["validation_ok"] and result["tfma"]["example_count"] == evaluation["shown"]
    assert "ranking" in report.flops_line(result) and "weighted click mean" in report.training_data_line(result)
    counts = result["evaluation"]["data_counts"]
    assert counts["rows_read"] == REQUESTS * 50 == counts["rows_used"] and not any(counts["rows_diverted"].values())
    block = report.counts_block(result)
    assert re.search(rf"rows read +{REQUESTS * 50:,}\n", block) and re.search(r"NaN values read as 0 +none\n", block)


def test_the_runs_report_html_holds_its_table_blessings_plots_timings_and_counts(resumed_run):
    """report.html rendered from the e2e run's own artifacts (what `cascade run` writes at its end)."""
    from tests.test_html_report import check_report_of_run

    config, _, timings = resumed_run
    result = report.collect(config)
    path = html_report.write(config, result, sum(s for _, s, _ in timings), timings, report.served_models(config))
    page = check_report_of_run(path, result, timings)
    served = {row[0]: row[1] for row in page["tables"]["served"][1:]}
    assert served == {stage: p for stage, (p, _) in report.served_models(config).items()} and len(served) == 3


# ---- run 2: the same data again, cache off ------------------------------------------------------
@pytest.fixture(scope="module")
def second_run(resumed_run):
    config = resumed_run[0].replace(enable_cache=False)
    before = _served_versions(config)
    local_runner.run(config, show_progress=False)
    return config, before


def test_a_second_run_is_blessed_against_the_first_and_the_evaluators_name_it(second_run, capsys):
    config, before = second_run
    evaluation = report.collect(config)["evaluation"]
    for stage in STAGES:
        node, key = MODEL_SOURCES[stage]
        first, second = _artifacts(config, node, key)
        blessing = _artifacts(config, "CascadeEvaluator", BLESSING_KEYS[stage])[-1]
        assert _prop(blessing, "current_model_id") == second.id, stage
        assert _prop(blessing, "baseline_model_id") == first.id, stage
        assert evaluation["blessings"][stage]["baseline_uri"] == first.uri, stage
        assert _prop(blessing, "blessed") == 1, (stage, evaluation["blessings"][stage])
    tfma_blessing = _artifacts(config, "Evaluator.ranking", "blessing")[-1]
    first_ranker = _artifacts(config, *MODEL_SOURCES["ranking"])[0]
    assert _prop(tfma_blessing, "baseline_model_id") == first_ranker.id
    # PD of the retrain against the first model: 0 when the retrain reproduces it exactly (the teacher
    # pass scores fixed blocks since 2026-12-06, so its float rounding no longer varies run to run).
    assert "pd_vs_baseline" in evaluation and 0 <= evaluation["pd_vs_baseline"] < 2
    after = _served_versions(config)
    assert all(len(after[stage]) == len(before[stage]) + 1 for stage in STAGES)  # each stage pushed again
    assert all("baseline /" in line for line in report.blessing_lines(evaluation))


# ---- run 3: cached reruns -----------------------------------------------------------------------
def test_a_rerun_on_the_same_inputs_is_answered_by_the_cache(second_run):
    """Every node is answered by the cache, the evaluators too: a cached candidate keeps the
    baseline it was first evaluated against (`BaselineBeforeCandidateStrategy`), not the latest
    blessed model, which is the candidate itself. Nothing is pushed again."""
    config = second_run[0].replace(enable_cache=True)
    before = _served_versions(config)
    resolvers = {n for n in NODES if n.startswith("LatestBlessed.")}
    for _ in range(2):
        seconds, timings = local_runner.run_with_timings(config, show_progress=False)
        assert {node for node, _, was_cached in timings if was_cached} == set(NODES) - resolvers
        assert seconds < 60
    assert _served_versions(config) == before


# ---- run 4: models that cannot rank -------------------------------------------------------------
LABEL_FIELDS = ("stage", "click", "ui_position", "ui_format", "true_ctr")
ITEM_FIELDS = ("item_id", "item_category", "item_tags", "item_dense")


def _break_train_data(data_dir: str, seed: int = 0) -> None:
    """Makes the train split unlearnable: the labels (tier, click, UI treatment, true CTR) and the
    item features are each permuted across the train rows, independently. No feature says anything
    about a label any more, and a request's candidates are random items, as the random negatives
    are (shuffling the labels alone would not do: a request's logged candidates would still be
    more relevant to it than random corpus items). The eval split keeps the true data."""
    path = os.path.join(data_dir, "Split-train", example_io.RECORD_FILE)
    rows = list(example_io.read_examples(path))
    rng = np.random.default_rng(seed)
    copies = {}
    for fields in (LABEL_FIELDS, ITEM_FIELDS):
        order = rng.permutation(len(rows))
        copies[fields] = [{name: tf.train.Feature.FromString(rows[k].features.feature[name].SerializeToString())
                           for name in fields} for k in order]
    with tf.io.TFRecordWriter(path, options="GZIP") as w:
        for i, row in enumerate(rows):
            for fields, values in copies.items():
                for name in fields:
                    row.features.feature[name].CopyFrom(values[i][name])
            w.write(row.SerializeToString())


def test_a_model_that_cannot_rank_is_not_blessed_and_the_previous_version_stays_served(second_run, tmp_path):
    config = second_run[0]
    before_pushed = report.pushed_models(config)
    before_versions = _served_versions(config)
    data = tmp_path / "shuffled"
    synthetic.write_dataset(config.synthetic, str(data))
    _break_train_data(str(data))
    broken = config.replace(source="examples", examples_dir=str(data), enable_cache=True)
    local_runner.run(broken, show_progress=False)
    evaluation = report.collect(broken)["evaluation"]
    quotas = dict(zip(evaluation["cascade"]["stages"], evaluation["cascade"]["quotas"]))
    lift = lambda stage: evaluation["cascade"][  # noqa: E731
        f"recall_lift_at_{quotas[report.STAGE_KEYS[stage]]}/{report.STAGE_KEYS[stage]}"]
    # The ranker was trained on nothing learnable: it orders the eval candidates near chance (the
    # served ranker's lift is above 0.5 at this scale; a little item popularity can leak, below).
    assert abs(lift("ranking")) < 0.25
    for stage in ("preranking", "ranking"):
        verdict = evaluation["blessings"][stage]
        # Not blessed: no better than chance, or far below the stage's served model (the broken
        # pre-ranker still learns a little item popularity from how random negatives are drawn).
        assert not verdict["blessed"] and verdict["reasons"], (stage, verdict)
        assert all("recall_lift" in r or "worse than the baseline" in r for r in verdict["reasons"]), verdict
        pushed = _artifacts(broken, f"Pusher.{stage}", "pushed_model")[-1]
        assert _prop(pushed, "pushed") == 0, stage
        assert report.served_models(broken)[stage] == (before_pushed[stage], False)  # the previous one is served
        assert _served_versions(broken)[stage] == before_versions[stage]
    # Retrieval learns item popularity from the broken data too (positives are drawn in proportion
    # to how often an item is logged, its sampled negatives uniformly), which orders the GT above
    # chance; its gate judges it by the same two rules.
    retrieval = evaluation["blessings"]["retrieval"]
    assert (lift("retrieval") < 0.15) == any("recall_lift" in reason for reason in retrieval["reasons"])


# ---- other runs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("orchestrator", ["beam"])
def test_the_same_pipeline_runs_on_beam_dag_runner(tmp_path, orchestrator):
    config = tiny_config(str(tmp_path), teacher=RankerConfig.teacher(epochs=1, hidden_units=(32,), cross_layers=1),
                         synthetic=synthetic.SyntheticConfig(num_requests=80, seed=2),
                         evaluator=EvaluatorConfig(thresholds=(), change_thresholds=(), tfma_min_auc=0.0,
                                                   tfma_calibration_range=(0.0, 1e9)))
    local_runner.run(config, orchestrator=orchestrator, show_progress=False)
    assert set(report.pushed_models(config)) == set(STAGES)
    assert all(runs for runs in _executions_by_node(config).values())


def test_anomalous_data_stops_before_training(tmp_path):
    data = tmp_path / "data"
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=20, seed=1), str(data))
    path = data / "Split-train" / example_io.RECORD_FILE
    examples = list(example_io.read_examples(str(path)))
    examples[3].features.feature["click"].int64_list.value[0] = 2  # a click of 2
    with tf.io.TFRecordWriter(str(path), options="GZIP") as w:
        for e in examples:
            w.write(e.SerializeToString())
    config = tiny_config(str(tmp_path / "out"), source="examples", examples_dir=str(data))
    with pytest.raises(Exception, match=r"train: click"):
        local_runner.run(config, show_progress=False)
    runs = _executions_by_node(config)
    for node in ("Trainer.teacher", "Trainer.cascade", "NegativeSampler"):
        assert not runs.get(node), node


def test_a_missing_data_path_is_one_line(tmp_path, capsys):
    code = cli.main(["run", "--source", "examples", "--examples-dir", str(tmp_path / "nowhere"),
                     "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_BAD_INPUT
    assert err.count("\n") == 0 and "nowhere" in err and "does not exist" in err
