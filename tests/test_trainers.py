"""Row-based Trainer modules (run_fn) on small generated data: outputs, the teacher's defaults,
resume after a kill."""
import json
import os

import pytest
import tensorflow as tf
from tfx.components.trainer.fn_args_utils import FnArgs

from cascade_ranking.datasources import synthetic
from cascade_ranking.models.config import TrainerConfig
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.models.trainers import baseline, common, teacher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_data")
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=60, seed=4), str(root / "examples"))
    return root / "examples"


def _fn_args(data, out, custom_config):
    return FnArgs(train_files=[str(data / "Split-train" / "*")], eval_files=[str(data / "Split-eval" / "*")],
                  serving_model_dir=str(out / "serving"), model_run_dir=str(out / "run"), custom_config=custom_config)


def _metrics(out):
    return json.load(open(out / "run" / common.EVAL_METRICS_FILE))


def test_baseline_module_trains_evaluates_and_exports(data, tmp_path):
    baseline.run_fn(_fn_args(data, tmp_path, {"trainer": TrainerConfig(batch_size=64).to_json()}))
    m = _metrics(tmp_path)
    assert m["examples"] > 0 and 0 < m["oracle_auc"] <= 1 and 0 <= m["auc"] <= 1
    serve = tf.saved_model.load(str(tmp_path / "serving")).signatures["serving_default"]
    assert set(serve.structured_outputs) == {"ctr", "logit"}
    assert tf.io.gfile.glob(str(tmp_path / "run" / "logs" / "train" / "events.*"))  # TensorBoard logs


def test_teacher_module_trains_on_rows_without_a_rank_loss_and_is_wider_than_the_ranker(data, tmp_path):
    teacher.run_fn(_fn_args(data, tmp_path, {"ranker": json.dumps({"epochs": 1})}))
    loaded = tf.saved_model.load(str(tmp_path / "serving"))
    assert {"serving_default", "quality", "ui", "score_ui_grid"} <= set(loaded.signatures)
    assert RankerConfig.teacher().rank_loss == "none"  # rows in any order: no per-request loss
    assert RankerConfig.teacher().hidden_units > RankerConfig().hidden_units
    m = _metrics(tmp_path)
    assert m["examples"] > 0 and 0 <= m["auc"] <= 1 and m["schema_path"].endswith("schema.pbtxt")
    # The eval metrics are over the eval split's shown rows, counted here from the raw records.
    shown, clicks, candidates = 0, 0, 0
    for raw in tf.data.TFRecordDataset(tf.io.gfile.glob(str(data / "Split-eval" / "*")), compression_type="GZIP"):
        candidates += 1
        feature = tf.train.Example.FromString(raw.numpy()).features.feature
        if feature["ui_position"].int64_list.value[0] > 0:
            shown += 1
            clicks += feature["click"].int64_list.value[0]
    assert 0 < m["examples"] == shown < candidates  # not every candidate was shown
    assert m["click_rate"] == pytest.approx(clicks / shown)


def test_the_teacher_refuses_a_per_request_rank_loss(data, tmp_path):
    with pytest.raises(ValueError, match="no per-request rank loss"):
        teacher.run_fn(_fn_args(data, tmp_path, {"ranker": json.dumps({"rank_loss": "multi_objective"})}))


class _KillAfterFirstEpoch(tf.keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise KeyboardInterrupt("killed")


class _RecordEpochs(tf.keras.callbacks.Callback):
    seen = []

    def on_epoch_begin(self, epoch, logs=None):
        _RecordEpochs.seen.append(epoch)


def test_training_resumes_after_a_kill(data, tmp_path, monkeypatch):
    real = common.callbacks
    args = _fn_args(data, tmp_path, {"ranker": json.dumps({"epochs": 3, "hidden_units": [32], "cross_layers": 1})})
    monkeypatch.setattr(common, "callbacks", lambda d: real(d) + [_KillAfterFirstEpoch()])
    with pytest.raises(KeyboardInterrupt):
        teacher.run_fn(args)
    assert os.listdir(tmp_path / "run" / "backup")  # the epoch-0 checkpoint
    monkeypatch.setattr(common, "callbacks", lambda d: real(d) + [_RecordEpochs()])
    _RecordEpochs.seen = []
    teacher.run_fn(args)
    assert _RecordEpochs.seen == [1, 2]  # epoch 0 was not trained again
    assert os.path.exists(tmp_path / "serving" / "saved_model.pb")
