"""`datasources.spans`: which span of a directory of spans a run reads, and TFX's ImportExampleGen
reading exactly that span in the pipeline's own example source (run on LocalDagRunner)."""
import os

import pytest

from cascade_ranking.datasources import spans, synthetic
from cascade_ranking.datasources.example_io import InputError

REQUESTS = 20  # per span (each span has requests in both splits)


@pytest.fixture(scope="module")
def span_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("spans") / "log")
    synthetic.write_spans(synthetic.SyntheticConfig(num_requests=REQUESTS, seed=1), out, spans=3, drift=0.3)
    return out


def test_find_spans_lists_span_directories_only(span_dir, tmp_path):
    os.makedirs(os.path.join(span_dir, "span-x"), exist_ok=True)  # not a span number: ignored
    found = spans.find_spans(span_dir)
    assert list(found) == [1, 2, 3]
    assert found[2] == os.path.join(span_dir, "span-2")
    assert spans.find_spans(str(tmp_path)) == {}
    assert spans.find_spans("gs://bucket/log") == {}


def test_the_newest_span_unless_one_is_named(span_dir, tmp_path):
    assert spans.chosen_span(span_dir, None) == 3
    assert spans.chosen_span(span_dir, 1) == 1
    assert spans.split_root(span_dir, None) == os.path.join(span_dir, "span-3")
    with pytest.raises(InputError, match=r"span 5 is not in .*: it has span\(s\) 1, 2, 3"):
        spans.chosen_span(span_dir, 5)
    flat = str(tmp_path / "flat")
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=2), flat)
    assert spans.chosen_span(flat, None) is None and spans.split_root(flat, None) == flat
    with pytest.raises(InputError, match="has no span-<number>/ directories"):
        spans.chosen_span(flat, 1)
    assert spans.chosen_span("gs://bucket/log", 4) == 4  # remote: taken as named, not listed


def test_patterns_and_range_config():
    assert spans.split_pattern("train", spanned=True) == "span-{SPAN}/Split-train/*"
    assert spans.split_pattern("eval", spanned=False) == "Split-eval/*"
    assert spans.range_config(None) is None
    static = spans.range_config(2).static_range
    assert (static.start_span_number, static.end_span_number) == (2, 2)


def _example_gen_output(config, tmp_path):
    """Runs the pipeline's example source alone on LocalDagRunner; returns (span property of its
    Examples artifact, request ids read per split)."""
    import tensorflow as tf
    from ml_metadata.metadata_store import metadata_store
    from tfx.orchestration import metadata
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner
    from tfx.orchestration.pipeline import Pipeline

    from cascade_ranking.datasources.example_io import read_examples
    from cascade_ranking.pipelines.pipeline import example_source

    connection = metadata.sqlite_metadata_connection_config(str(tmp_path / "metadata.sqlite"))
    LocalDagRunner().run(Pipeline(pipeline_name="spans", pipeline_root=str(tmp_path / "root"),
                                  components=[example_source(config)], metadata_connection_config=connection))
    [artifact] = metadata_store.MetadataStore(connection).get_artifacts_by_type("Examples")
    ids = {}
    for split in ("train", "eval"):
        pattern = os.path.join(artifact.uri, f"Split-{split}", "*")
        ids[split] = {ex.features.feature["request_id"].int64_list.value[0]
                      for path in tf.io.gfile.glob(pattern) for ex in read_examples(path)}
    return artifact.custom_properties["span"].int_value, ids


@pytest.mark.parametrize("named, expected", [(None, 3), (1, 1)])
def test_the_pipelines_example_gen_reads_exactly_the_chosen_span(span_dir, tmp_path, named, expected):
    from cascade_ranking.pipelines.config import PipelineConfig

    config = PipelineConfig(source="examples", examples_dir=span_dir, span=named, output_dir=str(tmp_path))
    config.validate()
    config.check_inputs()
    span, ids = _example_gen_output(config, tmp_path)
    assert span == expected
    assert ids["train"] and ids["eval"] and not ids["train"] & ids["eval"]
    assert ids["train"] | ids["eval"] == set(range((expected - 1) * REQUESTS, expected * REQUESTS))
