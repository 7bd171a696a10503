"""TeacherInference on DirectRunner: every record comes back with the teacher's logit."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from components import record_io, teacher_inference
from datasources import example_io
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


def test_too_many_bad_records_fail_the_component(data, tmp_path):
    _, examples, model = data
    with pytest.raises(record_io.BadInputError, match=r"1 of 601 records are bad"):
        _run(tmp_path, examples, model, max_bad_fraction=0.001)


def test_missing_split_is_a_clear_error(data, tmp_path):
    _, examples, model = data
    with pytest.raises(record_io.BadInputError, match="required split 'test' is missing"):
        _run(tmp_path, examples, model, splits=json.dumps(["train", "test"]))
