"""schema/: generated data validates against it with TFDV, and corrupted records are flagged."""
import os
import re

import pytest
import tensorflow as tf
import tensorflow_data_validation as tfdv
from tensorflow_metadata.proto.v0 import anomalies_pb2, schema_pb2

from cascade_ranking.datasources import synthetic
from cascade_ranking.schema import features as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def clean_examples():
    return list(synthetic.generate_examples(synthetic.SyntheticConfig(num_requests=30, seed=1)))


def _anomalies(examples, tmp_path, environment="TRAINING") -> anomalies_pb2.Anomalies:
    path = str(tmp_path / "data.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        for e in examples:
            w.write(e.SerializeToString())
    stats = tfdv.generate_statistics_from_tfrecord(data_location=path)
    return tfdv.validate_statistics(stats, F.load_schema(), environment=environment)


def _corrupt(examples, edit, rows=(7,)):
    out = [tf.train.Example.FromString(e.SerializeToString()) for e in examples]
    for row in rows:
        edit(out[row].features.feature)
    return out


def test_generated_data_has_no_anomalies(clean_examples, tmp_path):
    anomalies = _anomalies(clean_examples, tmp_path)
    assert dict(anomalies.anomaly_info) == {}
    assert not anomalies.HasField("dataset_anomaly_info")


def _set_float(feature_map, name, value):
    feature_map[name].Clear()
    feature_map[name].float_list.value.append(value)


def test_wrong_type_is_flagged(clean_examples, tmp_path):
    """A producer that writes user_id as float: TFDV reports the unexpected type."""
    wrong = _corrupt(clean_examples, lambda f: _set_float(f, "user_id", 3.5), rows=range(len(clean_examples)))
    anomalies = _anomalies(wrong, tmp_path)
    assert list(anomalies.anomaly_info) == ["user_id"]
    info = anomalies.anomaly_info["user_id"]
    assert anomalies_pb2.AnomalyInfo.UNEXPECTED_DATA_TYPE in [r.type for r in info.reason]


def test_one_record_of_wrong_type_fails_statistics_naming_the_feature(clean_examples, tmp_path):
    """TFX's decoder cannot hold two types in one column: StatisticsGen fails, naming the feature."""
    with pytest.raises(Exception, match="user_id"):
        _anomalies(_corrupt(clean_examples, lambda f: _set_float(f, "user_id", 3.5)), tmp_path)


@pytest.mark.parametrize(
    "name, edit, pattern",
    [
        ("missing required", lambda f: f.pop("item_id"), r"(dropped|missing|present)"),
        ("click=2", lambda f: f["click"].int64_list.value.__setitem__(0, 2), r"(range|large|big)"),
        ("unknown stage", lambda f: f["stage"].bytes_list.value.__setitem__(0, b"shown"), r"(unexpected|domain)"),
        ("position 11", lambda f: f["ui_position"].int64_list.value.__setitem__(0, 11), r"(range|large|big)"),
    ],
)
def test_corrupted_record_is_flagged(clean_examples, tmp_path, name, edit, pattern):
    feature = {"missing required": "item_id", "click=2": "click",
               "unknown stage": "stage", "position 11": "ui_position"}[name]
    anomalies = _anomalies(_corrupt(clean_examples, edit), tmp_path)
    assert list(anomalies.anomaly_info) == [feature]
    info = anomalies.anomaly_info[feature]
    text = f"{info.short_description} {info.description}"
    assert re.search(pattern, text, re.IGNORECASE), text


def test_serving_requests_need_no_labels(clean_examples, tmp_path):
    def strip(e):
        e = tf.train.Example.FromString(e.SerializeToString())
        for key in ("click", "stage", "true_ctr"):
            e.features.feature.pop(key)
        return e

    served = [strip(e) for e in clean_examples]
    assert dict(_anomalies(served, tmp_path, environment="SERVING").anomaly_info) == {}
    assert "click" in _anomalies(served, tmp_path, environment="TRAINING").anomaly_info


def test_model_inputs_are_schema_features_and_never_labels_or_oracles():
    names = {f.name for f in F.load_schema().feature}
    assert set(F.MODEL_INPUTS) <= names
    for never in (F.LABEL_KEY, F.STAGE_KEY, F.TRUE_CTR_KEY, F.REQUEST_ID_KEY, F.TEACHER_LOGIT_KEY):
        assert never not in F.MODEL_INPUTS
        assert never not in F.serving_parse_spec()
    assert set(F.serving_parse_spec()) == set(F.MODEL_INPUTS)


def test_every_float_feature_but_the_teacher_logit_disallows_nan():
    """So ExampleValidator flags NaN and serving rejects it (a user's schema may allow it)."""
    floats = {f.name: f for f in F.load_schema().feature if f.type == schema_pb2.FLOAT}
    assert {name for name, f in floats.items() if not f.float_domain.disallow_nan} == {F.TEACHER_LOGIT_KEY}
    assert {"user_dense", "item_dense"} <= set(floats)


def test_schema_readme_documents_every_feature():
    with open(os.path.join(REPO, "schema", "README.md")) as f:
        table_rows = [line for line in f if line.startswith("| `")]
    documented = {re.match(r"\| `([a-z_]+)`", line).group(1) for line in table_rows}
    assert documented == {f.name for f in F.load_schema().feature}
    for line in table_rows:
        name = re.match(r"\| `([a-z_]+)`", line).group(1)
        reads = line.rstrip().rstrip("|").split("|")[-1].strip().lower()
        assert reads.startswith("yes") == (name in F.MODEL_INPUTS), line


def test_optional_features_take_their_defaults():
    example = next(synthetic.generate_examples(synthetic.SyntheticConfig(num_requests=1)))
    parsed = tf.io.parse_example([example.SerializeToString()], F.training_parse_spec())
    assert parsed["sample_weight"].numpy()[0, 0] == 1.0
    assert tf.math.is_nan(parsed["teacher_logit"][0, 0])
    assert parsed["true_ctr"].numpy()[0, 0] >= 0.0  # present in synthetic rows
