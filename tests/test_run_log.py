"""pipelines/run_log.py: library output and tracebacks go to the run log; a failure is one line."""
import logging
import os
import re
import subprocess
import sys

import pytest

from cascade_ranking.pipelines import cli, local_runner, run_log


def test_each_run_writes_logs_run_log_and_keeps_the_previous_one_under_its_time(tmp_path):
    with run_log.RunLog(str(tmp_path)) as first:
        logging.getLogger("absl").warning("first run")
    os.utime(first.path, (1_700_000_000, 1_700_000_000))  # 2023-11-14 22:13:20 UTC
    with run_log.RunLog(str(tmp_path)) as second:
        logging.getLogger("absl").warning("second run")
    assert first.path == second.path == str(tmp_path / "logs" / "run.log")
    assert sorted(os.listdir(tmp_path / "logs")) == ["run-20231114-221320.log", "run.log"]
    assert "second run" in open(second.path).read() and "first run" not in open(second.path).read()
    assert "first run" in open(tmp_path / "logs" / "run-20231114-221320.log").read()


def test_the_run_log_takes_logging_and_fd_2_and_gives_them_back(tmp_path):
    root = logging.getLogger()
    handlers = root.handlers[:]
    with run_log.RunLog(str(tmp_path), startup="startup line\n") as log:
        logging.getLogger("absl").warning("library noise")
        os.write(2, b"C++ runtime line\n")
    text = open(log.path).read()
    assert text.startswith("startup line\n") and "library noise" in text and "C++ runtime line" in text
    assert root.handlers == handlers  # restored
    assert os.path.dirname(log.path) == str(tmp_path / run_log.LOG_DIR)


def test_absl_info_records_still_reach_the_log_after_a_savedmodel_export(tmp_path):
    """TF's SavedModel writer resets absl's verbosity to the flag's value; inside the run log that
    value is INFO, so the Trainers' absl lines after an export are not lost."""
    import tensorflow as tf
    from absl import logging as absl_logging

    with run_log.RunLog(str(tmp_path)) as log:
        absl_logging.info("before the export")
        module = tf.Module()
        module.f = tf.function(lambda x: x + 1, input_signature=[tf.TensorSpec([], tf.float32)])
        tf.saved_model.save(module, str(tmp_path / "model"))
        absl_logging.info("after the export")
    text = open(log.path).read()
    assert "before the export" in text and "after the export" in text


def test_the_console_gets_no_library_output_by_default_and_all_of_it_with_verbose(tmp_path, capfd):
    """At the file-descriptor level (what a terminal shows): the default run log keeps logging and
    fd 2 off the console; `verbose` (`cascade run -v`) shows both and still writes the log file."""
    handlers = logging.getLogger().handlers[:]
    with run_log.RunLog(str(tmp_path / "quiet")) as quiet:
        logging.getLogger("tensorflow").warning("library warning")
        os.write(2, b"E external/local_xla/cuda_dnn.cc: factory\n")
        print("progress line", flush=True)
    out, err = capfd.readouterr()
    assert out == "progress line\n" and err == ""
    assert "library warning" in open(quiet.path).read() and "cuda_dnn.cc" in open(quiet.path).read()

    with run_log.RunLog(str(tmp_path / "verbose"), verbose=True) as verbose:
        logging.getLogger("tensorflow").warning("library warning")
        os.write(2, b"E external/local_xla/cuda_dnn.cc: factory\n")
    out, err = capfd.readouterr()
    assert "library warning" in err and "cuda_dnn.cc" in err
    assert "library warning" in open(verbose.path).read()
    assert logging.getLogger().handlers == handlers  # the console and file handlers are gone again


def test_an_exception_leaving_the_block_is_written_with_its_traceback(tmp_path):
    try:
        with run_log.RunLog(str(tmp_path)) as log:
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    text = open(log.path).read()
    assert "Traceback" in text and "RuntimeError: boom" in text


def test_an_internal_error_is_one_line_with_exit_1_and_the_traceback_in_the_log(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("no_such_column")

    monkeypatch.setattr(local_runner, "run_with_timings", broken)
    code = cli.main(["run", "--requests", "5", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == run_log.EXIT_INTERNAL_ERROR == 1
    assert len(err) == 1 and err[0].startswith("cascade run: error: internal error: KeyError: 'no_such_column' (traceback: ")
    log = run_log.last_log(str(tmp_path / "out"))
    assert log in err[0] and "Traceback" in open(log).read()


def test_a_user_error_inside_the_pipeline_is_exit_2_with_its_own_first_line(tmp_path, capsys, monkeypatch):
    from cascade_ranking.components.record_io import BadInputError

    def refusing(*args, **kwargs):
        try:
            raise BadInputError("NegativeSampler: 9 of 10 records were diverted\nsecond line")
        except BadInputError as e:
            raise RuntimeError("wrapped by the runner") from e

    monkeypatch.setattr(local_runner, "run_with_timings", refusing)
    code = cli.main(["run", "--requests", "5", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("cascade run: error: NegativeSampler: 9 of 10 records were diverted (log: ")


# What library noise looks like on a console: TensorFlow's C++ log lines, Beam's worker log records
# relayed by the job service, Python warnings and absl/TF Python log records.
NOISE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] |[IWEF]\d{4} \d\d:\d\d:\d\d|WARNING:|INFO:|ERROR:)"
                   r"|Worker: severity|local_job_service|Warning: |cuda|python-snappy")


@pytest.mark.slow
def test_a_multi_processing_run_prints_no_library_noise_and_logs_it(tmp_path):
    """`cascade run` as a user starts it (its own process, Beam DirectRunner in multi_processing with
    2 worker processes, tiny synthetic data): stdout and stderr hold the progress, the epochs and the
    results, and no line of TensorFlow's C++ log, Beam's worker log or Python warnings; those go to
    the run log the console names."""
    out_dir = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "cascade_ranking.pipelines.cli", "run", "--requests", "300", "--epochs", "1",
         "--beam-mode", "multi_processing", "--workers", "2", "--output-dir", str(out_dir), "--serve-check"],
        capture_output=True, text=True, timeout=1200, cwd=str(tmp_path),
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"})  # even with TensorFlow's C++ log fully on
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines() + done.stderr.splitlines()
    noise = [line for line in lines if NOISE.search(line)]
    assert not noise, noise[:5]
    assert "Beam multi_processing" in done.stdout and "e2e recall" in done.stdout
    epochs = [re.match(r"  (teacher|cascade|retrieval) epoch \d+/\d+: \d+ steps, ", line) for line in lines]
    assert {m.group(1) for m in epochs if m} == {"teacher", "cascade", "retrieval"}  # a short line per Trainer epoch
    assert max(len(line) for line, m in zip(lines, epochs) if m) < 120
    log_path = re.search(r"library log: (\S+)", done.stdout).group(1)
    assert log_path == str(out_dir / run_log.LOG_DIR / run_log.LOG_FILE)
    log = open(log_path).read()
    assert "apache_beam" in log  # Beam's records went to the log, not away
    # The run ends with its serve-check and the path of its report.html, which holds what the
    # console printed.
    *_, checked, last = done.stdout.strip().splitlines()
    assert re.fullmatch(r"serve-check passed: [123] models", checked)  # what this tiny run pushed
    assert last == f"Report: {out_dir / 'report.html'}"
    timings = [(node, float(seconds), cached == " (cached)") for node, seconds, cached in
               re.findall(r"^\[ *[\d.]+s\] ✓ (\S+)  ([\d.]+)s( \(cached\))?$", done.stdout, re.M)]
    config = cli.run_config(cli.build_parser().parse_args(["run", "--requests", "300", "--output-dir", str(out_dir)]))
    from tests.test_html_report import check_report_of_run
    from cascade_ranking.pipelines import report
    page = check_report_of_run(str(out_dir / "report.html"), report.collect(config), timings)
    assert re.search(rf"e2e recall \(quotas [\d/]+\) +{page['tables']['table'][1][1]} ", done.stdout)
    served = page["tables"]["served"]
    assert served[0] == ["stage", "path", "pushed by this run", "serve-check"]
    assert len(served) - 1 == len(report.served_models(config)) == int(checked.split()[2])
    assert all(row[3].startswith("passed: warmup ") and "serving_default → " in row[3] for row in served[1:])
