"""The run log: library output and tracebacks go to a file, the console keeps what a user needs.

`RunLog(output_dir)` is a context manager around a pipeline run. Inside it, Python logging (absl,
TensorFlow, TFX, Beam), Python warnings, and everything written to file descriptor 2 (TensorFlow's
C++ log, the stderr of Beam's worker processes) are written to `<output_dir>/logs/run.log` (the
previous run's log is renamed `run-<its last write, UTC>.log`). Standard output stays on the console: the progress lines, Keras's per-epoch lines and
the results. With `verbose` (`cascade run -v`) the library output is shown on the console as well.
An exception leaving the block is written to the log with its whole traceback chain.

`explain_failure` turns a failed run into one line and an exit code:
  * a user error (bad data or arguments: `USER_ERRORS` anywhere in the exception chain, or a
    feature of the wrong type, which a full scan of the input then names by file, record and
    feature) exits `EXIT_USER_ERROR` (2) with the error's own first line;
  * anything else is an internal error: exit 1, its type and first line, and where the traceback is.
Either way the console gets one line; the traceback is in the log.
"""
import datetime
import logging
import os
import sys
import tempfile
import traceback
from typing import Iterator, Optional

from absl import logging as absl_logging

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
LOG_DIR = "logs"
LOG_FILE = "run.log"  # this run's log; an earlier run's is renamed run-<its last write, UTC>.log
# What a wrong-typed feature looks like when it fails inside a component (tfx_bsl's decoder, Arrow).
TYPE_ERROR_MARKERS = ("Feature had wrong type", "ArrowTypeError", "ArrowInvalid", "Unable to merge",
                      "Unable to parse example")


class RunFailed(Exception):
    """A failed run, explained in one line (`str`) with the exit code the CLI returns."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def check_writable(output_dir: str) -> None:
    """Raises InputError naming `output_dir` (the user's path, not a temporary one) when it cannot be
    created or written."""
    from cascade_ranking.datasources.example_io import InputError, why_not_writable

    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise InputError(f"output dir {output_dir} is not writable: {why_not_writable(output_dir, e)}") from None


class StartupOutput:
    """Holds what file descriptor 2 receives inside the block (TensorFlow's C++ runtime logs its
    start-up to it when first imported) in `text`, for the run log, instead of the console."""

    def __enter__(self) -> "StartupOutput":
        sys.stderr.flush()
        self._buffer = tempfile.TemporaryFile(mode="w+b")
        self._saved_fd = os.dup(2)
        os.dup2(self._buffer.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc) -> None:
        sys.stderr.flush()
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        self._buffer.seek(0)
        self.text = self._buffer.read().decode(errors="replace")
        self._buffer.close()


class RunLog:
    """Sends a run's library output and tracebacks to a log file (see the module docstring);
    `startup` is written first (`StartupOutput.text`)."""

    def __init__(self, output_dir: str, startup: str = "", verbose: bool = False):
        """`verbose` (`cascade run -v`): the library output stays on the console too: logging goes
        to the console and the file, and file descriptor 2 (C++ logs, Beam workers) is left alone."""
        self.path = os.path.abspath(os.path.join(output_dir, LOG_DIR, LOG_FILE))
        self._startup = startup
        self._verbose = verbose

    def __enter__(self) -> "RunLog":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if os.path.exists(self.path):  # the previous run's log keeps its own name
            stamp = datetime.datetime.fromtimestamp(os.path.getmtime(self.path), datetime.timezone.utc)
            os.replace(self.path, os.path.join(os.path.dirname(self.path), f"run-{stamp:%Y%m%d-%H%M%S}.log"))
        self._file = open(self.path, "a", buffering=1)
        self._file.write(self._startup)
        root = logging.getLogger()
        self._handlers, self._level = root.handlers[:], root.level
        for handler in self._handlers:
            root.removeHandler(handler)
        self._handler = logging.StreamHandler(self._file)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(self._handler)
        self._console = None
        if self._verbose:
            self._console = logging.StreamHandler(sys.stderr)
            self._console.setFormatter(self._handler.formatter)
            root.addHandler(self._console)
        root.setLevel(logging.INFO)
        # absl's own verbosity too: TF's SavedModel writer sets absl's verbosity to FATAL and back to
        # the verbosity flag's value (WARNING unless set), which silenced every absl INFO record of
        # the run (the Trainers' own lines among them) from the first export on.
        self._absl_verbosity = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.INFO)
        logging.captureWarnings(True)
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        if not self._verbose:
            os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self._file.write("".join(traceback.format_exception(exc_type, exc, tb)))
        self._file.flush()
        sys.stderr.flush()
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        logging.captureWarnings(False)
        root = logging.getLogger()
        root.removeHandler(self._handler)
        if self._console is not None:
            root.removeHandler(self._console)
        for handler in self._handlers:
            root.addHandler(handler)
        root.setLevel(self._level)
        absl_logging.set_verbosity(self._absl_verbosity)
        self._file.close()


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def explain_failure(error: BaseException, config, log_path: str) -> RunFailed:
    """One line and an exit code for a run that raised `error` (see the module docstring)."""
    from cascade_ranking.components.anomaly_gate import DataAnomaliesError
    from cascade_ranking.components.record_io import BadInputError
    from cascade_ranking.datasources.example_io import InputError, find_type_errors
    from cascade_ranking.pipelines.run_lock import OutputDirInUse

    user_errors = (DataAnomaliesError, BadInputError, InputError, OutputDirInUse)
    for link in _chain(error):
        if isinstance(link, user_errors):
            where = ""
            if isinstance(link, DataAnomaliesError) and config.source == "examples":
                where = f" (data: {config.examples_dir})"
            return RunFailed(f"{_first_line(link)}{where} (log: {log_path})", EXIT_USER_ERROR)
    text = "\n".join(str(link) for link in _chain(error))
    if any(marker in text for marker in TYPE_ERROR_MARKERS) and config.source == "examples":
        try:
            find_type_errors(config.examples_dir, config.local_schema())
        except InputError as found:
            return RunFailed(f"{found} (log: {log_path})", EXIT_USER_ERROR)
    return RunFailed(f"internal error: {type(error).__name__}: {_first_line(error)} (traceback: {log_path})",
                     EXIT_INTERNAL_ERROR)


def last_log(output_dir: str) -> Optional[str]:
    """The newest run log of an output dir (`logs/run.log`), if any."""
    path = os.path.join(output_dir, LOG_DIR, LOG_FILE)
    return path if os.path.exists(path) else None
