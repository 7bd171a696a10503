"""record_io: the vectorised record check agrees with the one-record check; atomic block writes."""
import os

import tensorflow as tf

from cascade_ranking.components import record_io
from cascade_ranking.datasources import example_io


def _example(**int_features) -> bytes:
    example = tf.train.Example()
    for name, values in int_features.items():
        example.features.feature[name].int64_list.value.extend(values)
    return example.SerializeToString()


def test_usable_records_agrees_with_record_problem_on_every_kind_of_record():
    good = [_example(request_id=[i], item_id=[i]) for i in range(5)]
    no_request = _example(item_id=[1])
    empty_request = _example(request_id=[], item_id=[2])  # present but empty: present, as in record_problem
    garbage = b"\x08\x96\x01 not an Example"
    bytes_request = tf.train.Example()
    bytes_request.features.feature["request_id"].bytes_list.value.append(b"r1")  # parses one by one only
    batches = {
        "all good": good,
        "one missing": good + [no_request],
        "one empty": good + [empty_request],
        "garbage": [garbage] + good,
        "bytes key": good + [bytes_request.SerializeToString()],
    }
    for name, batch in batches.items():
        expected = [record_io.record_problem(raw) for raw in batch]
        assert record_io.usable_records(batch) == expected, name
    assert record_io.record_problem(no_request) == "missing required feature(s): request_id"
    assert record_io.record_problem(empty_request) is None
    assert record_io.record_problem(garbage).startswith("unparseable tf.Example")
    assert sum(p is None for p in record_io.usable_records(batches["one missing"])) == 5


def test_decode_block_or_each_decodes_a_good_block_once_and_tells_each_bad_record():
    calls = []

    def decode(block):
        calls.append(len(block))
        if any(raw.startswith(b"bad") for raw in block):
            raise ValueError(f"cannot decode {len(block)}")
        return [raw.upper() for raw in block]

    def reason(raw, error):
        return f"{raw!r}: {error}"

    decoded, rows, bad = record_io.decode_block_or_each([b"a", b"b"], decode, (ValueError,), reason)
    assert (decoded, rows.tolist(), bad, calls) == ([b"A", b"B"], [0, 1], {}, [2])
    calls.clear()
    decoded, rows, bad = record_io.decode_block_or_each([b"a", b"bad1", b"c", b"bad2"], decode, (ValueError,), reason)
    assert decoded == [b"A", b"C"] and rows.tolist() == [0, 2]
    assert bad == {1: "b'bad1': cannot decode 1", 3: "b'bad2': cannot decode 1"}
    assert calls == [4, 1, 1, 1, 1, 2]  # the block, each record, then the good ones together
    decoded, rows, bad = record_io.decode_block_or_each([b"bad"], decode, (ValueError,), reason)
    assert decoded is None and rows.tolist() == [] and list(bad) == [0]


def test_atomic_writes_leave_whole_files_and_an_empty_file_for_an_empty_split(tmp_path):
    artifact = tmp_path / "examples"
    train, eval_ = str(artifact / "Split-train"), str(artifact / "Split-eval")
    records = [_example(request_id=[i]) for i in range(3)]
    record_io.write_records_atomically(os.path.join(train, "data_tfrecord-00000-00000.gz"), records)
    record_io.write_records_atomically(os.path.join(train, "data_tfrecord-00000-00000.gz"), records)  # a retry
    os.makedirs(eval_)
    assert os.listdir(artifact / record_io.INCOMPLETE_DIR) == []
    record_io.finish_atomic_writes(str(artifact), [train, eval_])
    assert sorted(os.listdir(artifact)) == ["Split-eval", "Split-train"]
    assert [e.SerializeToString() for e in example_io.read_examples(os.path.join(train, "*"))] == records
    assert os.listdir(eval_) == ["data_tfrecord-empty.gz"]
    assert list(example_io.read_examples(os.path.join(eval_, "*"))) == []


def test_file_parts_give_every_block_to_exactly_one_worker_under_its_own_name(tmp_path):
    """One file over 3 workers: 3 parts, whose blocks together are the file's blocks, each once,
    named as when the file is read whole; many files: one item per file."""
    path = str(tmp_path / "rows.gz")
    with tf.io.TFRecordWriter(path, options="GZIP") as w:
        for i in range(23):
            w.write(b"record-%d" % i)
    whole = list(record_io.named_file_blocks(path, 7, 4))
    assert [name for name, _ in whole] == [f"00007-{b:05d}" for b in range(6)]
    items = record_io.file_parts([path], 3)
    assert items == [(0, path, 0, 3), (0, path, 1, 3), (0, path, 2, 3)]
    parted = [block for _, p, part, parts in items for block in record_io.named_file_blocks(p, 7, 4, part, parts)]
    assert sorted(parted) == whole
    assert record_io.file_parts(["a", "b", "c"], 2) == [(0, "a", 0, 1), (1, "b", 0, 1), (2, "c", 0, 1)]


def test_beam_parallelism_reads_the_direct_runners_workers():
    assert record_io.beam_parallelism([]) == 1
    assert record_io.beam_parallelism(["--direct_running_mode=multi_processing", "--direct_num_workers=2"]) == 2
    assert record_io.beam_parallelism(["--runner=DataflowRunner"]) == record_io.OTHER_RUNNER_PARALLELISM
