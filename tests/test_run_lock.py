"""pipelines/run_lock.py: one run per output directory, stale locks taken over, a one-line refusal."""
import json
import os
import subprocess
import sys

import pytest

from cascade_ranking.pipelines import cli
from cascade_ranking.pipelines.run_lock import LOCK_FILE, OutputDirInUse, RunLock, read_lock


def _write_lock(directory, pid, host=None):
    import socket

    path = directory / LOCK_FILE
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2026-12-04T10:00:00",
                                "command": "cascade run --output-dir x"}))
    return path


def test_the_lock_is_held_for_the_run_and_released_after_it(tmp_path):
    with RunLock(str(tmp_path)) as lock:
        owner = read_lock(lock.path)
        assert owner["pid"] == os.getpid() and "command" in owner
        with pytest.raises(OutputDirInUse, match=f"pid {os.getpid()}"):
            RunLock(str(tmp_path)).acquire()
    assert not os.path.exists(tmp_path / LOCK_FILE)
    with pytest.raises(RuntimeError):  # released on an exception too
        with RunLock(str(tmp_path)):
            raise RuntimeError("the run failed")
    assert not os.path.exists(tmp_path / LOCK_FILE)


def test_a_stale_lock_of_a_killed_run_is_taken_over_and_reported(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, dead.pid)
    lines = []
    with RunLock(str(tmp_path), report=lines.append) as lock:
        assert read_lock(lock.path)["pid"] == os.getpid()
    assert len(lines) == 1 and f"pid {dead.pid}" in lines[0] and "stale" in lines[0]


def test_a_lock_from_another_host_is_refused_naming_the_host(tmp_path):
    _write_lock(tmp_path, 12345, host="other-machine")
    with pytest.raises(OutputDirInUse, match="other-machine"):
        RunLock(str(tmp_path)).acquire()


def test_a_second_cascade_run_refuses_in_one_line_naming_the_running_process(tmp_path, capsys):
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, running.pid)
        code = cli.main(["run", "--output-dir", str(tmp_path), "--requests", "20", "--beam-mode", "in_process"])
        err = capsys.readouterr().err.strip()
        assert code == cli.EXIT_BAD_INPUT
        assert len(err.splitlines()) == 1 and f"pid {running.pid}" in err and "in use" in err
        assert read_lock(str(tmp_path / LOCK_FILE))["pid"] == running.pid  # the other run's lock is left alone
    finally:
        running.kill()
