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
