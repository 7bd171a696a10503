"""`cascade run` on bad input and faults, as a new user meets them (issue "No silent loss").

One case per row of the matrix, each in-process at a tiny scale through `pipelines.cli.main`:
  * errors (exit 2): the last console line names the problem (the file, the split, the feature
    and the rule), no traceback reaches the console (it is in the run log), and nothing was used:
    no model was trained or pushed;
  * counted diverts and changes (exit 0): one run on data carrying all of them at once; each is
    counted in the run's data counts (the CascadeEvaluator's evaluation), printed in the counts
    block and named by the run's data line (the last before the report's path), and rows read = rows used + rows diverted;
  * serving: the pipeline's pushed models reject out-of-domain UI values and NaN, naming the feature.
"""
import glob
import io
import json
import os
import re
import socket
import subprocess
import sys

from contextlib import redirect_stderr, redirect_stdout

import pytest
import tensorflow as tf
from google.protobuf import text_format

from cascade_ranking.datasources import example_io, synthetic
from cascade_ranking.pipelines import cli, report
from cascade_ranking.pipelines.config import PipelineConfig
from cascade_ranking.pipelines.run_lock import LOCK_FILE
from cascade_ranking.schema import features as F

pytestmark = pytest.mark.slow

REQUESTS = 12  # the error cases: 600 rows


def _dataset(root, requests=REQUESTS, seed=1):
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=requests, seed=seed), str(root))
    return root


def _file(data, split):
    return data / f"Split-{split}" / example_io.RECORD_FILE


def _read(data, split):
    return list(example_io.read_examples(str(_file(data, split))))


def _write(path, records):
    with tf.io.TFRecordWriter(str(path), options="GZIP") as w:
        for record in records:
            w.write(record if isinstance(record, bytes) else record.SerializeToString())


def _mutate(data, split, change):
    """Rewrites a split file with `change(examples)` applied (it edits them in place or returns records)."""
    examples = _read(data, split)
    out = change(examples)
    _write(_file(data, split), examples if out is None else out)


def _set(example, name, values):
    """Replaces a feature's values, typed by the python values (float, int or bytes)."""
    example.features.feature[name].CopyFrom(example_io._feature(values))


def _cascade(capsys, *argv):
    try:
        code = cli.main(list(argv))
    except SystemExit as exit:  # argparse's one-line errors
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _run_args(data, out, *extra):
    return ("run", "--source", "examples", "--examples-dir", str(data), "--output-dir", str(out),
            "--beam-mode", "in_process", "--epochs", "1", *extra)


def _schema_without_disallow_nan(path, features):
    schema = F.load_schema().__deepcopy__()
    for feature in schema.feature:
        if feature.name in features:
            feature.float_domain.ClearField("disallow_nan")
    path.write_text(text_format.MessageToString(schema))
    return path


# ---- errors: exit 2, one line naming the problem ----------------------------------------------
def _missing_examples_dir(data, tmp):
    return ("run", "--source", "examples", "--examples-dir", str(tmp / "nowhere"), "--output-dir", str(tmp / "out")), \
        [r"data path .*nowhere does not exist"]


def _missing_split_dir(data, tmp):
    for f in (data / "Split-eval").iterdir():
        f.unlink()
    (data / "Split-eval").rmdir()
    return _run_args(data, tmp / "out"), [r"Split-eval does not exist"]


def _empty_split_dir(data, tmp):
    _file(data, "eval").unlink()
    return _run_args(data, tmp / "out"), [r"split Split-eval has no files: .*Split-eval"]


def _split_without_records(data, tmp):
    _write(_file(data, "eval"), [])
    return _run_args(data, tmp / "out"), [r"split Split-eval has no records: .*Split-eval"]


def _truncated_gzip(data, tmp):
    content = _file(data, "eval").read_bytes()
    _file(data, "eval").write_bytes(content[: len(content) // 2])
    return _run_args(data, tmp / "out"), [re.escape(str(_file(data, "eval"))), "not a readable gzipped TFRecord"]


def _corrupt_tfrecord(data, tmp):
    path = data / "Split-train" / "extra.gz"
    path.write_bytes(os.urandom(4096))
    return _run_args(data, tmp / "out"), [re.escape(str(path)), "not a readable gzipped TFRecord"]


def _not_a_tf_example(data, tmp):
    _mutate(data, "train", lambda examples: [e.SerializeToString() for e in examples[:3]] + [b"\x0a\x05hello"]
            + [e.SerializeToString() for e in examples[3:]])
    return _run_args(data, tmp / "out"), [re.escape(str(_file(data, "train"))), "record 3 is not a tf.Example"]


def _float_in_int_feature(data, tmp):
    _mutate(data, "train", lambda examples: _set(examples[7], "item_category", [2.5]))
    return _run_args(data, tmp / "out"), [re.escape(str(_file(data, "train"))), "record 7",
                                          "item_category", "expected int64_list, found float_list"]


def _string_in_float_feature(data, tmp):
    _mutate(data, "eval", lambda examples: _set(examples[2], "user_dense", [b"a", b"b", b"c", b"d"]))
    return _run_args(data, tmp / "out"), [re.escape(str(_file(data, "eval"))), "record 2", "user_dense",
                                          "expected float_list, found bytes_list"]


def _float_in_int_feature_beyond_the_preflight_sample(data, tmp, monkeypatch):
    """The pre-flight reads the first records of each file only: a wrong type further in fails in
    StatisticsGen, and the run then scans the input to name the file, record and feature."""
    monkeypatch.setattr(example_io, "PREFLIGHT_RECORDS", 5)
    _mutate(data, "train", lambda examples: _set(examples[300], "item_category", [2.5]))
    return _run_args(data, tmp / "out"), [re.escape(str(_file(data, "train"))), "record 300", "item_category"]


def _missing_schema_file(data, tmp):
    return _run_args(data, tmp / "out", "--schema-file", str(tmp / "none.pbtxt")), [r"schema file .*none.pbtxt does not exist"]


def _unparseable_schema_file(data, tmp):
    (tmp / "bad.pbtxt").write_text("feature { name: 'x' type: NOT_A_TYPE }")
    return _run_args(data, tmp / "out", "--schema-file", str(tmp / "bad.pbtxt")), [r"bad.pbtxt is not a TFMD schema"]


def _schema_file_without_the_pipelines_features(data, tmp):
    schema = F.load_schema().__deepcopy__()
    keep = [f for f in schema.feature if f.name not in ("sample_weight", "teacher_logit")]
    del schema.feature[:]
    schema.feature.extend(keep)
    (tmp / "mine.pbtxt").write_text(text_format.MessageToString(schema))
    return _run_args(data, tmp / "out", "--schema-file", str(tmp / "mine.pbtxt")), [
        r"mine.pbtxt lacks the optional features the pipeline's components add and read: teacher_logit, sample_weight"]


def _more_diverted_than_the_max_bad_fraction(data, tmp):
    """A request of train also written to eval: its 51 rows are diverted, 8 % of the 601 rows."""
    first = _read(data, "train")[0].features.feature["request_id"].int64_list.value[0]
    moved = [e for e in _read(data, "train") if e.features.feature["request_id"].int64_list.value[0] == first]
    _mutate(data, "eval", lambda examples: examples + moved[:1])
    return _run_args(data, tmp / "out", "--max-bad-fraction", "0.05"), [
        r"NegativeSampler: 51 of 601 records were diverted \(8.49% > 5.00%: candidates_diverted_split 51\)"]


def _unwritable_output_dir(data, tmp):
    (tmp / "a_file").write_text("")
    return _run_args(data, tmp / "a_file" / "out"), [re.escape(f"output dir {tmp / 'a_file' / 'out'} is not writable: "
                                                               f"{tmp / 'a_file'} is a file, not a directory")]


def _generate_into_unwritable_out(data, tmp):
    (tmp / "a_file").write_text("")
    return ("generate", "--out", str(tmp / "a_file" / "data"), "--requests", "5"), [
        re.escape(f"output directory {tmp / 'a_file' / 'data'} is not writable: {tmp / 'a_file'} is a file")]


def _bad_flag_value(data, tmp):
    return _run_args(data, tmp / "out", "--nonclick-keep-rate", "2"), [r"--nonclick-keep-rate: expected a keep rate in \(0, 1\], got 2"]


def _unknown_activation(data, tmp):
    return _run_args(data, tmp / "out", "--activation", "tanhh"), [r"tanhh"]


def _output_dir_in_use(data, tmp):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (tmp / "out").mkdir()
    (tmp / "out" / LOCK_FILE).write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname(),
                                                     "started": "2026-12-05T00:00:00", "command": "cascade run"}))
    _output_dir_in_use.process = alive
    return _run_args(data, tmp / "out"), [rf"in use by .*pid {alive.pid}"]


ERROR_CASES = {
    "missing_examples_dir": _missing_examples_dir,
    "missing_split_dir": _missing_split_dir,
    "empty_split_dir": _empty_split_dir,
    "split_without_records": _split_without_records,
    "truncated_gzip": _truncated_gzip,
    "corrupt_tfrecord": _corrupt_tfrecord,
    "not_a_tf_example": _not_a_tf_example,
    "float_in_int_feature": _float_in_int_feature,
    "string_in_float_feature": _string_in_float_feature,
    "missing_schema_file": _missing_schema_file,
    "unparseable_schema_file": _unparseable_schema_file,
    "schema_file_without_the_pipelines_features": _schema_file_without_the_pipelines_features,
    "unwritable_output_dir": _unwritable_output_dir,
    "more_diverted_than_the_max_bad_fraction": _more_diverted_than_the_max_bad_fraction,
    "generate_into_unwritable_out": _generate_into_unwritable_out,
    "bad_flag_value": _bad_flag_value,
    "unknown_activation": _unknown_activation,
    "output_dir_in_use": _output_dir_in_use,
}


def _assert_one_line_error(code, out, err, patterns, out_dir, trained_before=()):
    """`trained_before`: Trainers that run before the failing component (the teacher precedes the
    sampler); no stage model may be trained or pushed."""
    assert code == cli.EXIT_BAD_INPUT, (code, out[-2000:], err[-2000:])
    last = err.strip().splitlines()[-1]
    for pattern in patterns:
        assert re.search(pattern, last), (pattern, last)
    assert "Traceback" not in out + err
    assert not glob.glob(os.path.join(str(out_dir), "serving", "*", "*")), "a model was pushed"
    trained = {path.split(os.sep)[-3] for path in glob.glob(os.path.join(str(out_dir), "pipeline_root", "Trainer.*", "model", "*"))}
    assert trained <= set(trained_before), f"a model was trained: {trained}"


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_an_error_is_one_line_naming_the_problem_and_exit_2(case, tmp_path, capsys):
    data = _dataset(tmp_path / "data")
    argv, patterns = ERROR_CASES[case](data, tmp_path)
    try:
        code, out, err = _cascade(capsys, *argv)
    finally:
        if case == "output_dir_in_use":
            _output_dir_in_use.process.kill()
    _assert_one_line_error(code, out, err, patterns, tmp_path / "out",
                           trained_before=("Trainer.teacher",) if case == "more_diverted_than_the_max_bad_fraction" else ())


def test_a_wrong_type_beyond_the_preflight_sample_is_named_after_statistics_gen_fails(tmp_path, capsys, monkeypatch):
    data = _dataset(tmp_path / "data")
    argv, patterns = _float_in_int_feature_beyond_the_preflight_sample(data, tmp_path, monkeypatch)
    code, out, err = _cascade(capsys, *argv)
    _assert_one_line_error(code, out, err, patterns, tmp_path / "out")
    assert "✗ StatisticsGen failed" in out  # the pipeline started: the pre-flight did not see it
    logs = glob.glob(str(tmp_path / "out" / "logs" / "run.log"))
    assert len(logs) == 1 and "Traceback" in open(logs[0]).read()  # the traceback went to the run log
    assert os.path.basename(logs[0]) in err.strip().splitlines()[-1]


# ---- anomalies: the pipeline stops at the AnomalyGate, naming every feature and its kind ---------
def _nan_in_dense(examples):
    _set(examples[4], "user_dense", [0.1, float("nan"), 0.3, 0.4])


def _ui_position_out_of_domain(examples):
    _set(examples[4], "ui_position", [99])


def _click_out_of_domain(examples):
    _set(examples[4], "click", [2])


def _unknown_stage_tier(examples):
    _set(examples[4], "stage", [b"top_pick"])


def _missing_required_feature(examples):
    del examples[4].features.feature["click"]


def _negative_id(examples):
    _set(examples[4], "item_id", [-5])


def _wrong_value_count(examples):
    _set(examples[4], "user_dense", [0.1, 0.2, 0.3])


def _unknown_extra_feature(examples):
    for e in examples:
        _set(e, "campaign_id", [7])


def _several_anomalies(examples):
    _ui_position_out_of_domain(examples)
    _set(examples[9], "hour", [30])
    _nan_in_dense(examples)


ANOMALY_CASES = {  # case: (change, the feature and kind each named on the last line)
    "nan_in_dense_feature": (_nan_in_dense, [r"user_dense: [^;]*NaN"]),
    "ui_position_out_of_domain": (_ui_position_out_of_domain, [r"ui_position: Out-of-range values"]),
    "click_out_of_domain": (_click_out_of_domain, [r"click: Out-of-range values"]),
    "unknown_stage_tier": (_unknown_stage_tier, [r"stage: Unexpected string values"]),
    "missing_required_feature": (_missing_required_feature, [r"click: [^;]*present in fewer examples than expected"]),
    "negative_id": (_negative_id, [r"item_id: Out-of-range values"]),
    "wrong_value_count": (_wrong_value_count, [r"user_dense: [^;]*(value|shape)"]),
    "unknown_extra_feature": (_unknown_extra_feature, [r"campaign_id: New column"]),
    "several_anomalies": (_several_anomalies, [r"ui_position: Out-of-range", r"hour: Out-of-range", r"user_dense: "]),
}


@pytest.mark.parametrize("case", sorted(ANOMALY_CASES))
def test_anomalous_data_stops_the_run_naming_every_feature_and_its_kind(case, tmp_path, capsys):
    data = _dataset(tmp_path / "data")
    change, patterns = ANOMALY_CASES[case]
    _mutate(data, "train", change)
    code, out, err = _cascade(capsys, *_run_args(data, tmp_path / "out"))
    _assert_one_line_error(code, out, err, [r"data anomalies, training stopped", *patterns,
                                            re.escape(f"(data: {data})")], tmp_path / "out")
    assert "✗ AnomalyGate failed" in out


# ---- counted diverts and changes: one run carrying them all -------------------------------------
DIVERT_REQUESTS = 200  # 10,000 rows: the diverted rows below stay under the 1 % bad fraction


@pytest.fixture(scope="module")
def divert_run(tmp_path_factory):
    """One run on data with an over-long request, a request spanning the splits, ids above the
    buckets, a request without ground truth and NaN in a feature the given schema allows, into an
    output dir holding the stale lock of a killed run. Returns (exit code, console, result, data)."""
    tmp = tmp_path_factory.mktemp("diverts")
    data = _dataset(tmp / "data", requests=DIVERT_REQUESTS, seed=3)
    train = _read(data, "train")
    by_request = {}
    for e in train:
        by_request.setdefault(e.features.feature["request_id"].int64_list.value[0], []).append(e)
    ids = sorted(by_request)
    long_request, no_gt_request, spanning_request, odd_request = ids[:4]
    extra = []
    for k in range(40):  # the over-long request: 50 + 40 = 90 candidates for 60 slots
        e = tf.train.Example()
        e.CopyFrom(by_request[long_request][-1])
        _set(e, "item_id", [9_000 + k])
        _set(e, "ui_position", [0])
        _set(e, "click", [0])
        _set(e, "stage", [b"prerank_neg"])
        extra.append(e)
    for e in by_request[no_gt_request]:
        if e.features.feature["stage"].bytes_list.value[0] == b"rerank_pos":
            _set(e, "stage", [b"rerank_neg"])
    for e in by_request[odd_request][:5]:
        _set(e, "item_id", [10_000 + 17 * e.features.feature["item_id"].int64_list.value[0]])  # above the buckets
    for e in by_request[odd_request][5:8]:
        _set(e, "item_dense", [0.5, float("nan"), 0.5, float("nan")])  # 6 NaN values, allowed by the schema below
    _write(_file(data, "train"), train + extra)
    eval_rows = _read(data, "eval")
    _write(_file(data, "eval"), eval_rows + [by_request[spanning_request][0]])  # one row of a train request
    schema = _schema_without_disallow_nan(tmp / "schema.pbtxt", {"item_dense"})
    out = tmp / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                             "started": "2026-12-05T00:00:00", "command": "cascade run"}))
    stdout, stderr = io.StringIO(), io.StringIO()  # capsys is function-scoped: the module's run is captured here
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = cli.main(list(_run_args(data, out, "--schema-file", str(schema))))
    rows_in = len(train) + len(extra) + len(eval_rows) + 1
    return {"code": code, "out": stdout.getvalue(), "err": stderr.getvalue(), "rows_in": rows_in, "output_dir": out,
            "result": report.collect(PipelineConfig(output_dir=str(out)))}


DIVERT_CASES = {  # case: (where in the data counts, expected value, what the console names)
    "overlong_request": (("rows_diverted", "candidates_truncated"), 30, r"30 rows cut from over-long requests"),
    "request_spanning_splits": (("rows_diverted", "candidates_diverted_split"), 51,
                                r"51 rows of requests spanning splits"),
    "ids_above_the_buckets": (("ids_folded", "item_id", "ids"), 5, r"5 ids of item_id folded into its 10,000 buckets"),
    "request_without_ground_truth": (("requests_without_ground_truth", "train"), 1, r"1 requests without ground truth"),
    "nan_allowed_by_the_schema": (("nan_values_read_as_0", "item_dense"), 6, r"6 NaN values of item_dense read as 0"),
}


@pytest.mark.parametrize("case", sorted(DIVERT_CASES))
def test_a_divert_or_change_is_counted_printed_and_named_by_the_last_line(case, divert_run):
    out, err = divert_run["out"], divert_run["err"]
    assert divert_run["code"] == 0, err[-3000:]
    path, expected, named = DIVERT_CASES[case]
    counts = divert_run["result"]["evaluation"]["data_counts"]
    value = counts
    for key in path:
        value = value[key]
    assert value == expected
    *_, data_line, report_line = out.strip().splitlines()  # the data line, then the report's path
    assert "Data counts" in out and re.search(named, data_line), out[-1500:]
    assert report_line.startswith("Report: ") and report_line.endswith("report.html")
    assert counts["rows_read"] == divert_run["rows_in"] == counts["rows_used"] + sum(counts["rows_diverted"].values())
    assert "Traceback" not in out + err


def test_a_stale_lock_of_a_killed_run_is_taken_over_and_said(divert_run):
    assert divert_run["code"] == 0 and "taking over the stale lock of a run that no longer runs" in divert_run["out"]


# ---- serving: the run's stage models reject what the schema excludes ----------------------------
def _stage_models(output_dir):
    """The SavedModels the run trained for each stage (pushed or not: the gates are not the point here)."""
    root = os.path.join(str(output_dir), "pipeline_root")
    return {"ranking": glob.glob(os.path.join(root, "Trainer.cascade", "model", "*", "Format-Serving"))[0],
            "preranking": glob.glob(os.path.join(root, "Trainer.cascade", "model", "*", "stages", "preranking"))[0],
            "retrieval": glob.glob(os.path.join(root, "Trainer.retrieval", "model", "*", "Format-Serving"))[0]}


def _eval_row(output_dir):
    path = glob.glob(os.path.join(str(output_dir), "pipeline_root", "NegativeSampler", "shown_rows", "*",
                                  "Split-eval", "*"))[0]
    raw = next(iter(tf.data.TFRecordDataset(path, compression_type="GZIP").as_numpy_iterator()))
    return tf.train.Example.FromString(raw)


@pytest.mark.parametrize("feature,value,named", [
    ("ui_position", [99], "ui_position has a value outside its schema domain"),
    ("ui_format", [5], "ui_format has a value outside its schema domain"),
    ("user_dense", [0.1, float("nan"), 0.3, 0.4], "user_dense has a NaN value"),
])
def test_the_runs_stage_models_reject_out_of_domain_values_naming_the_feature(divert_run, feature, value, named):
    """The run's schema allows NaN in item_dense only: user_dense keeps disallow_nan."""
    good = _eval_row(divert_run["output_dir"])
    bad = _eval_row(divert_run["output_dir"])
    _set(bad, feature, value)
    for stage, path in _stage_models(divert_run["output_dir"]).items():
        serve = tf.saved_model.load(path).signatures["serving_default"]
        serve(examples=tf.constant([good.SerializeToString()]))  # a good row serves
        if stage == "retrieval" and feature.startswith("ui_"):
            continue  # the query tower reads no UI feature
        with pytest.raises(tf.errors.InvalidArgumentError, match=named):
            serve(examples=tf.constant([bad.SerializeToString()]))
