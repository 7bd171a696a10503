"""pipelines/run_log.py: library output and tracebacks go to the run log; a failure is one line."""
import logging
import os

from cascade_ranking.pipelines import cli, local_runner, run_log


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

    monkeypatch.setattr(local_runner, "run", broken)
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

    monkeypatch.setattr(local_runner, "run", refusing)
    code = cli.main(["run", "--requests", "5", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("cascade run: error: NegativeSampler: 9 of 10 records were diverted (log: ")
