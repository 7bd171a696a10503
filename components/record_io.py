"""Reading and writing Examples splits in Beam executors, with a dead-letter path for bad records.

Shared by the custom components: every executor reads raw records of the splits it needs, one by
one (`read_split`) or in blocks read by tf.data (`read_blocks`, `file_blocks`), checks them with
`ParseOrDivert` or, a block at a time, `usable_records` (records that fail to parse or miss a
required feature go to a dead-letter output instead of crashing the job, and are counted), writes
splits in the Examples layout (`write_split`, or `write_records_atomically` for one file per
block), and refuses to finish when the bad fraction passes the configured threshold
(`check_bad_fraction`).
"""
import json
import os
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type

import apache_beam as beam
import numpy as np
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


def _compression(path: str) -> str:
    return "GZIP" if path.endswith(".gz") else ""


def file_blocks(path: str, block_size: int) -> Iterable[List[bytes]]:
    """The records of one TFRecord file in blocks (lists of bytes) of `block_size`, read with tf.data's
    C++ reader: one Beam element per block instead of one per record (Beam's `ReadFromTFRecord`
    spends ~12 µs of Python per record)."""
    for _, records in named_file_blocks(path, 0, block_size):
        yield records


def named_file_blocks(path: str, file_index: int, block_size: int, part: int = 0,
                      parts: int = 1) -> Iterable[Tuple[str, List[bytes]]]:
    """`file_blocks` of one file, each with a name unique among the files of a split
    (`<file index>-<block index>`, zero-padded): the name of the output file written for it.
    With `parts` > 1, only the blocks whose index is `part` modulo `parts` (the file is read
    whole, its other blocks are skipped): `file_parts` spreads one file over several workers."""
    dataset = tf.data.TFRecordDataset(path, compression_type=_compression(path)).batch(block_size).enumerate()
    if parts > 1:
        dataset = dataset.shard(parts, part)
    for block, records in dataset.as_numpy_iterator():
        yield f"{file_index:05d}-{block:05d}", list(records)


OTHER_RUNNER_PARALLELISM = 16  # work items per stage asked for on runners that scale themselves


def beam_parallelism(beam_pipeline_args: Optional[Sequence[str]]) -> int:
    """How many workers a Beam stage can keep busy: DirectRunner's `direct_num_workers` (1 when
    in_process), or `OTHER_RUNNER_PARALLELISM` on any other runner."""
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

    options = PipelineOptions(list(beam_pipeline_args or []))
    if options.view_as(StandardOptions).runner not in (None, "DirectRunner", "direct"):
        return OTHER_RUNNER_PARALLELISM
    return max(1, options.view_as(DirectOptions).direct_num_workers or 1)


def file_parts(files: Sequence[str], parallelism: int) -> List[Tuple[int, str, int, int]]:
    """(file index, path, part, parts) work items that give `parallelism` workers some of the
    blocks of `files` each (`named_file_blocks(path, file index, size, part, parts)`): one item
    per file when there are at least as many files as workers, else each file in
    ⌈parallelism / files⌉ parts.

    This replaces a Reshuffle of the blocks themselves: on DirectRunner a Reshuffle holds every
    block of the split in memory at once (its buffer is the whole PCollection), so the memory of
    a component that reshuffled its rows grew with the data. `beam.Create` reshuffles these few
    items instead, and each worker reads its own blocks, scores and writes them as it goes."""
    parts = max(1, -(-parallelism // max(len(files), 1)))
    return [(index, path, part, parts) for index, path in enumerate(files) for part in range(parts)]


def split_files(uri: str) -> List[str]:
    """The files of one split directory, sorted; a split with none is a one-line error."""
    files = sorted(fileio.glob(io_utils.all_files_pattern(uri)))
    if not files:
        raise BadInputError(f"split directory {uri} has no files")
    return files


def read_blocks(pipeline: beam.Pipeline, uri: str, label: str, block_size: int) -> beam.PCollection:
    """Blocks (lists of raw records, at most `block_size` each) of every file of one split directory."""
    return (pipeline
            | f"Files[{label}]" >> beam.Create(split_files(uri))
            | f"ReadBlocks[{label}]" >> beam.FlatMap(file_blocks, block_size))


def read_tagged_splits(pipeline: beam.Pipeline, uris: Dict[str, str], split_names: Sequence[str]) -> beam.PCollection:
    """(split index in `split_names`, raw record) of every split, reshuffled: a split's file is read
    by one worker, and after the reshuffle the stages downstream spread over all workers."""
    records = [read_split(pipeline, uris[split], split) | f"Tag[{split}]" >> beam.Map(lambda raw, i=index: (i, raw))
               for index, split in enumerate(split_names)]
    return records | "AllSplits" >> beam.Flatten() | "Reshuffle" >> beam.Reshuffle()


class ParseOrDivert(beam.DoFn):
    """Keeps the records that parse as a tf.Example with the `required` features and diverts the
    others to the dead-letter output with the reason (`record_problem`); counts both. A kept record
    goes on as its bytes, so nothing is re-serialized downstream."""

    def __init__(self, namespace: str, required: Sequence[str] = (F.REQUEST_ID_KEY,)):
        self._required = tuple(required)
        self._good = beam.metrics.Metrics.counter(namespace, "records_parsed")
        self._bad = beam.metrics.Metrics.counter(namespace, "records_bad")

    def process(self, raw: bytes):
        problem = record_problem(raw, self._required)
        if problem:
            self._bad.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, (raw, problem))
            return
        self._good.inc()
        yield raw


def record_problem(raw: bytes, required: Sequence[str] = (F.REQUEST_ID_KEY,)) -> Optional[str]:
    """Why a record cannot be used (it does not parse as a tf.Example, or lacks a `required`
    feature), or None when it can."""
    try:
        example = tf.train.Example.FromString(raw)
    except Exception as e:  # protobuf raises DecodeError and friends
        return f"unparseable tf.Example: {type(e).__name__}"
    feature_map = example.features.feature
    missing = [name for name in required if name not in feature_map]
    return f"missing required feature(s): {', '.join(missing)}" if missing else None


def usable_records(records: Sequence[bytes], required: Sequence[str] = (F.REQUEST_ID_KEY,),
                   dtypes: Optional[Dict[str, tf.DType]] = None) -> List[Optional[str]]:
    """`record_problem` of every record of a batch, vectorised: one `tf.io.parse_example` of the
    whole batch checks that all parse and hold every `required` feature (typed by `dtypes`, int64
    by default: the pipeline's keys); only when it fails, or some list is empty, are those records
    checked one by one in Python (a present but empty feature counts as present, as
    `record_problem` says)."""
    problems: List[Optional[str]] = [None] * len(records)
    dtypes = dtypes or {}
    try:
        parsed = tf.io.parse_example(tf.constant(list(records), tf.string),
                                     {name: tf.io.VarLenFeature(dtypes.get(name, tf.int64)) for name in required})
    except (tf.errors.InvalidArgumentError, ValueError):
        return [record_problem(raw, required) for raw in records]
    empty = None
    for name in required:
        lengths = tf.math.bincount(tf.cast(parsed[name].indices[:, 0], tf.int32), minlength=len(records)).numpy()
        empty = lengths == 0 if empty is None else empty | (lengths == 0)
    for index in (empty.nonzero()[0] if empty is not None else ()):
        problems[index] = record_problem(records[index], required)
    return problems


def decode_block_or_each(raws: Sequence[bytes], decode: Callable[[List[bytes]], Any],
                         errors: Tuple[Type[BaseException], ...],
                         reason: Callable[[bytes, BaseException], str]) -> Tuple[Any, np.ndarray, Dict[int, str]]:
    """(`decode` of the records that decode, their indices in `raws`, {index: reason} of the
    others). The whole block is decoded at once; only when that raises one of `errors` is each
    record decoded alone, to tell which fail and why (`reason(raw, error)`), and the others then
    decoded together (None when none is left)."""
    try:
        return decode(list(raws)), np.arange(len(raws)), {}
    except errors:
        pass
    good, bad = [], {}
    for i, raw in enumerate(raws):
        try:
            decode([raw])
            good.append(i)
        except errors as e:
            bad[i] = reason(raw, e)
    return (decode([raws[i] for i in good]) if good else None), np.asarray(good, dtype=np.int64), bad


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


INCOMPLETE_DIR = ".incomplete"  # beside an artifact's Split-* directories: files still being written


def write_records_atomically(path: str, records: Sequence[bytes]) -> None:
    """Writes the records as one gzipped TFRecord file at `path` (a file of a Split-* directory):
    first under `<artifact>/.incomplete/`, which no split's file pattern matches, then renamed into
    place, so a reader never sees a partial file and a retried writer replaces it whole."""
    split_dir = os.path.dirname(path)
    temp_dir = os.path.join(os.path.dirname(split_dir), INCOMPLETE_DIR)
    fileio.makedirs(temp_dir)
    fileio.makedirs(split_dir)
    temp = os.path.join(temp_dir, f"{os.path.basename(split_dir)}-{os.path.basename(path)}-{uuid.uuid4().hex}")
    with tf.io.TFRecordWriter(temp, options="GZIP") as writer:
        for record in records:
            writer.write(record)
    fileio.rename(temp, path, overwrite=True)


def finish_atomic_writes(artifact_uri: str, split_uris: Iterable[str]) -> None:
    """After `write_records_atomically`: removes the temporary directory, and gives a split that got
    no file an empty one, so a reader of `Split-*/*` finds a file as with Beam's own sinks."""
    for uri in split_uris:
        if not fileio.glob(os.path.join(uri, "*")):
            write_records_atomically(os.path.join(uri, f"{EXAMPLES_FILE_PREFIX}-empty.gz"), [])
    temp_dir = os.path.join(artifact_uri, INCOMPLETE_DIR)
    if fileio.exists(temp_dir):
        fileio.rmtree(temp_dir)


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


def partition_usable(records: Sequence[bytes], required: Sequence[str] = (F.REQUEST_ID_KEY,),
                     dtypes: Optional[Dict[str, tf.DType]] = None) -> Tuple[List[bytes], List[Tuple[bytes, str]]]:
    """(the usable records, (raw, reason) of each other one for the dead letters), by `usable_records`."""
    problems = usable_records(records, required, dtypes)
    good = [raw for raw, problem in zip(records, problems) if problem is None]
    bad = [(raw, problem) for raw, problem in zip(records, problems) if problem is not None]
    return good, bad


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
