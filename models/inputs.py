"""tf.data input pipelines over Examples artifacts (gzipped TFRecords of candidate rows).

Files are parsed in batches with the schema-derived parse spec (`schema.features`), so training
and serving parse the same way. `exposed_only` keeps the rows whose candidate was shown
(ui_position > 0): the impressions a CTR model learns from.
"""
from typing import Dict, Iterable, Optional, Sequence, Tuple

import tensorflow as tf

from cascade_ranking.schema import features as F


def list_files(file_patterns: Iterable[str]) -> Sequence[str]:
    files = []
    for pattern in file_patterns:
        if tf.io.gfile.isdir(pattern):
            pattern = pattern.rstrip("/") + "/*"
        files.extend(sorted(tf.io.gfile.glob(pattern)))
    if not files:
        raise FileNotFoundError(f"no data files match {list(file_patterns)}")
    return files


READ_BLOCK = 4096  # records a file yields at a time to `record_blocks`


def record_blocks(files: Sequence[str], block: int, shuffle_seed: Optional[int] = None,
                  reshuffle: bool = True) -> tf.data.Dataset:
    """The GZIP TFRecord files' records, `block` at a time ([<= block] strings), 4 files read in
    parallel, in an order fixed by `shuffle_seed` (the files shuffled with it, and again every
    iteration with `reshuffle`) or the files' own: a deterministic interleave, so a seeded run
    is reproducible. Each file yields blocks, not records: interleaving single records across
    threads cost more than reading them (the demo's 199,100 train rows: 1.33 s interleaved one by
    one, 0.26 s read one file after another, in blocks about as fast)."""
    ds = tf.data.Dataset.from_tensor_slices(list(files))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=reshuffle)
    return ds.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP").batch(block),
                         cycle_length=min(4, len(files)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _boolean_mask(features: Dict[str, tf.Tensor], keep: tf.Tensor) -> Dict[str, tf.Tensor]:
    return {
        k: tf.ragged.boolean_mask(v, keep) if isinstance(v, tf.RaggedTensor) else tf.boolean_mask(v, keep)
        for k, v in features.items()
    }


def parsed_batches(
    file_patterns: Iterable[str],
    batch_size: int,
    parse_spec: Optional[Dict] = None,
    shuffle_seed: Optional[int] = None,
    num_epochs: Optional[int] = 1,
    exposed_only: bool = False,
) -> tf.data.Dataset:
    """Batches of parsed feature dicts (every schema feature unless `parse_spec` says otherwise)."""
    spec = parse_spec or F.training_parse_spec()
    files = list_files(file_patterns)
    ds = record_blocks(files, READ_BLOCK, shuffle_seed).unbatch()
    if shuffle_seed is not None:
        ds = ds.shuffle(max(16 * batch_size, 10_000), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.repeat(num_epochs)
    ds = ds.batch(batch_size).map(lambda x: tf.io.parse_example(x, spec), num_parallel_calls=tf.data.AUTOTUNE)
    if exposed_only and F.SHOWN_KEY in spec:  # without ui_position every logged row was shown
        ds = ds.map(lambda f: _boolean_mask(f, f[F.SHOWN_KEY][:, 0] > F.NOT_SHOWN_POSITION))
    return ds.prefetch(tf.data.AUTOTUNE)


def shown_row_batches(
    file_patterns: Iterable[str],
    batch_size: int,
    parse_spec: Optional[Dict] = None,
    shuffle_seed: Optional[int] = None,
    cache: bool = False,
    parse_batch_size: int = 4096,
) -> tf.data.Dataset:
    """Batches of `batch_size` shown rows (ui_position > 0; every row without ui_position): one pass
    over the files, to be iterated once per epoch (`Model.fit(epochs=…)`).

    Rows are read `parse_batch_size` at a time and filtered before batching, so a step sees
    `batch_size` training rows however few candidates were shown (`parsed_batches(exposed_only=True)`
    batches candidate rows, then filters: ~1/5 of a batch on the synthetic data). The filter parses
    `ui_position` alone and drops the unshown rows' bytes. The shown rows are shuffled as
    serialized strings, one tensor each, and parsed whole a batch at a time after the shuffle:
    shuffling the parsed rows (a tensor per feature per row) took longer than the read and the
    parse together (the demo's 39,820 shown train rows: 0.94 s a pass shuffled parsed, 0.36 s
    shuffled serialized; `bench/input_rates.py` sets this against the teacher's training rate).
    With `cache` the shown rows' strings are read once and kept in memory for the later epochs
    (shuffled again and parsed every epoch: 0.13 s a pass on the demo, against 0.65 s when the
    parsed rows were kept); the caller decides whether they fit (`cache_fits`)."""
    spec = parse_spec or F.training_parse_spec()
    files = list_files(file_patterns)
    ds = record_blocks(files, parse_batch_size, shuffle_seed, reshuffle=not cache)
    if F.SHOWN_KEY in spec:
        shown_spec = {F.SHOWN_KEY: spec[F.SHOWN_KEY]}
        ds = ds.map(lambda raw: tf.boolean_mask(
            raw, tf.io.parse_example(raw, shown_spec)[F.SHOWN_KEY][:, 0] > F.NOT_SHOWN_POSITION),
            num_parallel_calls=tf.data.AUTOTUNE)
    if cache:  # blocks of the shown rows' strings: one tensor per ~thousand rows, not per row
        ds = ds.cache()
    ds = ds.unbatch()
    if shuffle_seed is not None:
        ds = ds.shuffle(max(16 * batch_size, 10_000), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda x: tf.io.parse_example(x, spec), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def cache_fits(file_patterns: Iterable[str], limit_mb: float) -> bool:
    """Whether the files hold at most `limit_mb` MB on disk (compressed): the bound under which a
    trainer keeps its rows in memory between epochs instead of reading them again (the teacher
    keeps its shown rows' serialized bytes: on the synthetic data about 2× the split's compressed
    size, up to ~10× for a log whose every row was shown)."""
    return sum(tf.io.gfile.stat(path).length for path in list_files(file_patterns)) <= limit_mb * 2 ** 20


def to_model_io(features: Dict[str, tf.Tensor], registry: F.FeatureConfig = F.DEFAULT
                ) -> Tuple[Dict[str, tf.Tensor], tf.Tensor, tf.Tensor]:
    """(the registry's model inputs, click label as float, sample weight) for `Model.fit`."""
    inputs = {k: features[k] for k in registry.model_inputs}
    label = tf.cast(features[F.LABEL_KEY], tf.float32)
    return inputs, label, features[F.SAMPLE_WEIGHT_KEY]
