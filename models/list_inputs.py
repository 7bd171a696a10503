"""tf.data of request lists (DESIGN §4, the `schema.request_list` contract).

Two sources:
* an Examples directory of candidate rows (one tf.Example per request × item: what the
  generator and the converters write). `request_lists_from_candidates` groups the rows by
  `request_id` in memory with numpy (a sort, then a scatter into [R, L] arrays). It fits data of
  the size of the synthetic default and MovieLens (a few hundred thousand rows); at scale the
  NegativeSampler component writes request lists with Beam instead.
* TFRecords of request-list Examples (`write_request_lists`, or the NegativeSampler's output):
  `request_list_dataset` parses them with `schema.request_list.parse_spec`.

In memory, request lists are a dict of numpy arrays in the parse layout of
`schema.request_list.parse_spec(L, features)` (request features [R, 1] / [R, w], candidate
features [R, L·w]): the registry (`schema.features.FeatureConfig`) gives every width. One
difference: a query-side multivalent feature is a dense [R, w] array padded with its pad value,
where parsing gives a ragged tensor; `request_features` accepts both.

`request_features` / `candidate_features` turn a batch of lists into the inputs of the stage
towers: request-level features once per request ([B, ...]), candidate features flattened to
[B·L, ...] (the layout `models.embedding.FeatureEmbedding` reads).
"""
import os
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from cascade_ranking.datasources.example_io import make_example
from cascade_ranking.models import inputs
from cascade_ranking.schema import features as F
from cascade_ranking.schema import request_list as RL

QUERY_FEATURES = F.DEFAULT.query_names  # the default registry's (the synthetic layout)
ITEM_FEATURES = F.DEFAULT.item_names


def _files(file_patterns) -> Sequence[str]:
    return inputs.list_files([file_patterns] if isinstance(file_patterns, str) else file_patterns)


def padded(values, f: F.InputFeature):
    """A parsed multivalent batch, ragged, as an [N, width] tensor: cut to the width, padded with
    the pad value (a dense one as it is)."""
    if isinstance(values, tf.RaggedTensor):
        return values[:, :f.width].to_tensor(default_value=f.pad_value, shape=[None, f.width])
    return values


def _padded(values, f: F.InputFeature) -> np.ndarray:
    values = padded(values, f)
    return np.asarray(values.numpy() if hasattr(values, "numpy") else values).reshape(-1, f.width)


def read_candidate_rows(file_patterns, batch_size: int = 8192, features: F.FeatureConfig = F.DEFAULT,
                        schema=None) -> Dict[str, np.ndarray]:
    """Every candidate row of gzipped TFRecord files as numpy columns ([N] or [N, width]).

    Parsed with the schema's training parse spec (optional features take their defaults);
    multivalent inputs become [N, width] arrays padded with their pad value, `stage` the tier index.
    """
    spec = F.training_parse_spec(schema)
    multivalent = {f.name: f for f in features.resolved() if f.multivalent}
    ds = tf.data.TFRecordDataset(_files(file_patterns), compression_type="GZIP")
    ds = ds.batch(batch_size).map(lambda x: tf.io.parse_example(x, spec))
    parts: Dict[str, list] = {}
    for batch in ds:
        for name, value in batch.items():
            value = _padded(value, multivalent[name]) if name in multivalent else value.numpy()
            parts.setdefault(name, []).append(value)
    if not parts:
        raise ValueError(f"no candidate rows in {file_patterns}")
    columns = {k: np.concatenate(v) for k, v in parts.items()}
    for name in list(columns):
        if columns[name].ndim == 2 and columns[name].shape[1] == 1:
            columns[name] = columns[name][:, 0]
    if "stage" in columns:
        columns["stage"] = np.array([RL.TIER_INDEX[s.decode()] for s in columns["stage"]], dtype=np.int64)
    else:  # a log without tiers (`F.tier_without_stage`)
        columns["stage"] = np.array([RL.TIER_INDEX[F.tier_without_stage(c)] for c in columns[F.LABEL_KEY]], dtype=np.int64)
    if F.SHOWN_KEY not in columns:
        columns[F.SHOWN_KEY] = np.full(columns[F.LABEL_KEY].shape, F.SHOWN_WITHOUT_POSITION, dtype=np.int64)
    return columns


def group_rows(columns: Mapping[str, np.ndarray], list_size: Optional[int] = None,
               shuffle_seed: Optional[int] = None, features: F.FeatureConfig = F.DEFAULT) -> Dict[str, np.ndarray]:
    """Candidate-row columns → request lists (numpy, the parse layout of `RL.parse_spec`).

    Requests are sorted by request_id. Within a request the rows keep their order, or are put in
    a seeded random order with `shuffle_seed` (so list position carries no information about the
    tier: the MovieLens converter writes shown items first). Padded slots follow the request-list
    contract (mask 0, stage −1, `RL.FLOAT_PADDING`, pad values elsewhere).

    Raises ValueError if a request has more rows than `list_size` (default: the longest request).
    """
    request_id = np.asarray(columns["request_id"]).reshape(-1)
    n = request_id.size
    key = np.arange(n) if shuffle_seed is None else np.random.default_rng(shuffle_seed).random(n)
    order = np.lexsort((key, request_id))
    ids, start, counts = np.unique(request_id[order], return_index=True, return_counts=True)
    size = int(counts.max()) if list_size is None else int(list_size)
    if counts.max() > size:
        raise ValueError(f"request {ids[np.argmax(counts)]} has {counts.max()} candidates > list size {size}")
    rows = np.repeat(np.arange(ids.size), counts)
    slots = np.arange(n) - np.repeat(start, counts)
    first = order[start]
    out: Dict[str, np.ndarray] = {}
    for name in RL.REQUEST_KEYS:
        out[name] = np.asarray(columns[name]).reshape(n, -1)[first, :1].astype(np.int64)
    for f in RL.query_inputs(features):
        out[f.name] = _fit_width(np.asarray(columns[f.name]).reshape(n, -1), f)[first].astype(f.np_dtype)

    def scatter(values, pad, dtype, width=None):
        shape = (ids.size, size) if width is None else (ids.size, size, width)
        arr = np.full(shape, pad, dtype=dtype)
        arr[rows, slots] = np.asarray(values)[order] if width is None else np.asarray(values).reshape(n, width)[order]
        return arr if width is None else arr.reshape(ids.size, size * width)

    for f in RL.candidate_inputs(features):
        values = _fit_width(np.asarray(columns[f.name]).reshape(n, -1), f)
        out[f.name] = scatter(values, f.pad_value, f.np_dtype, f.width)
    for name in RL.candidate_int_keys(features):
        if name == F.MASK_KEY:
            out[name] = scatter(np.ones(n, dtype=np.int64), 0, np.int64)
        elif name == F.STAGE_KEY:
            out[name] = scatter(columns["stage"], RL.PAD_STAGE, np.int64)
        else:
            out[name] = scatter(np.asarray(columns[name]).reshape(n), 0, np.int64)
    for name in RL.CANDIDATE_FLOAT_FEATURES:
        values = columns.get(name, np.full(n, F.OPTIONAL_DEFAULTS[name], dtype=np.float32))
        out[name] = scatter(np.asarray(values).reshape(n), RL.FLOAT_PADDING[name], np.float32)
    return out


def _fit_width(values: np.ndarray, f: F.InputFeature) -> np.ndarray:
    """[N, k] values of `f` as [N, f.width]: a multivalent feature cut or padded; a scalar or dense
    one as it is (ValueError if its width differs)."""
    if values.shape[1] == f.width:
        return values
    if not f.multivalent:
        raise ValueError(f"{f.name} has {values.shape[1]} values per row, declared width {f.width}")
    if values.shape[1] > f.width:
        return values[:, :f.width]
    pad = np.full((values.shape[0], f.width - values.shape[1]), f.pad_value, dtype=values.dtype)
    return np.concatenate([values, pad], axis=1)


def request_lists_from_candidates(file_patterns, list_size: Optional[int] = None, shuffle_seed: Optional[int] = None,
                                  features: F.FeatureConfig = F.DEFAULT) -> Dict[str, np.ndarray]:
    """An Examples split of candidate rows (a directory or glob) → request lists (numpy)."""
    return group_rows(read_candidate_rows(file_patterns, features=features), list_size, shuffle_seed, features)


def num_lists(lists: Mapping[str, np.ndarray]) -> int:
    return int(np.asarray(lists["mask"]).shape[0])


def list_size_of(lists: Mapping) -> int:
    return int(lists["mask"].shape[1])


def take_lists(lists: Mapping[str, np.ndarray], index) -> Dict[str, np.ndarray]:
    return {k: np.asarray(v)[index] for k, v in lists.items()}


def to_example(lists: Mapping[str, np.ndarray], r: int, features: F.FeatureConfig = F.DEFAULT) -> tf.train.Example:
    """Request list r as a request-list tf.Example (query-side multivalent features without their padding)."""
    row = {k: np.asarray(v)[r] for k, v in lists.items()}
    for f in RL.query_inputs(features):
        if f.multivalent:
            values = np.asarray(row[f.name]).reshape(-1)
            real = values != f.pad_value
            row[f.name] = values[real] if real.any() else values[:1]
    return make_example(row)


def write_request_lists(lists: Mapping[str, np.ndarray], path: str, features: F.FeatureConfig = F.DEFAULT) -> str:
    """Writes the lists as a gzipped TFRecord file of request-list Examples."""
    parent = os.path.dirname(path)
    if parent:
        tf.io.gfile.makedirs(parent)
    with tf.io.TFRecordWriter(path, options=tf.io.TFRecordOptions(compression_type="GZIP")) as writer:
        for r in range(num_lists(lists)):
            writer.write(to_example(lists, r, features).SerializeToString(deterministic=True))
    return path


def list_size_in(file_patterns) -> int:
    """The list size of request-list TFRecords, read from their first record (the slots of its
    `mask`): the NegativeSampler's `list_size` is the one place it is set, and every reader takes
    it from the data. Raises ValueError naming the files when they hold no list."""
    files = _files(file_patterns)
    for raw in tf.data.TFRecordDataset(files, compression_type="GZIP").take(1).as_numpy_iterator():
        return len(tf.train.Example.FromString(raw).features.feature[F.MASK_KEY].int64_list.value)
    raise ValueError(f"no request lists in {file_patterns}")


def request_list_dataset(file_patterns, batch_size: int, list_size: int = RL.LIST_SIZE,
                         shuffle_seed: Optional[int] = None, num_epochs: Optional[int] = 1,
                         features: F.FeatureConfig = F.DEFAULT, keys: Optional[Sequence[str]] = None) -> tf.data.Dataset:
    """Batches of parsed request lists from gzipped TFRecords of request-list Examples (`keys`:
    only these features of the layout; default all)."""
    spec = RL.parse_spec(list_size, features)
    if keys is not None:
        spec = {k: spec[k] for k in keys}
    ds = tf.data.TFRecordDataset(_files(file_patterns), compression_type="GZIP")
    if shuffle_seed is not None:
        ds = ds.shuffle(10_000, seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.repeat(num_epochs).batch(batch_size)
    return ds.map(lambda x: tf.io.parse_example(x, spec), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def dataset_from_lists(lists: Mapping[str, np.ndarray], batch_size: int, shuffle_seed: Optional[int] = None,
                       num_epochs: Optional[int] = 1, drop_remainder: bool = False) -> tf.data.Dataset:
    """Batches of in-memory request lists (same layout as parsed ones, query_tokens dense)."""
    ds = tf.data.Dataset.from_tensor_slices({k: np.asarray(v) for k, v in lists.items()})
    if shuffle_seed is not None:
        ds = ds.shuffle(num_lists(lists), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.repeat(num_epochs).batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def _ragged(values, f: F.InputFeature) -> tf.RaggedTensor:
    if isinstance(values, tf.RaggedTensor):
        return values
    values = tf.convert_to_tensor(values)
    return tf.RaggedTensor.from_tensor(values, padding=tf.constant(f.pad_value, values.dtype))


def request_features(lists: Mapping[str, tf.Tensor], features: F.FeatureConfig = F.DEFAULT) -> Dict[str, tf.Tensor]:
    """The registry's query-side inputs of a batch of lists, one row per request ([B, ...];
    multivalent ones ragged, padding dropped)."""
    return {f.name: _ragged(lists[f.name], f) if f.multivalent else lists[f.name] for f in RL.query_inputs(features)}


def candidate_features(lists: Mapping[str, tf.Tensor], features: F.FeatureConfig = F.DEFAULT) -> Dict[str, tf.Tensor]:
    """The registry's item-side inputs of a batch of lists, flattened to [B·L, ...] (multivalent
    ones ragged, padding dropped)."""
    out = {}
    for f in features.of_role("item"):
        value = tf.reshape(lists[f.name], [-1, f.width])
        out[f.name] = _ragged(value, f) if f.multivalent else value
    return out


def repeat_per_candidate(per_request: tf.Tensor, list_size) -> tf.Tensor:
    """[B, d] → [B·L, d]: a request-level tensor repeated for each of its L slots."""
    return tf.repeat(per_request, list_size, axis=0)
