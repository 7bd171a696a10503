"""Writing candidate rows as an Examples-artifact directory, atomically.

Layout (the TFX Examples artifact layout, so ImportExampleGen and our components read it):
    OUT/Split-<split>/data_tfrecord-00000-of-00001.gz   gzipped TFRecords of tf.train.Example
    OUT/report.json                                      counts per split, rejected records
    OUT/rejected.jsonl                                   one line per diverted bad input record

Everything is written under a temporary sibling directory first and renamed into place at the
end, so a failed run leaves nothing half-written at OUT.
"""
import contextlib
import json
import os
import shutil
import tempfile
from typing import Dict, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

Value = Union[int, float, str, bytes, Sequence[int], Sequence[float], Sequence[str], Sequence[bytes]]
RECORD_FILE = "data_tfrecord-00000-of-00001.gz"


class InputError(ValueError):
    """Bad arguments or input data; the message names the problem in one line."""


def _feature(value: Value) -> tf.train.Feature:
    """One tf.train.Feature from a python scalar, a list, or a numpy array (typed by its values)."""
    if isinstance(value, np.ndarray):
        values = value.reshape(-1).tolist()
    elif isinstance(value, (list, tuple)):
        values = [v.item() if isinstance(v, np.generic) else v for v in value]
    else:
        values = [value.item() if isinstance(value, np.generic) else value]
    if not values:
        raise InputError("empty feature value list")
    first = values[0]
    if isinstance(first, (bool, int)):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
    if isinstance(first, float):
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))
    return tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[v.encode() if isinstance(v, str) else bytes(v) for v in values])
    )


def make_example(row: Mapping[str, Value]) -> tf.train.Example:
    """Builds a tf.train.Example from a dict of python/numpy scalars or lists."""
    return tf.train.Example(features=tf.train.Features(feature={k: _feature(v) for k, v in row.items()}))


def check_new_output_dir(out_dir: str, overwrite: bool = False) -> None:
    """Refuses to clobber an existing non-empty directory unless overwrite is set."""
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise InputError(f"output directory {out_dir} exists and is not empty (pass --overwrite)")


def why_not_writable(path: str, error: OSError) -> str:
    """The reason a directory could not be made or written, in the user's terms: a file in the way
    (which makedirs reports as "File exists"), else the OS's words."""
    ancestor = os.path.abspath(path)
    while ancestor and not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if ancestor and os.path.isfile(ancestor):
        return f"{ancestor} is a file, not a directory"
    return error.strerror or str(error)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary directory that replaces `out_dir` only if the block succeeds."""
    check_new_output_dir(out_dir, overwrite)
    parent = os.path.dirname(os.path.abspath(out_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    except OSError as e:  # named by the user's path, not the temporary one
        raise InputError(f"output directory {out_dir} is not writable: {why_not_writable(out_dir, e)}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        if os.path.exists(out_dir):
            old = tmp + ".old"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class SplitWriter:
    """Writes serialized examples into `Split-<name>/` files of an Examples directory, in order.

    Single-process and in-order, so the bytes depend only on the input sequence.
    """

    def __init__(self, root: str, split_names: Iterable[str]):
        self._writers = {}
        self.counts: Dict[str, int] = {}
        for name in split_names:
            split_dir = os.path.join(root, f"Split-{name}")
            os.makedirs(split_dir, exist_ok=True)
            self._writers[name] = tf.io.TFRecordWriter(
                os.path.join(split_dir, RECORD_FILE), options=tf.io.TFRecordOptions(compression_type="GZIP")
            )
            self.counts[name] = 0

    def write(self, split: str, serialized: bytes) -> None:
        self._writers[split].write(serialized)
        self.counts[split] += 1

    def close(self) -> None:
        for w in self._writers.values():
            w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RejectLog:
    """Diverts bad input records to `rejected.jsonl` with a reason, and counts them per reason."""

    def __init__(self, root: str):
        self._file = open(os.path.join(root, "rejected.jsonl"), "w")
        self.counts: Dict[str, int] = {}

    def reject(self, reason: str, record: Mapping) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self._file.write(json.dumps({"reason": reason, "record": dict(record)}, default=str) + "\n")

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_report(root: str, report: Mapping) -> None:
    with open(os.path.join(root, "report.json"), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)


def read_examples(split_dir_or_glob: str) -> Iterator[tf.train.Example]:
    """Reads every tf.train.Example of a split directory (or a file glob), for tests and tools."""
    pattern = split_dir_or_glob
    if tf.io.gfile.isdir(pattern):
        pattern = os.path.join(pattern, "*.gz")
    for path in sorted(tf.io.gfile.glob(pattern)):
        for raw in tf.data.TFRecordDataset(path, compression_type="GZIP").as_numpy_iterator():
            yield tf.train.Example.FromString(raw)


PREFLIGHT_RECORDS = 10_000  # records of each file whose types `check_split_readable` checks against the schema


def _split_files(split_dir: str):
    return sorted(f for f in tf.io.gfile.glob(os.path.join(split_dir, "*")) if not tf.io.gfile.isdir(f))


def _records(path: str, batch_size: int = 4096):
    """Batches of raw records of one TFRecord file (gzip by a `.gz` name, as ImportExampleGen reads
    it); raises InputError naming the file when it does not read to its end."""
    compression = "GZIP" if path.endswith(".gz") else ""
    try:
        for batch in tf.data.TFRecordDataset(path, compression_type=compression).batch(batch_size).as_numpy_iterator():
            yield list(batch)
    except tf.errors.OpError as e:
        raise InputError(f"{path}: not a readable {'gzipped ' if compression else ''}TFRecord file "
                         f"({e.message.splitlines()[0]})") from None


class _TypeChecker:
    """Decodes raw tf.Examples with tfx_bsl's C++ decoder typed by `schema` (the features of its
    default environment): a record that is not a tf.Example, or a feature whose values are of
    another type than the schema says, is an InputError naming the file, the record and the feature."""

    def __init__(self, schema):
        from tfx_bsl.coders import example_coder

        self._schema = schema.SerializeToString()
        self._coder = example_coder
        self._decoder = self._coder.ExamplesToRecordBatchDecoder(self._schema)
        self.present = set()  # the features some checked record carries

    def check(self, path: str, first_index: int, raws) -> None:
        try:
            batch = self._decoder.DecodeBatch(raws)
            self.present.update(name for name, column in zip(batch.schema.names, batch.columns)
                                if column.null_count < len(column))
            return
        except RuntimeError:
            pass
        for i, raw in enumerate(raws):  # find the record, and the decoder's own words for it
            self._decoder = self._coder.ExamplesToRecordBatchDecoder(self._schema)  # a failed decode spoils it
            try:
                self._decoder.DecodeBatch([raw])
            except RuntimeError as e:
                text = str(e).splitlines()[0]
                if "Unable to parse" in text:
                    raise InputError(f"{path}: record {first_index + i} is not a tf.Example") from None
                text = text.split(": ", 1)[-1]  # drop the status code
                if "wrong type" in text:
                    text = text.replace("Feature had wrong type", "a feature of the wrong type")
                raise InputError(f"{path}: record {first_index + i}: {text} (schema type rule)") from None


def check_split_readable(split_dir: str, schema=None, type_check_records: Optional[int] = None,
                         required: Sequence[str] = ()) -> int:
    """Checks an Examples split directory before a pipeline reads it: it has files, every file reads
    to its end as TFRecords (gzip by a `.gz` name, as ImportExampleGen reads it), the split holds at
    least one record, and (with a `schema`) the first `type_check_records` records of each file
    (default `PREFLIGHT_RECORDS`; None in `find_type_errors` checks all) are tf.Examples whose features
    have the schema's types. Returns the number of records. Raises InputError naming the split
    directory or the file (an empty split would pass validation and fail later, in a Trainer; a
    truncated gzip file would fail in Beam with a traceback that does not name it; a float in an
    int feature would fail in StatisticsGen with three chained tracebacks). With a schema, each
    feature of `required` (the run's declared model inputs) must appear in the checked records: one
    declared in the config but absent from the data is an InputError naming it, before training."""
    files = _split_files(split_dir)
    if not files:
        raise InputError(f"split {os.path.basename(split_dir.rstrip('/'))} has no files: {split_dir}")
    limit = PREFLIGHT_RECORDS if type_check_records is None else type_check_records
    checker = _TypeChecker(schema) if schema is not None and limit else None
    records = 0
    for path in files:
        seen = 0
        for raws in _records(path):
            if checker is not None and seen < limit:
                checker.check(path, seen, raws[:limit - seen])
            seen += len(raws)
        records += seen
    if not records:
        raise InputError(f"split {os.path.basename(split_dir.rstrip('/'))} has no records: {split_dir}")
    absent = [name for name in required if checker is not None and name not in checker.present]
    if absent:
        raise InputError(f"split {os.path.basename(split_dir.rstrip('/'))} has no value of the declared feature(s) "
                         f"{', '.join(absent)} in its first {limit} records per file: {split_dir} (features.inputs "
                         f"names a feature the data does not carry)")
    return records


def check_examples_dir(examples_dir: str, schema=None, type_check_records: Optional[int] = None,
                       splits=("train", "eval"), required: Sequence[str] = ()) -> None:
    """`check_split_readable` on each split of an Examples directory."""
    for split in splits:
        check_split_readable(os.path.join(examples_dir, f"Split-{split}"), schema, type_check_records, required)


def find_type_errors(examples_dir: str, schema) -> None:
    """`check_examples_dir` over every record (after a pipeline failed on a record beyond the
    pre-flight sample): raises the InputError naming the file, record and feature."""
    check_examples_dir(examples_dir, schema, type_check_records=2 ** 62)
