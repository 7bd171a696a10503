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
"""
import sys
import threading
import time
from typing import Callable, List, Optional, TextIO, Tuple

from tfx.orchestration.portable import cache_utils, launcher


class ComponentProgress:
    """A context manager that prints timed start/end lines for every component the runner launches."""

    def __init__(self, stream: Optional[TextIO] = None, before_launch: Optional[Callable[[], None]] = None):
        self._stream = stream or sys.stdout
        self._before_launch = before_launch  # called as each component starts, before its clock
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
            try:
                result = launch(launcher_self, *args, **kwargs)
            except BaseException:
                progress._print(f"✗ {node} failed after {time.time() - start:.1f}s")
                raise
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

    def __exit__(self, *exc) -> None:
        launcher.Launcher.launch = self._launch
        cache_utils.get_cached_outputs = self._get_cached
