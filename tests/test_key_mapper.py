"""components/key_mapper.py: the pipeline's keys from a log's own key columns, on DirectRunner."""
import hashlib
import json
import os

import numpy as np
import tensorflow as tf
from tfx.dsl.components.base import base_beam_executor

from cascade_ranking.components import key_mapper, record_io
from cascade_ranking.datasources import example_io
from cascade_ranking.models.config import to_dict
from cascade_ranking.schema.keys import KeyConfig
from tests.component_fixtures import examples_artifact


def _run(tmp_path, rows_by_split, keys):
    for split, rows in rows_by_split.items():
        os.makedirs(tmp_path / "in" / f"Split-{split}")
        with tf.io.TFRecordWriter(str(tmp_path / "in" / f"Split-{split}" / example_io.RECORD_FILE), options="GZIP") as w:
            for row in rows:
                w.write(row if isinstance(row, bytes) else example_io.make_example(row).SerializeToString())
    dead = record_io.DeadLetters()
    dead.uri = str(tmp_path / "dead")
    out = examples_artifact(str(tmp_path / "out"), splits=())
    context = base_beam_executor.BaseBeamExecutor.Context(beam_pipeline_args=[], tmp_dir=str(tmp_path / "tmp"))
    key_mapper.Executor(context).Do(
        {"examples": [examples_artifact(str(tmp_path / "in"))]}, {"output_examples": [out], "dead_letters": [dead]},
        {"keys": json.dumps(to_dict(keys)), "splits": json.dumps(sorted(rows_by_split)), "max_bad_fraction": 0.5})
    mapped = {split: list(example_io.read_examples(str(tmp_path / "out" / f"Split-{split}" / "*")))
              for split in rows_by_split}
    letters = [json.loads(line) for path in tf.io.gfile.glob(str(tmp_path / "dead" / "*.jsonl")) for line in open(path)]
    return mapped, letters, record_io.read_metrics(str(tmp_path / "out"))


def test_string_keys_hash_to_int64_labels_become_clicks_and_rows_keep_their_columns(tmp_path):
    rows = {"train": [{"session": b"s-1", "clicked": 1.0, "ts": 7, "sku": b"a"},
                      {"session": b"s-1", "clicked": 0.0, "ts": 7, "sku": b"b"},
                      {"session": b"s-2", "clicked": 0.0, "ts": 9, "sku": b"c"}],
            "eval": [{"session": b"s-3", "clicked": 2.0, "ts": 11, "sku": b"d"},
                     {"clicked": 1.0, "ts": 12, "sku": b"e"}]}  # no request key: a dead letter
    mapped, letters, counters = _run(tmp_path, rows, KeyConfig(request_id="session", click="clicked", request_time="ts"))

    def expected_id(key: bytes) -> int:  # an independent computation of the documented rule
        return int(hashlib.blake2b(key, digest_size=8).hexdigest(), 16) % 2 ** 63

    got = sorted((e.features.feature["sku"].bytes_list.value[0], e.features.feature["request_id"].int64_list.value[0],
                  e.features.feature["click"].int64_list.value[0], e.features.feature["request_time"].int64_list.value[0],
                  e.features.feature["session"].bytes_list.value[0])
                 for split in mapped for e in mapped[split])
    assert got == [(b"a", expected_id(b"s-1"), 1, 7, b"s-1"), (b"b", expected_id(b"s-1"), 0, 7, b"s-1"),
                   (b"c", expected_id(b"s-2"), 0, 9, b"s-2"), (b"d", expected_id(b"s-3"), 1, 11, b"s-3")]
    assert len(mapped["train"]) == 3 and len(mapped["eval"]) == 1  # splits kept
    assert [letter["reason"] for letter in letters] == ["missing key feature(s): session"]
    assert counters["records_parsed"] == 4 and counters["records_bad"] == 1 and counters["string_keys_hashed"] == 4
    assert np.all(np.array([r[1] for r in got]) >= 0)


def test_int_keys_pass_through_and_no_time_column_is_time_0(tmp_path):
    rows = {"train": [{"req": 42, "y": 1, "sku": b"a"}], "eval": [{"req": 43, "y": 0, "sku": b"b"}]}
    mapped, letters, counters = _run(tmp_path, rows, KeyConfig(request_id="req", click="y", request_time=""))
    (train,), (evals,) = mapped["train"], mapped["eval"]
    assert train.features.feature["request_id"].int64_list.value[0] == 42
    assert evals.features.feature["click"].int64_list.value[0] == 0
    assert train.features.feature["request_time"].int64_list.value[0] == 0
    assert not letters and counters.get("string_keys_hashed", 0) == 0


def test_a_schema_without_the_pipelines_keys_is_one_line_naming_them(tmp_path):
    """The KeyMapper adds request_id, click and request_time: the run's schema must declare them
    (`cascade init` does); one that does not is refused before the run, naming them."""
    import pytest
    from google.protobuf import text_format

    from cascade_ranking.datasources.example_io import InputError
    from cascade_ranking.pipelines.config import PipelineConfig
    from cascade_ranking.schema import features as F

    schema = F.load_schema().__deepcopy__()
    kept = [f for f in schema.feature if f.name not in ("request_id", "request_time")]
    del schema.feature[:]
    schema.feature.extend(kept)
    path = tmp_path / "schema.pbtxt"
    path.write_text(text_format.MessageToString(schema))
    config = PipelineConfig(schema_file=str(path), keys=KeyConfig(request_id="session", click="click"))
    with pytest.raises(InputError, match=r"lacks the key feature\(s\) request_id, request_time the pipeline reads "
                                         r"\(the KeyMapper adds them from keys request_id='session'"):
        config.local_schema()
