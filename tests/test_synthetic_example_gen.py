"""SyntheticExampleGen's executor on DirectRunner: it writes the generator's rows, split by request."""
import os

from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils, standard_artifacts, standard_component_specs
from tfx.utils import proto_utils

from cascade_ranking.components import synthetic_example_gen as gen
from cascade_ranking.datasources import example_io, synthetic


def _canonical(examples):
    return sorted(e.SerializeToString(deterministic=True) for e in examples)


def test_executor_writes_the_generated_rows_split_by_request(tmp_path):
    config = synthetic.SyntheticConfig(num_requests=30, seed=4)
    component = gen.SyntheticExampleGen(config=config)
    examples = standard_artifacts.Examples()
    examples.uri = str(tmp_path / "examples")
    exec_properties = {
        # The component spec already holds the input config as JSON, as the orchestrator passes it.
        standard_component_specs.INPUT_CONFIG_KEY: component.exec_properties[standard_component_specs.INPUT_CONFIG_KEY],
        standard_component_specs.OUTPUT_CONFIG_KEY: proto_utils.proto_to_json(example_gen_pb2.Output()),
        standard_component_specs.OUTPUT_DATA_FORMAT_KEY: example_gen_pb2.FORMAT_TF_EXAMPLE,
        standard_component_specs.OUTPUT_FILE_FORMAT_KEY: example_gen_pb2.FORMAT_TFRECORDS_GZIP,
    }
    gen.Executor().Do({}, {standard_component_specs.EXAMPLES_KEY: [examples]}, exec_properties)

    assert artifact_utils.decode_split_names(examples.split_names) == ["train", "eval"]
    # The same rows as the single-process writer (`cascade generate`), split the same way.
    reference = tmp_path / "reference"
    report = synthetic.write_dataset(config, str(reference))
    for split in ("train", "eval"):
        written = list(example_io.read_examples(os.path.join(examples.uri, f"Split-{split}")))
        expected = list(example_io.read_examples(str(reference / f"Split-{split}")))
        assert len(written) == report["rows"][split] == 50 * report["requests"][split]
        assert _canonical(written) == _canonical(expected)
        ids = {e.features.feature["request_id"].int64_list.value[0] for e in written}
        assert all(synthetic.request_split(r, gen.DEFAULT_SPLITS) == split for r in ids)
    assert report["requests"]["train"] > report["requests"]["eval"] > 0


def test_query_round_trips_the_config():
    config = synthetic.SyntheticConfig(num_requests=7, seed=9, stage_noise=(1.0, 1.0, 1.0, 1.0))
    decoded, split, buckets = gen.decode_query(gen.encode_query(config, "eval", gen.DEFAULT_SPLITS))
    assert decoded == config and split == "eval" and buckets == gen.DEFAULT_SPLITS
