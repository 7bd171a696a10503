"""SpanWindow: the rows a run trains on when it trains on a rolling window of spans (issue 17).

A run on span k with `span_window: N` trains on spans k−N+1 … k and evaluates on span k alone:

    ImportExampleGen (span k) ─┐
    SpanWindow.examples (Resolver, TFX `SpanRangeStrategy`, static range [k−N+1, k] over every
        span ImportExampleGen has read into this pipeline's MLMD) ─► SpanWindow ─► one Examples
        artifact: Split-train = the train files of every span of the window, Split-eval = span k's

Every component after it (statistics, Trainers, sampler, evaluators) reads that one Examples
artifact as it would read one span, so none of them needs to know about windows; the window's
provenance is in MLMD (the Resolver's inputs) and on the artifact (custom property
`window_spans`, e.g. "3,4,5"; `span` is k).

The files are not decoded: a split is a set of TFRecord files, so the window's train split is the
union of the spans' files, each hard-linked (a local pipeline root: no copy, no disk) or copied
(`tfx.dsl.io.fileio`: GCS, S3) under `span-<s>-<file name>`. Of a span read more than once (its
files changed: a new version), the newest artifact is taken. Spans the Resolver did not find are
left out: `pipelines.local_runner.import_window_spans` reads the window's older spans into MLMD
before a local run.

Contract: request ids are unique across the spans of a window, as in a log whose request ids are
global. The NegativeSampler groups a request's rows by request_id, so two spans' requests with the
same id would be one list.

Written by hand: TFX's ExampleGen reads one span per artifact (a RangeConfig's static range must
start and end at the same span), and its components read one Examples artifact.
"""
import json
import os
from typing import Any, Dict, List

from tfx import types
from tfx.components.example_gen import utils as example_gen_utils
from tfx.dsl.components.base import base_component, base_executor, executor_spec
from tfx.dsl.io import fileio
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from cascade_ranking.components import record_io

SPAN = example_gen_utils.SPAN_PROPERTY_NAME
WINDOW_SPANS = "window_spans"  # custom property of the output: the spans of its train split, "3,4,5"
TRAIN_SPLIT = "train"


def artifact_span(examples: types.Artifact) -> int:
    """The span an ExampleGen recorded on its Examples artifact (custom property `span`)."""
    if not examples.has_custom_property(SPAN):
        raise record_io.BadInputError(f"Examples artifact {examples.uri} records no span: it was not read from spans")
    value = examples.get_string_custom_property(SPAN)  # older TFX wrote it as a string
    return int(value) if value else examples.get_int_custom_property(SPAN)


def newest_per_span(artifacts: List[types.Artifact]) -> Dict[int, types.Artifact]:
    """span → its newest Examples artifact (the largest MLMD id: the latest version read)."""
    chosen: Dict[int, types.Artifact] = {}
    for artifact in artifacts:
        span = artifact_span(artifact)
        if span not in chosen or artifact.id > chosen[span].id:
            chosen[span] = artifact
    return dict(sorted(chosen.items()))


def link_or_copy(source: str, destination: str) -> None:
    """A hard link on a local file system (no bytes copied); `fileio.copy` elsewhere or when the
    link fails (another device)."""
    if "://" not in source and "://" not in destination:
        try:
            os.link(source, destination)
            return
        except OSError:
            pass
    fileio.copy(source, destination, overwrite=True)


class SpanWindowSpec(ComponentSpec):
    PARAMETERS = {
        "span": ExecutionParameter(type=int),  # the run's span: the newest of the window
        "window": ExecutionParameter(type=int),  # N: spans span−N+1 … span
    }
    INPUTS = {
        "examples": ChannelParameter(type=standard_artifacts.Examples),  # the run's span (ImportExampleGen's)
        "window_examples": ChannelParameter(type=standard_artifacts.Examples, optional=True),  # the Resolver's
    }
    OUTPUTS = {"output_examples": ChannelParameter(type=standard_artifacts.Examples)}


class Executor(base_executor.BaseExecutor):
    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        current = artifact_utils.get_single_instance(input_dict["examples"])
        span, window = int(exec_properties["span"]), int(exec_properties["window"])
        if artifact_span(current) != span:
            raise record_io.BadInputError(f"SpanWindow of span {span} got the Examples of span {artifact_span(current)}")
        spans = newest_per_span([a for a in input_dict.get("window_examples", [])
                                 if span - window < artifact_span(a) < span])
        spans[span] = current
        output = artifact_utils.get_single_instance(output_dict["output_examples"])
        split_names = artifact_utils.decode_split_names(current.split_names)
        output.split_names = artifact_utils.encode_split_names(split_names)
        for split in split_names:
            target = artifact_utils.get_split_uri([output], split)
            fileio.makedirs(target)
            for s, artifact in (spans.items() if split == TRAIN_SPLIT else [(span, current)]):
                for path in record_io.split_files(artifact_utils.get_split_uri([artifact], split)):
                    link_or_copy(path, os.path.join(target, f"span-{s}-{os.path.basename(path)}"))
        for name in ("payload_format", "file_format"):
            if current.has_custom_property(name):
                output.set_string_custom_property(name, current.get_string_custom_property(name))
        output.set_int_custom_property(SPAN, span)
        output.set_string_custom_property(WINDOW_SPANS, ",".join(map(str, spans)))
        missing = sorted(set(range(max(1, span - window + 1), span + 1)) - set(spans))
        with fileio.open(os.path.join(output.uri, "window.json"), "w") as f:
            f.write(json.dumps({"span": span, "window": window, "spans": list(spans), "missing": missing,
                                "sources": {str(s): a.uri for s, a in spans.items()}}, indent=1))


class SpanWindow(base_component.BaseComponent):
    """One Examples artifact of the run's span (its eval split) and the window's spans (train)."""

    SPEC_CLASS = SpanWindowSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(Executor)

    def __init__(self, examples: types.BaseChannel, window_examples: types.BaseChannel, span: int, window: int):
        super().__init__(spec=SpanWindowSpec(
            examples=examples, window_examples=window_examples, span=span, window=window,
            output_examples=types.Channel(type=standard_artifacts.Examples)))
