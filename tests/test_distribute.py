"""models.trainers.distribute: the cluster read from TF_CONFIG, the chief, the config's refusals, and a
training step under a 2-replica synchronous strategy equal to the one-process step on the same
global batch (the loss and logs per replica, the bias-constraint duals averaged): the ranker's, and
the joint cascade's with LCRON's uncertainty weights."""
import json
import os
import subprocess
import sys

import pytest

from cascade_ranking.models.config import ConfigError
from cascade_ranking.models.trainers import distribute
from cascade_ranking.models.trainers.distribute import ClusterConfig
from cascade_ranking.pipelines.config import PipelineConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tf_config(cluster, task_type=None, index=0):
    config = {"cluster": cluster}
    if task_type:
        config["task"] = {"type": task_type, "index": index}
    return config


def test_the_strategy_and_the_chief_come_from_tf_config(monkeypatch):
    monkeypatch.delenv(distribute.TF_CONFIG_ENV, raising=False)
    assert distribute.cluster_strategy() is None and distribute.is_chief() and distribute.task() == (None, 0)
    mirrored = {"chief": ["localhost:1"], "worker": ["localhost:2"]}
    assert distribute.cluster_strategy(_tf_config(mirrored, "worker", 0)) == distribute.MIRRORED
    assert distribute.is_chief(_tf_config(mirrored, "chief", 0))
    assert not distribute.is_chief(_tf_config(mirrored, "worker", 0))  # a chief exists: worker 0 is not it
    workers_only = {"worker": ["localhost:1", "localhost:2"]}
    assert distribute.is_chief(_tf_config(workers_only, "worker", 0))
    assert not distribute.is_chief(_tf_config(workers_only, "worker", 1))
    ps = {"chief": ["localhost:1"], "worker": ["localhost:2"], "ps": ["localhost:3"]}
    assert distribute.cluster_strategy(_tf_config(ps, "ps", 0)) == distribute.PARAMETER_SERVER
    assert distribute.cluster_strategy(_tf_config({"chief": ["localhost:1"]}, "chief", 0)) is None  # one task
    monkeypatch.setenv(distribute.TF_CONFIG_ENV, "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not JSON"):
        distribute.tf_config()


def test_without_tf_config_a_trainer_has_no_strategy_and_refuses_none(monkeypatch):
    monkeypatch.delenv(distribute.TF_CONFIG_ENV, raising=False)
    assert distribute.strategy_for("teacher", ()) is None  # one process: as before, whatever it supports
    monkeypatch.setenv(distribute.TF_CONFIG_ENV, json.dumps(_tf_config(
        {"chief": ["localhost:1"], "worker": ["localhost:2"]}, "chief", 0)))
    with pytest.raises(ValueError, match="Trainer.retrieval does not train under multi_worker_mirrored"):
        distribute.strategy_for("retrieval", (distribute.PARAMETER_SERVER,))


def test_the_cluster_config_gives_the_tasks_of_each_strategy():
    assert ClusterConfig().task_counts() == {} and not ClusterConfig(workers=1).distributed
    assert ClusterConfig(workers=2).task_counts() == {"chief": 1, "worker": 1}
    assert ClusterConfig(workers=2).strategy == distribute.MIRRORED
    assert ClusterConfig(workers=2, parameter_servers=1).task_counts() == {"chief": 1, "worker": 2, "ps": 1}
    assert ClusterConfig(workers=2, parameter_servers=1).strategy == distribute.PARAMETER_SERVER
    assert ClusterConfig(workers=2, trainers=("cascade",)).runs("cascade")
    assert not ClusterConfig(workers=2, trainers=("cascade",)).runs("teacher")
    with pytest.raises(ValueError, match="parameter_servers needs at least one worker"):
        ClusterConfig(parameter_servers=1)


def test_the_pipeline_config_refuses_an_unknown_trainer_and_an_unsupported_strategy(monkeypatch):
    with pytest.raises(ConfigError, match="no Trainer 'ranker' in this run"):
        PipelineConfig(training_cluster=ClusterConfig(workers=2, trainers=("ranker",))).check_training_cluster()
    from cascade_ranking.models.trainers import teacher

    monkeypatch.setattr(teacher, "DISTRIBUTE_STRATEGIES", (distribute.MIRRORED,))
    with pytest.raises(ConfigError, match="Trainer.teacher does not train under parameter_server"):
        PipelineConfig(training_cluster=ClusterConfig(workers=2, parameter_servers=1,
                                                      trainers=("teacher",))).check_training_cluster()
    PipelineConfig(training_cluster=ClusterConfig(workers=2, trainers=("teacher", "cascade"))).check_training_cluster()


# One step of the ranker (logistic + distillation + bias constraints from step 0, Adagrad) on the same
# 40 rows: in one process, and under MirroredStrategy over 2 logical CPUs (20 rows a replica; the
# same all-reduce and replica context as MultiWorkerMirroredStrategy, in one process).
_REPLICA_STEP = r"""
import json, numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from cascade_ranking.models import ranker
from cascade_ranking.models.ranker_config import RankerConfig
from tests.test_ranker import SMALL, make_rows, to_tensors

raw = make_rows(4, seed=3)
# Every row has a teacher logit: the distillation mean is then over the same rows in both runs (with
# some missing, each replica would average over its own count of them).
raw["teacher_logit"] = np.nan_to_num(raw["teacher_logit"], nan=0.5)
rows = to_tensors(raw)
config = RankerConfig(**{**SMALL, "rank_loss": "none", "bias_start_step": 0, "bias_ramp_steps": 1,
                         "distill_start_step": 0, "distill_ramp_steps": 1, "ema_momentum": 0.0})

def one_step(strategy):
    tf.keras.utils.set_random_seed(0)
    with strategy.scope():
        model = ranker.FactoryFloorRanker(config)
        model.adapt(tf.data.Dataset.from_tensors(rows), steps=1)
        model.compile()
        model.build_train_step(rows)
        model.optimizer.iterations.assign(10)  # past the bias and distillation ramps
    start = [v.numpy() for v in model.trainable_variables]  # in creation order (Keras renames a second model's layers)
    logs = model.fit(tf.data.Dataset.from_tensors(rows), epochs=1, verbose=0).history
    values = [v.numpy() for v in model.trainable_variables]
    change = max(float(np.max(np.abs(a - b))) for a, b in zip(values, start))
    return values, model.bias_constraints.duals.numpy(), {k: float(v[0]) for k, v in logs.items()}, change

one, duals_one, logs_one, change = one_step(tf.distribute.get_strategy())
two, duals_two, logs_two, _ = one_step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
print(json.dumps({
    "replicas": 2,
    "variables": len(one),
    "max_weight_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(one, two)),
    "max_weight_change": change,
    "duals_one": duals_one.tolist(), "duals_two": duals_two.tolist(),
    "loss_one": logs_one["loss"], "loss_two": logs_two["loss"],
}))
"""


def test_a_step_on_two_replicas_equals_the_one_process_step_on_the_global_batch():
    """The gradient of each replica's loss is divided by the replicas before the all-reduce sums them
    (`models.tasks` (f)); the duals' MEAN aggregation averages the replicas' ascent steps; the logged
    loss is the replicas' mean (g). Without them the two-replica weights would move twice as far."""
    pytest.importorskip("tensorflow")
    run = subprocess.run([sys.executable, "-c", _REPLICA_STEP], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["variables"] > 10
    assert result["max_weight_change"] > 1e-3 and result["max_weight_diff"] < 1e-5
    assert any(abs(d) > 1e-4 for d in result["duals_one"])  # the duals did step
    assert result["duals_two"] == pytest.approx(result["duals_one"], abs=1e-6)
    assert result["loss_two"] == pytest.approx(result["loss_one"], rel=1e-5)


# One step of the joint cascade (pre-ranker + ranking stage, LCRON with its uncertainty weights w_i,
# the ranker's own optimizer, bias constraints and curriculum past their ramps) on the same 8
# request lists: in one process and under MirroredStrategy over 2 logical CPUs (4 lists a replica;
# every synthetic request shows 10 candidates, so the ranker's per-row means cover equal counts).
_CASCADE_STEP = r"""
import json, os, sys, numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from cascade_ranking.datasources import synthetic
from cascade_ranking.models import list_inputs as LI
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.models.trainers.cascade import CascadeTrainerConfig, build_model

root = sys.argv[1]
synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=30, seed=5), root)
lists = LI.request_lists_from_candidates(os.path.join(root, "Split-train"))
lists = {k: np.asarray(v)[:8] for k, v in lists.items()}
config = CascadeTrainerConfig(method="lcron", batch_size=8, embedding_dim=4)
ranker = RankerConfig.cascade_stage(hidden_units=(16,), cascade_head_units=(8,), embedding_dim=4, cross_layers=1,
                                    cross_projection_dim=4, qu_dim=4, ui_hidden_units=(4,), ema_momentum=0.0,
                                    rank_start_step=0, rank_ramp_steps=1, bias_start_step=0, bias_ramp_steps=1,
                                    distill_start_step=0, distill_ramp_steps=1)

def one_step(strategy):
    with strategy.scope():
        model = build_model(config, ranker)  # seeds TF with config.seed
        model.adapt(lists)
        model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))
        model.build_train_step(next(iter(LI.dataset_from_lists(lists, 8))))
        model.optimizer.iterations.assign(10)
        model.ranking_stage.optimizer.iterations.assign(10)
    start = [v.numpy() for v in model.trainable_variables]
    logs = model.fit(LI.dataset_from_lists(lists, 8), epochs=1, verbose=0).history
    values = [v.numpy() for v in model.trainable_variables]
    w = [v.numpy() for v in model.trainable_variables if v.name.split("/")[-1] == "w:0"]  # LCRON's w_i
    duals = model.ranking_stage.ranker.bias_constraints.duals.numpy()
    change = max(float(np.max(np.abs(a - b))) for a, b in zip(values, start))
    return values, w, duals, float(logs["loss"][0]), change

one, w_one, duals_one, loss_one, change = one_step(tf.distribute.get_strategy())
two, w_two, duals_two, loss_two, _ = one_step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
print(json.dumps({"variables": len(one), "max_weight_change": change,
                  "max_weight_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(one, two)),
                  "w_one": [x.tolist() for x in w_one], "w_two": [x.tolist() for x in w_two],
                  "duals_diff": float(np.max(np.abs(duals_one - duals_two))), "duals_moved": float(np.max(np.abs(duals_one))),
                  "loss_one": loss_one, "loss_two": loss_two}))
"""


def test_a_cascade_step_on_two_replicas_equals_the_one_process_step(tmp_path):
    """The joint cascade's step under a 2-replica strategy: LCRON's uncertainty weights, every
    stage's weights (the ranker's through its own optimizer) and the ranker's duals move as in one
    process on the same 8 lists."""
    run = subprocess.run([sys.executable, "-c", _CASCADE_STEP, str(tmp_path / "examples")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    (w_one,), (w_two,) = result["w_one"], result["w_two"]
    assert max(abs(w - 1.0) for w in w_one) > 1e-4  # the uncertainty weights moved from their initial 1
    assert w_two == pytest.approx(w_one, abs=1e-6)
    assert result["max_weight_change"] > 1e-4 and result["max_weight_diff"] < 1e-5
    assert result["duals_moved"] > 1e-5 and result["duals_diff"] < 1e-6
    assert result["loss_two"] == pytest.approx(result["loss_one"], rel=1e-5)
