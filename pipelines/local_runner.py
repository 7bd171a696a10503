"""Local runner: the pipeline on LocalDagRunner (or BeamDagRunner), Beam components on
DirectRunner, each component's start and end printed with its time (thin on purpose)."""
import ctypes
import gc
import io
import logging
import os
import time
from typing import List, Tuple

from tfx.orchestration import metadata as tfx_metadata

from cascade_ranking.pipelines.config import PipelineConfig
from cascade_ranking.datasources import spans
from cascade_ranking.pipelines.pipeline import create_pipeline, example_source
from cascade_ranking.pipelines.progress import ComponentProgress
from cascade_ranking.pipelines.run_lock import RunLock

ORCHESTRATORS = ("local", "beam")


def collect_and_freeze_garbage() -> None:
    """Run before each component: collects what the components before it left as garbage, then
    moves every live object to Python's permanent generation (`gc.freeze`), so the collections
    during the component scan only the objects it creates. Every component runs in this one process,
    and the heap they leave (imported libraries, the graphs TF traced) made each collection slower
    as the run went on: measured on the demo, Trainer.cascade 22.8 s → 17.6 s and the pipeline
    103.0 s → 91.5 s, each collection here taking under 0.4 s. `run_with_timings` unfreezes at the end.

    Then hands the C heap's free memory back to the system when much is free (`release_free_heap`)."""
    gc.collect()
    gc.freeze()
    release_free_heap()


TRIM_FREE_BYTES = 256 * 2 ** 20  # trim the C heap when at least this much of it is free


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def release_free_heap(min_free_bytes: int = TRIM_FREE_BYTES) -> bool:
    """glibc's `malloc_trim(0)` when at least `min_free_bytes` of the C heap are free
    (`mallinfo2().fordblks`, every arena): returns those pages to the system. A component that held
    much memory (on DirectRunner a shuffle's buffer is the whole PCollection, in this process)
    leaves it free but still resident, and the components after it would be charged with it. A
    small free heap is kept: giving it back costs page faults when the next component allocates.
    (`fordblks` counts free chunks whether or not their pages were already given back, so once the
    heap has had a large free part, every later call trims: a cheap call when nothing is left.)
    False when nothing was trimmed (too little free, or no glibc here)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return False
    free = libc.mallinfo2().fordblks
    if free < min_free_bytes:
        return False
    before = _resident_bytes()
    libc.malloc_trim(0)
    logging.info("malloc_trim: %.0f MB of the C heap free; resident memory %.0f → %.0f MB", free / 2 ** 20,
                 before / 2 ** 20, _resident_bytes() / 2 ** 20)
    return True


def _resident_bytes() -> int:
    """This process's resident memory (Linux `/proc/self/statm`; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _dag_runner(orchestrator: str):
    if orchestrator == "local":
        from tfx.orchestration.local.local_dag_runner import LocalDagRunner

        return LocalDagRunner()
    if orchestrator == "beam":
        from tfx.orchestration.beam.beam_dag_runner import BeamDagRunner

        return BeamDagRunner()
    raise ValueError(f"unknown orchestrator {orchestrator!r}; choose one of {', '.join(ORCHESTRATORS)}")


def window_spans(config: PipelineConfig) -> Tuple[List[int], List[int]]:
    """(the older spans of the run's window that are in examples_dir, those that are not), oldest
    first: `import_window_spans` reads the first and names the second; both empty without a window."""
    span = config.read_span()
    if span is None or config.span_window <= 1:
        return [], []
    present = spans.find_spans(config.examples_dir)
    older = range(max(1, span - config.span_window + 1), span)
    return [s for s in older if s in present], [s for s in older if s not in present]


def import_window_spans(config: PipelineConfig, metadata_connection_config, orchestrator: str = "local",
                        report=print) -> List[Tuple[int, bool]]:
    """Reads the window's older spans into this pipeline's MLMD, where the run's `SpanWindow.examples`
    Resolver finds them: for each, a run of this pipeline's ImportExampleGen alone, on that span
    (same pipeline name, root and node id). A span an earlier run read is a cache hit; a span this
    output directory never read (a first run with a window, or spans added out of order) is read
    now. Returns (span, cached) for each."""
    from tfx.orchestration.pipeline import Pipeline

    present, absent = window_spans(config)
    if absent:
        report(f"warning: the window of span {config.read_span()} ({config.span_window} spans) lacks span(s) "
               f"{', '.join(map(str, absent))}: not in {config.examples_dir}; it trains on the spans there are")
    done = []
    for span in present:
        span_config = config.replace(span=span)
        progress = ComponentProgress(stream=io.StringIO())
        with progress:
            _dag_runner(orchestrator).run(Pipeline(
                pipeline_name=config.pipeline_name, pipeline_root=os.path.abspath(config.pipeline_root),
                components=[example_source(span_config)], enable_cache=True,
                metadata_connection_config=metadata_connection_config,
                beam_pipeline_args=config.beam_pipeline_args()))
        cached = all(hit for _, _, hit in progress.timings)
        done.append((span, cached))
        if not cached:
            report(f"span {span}: read into the window of span {config.read_span()} ({span_config.split_root()})")
    return done


def run(config: PipelineConfig, orchestrator: str = "local", show_progress: bool = True,
        check_inputs: bool = True) -> float:
    """Runs the pipeline to completion and returns its wall time in seconds."""
    seconds, _ = run_with_timings(config, orchestrator, show_progress, check_inputs)
    return seconds


def run_with_timings(config: PipelineConfig, orchestrator: str = "local", show_progress: bool = True,
                     check_inputs: bool = True) -> Tuple[float, List[Tuple[str, float, bool]]]:
    """As `run`, plus each component's (id, seconds, cached) in the order they finished. The config
    is validated and (unless `check_inputs` is False: the caller did it) its input data read first
    (`PipelineConfig.check_inputs`). The output directory is locked for the run
    (`pipelines.run_lock`): a second run into it refuses."""
    runner = _dag_runner(orchestrator)
    config.validate()
    if check_inputs:
        config.check_inputs()
    os.makedirs(config.output_dir, exist_ok=True)
    metadata = tfx_metadata.sqlite_metadata_connection_config(os.path.abspath(config.metadata_path))
    pipeline = create_pipeline(config, metadata)
    progress = ComponentProgress(stream=None if show_progress else io.StringIO(), before_launch=collect_and_freeze_garbage)
    with RunLock(config.output_dir, report=print if show_progress else lambda line: None):
        start = time.time()
        import_window_spans(config, metadata, orchestrator, report=print if show_progress else lambda line: None)
        try:
            with progress:
                runner.run(pipeline)
        finally:
            gc.unfreeze()
        return time.time() - start, progress.timings
