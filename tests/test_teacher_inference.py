"""TeacherInference on DirectRunner: every record comes back with the teacher's logit."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from tfx import types
from tfx.types import standard_artifacts

from cascade_ranking.components import record_io, teacher_inference
from cascade_ranking.datasources import example_io
from tests.component_fixtures import examples_artifact, exported_model, synthetic_examples

GARBAGE = b"\x08\x96\x01 this is not a tf.Example"


def _run(tmp_path, examples, model, **overrides):
    out = examples_artifact(str(tmp_path / "out"), splits=())
    dead = record_io.DeadLetters()
    dead.uri = str(tmp_path / "dead")
    props = {"splits": json.dumps(["train", "eval"]), "output_key": "logit", "output_feature": "teacher_logit",
             "max_bad_fraction": 0.01}
    props.update(overrides)
    teacher_inference.Executor().Do({"examples": [examples], "model": [model]},
                                    {"output_examples": [out], "dead_letters": [dead]}, props)
    return out, dead


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    examples = synthetic_examples(str(root / "examples"), num_requests=12, extra_records={"train": [GARBAGE]})
    model = exported_model(str(root / "examples"), str(root / "model"))
    return root, examples, model


def test_every_record_gets_the_model_logit(data, tmp_path):
    root, examples, model = data
    out, dead = _run(tmp_path, examples, model)
    serve = tf.saved_model.load(os.path.join(model.uri, "Format-Serving")).signatures["serving_default"]
    for split in ("train", "eval"):
        source = list(example_io.read_examples(os.path.join(examples.uri, f"Split-{split}", "data_*")))
        written = list(example_io.read_examples(os.path.join(out.uri, f"Split-{split}")))
        assert len(written) == len(source)
        expected = serve(examples=tf.constant([e.SerializeToString() for e in source]))["logit"].numpy()
        by_key = {(e.features.feature["request_id"].int64_list.value[0], e.features.feature["item_id"].int64_list.value[0]):
                  e.features.feature["teacher_logit"].float_list.value[0] for e in written}
        got = np.array([by_key[(e.features.feature["request_id"].int64_list.value[0],
                                e.features.feature["item_id"].int64_list.value[0])] for e in source])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    metrics = json.loads(open(os.path.join(out.uri, record_io.METRICS_FILE)).read())
    total = 12 * 50
    assert metrics["records_parsed"] == metrics["records_written"] == total
    assert metrics["records_bad"] == 1
    assert out.get_int_custom_property("records_written") == total
    lines = [json.loads(l) for f in tf.io.gfile.glob(os.path.join(dead.uri, "*.jsonl")) for l in open(f)]
    assert len(lines) == 1 and bytes.fromhex(lines[0]["record_hex"]) == GARBAGE
    assert "unparseable" in lines[0]["reason"]


def test_bad_records_over_the_default_one_percent_fail_the_component(data, tmp_path):
    """600 good rows + 7 bad ones (1.15%) fail under the component's default max_bad_fraction
    (1%), with a one-line message, after every bad record reached the dead letters with its
    reason; the good rows are still written."""
    root, _, model = data
    first = next(iter(example_io.read_examples(os.path.join(root, "examples", "Split-eval", "data_*"))))
    no_request = tf.train.Example()
    no_request.CopyFrom(first)
    del no_request.features.feature["request_id"]
    garbage = [GARBAGE + bytes([i]) for i in range(6)]
    examples = synthetic_examples(str(tmp_path / "examples"), num_requests=12,
                                  extra_records={"eval": garbage + [no_request.SerializeToString()]})
    default = teacher_inference.TeacherInference(examples=_channel(standard_artifacts.Examples),
                                                 model=_channel(standard_artifacts.Model)).exec_properties["max_bad_fraction"]
    assert default == 0.01
    with pytest.raises(record_io.BadInputError) as error:
        _run(tmp_path, examples, model, max_bad_fraction=default)
    assert "\n" not in str(error.value)
    assert "TeacherInference: 7 of 607 records are bad (1.15% > 1.00%)" in str(error.value)
    lines = [json.loads(l) for f in tf.io.gfile.glob(str(tmp_path / "dead" / "*.jsonl")) for l in open(f)]
    reasons = {bytes.fromhex(d["record_hex"]): d["reason"] for d in lines}
    assert len(lines) == 7 and set(reasons) == set(garbage) | {no_request.SerializeToString()}
    assert all(reasons[g].startswith("unparseable tf.Example") for g in garbage)
    assert reasons[no_request.SerializeToString()] == "missing required feature(s): request_id"
    metrics = json.loads(open(tmp_path / "out" / record_io.METRICS_FILE).read())
    assert metrics["records_written"] == metrics["records_parsed"] == 600


def _channel(artifact_type):
    return types.Channel(type=artifact_type)


def test_missing_split_is_a_clear_error(data, tmp_path):
    _, examples, model = data
    with pytest.raises(record_io.BadInputError, match="required split 'test' is missing") as error:
        _run(tmp_path, examples, model, splits=json.dumps(["train", "test"]))
    assert "\n" not in str(error.value)


def test_a_second_pass_replaces_the_logit_and_keeps_every_other_feature(data, tmp_path):
    root, examples, model = data
    first, _ = _run(tmp_path / "first", examples, model)
    second, _ = _run(tmp_path / "second", first, model, output_feature="teacher_logit")
    key = lambda e: (e.features.feature["request_id"].int64_list.value[0], e.features.feature["item_id"].int64_list.value[0])
    for split in ("train", "eval"):
        source = {key(e): e for e in example_io.read_examples(os.path.join(examples.uri, f"Split-{split}", "data_*"))}
        once = {key(e): e for e in example_io.read_examples(os.path.join(first.uri, f"Split-{split}"))}
        twice = list(example_io.read_examples(os.path.join(second.uri, f"Split-{split}")))
        assert len(twice) == len(source)
        for example in twice:
            features = dict(example.features.feature)
            replaced = list(features.pop("teacher_logit").float_list.value)
            before = list(once[key(example)].features.feature["teacher_logit"].float_list.value)
            assert len(replaced) == 1 and replaced == pytest.approx(before, rel=1e-5, abs=1e-6)  # (batching changes
            # the float rounding, so the second pass's logit is close, not bit-equal)
            assert features == dict(source[key(example)].features.feature)


def test_the_feature_suffix_is_the_serialized_feature_record():
    suffix = teacher_inference.FeatureSuffix("teacher_logit")
    values = np.array([0.0, -0.0, 1.5, -3.25e-7, 1e30, np.inf, np.nan, 12.345678], np.float32)
    for value, built in zip(values, suffix.of(values)):
        assert built == teacher_inference.feature_record("teacher_logit", float(value))
