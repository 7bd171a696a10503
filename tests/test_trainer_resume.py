"""Resume after a kill for the list-based Trainer modules (retrieval, HAP pre-ranking, joint
cascade), through `tf.keras.callbacks.BackupAndRestore` (`cascade_ranking.models.trainers.common.callbacks`).

Each module is run at tiny scale with 3 epochs and killed in the middle of its second epoch (a
callback raises after the first batch of epoch 1, so the run dies the way a preempted worker
does: no `on_train_end`, the backup of epoch 0 left on disk). The rerun is what TFX does after a
kill: a new execution, so a new ModelRun directory (`<node>/model_run/<execution id>`), same
inputs and custom_config. It must
  * find the backup and start at epoch 1 (epochs 1 and 2 are trained, epoch 0 is not);
  * start from the backed-up state: the optimizer's step counter is that of the end of epoch 0,
    and after its first step the weights are one step away from the end-of-epoch-0 weights (the
    models build lazily, so the restored weights only exist once the first batch has run);
  * finish: a SavedModel in serving_model_dir, eval_metrics.json, and the backup removed.
"""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from tfx.components.trainer.fn_args_utils import FnArgs

from cascade_ranking.models.trainers import cascade, common, preranking, retrieval
from tests.component_fixtures import request_list_splits

pytestmark = pytest.mark.slow
LIST_SIZE = 60
EPOCHS = 3


class Killed(Exception):
    """Stands for the process being killed."""


def _trainable(model):
    return [w.numpy().copy() for w in model.trainable_weights]


def _distance(a, b):
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    return float(np.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b))))


class _KillInSecondEpoch(tf.keras.callbacks.Callback):
    """Records the weights after the first step and at the end of epoch 0 (after BackupAndRestore
    has saved them: callbacks run in order, and this one comes after `common.callbacks`), then
    dies after the first batch of epoch 1."""

    def __init__(self, record):
        super().__init__()
        self.record = record
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if "first_step" not in self.record:
            self.record["first_step"] = _trainable(self.model)
        if self._epoch == 1:
            raise Killed("killed in epoch 1")

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.record["steps"] = int(self.model.optimizer.iterations.numpy())
            self.record["epoch0"] = _trainable(self.model)


class _RecordResume(tf.keras.callbacks.Callback):
    """Records the epochs the rerun trains, its starting optimizer step and its weights after
    its first step."""

    def __init__(self, record):
        super().__init__()
        self.record = record
        self.record["epochs"] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.record["epochs"].append(epoch)
        self.record.setdefault("start_steps", int(self.model.optimizer.iterations.numpy()))

    def on_train_batch_end(self, batch, logs=None):
        if "first_step" not in self.record:
            self.record["first_step"] = _trainable(self.model)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Request-list Examples in the NegativeSampler's layout, 40 requests."""
    root = tmp_path_factory.mktemp("resume_data")
    return request_list_splits(root, num_requests=40, seed=11, list_size=LIST_SIZE)


def _fn_args(data, node_dir, execution_id, custom_config):
    """FnArgs as TFX's Trainer gives them: the ModelRun is <node>/model_run/<execution id>."""
    return FnArgs(train_files=[str(data / "Split-train" / "*")], eval_files=[str(data / "Split-eval" / "*")],
                  serving_model_dir=str(node_dir / "model" / str(execution_id) / "Format-Serving"),
                  model_run_dir=str(node_dir / "model_run" / str(execution_id)), custom_config=custom_config)


MODULES = {
    "retrieval": (retrieval, {"epochs": EPOCHS, "batch_size": 64, "num_negatives": 16, "top_k": 10}),
    "preranking": (preranking, {"epochs": EPOCHS, "batch_size": 8, "top_m": 25}),
    "cascade": (cascade, {"epochs": EPOCHS, "batch_size": 8}),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_list_trainer_resumes_after_a_kill(name, data, tmp_path, monkeypatch):
    module, config = MODULES[name]
    custom_config = {module.CONFIG_KEY: json.dumps(config)}
    first, rerun = _fn_args(data, tmp_path, 7, custom_config), _fn_args(data, tmp_path, 8, custom_config)
    backup = common.backup_dir(first)
    assert common.backup_dir(rerun) == backup  # the new execution looks where the killed one saved
    assert not backup.startswith(first.model_run_dir)
    real = common.callbacks
    killed, resumed = {}, {}

    monkeypatch.setattr(common, "callbacks", lambda args: real(args) + [_KillInSecondEpoch(killed)])
    with pytest.raises(Killed):
        module.run_fn(first)
    assert os.listdir(backup), "no BackupAndRestore checkpoint after the kill"
    assert not os.path.exists(first.serving_model_dir)
    steps_per_epoch = killed["steps"]
    assert steps_per_epoch >= 3  # the kill is mid-epoch, and the weights move enough to tell states apart

    monkeypatch.setattr(common, "callbacks", lambda args: real(args) + [_RecordResume(resumed)])
    module.run_fn(rerun)
    assert resumed["epochs"] == [1, 2], f"{name} trained epochs {resumed['epochs']} after the resume"
    assert resumed["start_steps"] == steps_per_epoch  # the optimizer state is the backup's
    # One step after the resume, the weights are one step from the end-of-epoch-0 weights, and
    # far from where a fresh start (same seed, so the killed run's first step) would be.
    from_backup = _distance(resumed["first_step"], killed["epoch0"])
    from_fresh = _distance(resumed["first_step"], killed["first_step"])
    assert from_backup < 0.5 * from_fresh, (name, from_backup, from_fresh)
    assert os.path.exists(os.path.join(rerun.serving_model_dir, "saved_model.pb"))
    assert os.path.exists(os.path.join(rerun.model_run_dir, common.EVAL_METRICS_FILE))
    assert tf.io.gfile.glob(os.path.join(rerun.model_run_dir, "logs", "train", "events.*"))
    assert not os.path.exists(backup) or not os.listdir(backup)  # removed once training finished
