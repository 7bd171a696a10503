"""`models.inputs.shown_row_batches`: the shown rows of the files, each once, in file order, parsed
as `tf.io.parse_example` parses them (against an independent parse of every row, then a filter)."""
import numpy as np
import tensorflow as tf

from cascade_ranking.datasources import synthetic
from cascade_ranking.models import inputs
from cascade_ranking.schema import features as F


def test_shown_row_batches_are_the_shown_rows_parsed_whole(tmp_path):
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=30, seed=5), str(tmp_path))
    files = [str(tmp_path / "Split-train" / "*")]
    spec = F.training_parse_spec()
    raw = np.concatenate([b.numpy() for b in tf.data.TFRecordDataset(
        tf.io.gfile.glob(files[0]), compression_type="GZIP").batch(10_000)])
    every = tf.io.parse_example(raw, spec)
    shown = every[F.SHOWN_KEY][:, 0].numpy() > F.NOT_SHOWN_POSITION
    assert 0 < shown.sum() < len(raw)
    batches = list(inputs.shown_row_batches(files, 7, parse_spec=spec, parse_batch_size=50))
    assert all(len(b[F.LABEL_KEY]) == 7 for b in batches[:-1])
    for name in spec:
        got = [row for b in batches for row in _rows(b[name])]
        want = [row for row, keep in zip(_rows(every[name]), shown) if keep]
        np.testing.assert_equal(got, want, err_msg=name)  # NaN (an absent teacher_logit) equals NaN


def _rows(value):
    """Each row's values as a list (dense, ragged or sparse tensors alike)."""
    if isinstance(value, tf.SparseTensor):
        value = tf.RaggedTensor.from_sparse(value)
    if isinstance(value, tf.RaggedTensor):
        return value.to_list()
    return value.numpy().tolist()


def test_a_seeded_pass_takes_the_rows_in_the_same_order_every_time(tmp_path):
    """With a shuffle seed the files are read 4 at a time in parallel; the order must still be the
    seed's alone (a deterministic interleave), or the teacher trained on it differs run to run."""
    root = tmp_path / "rows"
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=400, seed=2), str(root))
    directory = root / "Split-train"
    files = sorted(tf.io.gfile.glob(str(directory / "*")))
    for k, path in enumerate(files):  # 8 files of different sizes, so parallel reads finish unevenly
        records = list(tf.data.TFRecordDataset(path, compression_type="GZIP").as_numpy_iterator())
        tf.io.gfile.remove(path)
        for part in range(8):
            chunk = records[part * len(records) // 8 * (part % 3 + 1) // 3:(part + 1) * len(records) // 8]
            with tf.io.TFRecordWriter(str(directory / f"part-{k}-{part}.gz"), options="GZIP") as writer:
                for record in chunk:
                    writer.write(record)
    patterns = [str(directory / "*")]
    spec = F.training_parse_spec()

    def order(dataset):
        return [(int(r), int(i)) for b in dataset for r, i in zip(b[F.REQUEST_ID_KEY][:, 0].numpy(),
                                                                 b[F.ITEM_KEY][:, 0].numpy())]

    for make in (lambda: inputs.shown_row_batches(patterns, 32, parse_spec=spec, shuffle_seed=5, parse_batch_size=64),
                 lambda: inputs.parsed_batches(patterns, 32, parse_spec=spec, shuffle_seed=5)):
        first = order(make())
        assert len(first) > 1000
        for _ in range(3):
            assert order(make()) == first


def test_a_cached_input_reads_the_files_once_and_shuffles_every_epoch(tmp_path):
    """With `cache` the first epoch keeps the parsed shown rows: the later epochs read memory (the
    files can be gone), take each shown row once, and in a new order."""
    root = tmp_path / "rows"
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=100, seed=3), str(root))
    patterns = [str(root / "Split-train" / "*")]
    spec = F.training_parse_spec()

    def rows(dataset):
        return [(int(r), int(i)) for b in dataset for r, i in zip(b[F.REQUEST_ID_KEY][:, 0].numpy(),
                                                                 b[F.ITEM_KEY][:, 0].numpy())]

    expected = rows(inputs.shown_row_batches(patterns, 16, parse_spec=spec))
    cached = inputs.shown_row_batches(patterns, 16, parse_spec=spec, shuffle_seed=1, cache=True, parse_batch_size=64)
    epochs = [rows(cached)]
    for path in tf.io.gfile.glob(patterns[0]):
        tf.io.gfile.remove(path)
    epochs += [rows(cached) for _ in range(2)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(expected) and len(set(epoch)) == len(epoch) > 300
    assert epochs[0] != epochs[1] != epochs[2]
