"""pipelines/init_config.py: `cascade init` infers a starter schema and config from the data (TFDV)."""
import math
import os

import pytest
import tensorflow as tf
import tensorflow_data_validation as tfdv
from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2

from cascade_ranking.datasources import example_io, synthetic
from cascade_ranking.pipelines import cli
from cascade_ranking.pipelines.config import load_config
from cascade_ranking.schema import features as F


def _main(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("init") / "data"
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=40, seed=4), str(root))
    return root


def _schema(path):
    return text_format.Parse(open(path).read(), schema_pb2.Schema())


def test_init_infers_a_schema_with_the_packages_types_domains_and_environments(data, tmp_path, capsys):
    code, out, err = _main(capsys, "init", "--examples-dir", str(data), "--out", str(tmp_path / "starter"))
    assert code == 0, err
    inferred = {f.name: f for f in _schema(tmp_path / "starter" / "schema.pbtxt").feature}
    packaged = {f.name: f for f in F.load_schema().feature}
    present = set(inferred)
    assert set(F.MODEL_INPUTS) <= present and present <= set(packaged)
    for name in present:
        assert inferred[name].type == packaged[name].type, name
    assert inferred["user_dense"].float_domain.disallow_nan and inferred["item_dense"].float_domain.disallow_nan
    assert [d.size for d in inferred["user_dense"].shape.dim] == [4]  # fixed-length: parsed as FixedLenFeature
    assert not inferred["query_tokens"].HasField("shape")  # variable-length: ragged
    assert "SERVING" in inferred["click"].not_in_environment and "SERVING" in inferred["stage"].not_in_environment
    assert "SERVING" not in inferred["ui_position"].not_in_environment
    assert inferred["item_id"].int_domain.min == 0
    # The ids named are the wide-range ones, not the small categorical features or the keys.
    id_line = next(line for line in out.splitlines() if line.startswith("look like ids"))
    assert "item_id" in id_line and "user_id" in id_line
    for name in ("hour", "device", "ui_position", "ui_format", "item_category", "request_id", "request_time"):
        assert f"{name} (" not in id_line, name
    assert "every one is disallow_nan" in out and "wrote" in out.strip().splitlines()[-1]
    first = out.splitlines()[1]  # after the "computing TFDV statistics" line
    assert "teacher_logit" not in first and "true_ctr" in first  # the data's own features
    assert "declared for the pipeline's components (not in the data): propensity_score, teacher_logit" in out


def test_the_starter_config_runs_the_pipeline_inputs_check_and_the_schema_accepts_the_eval_split(data, tmp_path, capsys):
    starter = tmp_path / "starter"
    assert _main(capsys, "init", "--examples-dir", str(data), "--out", str(starter))[0] == 0
    config = load_config(str(starter / "cascade.yaml"))
    assert (config.source, config.examples_dir) == ("examples", str(data))
    assert config.schema_file == str(starter / "schema.pbtxt")
    config.validate()
    config.check_inputs()  # the pre-flight's type check with the inferred schema
    schema = _schema(config.schema_file)
    stats = tfdv.generate_statistics_from_tfrecord(str(data / "Split-eval" / "*"))
    anomalies = tfdv.validate_statistics(stats, schema, environment="TRAINING")
    assert not anomalies.anomaly_info, dict(anomalies.anomaly_info)
    # The parse specs the Trainers and serving derive from it are the packaged schema's.
    assert F.training_parse_spec(schema).keys() == {k for k in F.training_parse_spec() if k in
                                                    {f.name for f in schema.feature}}
    assert F.serving_parse_spec(schema) == F.serving_parse_spec()


def test_nan_in_a_float_feature_is_left_allowed_and_said(data, tmp_path, capsys):
    nan_data = tmp_path / "nan_data"
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=10, seed=4), str(nan_data))
    path = nan_data / "Split-train" / example_io.RECORD_FILE
    examples = list(example_io.read_examples(str(path)))
    examples[0].features.feature["item_dense"].float_list.value[2] = math.nan
    with tf.io.TFRecordWriter(str(path), options="GZIP") as w:
        for e in examples:
            w.write(e.SerializeToString())
    code, out, _ = _main(capsys, "init", "--examples-dir", str(nan_data), "--out", str(tmp_path / "s"))
    assert code == 0
    inferred = {f.name: f for f in _schema(tmp_path / "s" / "schema.pbtxt").feature}
    assert not inferred["item_dense"].float_domain.disallow_nan and inferred["user_dense"].float_domain.disallow_nan
    assert "have NaN values, left allowed (read as 0 and counted): item_dense" in out


def test_init_refuses_to_replace_files_and_names_a_bad_data_path(data, tmp_path, capsys):
    out_dir = tmp_path / "s"
    assert _main(capsys, "init", "--examples-dir", str(data), "--out", str(out_dir))[0] == 0
    code, _, err = _main(capsys, "init", "--examples-dir", str(data), "--out", str(out_dir))
    assert code == 2 and "exist (pass --overwrite)" in err and len(err.strip().splitlines()) == 1
    code, _, err = _main(capsys, "init", "--examples-dir", str(tmp_path / "none"), "--out", str(tmp_path / "t"))
    assert code == 2 and "none does not exist" in err
    assert not os.path.exists(tmp_path / "t")


def test_an_id_wider_than_its_default_buckets_gets_buckets_in_the_starter_config(tmp_path, capsys):
    wide = tmp_path / "wide"
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=20, seed=4), str(wide))
    largest = 0
    for split in ("train", "eval"):
        path = wide / f"Split-{split}" / example_io.RECORD_FILE
        examples = list(example_io.read_examples(str(path)))
        for e in examples:  # item ids up to ~50,000: five times the default 10,000 buckets
            e.features.feature["item_id"].int64_list.value[0] *= 5
            if split == "train":
                largest = max(largest, e.features.feature["item_id"].int64_list.value[0])
        with tf.io.TFRecordWriter(str(path), options="GZIP") as w:
            for e in examples:
                w.write(e.SerializeToString())
    assert _main(capsys, "init", "--examples-dir", str(wide), "--out", str(tmp_path / "s"))[0] == 0
    config = load_config(str(tmp_path / "s" / "cascade.yaml"))
    buckets = {f.name: f.num_buckets for f in config.features.sparse_features()}
    # The next power of two at or above twice the largest train id + 1: no two ids share a row.
    expected = 1
    while expected < 2 * (largest + 1):
        expected *= 2
    assert largest > 40_000 and buckets["item_id"] == expected


def test_init_infers_the_registry_of_a_log_of_another_shape(tmp_path, capsys):
    """String ids, a dense feature of width 7, up to 20 keywords, 100 candidates, no tiers: roles from
    whether a feature is constant within a request, kinds and widths from the schema."""
    from tests import own_logs

    data = own_logs.write(str(tmp_path / "own"), train_requests=6, eval_requests=2)
    code, out, err = _main(capsys, "init", "--examples-dir", data, "--out", str(tmp_path / "s"))
    assert code == 0, err
    config = load_config(str(tmp_path / "s" / "cascade.yaml"))
    declared = {f.name: f for f in config.features.inputs}
    expected = own_logs.registry()
    assert set(declared) == {f.name for f in expected.inputs}
    for f in expected.inputs:
        got = declared[f.name]
        assert (got.role, got.kind, got.dtype) == (f.role, f.kind, f.dtype), f.name
        if f.kind != "id":
            assert got.width == f.width, f.name
    assert config.features.item_key == "sku"
    assert config.ranker.bias_slice_feature == "slot" and config.teacher.bias_slice_feature == "slot"
    assert "no stage (tiers): the ground truth is the click" in out and "no ui_position" in out
    config.validate()
    config.check_inputs()


def test_init_with_lookup_vocabulary_declares_every_non_ui_id_feature_a_vocabulary(tmp_path, capsys):
    """`--lookup vocabulary`: no buckets, one OOV row (UI ids stay hashed); the report says how many ids the train split
    has; dense features are untouched; the config loads and validates."""
    from tests import own_logs

    data = own_logs.write(str(tmp_path / "own"), train_requests=6, eval_requests=2)
    code, out, err = _main(capsys, "init", "--examples-dir", data, "--out", str(tmp_path / "s"), "--lookup", "vocabulary")
    assert code == 0, err
    config = load_config(str(tmp_path / "s" / "cascade.yaml"))
    declared = {f.name: f for f in config.features.inputs}
    ids = [f.name for f in own_logs.registry().inputs if f.kind != "dense" and f.role != "ui"]
    assert sorted(f.name for f in config.features.vocabulary_features()) == sorted(ids)
    assert all(declared[n].buckets == 0 and declared[n].oov_buckets == 1 for n in ids)
    assert declared["vector"].lookup == "hash" and declared["vector"].kind == "dense"
    assert declared["slot"].lookup == "hash" and declared["slot"].buckets == 8  # UI ids stay 0..buckets−1
    skus = len({r["sku"][0] for r in own_logs.rows(6)})
    assert f"sku: item, id string, a vocabulary of the train split's ids + 1 OOV row ({skus:,} distinct in train)" in out
    assert "lookup: vocabulary" in open(tmp_path / "s" / "cascade.yaml").read()
    config.validate()
    with pytest.raises(SystemExit) as stopped:
        cli.main(["init", "--examples-dir", data, "--out", str(tmp_path / "t"), "--lookup", "table"])
    assert stopped.value.code == 2 and "invalid choice: 'table'" in capsys.readouterr().err
