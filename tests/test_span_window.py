"""`components.span_window` and the pipeline's rolling window of spans: the SpanWindow executor on
hand-made Examples artifacts, then `cascade run --window 2` on span 2 of a fresh output directory
(span 1 read into MLMD first, `local_runner.import_window_spans`), checked on the run's artifacts."""
import json
import os

import ml_metadata as mlmd
import pytest
import tensorflow as tf
from tfx.orchestration import metadata
from tfx.types import artifact_utils, standard_artifacts

from cascade_ranking.components import span_window
from cascade_ranking.components.record_io import BadInputError
from cascade_ranking.datasources import example_io, spans, synthetic
from cascade_ranking.models.config import to_dict
from cascade_ranking.pipelines import cli, local_runner
from cascade_ranking.pipelines.config import ConfigError

from tests.test_warm_start_strategy import _config


def _write(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for record in records:
            writer.write(record)


def _examples(tmp_path, artifact_id, span, rows_per_split=2):
    """An Examples artifact of `span` whose records are b"<span>/<id>/<split>/<i>" (one file a split)."""
    artifact = standard_artifacts.Examples()
    artifact.id, artifact.uri = artifact_id, str(tmp_path / f"examples{artifact_id}")
    artifact.split_names = artifact_utils.encode_split_names(["train", "eval"])
    artifact.set_int_custom_property("span", span)
    artifact.set_string_custom_property("payload_format", "FORMAT_TF_EXAMPLE")
    for split in ("train", "eval"):
        path = os.path.join(artifact.uri, f"Split-{split}", "data_tfrecord-00000-of-00001.gz")
        _write(path, [f"{span}/{artifact_id}/{split}/{i}".encode() for i in range(rows_per_split)])
    return artifact


def _records(artifact, split):
    files = tf.io.gfile.glob(os.path.join(artifact_utils.get_split_uri([artifact], split), "*"))
    return sorted(r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP"))


def _run_window(tmp_path, current, window_examples, window):
    output = standard_artifacts.Examples()
    output.uri = str(tmp_path / "window")
    span_window.Executor().Do({"examples": [current], "window_examples": window_examples},
                              {"output_examples": [output]}, {"span": span_window.artifact_span(current),
                                                              "window": window})
    return output


def test_train_is_the_window_s_spans_and_eval_the_run_s_span(tmp_path):
    span1, span2, span2_again, span3 = (_examples(tmp_path, 1, 1), _examples(tmp_path, 2, 2),
                                        _examples(tmp_path, 5, 2), _examples(tmp_path, 3, 3))
    # What the Resolver hands over: every span in range, span 2 read twice (a new version: id 5), and
    # the run's own span; span 1 is outside a window of 2 ending at 3.
    output = _run_window(tmp_path, span3, [span3, span2_again, span2, span1], window=2)
    assert _records(output, "train") == sorted(_records(span2_again, "train") + _records(span3, "train"))
    assert _records(output, "eval") == _records(span3, "eval")
    assert output.get_int_custom_property("span") == 3
    assert output.get_string_custom_property(span_window.WINDOW_SPANS) == "2,3"
    assert output.get_string_custom_property("payload_format") == "FORMAT_TF_EXAMPLE"
    assert artifact_utils.decode_split_names(output.split_names) == ["train", "eval"]
    with open(os.path.join(output.uri, "window.json")) as f:
        record = json.load(f)
    assert record["spans"] == [2, 3] and record["missing"] == [] and record["sources"]["2"] == span2_again.uri


def test_a_span_not_read_is_named_missing_and_a_wrong_current_span_refused(tmp_path):
    span1, span3 = _examples(tmp_path, 1, 1), _examples(tmp_path, 3, 3)
    output = _run_window(tmp_path, span3, [span3, span1], window=3)
    assert output.get_string_custom_property(span_window.WINDOW_SPANS) == "1,3"
    assert json.load(open(os.path.join(output.uri, "window.json")))["missing"] == [2]
    with pytest.raises(BadInputError, match="SpanWindow of span 2 got the Examples of span 3"):
        span_window.Executor().Do({"examples": [span3]}, {"output_examples": [standard_artifacts.Examples()]},
                                  {"span": 2, "window": 2})
    unspanned = standard_artifacts.Examples()
    unspanned.uri = "x"
    with pytest.raises(BadInputError, match="records no span"):
        span_window.artifact_span(unspanned)


def test_window_config_is_checked(tmp_path):
    log = str(tmp_path / "log")
    synthetic.write_spans(synthetic.SyntheticConfig(num_requests=4, seed=1), log, spans=3)
    config = _config(log, str(tmp_path / "out"), 3)
    with pytest.raises(ConfigError, match="span_window must be >= 1"):
        config.replace(span_window=0).validate()
    with pytest.raises(ConfigError, match="only source 'examples'"):
        config.replace(source="synthetic", span=None, span_window=2).validate()
    flat = str(tmp_path / "flat")
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=4), flat)
    with pytest.raises(ConfigError, match="has no span-<number>/ directories"):
        config.replace(examples_dir=flat, span=None, span_window=2).validate()
    assert local_runner.window_spans(config.replace(span_window=2))[0] == [2]
    assert local_runner.window_spans(config.replace(span_window=5))[0] == [1, 2]
    assert local_runner.window_spans(config.replace(span=1, span_window=5))[0] == []
    assert local_runner.window_spans(config)[0] == []
    os.rename(os.path.join(log, "span-2"), os.path.join(log, "span-2-moved"))  # a gap in the log
    assert local_runner.window_spans(config.replace(span_window=3)) == ([1], [2])
    static = spans.window_range_config(2, 4).static_range
    assert (static.start_span_number, static.end_span_number) == (2, 4)


def _request_ids(uri):
    return {ex.features.feature["request_id"].int64_list.value[0] for ex in example_io.read_examples(uri)}


@pytest.mark.slow
def test_cascade_run_with_a_window_trains_on_both_spans_and_evaluates_on_the_newest(tmp_path, capsys):
    """`cascade run --span 2 --window 2` into a fresh output directory, on the user's spans (a
    config file, as a user gives one)."""
    log, out = str(tmp_path / "log"), str(tmp_path / "out")
    synthetic.write_spans(synthetic.SyntheticConfig(num_requests=60, seed=2), log, spans=3, drift=0.3)
    config = _config(log, out, None).replace(warm_start=False)
    config_file = str(tmp_path / "config.json")
    with open(config_file, "w") as f:
        json.dump({k: v for k, v in to_dict(config).items() if k not in ("source", "examples_dir", "span", "output_dir")},
                  f)
    assert cli.main(["run", "--config", config_file, "--source", "examples", "--examples-dir", log, "--span", "2",
                     "--window", "2", "--output-dir", out]) == 0
    printed = capsys.readouterr().out
    assert f"span 1: read into the window of span 2 ({os.path.join(log, 'span-1')})" in printed

    store = mlmd.MetadataStore(metadata.sqlite_metadata_connection_config(os.path.abspath(config.metadata_path)))
    imported = sorted(a.custom_properties["span"].int_value for a in store.get_artifacts_by_type("Examples")
                      if "/ImportExampleGen/" in a.uri)
    assert imported == [1, 2]  # span 1 read first, then the run's span; span 3 (newer) never
    [window] = [a for a in store.get_artifacts_by_type("Examples") if "/SpanWindow/" in a.uri]
    assert window.custom_properties[span_window.WINDOW_SPANS].string_value == "1,2"
    assert window.custom_properties["span"].int_value == 2
    # The Trainers read the window: the teacher's examples are the window's rows.
    context = store.get_context_by_type_and_name("node", f"{config.pipeline_name}.Trainer.teacher")
    [execution] = store.get_executions_by_context(context.id)
    read = [e.artifact_id for e in store.get_events_by_execution_ids([execution.id])
            if e.type == mlmd.proto.Event.INPUT and e.path.steps[0].key == "examples"]
    assert read == [window.id]
    train, evaluation = (_request_ids(os.path.join(window.uri, f"Split-{s}")) for s in ("train", "eval"))
    span_ids = {s: {split: _request_ids(os.path.join(log, f"span-{s}", f"Split-{split}")) for split in ("train", "eval")}
                for s in (1, 2)}
    assert train == span_ids[1]["train"] | span_ids[2]["train"]
    assert evaluation == span_ids[2]["eval"]
    # The NegativeSampler's request lists of the train split hold requests of both spans.
    [lists] = [a for a in store.get_artifacts_by_type("Examples") if "/NegativeSampler/request_lists/" in a.uri]
    listed = {ex.features.feature["request_id"].int64_list.value[0]
              for ex in example_io.read_examples(os.path.join(lists.uri, "Split-train"))}
    assert listed & span_ids[1]["train"] and listed & span_ids[2]["train"]


def test_the_kubeflow_compile_refuses_a_window(tmp_path):
    from cascade_ranking.pipelines.pipeline import create_pipeline

    log = str(tmp_path / "log")
    synthetic.write_spans(synthetic.SyntheticConfig(num_requests=4, seed=1), log, spans=2)
    with pytest.raises(ConfigError, match="span_window > 1 runs on the local runners only"):
        create_pipeline(_config(log, str(tmp_path / "out"), 2).replace(span_window=2), kubeflow=True)
