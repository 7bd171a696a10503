"""Prints each pipeline component as it starts and ends, with its wall time.

TFX's LocalDagRunner and BeamDagRunner both run every node through
`tfx.orchestration.portable.launcher.Launcher.launch`, and a node answered by the MLMD cache goes
through `cache_utils.get_cached_outputs`. `ComponentProgress` wraps those two functions for the
duration of a `with` block (restoring them on exit) and prints one line for each start and end:

    [   0.0s] ▶ SyntheticExampleGen
    [  12.4s] ✓ SyntheticExampleGen  12.4s
    [  12.4s] ▶ StatisticsGen
    [  12.5s] ✓ StatisticsGen  0.1s (cached)
    [  13.0s] ✗ Trainer.ranking failed after 0.5s

(The runners also log "Component … is running." through absl, but Keras and TF reset absl's
logging level during training, so those records cannot be relied on.)

While a Beam component runs, and the stream is a terminal, a tqdm line below its start line counts
what its outputs have written so far (`OutputMeter`: the bytes under `<pipeline_root>/<node>/`,
which grow as the Beam stages write their files), with the elapsed time and the rate:

      NegativeSampler: 41.2MB written, 00:07, 5.61MB/s

The line is erased when the component ends; text the component prints meanwhile is written above
it. The Trainers draw their own bars (`models.trainers.epoch_progress`).
"""
import os
import sys
import threading
import time
from typing import Callable, List, Optional, TextIO, Tuple

from tfx.orchestration.portable import cache_utils, launcher
from tfx.proto.orchestration import executable_spec_pb2

METER_INTERVAL = 0.5  # seconds between two updates of a running Beam component's line


def bytes_under(directory: str) -> int:
    """The size of the files under `directory` (0 when it does not exist yet)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # renamed or removed meanwhile (atomic writes)
                pass
    return total


class OutputMeter:
    """A tqdm line counting the bytes written under `directory` since the meter started, updated
    every `interval` seconds by a thread, until `stop`. Writes to the stream go through `write`
    meanwhile, which clears the line first so that nothing is printed into it."""

    def __init__(self, name: str, directory: str, stream: TextIO, interval: float = METER_INTERVAL):
        from tqdm import tqdm

        self._directory, self._interval = directory, interval
        self._base = bytes_under(directory)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._bar = tqdm(desc=f"  {name}", unit="B", unit_scale=True, unit_divisor=1024, leave=False, file=stream,
                         dynamic_ncols=True, bar_format="{desc}: {n_fmt} written, {elapsed}, {rate_fmt}")
        self._thread = threading.Thread(target=self._run, name=f"meter-{name}", daemon=True)
        self._thread.start()

    @property
    def written(self) -> int:
        return self._bar.n

    def _run(self) -> None:
        while not self._done.wait(self._interval):
            self.update()

    def update(self) -> None:
        with self._lock:
            self._bar.update(max(0, bytes_under(self._directory) - self._base - self._bar.n))

    def write(self, stream: TextIO, text: str) -> None:
        with self._lock:
            self._bar.clear()
            stream.write(text)
            stream.flush()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self.update()
        self._bar.close()


class _AboveMeter:
    """A stream proxy that writes through the running `OutputMeter` (every other attribute is the
    stream's own)."""

    def __init__(self, stream: TextIO, meter: OutputMeter):
        self._stream, self._meter = stream, meter

    def write(self, text: str) -> int:
        self._meter.write(self._stream, text)
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _is_beam_component(launcher_self) -> bool:
    return isinstance(launcher_self._executor_spec,  # pylint: disable=protected-access
                      executable_spec_pb2.BeamExecutableSpec)


def _node_directory(launcher_self, node: str) -> str:
    spec = launcher_self._pipeline_runtime_spec  # pylint: disable=protected-access
    return os.path.join(spec.pipeline_root.field_value.string_value, node)


class ComponentProgress:
    """A context manager that prints timed start/end lines for every component the runner launches."""

    def __init__(self, stream: Optional[TextIO] = None, before_launch: Optional[Callable[[], None]] = None,
                 meters: Optional[bool] = None):
        """`meters`: draw an `OutputMeter` line while each Beam component runs (default: when the
        stream is a terminal)."""
        self._stream = stream or sys.stdout
        self._before_launch = before_launch  # called as each component starts, before its clock
        self._meters = self._stream.isatty() if meters is None else meters
        self._origin = time.time()
        self._local = threading.local()
        self.timings: List[Tuple[str, float, bool]] = []  # (component, seconds, cached) in finishing order

    def _print(self, text: str) -> None:
        self._stream.write(f"[{time.time() - self._origin:7.1f}s] {text}\n")
        self._stream.flush()

    def __enter__(self) -> "ComponentProgress":
        self._launch, self._get_cached = launcher.Launcher.launch, cache_utils.get_cached_outputs
        progress, launch, get_cached = self, self._launch, self._get_cached

        def timed_launch(launcher_self, *args, **kwargs):
            node = launcher_self._pipeline_node.node_info.id  # pylint: disable=protected-access
            progress._local.cached = False
            progress._print(f"▶ {node}")
            if progress._before_launch is not None:
                progress._before_launch()
            start = time.time()
            meter = progress._start_meter(launcher_self, node)
            try:
                result = launch(launcher_self, *args, **kwargs)
            except BaseException:
                progress._stop_meter(meter)
                progress._print(f"✗ {node} failed after {time.time() - start:.1f}s")
                raise
            progress._stop_meter(meter)
            seconds, cached = time.time() - start, getattr(progress._local, "cached", False)
            progress.timings.append((node, seconds, cached))
            progress._print(f"✓ {node}  {seconds:.1f}s{' (cached)' if cached else ''}")
            return result

        def noting_cache_hits(*args, **kwargs):
            outputs = get_cached(*args, **kwargs)
            if outputs is not None:
                progress._local.cached = True
            return outputs

        launcher.Launcher.launch = timed_launch
        cache_utils.get_cached_outputs = noting_cache_hits
        return self

    def _start_meter(self, launcher_self, node: str) -> Optional[OutputMeter]:
        if not (self._meters and _is_beam_component(launcher_self)):
            return None
        meter = OutputMeter(node, _node_directory(launcher_self, node), self._stream)
        self._unmetered = sys.stdout
        if sys.stdout is self._stream:  # what the component prints goes above the line
            sys.stdout = _AboveMeter(self._stream, meter)
        return meter

    def _stop_meter(self, meter: Optional[OutputMeter]) -> None:
        if meter is None:
            return
        sys.stdout = self._unmetered
        meter.stop()

    def __exit__(self, *exc) -> None:
        launcher.Launcher.launch = self._launch
        cache_utils.get_cached_outputs = self._get_cached
