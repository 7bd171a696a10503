"""The whole cascade pipeline at a tiny scale on LocalDagRunner: killed during training and
resumed, then read back — components, pushed models, the evaluation table, serve-check, the cache
— plus one run on BeamDagRunner and anomalous data stopping the run before training."""
import dataclasses
import glob
import os
import signal
import subprocess
import sys
import time

import ml_metadata as mlmd
import numpy as np
import pytest
import tensorflow as tf
from tfx.orchestration import metadata

from datasources import example_io, synthetic
from models.ranker_config import RankerConfig
from models.trainers.retrieval import RetrievalTrainerConfig
from pipelines import cli, local_runner, report, serve_check
from pipelines.config import PipelineConfig, default_cascade
from pipelines.pipeline import STAGES

pytestmark = pytest.mark.slow

NODES = ("SyntheticExampleGen", "StatisticsGen", "ImportSchemaGen", "ExampleValidator", "AnomalyGate",
         "Trainer.teacher", "TeacherInference", "NegativeSampler", "Trainer.ranking", "Trainer.retrieval",
         "Trainer.cascade", "CascadeEvaluator", "Pusher.retrieval", "Pusher.preranking", "Pusher.ranking")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER_EPOCHS = 12  # long enough on tiny data that the kill lands during the teacher's training


def tiny_config(output_dir: str, **changes) -> PipelineConfig:
    """The pipeline at test scale: 80 requests, one epoch per student, in-process Beam."""
    return PipelineConfig(
        output_dir=output_dir,
        synthetic=synthetic.SyntheticConfig(num_requests=80, seed=2),
        teacher=RankerConfig.teacher(epochs=TEACHER_EPOCHS, hidden_units=(32,), cross_layers=1),
        ranker=RankerConfig(epochs=1),
        retrieval=RetrievalTrainerConfig(epochs=1),
        cascade=dataclasses.replace(default_cascade(), epochs=1),
        beam_mode="in_process",
    ).replace(**changes)


def _executions_by_node(config):
    store = mlmd.MetadataStore(metadata.sqlite_metadata_connection_config(os.path.abspath(config.metadata_path)))
    return {context.name.split(".", 1)[1]: store.get_executions_by_context(context.id)
            for context in store.get_contexts_by_type("node")}


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
    seconds, timings = local_runner.run_with_timings(config, show_progress=False)
    return config, before_kill, timings


def test_every_component_runs_and_the_rerun_reuses_what_finished_before_the_kill(resumed_run):
    config, before_kill, timings = resumed_run
    finished_before = {node for node, ids in before_kill.items() if ids}
    assert {"SyntheticExampleGen", "StatisticsGen", "AnomalyGate"} <= finished_before
    assert "Trainer.teacher" not in finished_before
    assert {node for node, _, _ in timings} == set(NODES)
    cached = {node for node, _, was_cached in timings if was_cached}
    assert finished_before <= cached
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


def test_each_stage_is_pushed_into_a_versioned_directory(resumed_run):
    config, _, _ = resumed_run
    pushed = report.pushed_models(config)
    assert set(pushed) == set(STAGES)
    for stage, path in pushed.items():
        assert os.path.dirname(path) == os.path.join(os.path.abspath(config.serving_dir), stage)
        assert os.path.basename(path).isdigit()


def test_serve_check_calls_every_signature_of_every_pushed_model(resumed_run, capsys):
    config, _, _ = resumed_run
    checks = {c.stage: c for c in serve_check.serve_check(config.output_dir, count=12)}
    assert set(checks) == set(STAGES)
    assert set(checks["ranking"].signatures) == {"serving_default", "quality", "ui", "score_ui_grid"}
    assert checks["ranking"].signatures["serving_default"]["ctr"] == (12,)
    assert set(checks["retrieval"].signatures) == {"serving_default", "query_embedding", "item_embeddings", "score"}
    assert checks["preranking"].signatures["serving_default"]["score/prerank"] == (12,)
    assert checks["ranking"].warmup_requests == 4
    assert cli.main(["serve-check", config.output_dir]) == 0
    assert "serve-check passed: 3 models" in capsys.readouterr().out


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


def test_the_table_reports_the_evaluators_metrics_beside_the_oracle(resumed_run):
    config, _, _ = resumed_run
    evaluation = report.collect(config)["evaluation"]
    rows = {name: (model, oracle) for name, model, oracle in report.table_rows(evaluation)}
    assert rows["e2e recall (quotas 40/30/20)"] == (evaluation["cascade"]["e2e_recall"],
                                                    evaluation["oracle_cascade"]["e2e_recall"])
    assert rows["ranking AUC"] == (evaluation["model"]["auc"], evaluation["oracle"]["auc"])
    assert rows["ranking Recall@|GT|@30".replace("ranking", "pre-ranking")][0] == \
        evaluation["cascade"]["recall_at_30/preranking_model"]
    model_calibration = rows["calibration Σŷ/Σy"][0]
    assert model_calibration == pytest.approx(evaluation["model"]["mean_prediction"] / evaluation["click_rate"])
    for name, (model, _) in rows.items():
        if "bucket" not in name:
            assert np.isfinite(model), name
    assert 0.0 <= evaluation["cascade"]["e2e_recall"] <= 1.0
    text = report.format_table(evaluation)
    assert "e2e recall" in text and f"{evaluation['oracle']['auc']:.4f}" in text


def test_a_rerun_on_the_same_inputs_is_answered_by_the_cache(resumed_run):
    config, _, _ = resumed_run
    seconds, timings = local_runner.run_with_timings(config, show_progress=False)
    assert {node for node, _, cached in timings if cached} == set(NODES)
    assert seconds < 60


@pytest.mark.parametrize("orchestrator", ["beam"])
def test_the_same_pipeline_runs_on_beam_dag_runner(tmp_path, orchestrator):
    config = tiny_config(str(tmp_path), teacher=RankerConfig.teacher(epochs=1, hidden_units=(32,), cross_layers=1))
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
    for node in ("Trainer.teacher", "Trainer.ranking", "NegativeSampler"):
        assert not runs.get(node), node


def test_a_missing_data_path_is_one_line(tmp_path, capsys):
    code = cli.main(["run", "--source", "examples", "--examples-dir", str(tmp_path / "nowhere"),
                     "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_BAD_INPUT
    assert err.count("\n") == 0 and "nowhere" in err and "does not exist" in err
