"""The first end-to-end pipeline on LocalDagRunner at a tiny scale, and bad data stopping it."""
import dataclasses
import os

import ml_metadata as mlmd
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2
from tfx.orchestration import metadata

from datasources import example_io, synthetic
from models import export
from models.ranker_config import RankerConfig
from pipelines import local_runner, report
from pipelines.config import PipelineConfig

pytestmark = pytest.mark.slow


def _executions_by_node(config):
    store = mlmd.MetadataStore(metadata.sqlite_metadata_connection_config(os.path.abspath(config.metadata_path)))
    result = {}
    for context in store.get_contexts_by_type("node"):
        node = context.name.split(".", 1)[1]
        result[node] = store.get_executions_by_context(context.id)
    return result


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    config = PipelineConfig(
        output_dir=str(out),
        synthetic=synthetic.SyntheticConfig(num_requests=80, seed=2),
        ranker=RankerConfig(epochs=1),
    )
    local_runner.run(config)
    return config


def test_pushed_model_scores_serialized_examples(finished_run):
    result = report.collect(finished_run, "ranking")
    pushed = result["pushed_model"]
    assert os.path.dirname(pushed) == os.path.join(os.path.abspath(finished_run.serving_dir), "ranking")
    assert os.path.basename(pushed).isdigit()  # versioned directory
    loaded = tf.saved_model.load(pushed)
    serve = loaded.signatures["serving_default"]
    raw = [
        e.SerializeToString()
        for e in synthetic.generate_examples(synthetic.SyntheticConfig(num_requests=1, seed=99))
    ]
    out = serve(examples=tf.constant(raw))
    ctr = out["ctr"].numpy()
    assert ctr.shape == (50,)
    assert np.all((ctr > 0) & (ctr < 1))
    np.testing.assert_allclose(ctr, 1 / (1 + np.exp(-out["logit"].numpy())), rtol=1e-5)
    assert np.std(ctr) > 0  # the candidates are told apart

    with pytest.raises(tf.errors.InvalidArgumentError, match="item_id"):
        broken = tf.train.Example.FromString(raw[0])
        del broken.features.feature["item_id"]
        serve(examples=tf.constant([broken.SerializeToString()]))


def test_warmup_requests_parse_and_cover_every_signature(finished_run):
    pushed = report.collect(finished_run, "ranking")["pushed_model"]
    records = list(tf.data.TFRecordDataset(os.path.join(pushed, export.WARMUP_FILE)).as_numpy_iterator())
    logs = [prediction_log_pb2.PredictionLog.FromString(r) for r in records]
    signatures = {log.predict_log.request.model_spec.signature_name for log in logs}
    assert signatures == {"serving_default", "quality", "ui", "score_ui_grid"}
    assert set(tf.saved_model.load(pushed).signatures) == signatures


def test_eval_metrics_sit_next_to_the_oracle(finished_run):
    m = report.collect(finished_run, "ranking")["metrics"]
    assert m["examples"] > 50
    for key in ("auc", "ne", "oracle_auc", "oracle_ne"):
        assert np.isfinite(m[key]), key
    assert 0.5 < m["oracle_auc"] <= 1.0
    table = report.format_table([report.collect(finished_run, "ranking")])
    assert "AUC" in table and f"{m['oracle_auc']:.4f}" in table


def test_every_component_ran_once(finished_run):
    runs = _executions_by_node(finished_run)
    for node in ("SyntheticExampleGen", "StatisticsGen", "ImportSchemaGen", "ExampleValidator", "AnomalyGate",
                 "Trainer.ranking", "Pusher.ranking"):
        assert len(runs[node]) == 1, node


def test_anomalous_data_stops_before_training(tmp_path):
    data = tmp_path / "data"
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=20, seed=1), str(data))
    # Corrupt the train split: one click of 2.
    path = data / "Split-train" / example_io.RECORD_FILE
    examples = list(example_io.read_examples(str(path)))
    examples[3].features.feature["click"].int64_list.value[0] = 2
    with tf.io.TFRecordWriter(str(path), options="GZIP") as w:
        for e in examples:
            w.write(e.SerializeToString())
    config = PipelineConfig(output_dir=str(tmp_path / "out"), source="examples", examples_dir=str(data))
    with pytest.raises(Exception, match=r"train: click"):
        local_runner.run(config)
    runs = _executions_by_node(config)
    assert "Trainer.ranking" not in runs or not runs["Trainer.ranking"]
