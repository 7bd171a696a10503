"""components.local_cluster_trainer: the teacher Trainer run by TFX's GenericExecutor in one process,
on a MultiWorkerMirrored cluster (chief + 1 worker) and on a ParameterServer cluster (chief + 2
workers + 1 ps) of localhost processes, on the same data and seed: each finishes, exports once (the
chief's Format-Serving and warm-start checkpoint, no worker's temporary export left), the SavedModel
serves, and the eval metrics match the one-process run within the stated tolerances. Killing a
ParameterServer worker mid-training: the coordinator recovers (its steps go to the other worker)."""
import json
import os
import signal
import threading
import time

import pytest
import tensorflow as tf
from tfx.types import standard_artifacts

from cascade_ranking.components import local_cluster_trainer
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.models.trainers import common, distribute
from cascade_ranking.models.trainers.distribute import ClusterConfig
from cascade_ranking.schema import features as F
from tests.component_fixtures import examples_artifact, request_list_splits, schema_artifact, synthetic_examples

pytestmark = pytest.mark.slow

# MultiWorkerMirrored runs the one-process algorithm (each global batch split between the replicas,
# the gradients summed): its metrics match to float noise. ParameterServer training is asynchronous
# (each worker steps the shared variables on its own batches with stale reads), another algorithm:
# its AUC is held to 0.02 of the one-process run here, on 2,000 shown eval rows.
MIRRORED_TOLERANCE = 0.002
PARAMETER_SERVER_AUC_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    examples = synthetic_examples(str(root / "examples"), num_requests=1000, seed=7)
    schema = schema_artifact(str(root / "schema"), F.load_schema(F.SCHEMA_PATH))
    return examples, schema


def _run(data, out, cluster: ClusterConfig, during=None, trainer="teacher", config=None):
    """Trainer.<trainer>'s executor on `data` into `out` (`during(model_run_dir)` runs in a thread)."""
    examples, schema = data
    model, model_run = standard_artifacts.Model(), standard_artifacts.ModelRun()
    model.uri, model_run.uri = str(out / "model"), str(out / "model_run")
    config = config or {"ranker": json.dumps({"epochs": 2, "batch_size": 128})}
    custom_config = {**config, distribute.CLUSTER_KEY: cluster.to_json()}
    exec_properties = {"run_fn": f"cascade_ranking.models.trainers.{trainer}.run_fn",
                       "custom_config": json.dumps(custom_config), "train_args": "{}", "eval_args": "{}"}
    thread = threading.Thread(target=during, args=(model_run.uri,), daemon=True) if during else None
    if thread:
        thread.start()
    local_cluster_trainer.Executor().Do({"examples": [examples], "schema": [schema]},
                                        {"model": [model], "model_run": [model_run]}, exec_properties)
    return model.uri, model_run.uri


def _check_one_export_that_serves(model_uri, model_run_uri, examples):
    assert sorted(os.listdir(model_uri)) == ["Format-Serving", "checkpoint"]
    assert not [d for d in os.listdir(model_run_uri) if d.startswith("workertemp")]
    served = tf.saved_model.load(os.path.join(model_uri, "Format-Serving")).signatures["serving_default"]
    warmup = common.warmup_examples([os.path.join(examples.uri, "Split-eval", "*")])
    ctr = served(examples=tf.constant(warmup))["ctr"].numpy()
    assert ctr.shape[0] == len(warmup) and ((ctr > 0) & (ctr < 1)).all()
    return json.load(open(os.path.join(model_run_uri, common.EVAL_METRICS_FILE)))


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    model_uri, model_run_uri = _run(data, out, ClusterConfig())
    assert not os.path.exists(os.path.join(model_run_uri, "cluster"))  # plain GenericExecutor
    return _check_one_export_that_serves(model_uri, model_run_uri, data[0])


def test_multi_worker_mirrored_on_localhost_matches_one_process(data, one_process, tmp_path):
    model_uri, model_run_uri = _run(data, tmp_path, ClusterConfig(workers=2, trainers=("teacher",)))
    tasks = json.load(open(os.path.join(model_run_uri, "cluster", "tasks.json")))
    assert sorted(tasks) == ["chief-0", "worker-0"]
    worker_log = open(tasks["worker-0"]["log"]).read()
    assert "multi_worker_mirrored, task worker 0" in worker_log and "teacher epoch 2/2" in worker_log
    metrics = _check_one_export_that_serves(model_uri, model_run_uri, data[0])
    assert metrics["examples"] == one_process["examples"]
    for name in ("auc", "ne", "mean_prediction"):
        assert metrics[name] == pytest.approx(one_process[name], abs=MIRRORED_TOLERANCE), name


def test_parameter_server_on_localhost_trains_within_tolerance(data, one_process, tmp_path):
    model_uri, model_run_uri = _run(data, tmp_path, ClusterConfig(workers=2, parameter_servers=1, trainers=("teacher",)))
    tasks = json.load(open(os.path.join(model_run_uri, "cluster", "tasks.json")))
    assert sorted(tasks) == ["chief-0", "ps-0", "worker-0", "worker-1"]
    assert "Serving as ps 0" in open(tasks["ps-0"]["log"]).read()
    metrics = _check_one_export_that_serves(model_uri, model_run_uri, data[0])
    assert metrics["auc"] == pytest.approx(one_process["auc"], abs=PARAMETER_SERVER_AUC_TOLERANCE)


def test_killing_a_parameter_server_worker_the_coordinator_recovers(data, one_process, tmp_path):
    killed = {}

    def kill_worker_1(model_run_uri):
        cluster_dir = os.path.join(model_run_uri, "cluster")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # once the chief's first epoch ended: training is under way
            chief_log = os.path.join(cluster_dir, "chief-0.log")
            if os.path.exists(chief_log) and "teacher epoch 1/2" in open(chief_log).read():
                tasks = json.load(open(os.path.join(cluster_dir, "tasks.json")))
                os.kill(tasks["worker-1"]["pid"], signal.SIGKILL)
                killed["pid"] = tasks["worker-1"]["pid"]
                return
            time.sleep(0.2)

    model_uri, model_run_uri = _run(data, tmp_path, ClusterConfig(workers=2, parameter_servers=1, trainers=("teacher",)),
                                    during=kill_worker_1)
    assert killed, "worker-1 was not killed"
    chief_log = open(os.path.join(model_run_uri, "cluster", "chief-0.log")).read()
    assert "/job:worker/replica:0/task:1 failed" in chief_log  # the coordinator saw it die...
    assert "teacher epoch 2/2" in chief_log  # ...and finished the training on worker 0
    metrics = _check_one_export_that_serves(model_uri, model_run_uri, data[0])
    assert metrics["auc"] == pytest.approx(one_process["auc"], abs=PARAMETER_SERVER_AUC_TOLERANCE)


def test_a_failing_task_stops_the_cluster_with_one_line_naming_it_and_its_log(data, tmp_path, monkeypatch):
    """A MultiWorkerMirrored worker that dies would leave the chief waiting in its next all-reduce: the
    executor stops the cluster and names the task."""

    def kill_the_worker(model_run_uri):
        path = os.path.join(model_run_uri, "cluster", "tasks.json")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not os.path.exists(path):
            time.sleep(0.1)
        time.sleep(0.5)
        os.kill(json.load(open(path))["worker-0"]["pid"], signal.SIGKILL)

    with pytest.raises(RuntimeError, match=r"the training cluster's worker-0 failed \(exit code -9; log .*worker-0.log\)"):
        _run(data, tmp_path, ClusterConfig(workers=2, trainers=("teacher",)), during=kill_the_worker)
    assert not os.path.exists(os.path.join(tmp_path, "model", "Format-Serving"))


@pytest.fixture(scope="module")
def request_lists(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster_lists")
    lists = request_list_splits(root, num_requests=300, seed=5, list_size=60)
    schema = schema_artifact(str(root / "schema"), F.load_schema(F.SCHEMA_PATH))
    return examples_artifact(str(lists)), schema


def test_retrieval_under_parameter_servers_splits_its_embedding_tables_and_serves(request_lists, tmp_path, capsys):
    """Two parameter servers and a 16 KiB min_shard_bytes: every embedding table of at least 32 KiB
    (item_id: 10,000 rows × 16 × 4 bytes) is split in two, trained, and exported whole."""
    config = {"retrieval": json.dumps({"epochs": 2, "batch_size": 32, "num_negatives": 32, "top_k": 20})}
    one_uri, one_run = _run(request_lists, tmp_path / "one", ClusterConfig(), trainer="retrieval", config=config)
    cluster = ClusterConfig(workers=2, parameter_servers=2, min_shard_bytes=16 << 10, trainers=("retrieval",))
    model_uri, model_run_uri = _run(request_lists, tmp_path / "ps", cluster, trainer="retrieval", config=config)
    console = capsys.readouterr().out
    assert "variables split across the parameter servers: " in console
    assert "item_tower/embedding/item_id_embedding/embeddings (2 shards)" in console
    served = tf.saved_model.load(os.path.join(model_uri, "Format-Serving")).signatures
    one = tf.saved_model.load(os.path.join(one_uri, "Format-Serving")).signatures
    table, one_table = served["item_embeddings"](), one["item_embeddings"]()
    assert table["embeddings"].shape == one_table["embeddings"].shape  # the whole corpus, from both shards
    assert (table["item_ids"].numpy() == one_table["item_ids"].numpy()).all()
    recall = json.load(open(os.path.join(model_run_uri, common.EVAL_METRICS_FILE)))["recall_retrieval@40"]
    one_recall = json.load(open(os.path.join(one_run, common.EVAL_METRICS_FILE)))["recall_retrieval@40"]
    assert 0 < recall and recall == pytest.approx(one_recall, abs=0.05)
