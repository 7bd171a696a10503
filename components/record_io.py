"""Reading and writing Examples splits in Beam executors, with a dead-letter path for bad records.

Shared by the custom components: every executor reads raw records of the splits it needs
(`read_split`), parses them with `ParseOrDivert` (records that fail to parse or miss a required
feature go to a dead-letter output instead of crashing the job, and are counted), writes splits
in the Examples layout (`write_split`), and refuses to finish when the bad fraction passes the
configured threshold (`check_bad_fraction`).
"""
import json
import os
from typing import Dict, Iterable, Sequence

import apache_beam as beam
import tensorflow as tf
from tfx import types
from tfx.dsl.io import fileio
from tfx.types import artifact_utils
from tfx.types.artifact import Artifact
from tfx.utils import io_utils

from cascade_ranking.schema import features as F

EXAMPLES_FILE_PREFIX = "data_tfrecord"
DEAD_LETTER_TAG = "dead_letter"
METRICS_FILE = "metrics.json"
DEFAULT_MAX_BAD_FRACTION = 0.01


class DeadLetters(Artifact):
    """Records a component could not use: the raw bytes and the reason, one JSON line each."""

    TYPE_NAME = "cascade.DeadLetters"  # <namespace>.<title>, the form KFP v2 artifact schemas need


class BadInputError(ValueError):
    """The input does not meet the component's contract (one-line message)."""


def required_split_uris(examples: Sequence[types.Artifact], splits: Iterable[str]) -> Dict[str, str]:
    """Split name → URI, failing with a clear message when a required split is missing."""
    artifact = artifact_utils.get_single_instance(list(examples))
    available = artifact_utils.decode_split_names(artifact.split_names)
    uris = {}
    for split in splits:
        if split not in available:
            raise BadInputError(
                f"Examples artifact {artifact.uri} has splits {available}; the required split {split!r} is missing"
            )
        uris[split] = artifact_utils.get_split_uri([artifact], split)
    return uris


def read_split(pipeline: beam.Pipeline, uri: str, label: str) -> beam.PCollection:
    """Raw records (bytes) of every file of one split directory."""
    return pipeline | f"Read[{label}]" >> beam.io.ReadFromTFRecord(
        io_utils.all_files_pattern(uri), coder=beam.coders.BytesCoder()
    )


def read_tagged_splits(pipeline: beam.Pipeline, uris: Dict[str, str], split_names: Sequence[str]) -> beam.PCollection:
    """(split index in `split_names`, raw record) of every split, reshuffled: a split's file is read
    by one worker, and after the reshuffle the stages downstream spread over all workers."""
    records = [read_split(pipeline, uris[split], split) | f"Tag[{split}]" >> beam.Map(lambda raw, i=index: (i, raw))
               for index, split in enumerate(split_names)]
    return records | "AllSplits" >> beam.Flatten() | "Reshuffle" >> beam.Reshuffle()


class ParseOrDivert(beam.DoFn):
    """Keeps the records that parse as a tf.Example with the `required` features and diverts the
    others to the dead-letter output with the reason; counts both. A kept record goes on as the
    element it came in as — its bytes, or `(key, bytes)` with `keyed=True` — so nothing is
    re-serialized downstream."""

    def __init__(self, namespace: str, required: Sequence[str] = (F.REQUEST_ID_KEY,), keyed: bool = False):
        self._required = tuple(required)
        self._keyed = keyed
        self._good = beam.metrics.Metrics.counter(namespace, "records_parsed")
        self._bad = beam.metrics.Metrics.counter(namespace, "records_bad")

    def process(self, element):
        raw = element[1] if self._keyed else element
        try:
            example = tf.train.Example.FromString(raw)
        except Exception as e:  # protobuf raises DecodeError and friends
            self._bad.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, (raw, f"unparseable tf.Example: {type(e).__name__}"))
            return
        missing = [name for name in self._required if name not in example.features.feature]
        if missing:
            self._bad.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, (raw, f"missing required feature(s): {', '.join(missing)}"))
            return
        self._good.inc()
        yield element


def _dead_letter_json(item) -> str:
    raw, reason = item
    return json.dumps({"reason": reason, "record_hex": raw.hex()})


def write_dead_letters(pcoll: beam.PCollection, uri: str, label: str) -> None:
    """Writes (raw, reason) pairs as `dead_letters-<label>-*.jsonl` in `uri`. The labels of one
    pipeline must not be prefixes of each other ("records" and "records-train"): a text sink
    deletes the files that match its own pattern when it finalizes."""
    _ = (
        pcoll
        | f"DeadLetterJson[{label}]" >> beam.Map(_dead_letter_json)
        | f"WriteDeadLetters[{label}]" >> beam.io.WriteToText(os.path.join(uri, f"dead_letters-{label}"), file_name_suffix=".jsonl")
    )


def write_split(pcoll: beam.PCollection, uri: str, label: str) -> None:
    """Writes serialized examples (bytes) as gzipped TFRecords in the Examples layout."""
    _ = pcoll | f"Write[{label}]" >> beam.io.WriteToTFRecord(
        os.path.join(uri, EXAMPLES_FILE_PREFIX), file_name_suffix=".gz", coder=beam.coders.BytesCoder()
    )


def query_counters(result: beam.runners.runner.PipelineResult, namespace: str) -> Dict[str, int]:
    """Committed values of every Beam counter of a namespace (summed over steps)."""
    counters: Dict[str, int] = {}
    for counter in result.metrics().query(beam.metrics.MetricsFilter().with_namespace(namespace))["counters"]:
        name = counter.key.metric.name
        counters[name] = counters.get(name, 0) + int(counter.committed or counter.attempted or 0)
    return counters


def run_and_count(pipeline: beam.Pipeline, namespace: str) -> Dict[str, int]:
    """Runs the pipeline to completion and returns its counters of `namespace`."""
    result = pipeline.run()
    result.wait_until_finish()
    return query_counters(result, namespace)


def record_counters(artifact: types.Artifact, counters: Dict[str, int]) -> None:
    """Saves the counters as `metrics.json` in the artifact and as its int custom properties."""
    write_metrics(artifact.uri, counters)
    for name, value in counters.items():
        artifact.set_int_custom_property(name, value)


def check_bad_fraction(counters: Dict[str, int], max_bad_fraction: float, what: str) -> None:
    bad = counters.get("records_bad", 0)
    total = bad + counters.get("records_parsed", 0)
    if total and bad / total > max_bad_fraction:
        raise BadInputError(
            f"{what}: {bad} of {total} records are bad ({bad / total:.2%} > {max_bad_fraction:.2%}); "
            "see the dead-letter output"
        )


def write_metrics(uri: str, counters: Dict[str, int]) -> None:
    fileio.makedirs(uri)
    with fileio.open(os.path.join(uri, METRICS_FILE), "w") as f:
        f.write(json.dumps(counters, indent=2, sort_keys=True))


def read_metrics(uri: str) -> Dict[str, int]:
    """The counters `write_metrics` saved in an artifact ({} when it saved none)."""
    path = os.path.join(uri, METRICS_FILE)
    if not fileio.exists(path):
        return {}
    with fileio.open(path, "r") as f:
        return json.loads(f.read())
