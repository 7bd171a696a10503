"""`cascade run` with the ranking Trainer on a 2-worker localhost cluster, as the README's "Training
beyond one machine" runs it: checked on the run's own artifacts (MLMD, the Trainer's ModelRun and
Model, the CascadeEvaluator's metrics, the exported ranker's serve check)."""
import json
import os

import ml_metadata as mlmd
import pytest
from tfx.orchestration import metadata

from cascade_ranking.models.trainers import common
from cascade_ranking.pipelines import cli, report, serve_check
from cascade_ranking.pipelines.config import load_config

pytestmark = pytest.mark.slow


def test_cascade_run_trains_the_ranking_trainer_on_two_localhost_workers(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--output-dir", str(out), "--beam-mode", "in_process",
            "--set", "synthetic.num_requests=120", "--set", "teacher.epochs=1",
            "--set", "training_cluster.workers=2"]  # training_cluster.trainers defaults to [cascade]
    assert cli.main(argv) == 0
    console = capsys.readouterr().out
    assert "training cluster: multi_worker_mirrored, 1 chief, 1 worker on localhost" in console
    assert "cascade epoch 3/3" in console  # the chief's epochs reach the console

    config = load_config(None, [f"output_dir={out}"])
    store = mlmd.MetadataStore(metadata.sqlite_metadata_connection_config(config.metadata_path))
    prefix = config.pipeline_name
    (model,) = report.node_artifacts(store, "Model", f"{prefix}.Trainer.cascade")
    (model_run,) = report.node_artifacts(store, "ModelRun", f"{prefix}.Trainer.cascade")
    tasks = json.load(open(os.path.join(model_run.uri, "cluster", "tasks.json")))
    assert sorted(tasks) == ["chief-0", "worker-0"]
    worker_log = open(tasks["worker-0"]["log"]).read()
    assert "Trainer.cascade: multi_worker_mirrored, task worker 0" in worker_log and "cascade epoch 3/3" in worker_log
    # One export, the chief's: the ranker, the pre-ranker beside it and the warm-start checkpoint.
    assert sorted(os.listdir(model.uri)) == ["Format-Serving", "checkpoint", "stages"]
    assert not [d for d in os.listdir(model_run.uri) if d.startswith("workertemp")]
    trained = json.load(open(os.path.join(model_run.uri, common.EVAL_METRICS_FILE)))
    assert 0 < trained["e2e_recall"] <= 1
    # The teacher and retrieval Trainers stayed in one process.
    (teacher_run,) = report.node_artifacts(store, "ModelRun", f"{prefix}.Trainer.teacher")
    assert not os.path.exists(os.path.join(teacher_run.uri, "cluster"))
    # The pipeline evaluated the cluster-trained models and the serve check called them.
    (evaluation,) = report.node_artifacts(store, "ModelEvaluation", f"{prefix}.CascadeEvaluator")
    metrics = json.load(open(os.path.join(evaluation.uri, "metrics.json")))
    assert metrics["blessings"]["ranking"]["model_uri"] == model.uri
    assert 0 < metrics["cascade"]["e2e_recall"] <= 1
    # The exported ranker serves (TF Serving's check: every signature on the run's eval examples and
    # the warmup file replayed), pushed or not (a 120-request run need not pass the CTR gates).
    examples = serve_check.read_examples(serve_check.eval_examples_from_run(str(out)), 16)
    check = serve_check.check_model("ranking", os.path.join(model.uri, "Format-Serving"), examples)
    assert {"serving_default", "quality", "ui", "score_ui_grid"} <= set(check.signatures) and check.warmup_requests > 0
