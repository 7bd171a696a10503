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
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_seed is not None:
        ds = ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
        cycle_length=min(4, len(files)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=shuffle_seed is None,
    )
    if shuffle_seed is not None:
        ds = ds.shuffle(max(16 * batch_size, 10_000), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.repeat(num_epochs)
    ds = ds.batch(batch_size).map(lambda x: tf.io.parse_example(x, spec), num_parallel_calls=tf.data.AUTOTUNE)
    if exposed_only and F.SHOWN_KEY in spec:  # without ui_position every logged row was shown
        ds = ds.map(lambda f: _boolean_mask(f, f[F.SHOWN_KEY][:, 0] > F.NOT_SHOWN_POSITION))
    return ds.prefetch(tf.data.AUTOTUNE)


def to_model_io(features: Dict[str, tf.Tensor], registry: F.FeatureConfig = F.DEFAULT
                ) -> Tuple[Dict[str, tf.Tensor], tf.Tensor, tf.Tensor]:
    """(the registry's model inputs, click label as float, sample weight) for `Model.fit`."""
    inputs = {k: features[k] for k in registry.model_inputs}
    label = tf.cast(features[F.LABEL_KEY], tf.float32)
    return inputs, label, features[F.SAMPLE_WEIGHT_KEY]
