"""Request lists: one tf.Example per request, for the listwise losses (RankNet per request, LCRON).

A request list holds one request's candidates together with a fixed list size L and a mask, so a
candidate never ends up in another batch than its request (DESIGN §4). Its features derive from
the run's feature registry (`schema.features.FeatureConfig`, "the registry" below):

    request level   request_id, request_time                                 int64 [1]
                    each query-side input: id [1] (int64 or bytes), dense [w] float,
                    ids [1..w] (var-len)
    candidate level each item-side and UI input: id [L], dense [L·w] float, ids [L·w] (padded)
                    ui_position (when the registry does not declare it)    int64 [L]
                    click                                                    int64 [L]
                    stage          tier index: 0 rerank_pos … 4 prerank_neg, 5 random_neg   int64 [L]
                    true_ctr (−1 = unknown), teacher_logit (NaN = none),
                    sample_weight, sampling_probability                      float [L]
                    mask           1 = real candidate, 0 = padding           int64 [L]

With the default registry (the package's own layout) that is user_id, hour, device [1],
user_dense [4], query_tokens [1..8]; item_id, item_category, ui_position, ui_format [L],
item_tags [L·8], item_dense [L·4].

Padded slots and padded values of a multivalent feature carry the feature's pad value (0, the
empty string, 0.0: `InputFeature.pad_value`, which is no id); padded slots carry mask 0, stage −1;
every loss and metric must ignore them. `flatten_to_candidates` turns a batch of parsed lists into
candidate rows ([B·L]) that the candidate-level towers (`models.embedding.FeatureEmbedding`) read.
"""
import math
from typing import Dict, List, Mapping, Sequence

import numpy as np
import tensorflow as tf

from cascade_ranking.schema import features as F

LIST_SIZE = 60  # 50 logged candidates (5 tiers × 10) + up to 10 random negatives
MAX_ITEM_TAGS = 8  # the default registry's item_tags width
ITEM_DENSE_SIZE = 4  # the default registry's item_dense width
RANDOM_NEG_TIER = "random_neg"
TIERS = F.STAGE_TIERS + (RANDOM_NEG_TIER,)
TIER_INDEX = {t: i for i, t in enumerate(TIERS)}
PAD_STAGE = -1

REQUEST_KEYS = (F.REQUEST_ID_KEY, F.REQUEST_TIME_KEY)  # int64 [1]
LABEL_KEYS = (F.LABEL_KEY, F.STAGE_KEY, F.MASK_KEY)  # int64 [L]
CANDIDATE_FLOAT_FEATURES = ("true_ctr", "teacher_logit", "sample_weight", "sampling_probability")
FLOAT_PADDING = {"true_ctr": -1.0, "teacher_logit": math.nan, "sample_weight": 0.0, "sampling_probability": 1.0}


def query_inputs(features: F.FeatureConfig = F.DEFAULT):
    """The registry's request-level inputs (role query)."""
    return features.of_role("query")


def candidate_inputs(features: F.FeatureConfig = F.DEFAULT):
    """The registry's candidate-level inputs (roles item and ui)."""
    return features.of_role("item", "ui")


def candidate_int_keys(features: F.FeatureConfig = F.DEFAULT):
    """The int64 [L] keys of a list beside its inputs: ui_position when the registry does not
    declare it (the shown mask reads it), click, stage and mask."""
    shown = () if F.SHOWN_KEY in features.model_inputs else (F.SHOWN_KEY,)
    return shown + LABEL_KEYS


def parse_spec(list_size: int = LIST_SIZE, features: F.FeatureConfig = F.DEFAULT) -> Dict[str, object]:
    spec: Dict[str, object] = {name: tf.io.FixedLenFeature([1], tf.int64) for name in REQUEST_KEYS}
    for f in query_inputs(features):
        if f.multivalent:
            spec[f.name] = tf.io.RaggedFeature(f.tf_dtype, row_splits_dtype=tf.int64)
        else:
            spec[f.name] = tf.io.FixedLenFeature([f.width], f.tf_dtype)
    for f in candidate_inputs(features):
        spec[f.name] = tf.io.FixedLenFeature([list_size * f.width], f.tf_dtype)
    for name in candidate_int_keys(features):
        spec[name] = tf.io.FixedLenFeature([list_size], tf.int64)
    for name in CANDIDATE_FLOAT_FEATURES:
        spec[name] = tf.io.FixedLenFeature([list_size], tf.float32)
    return spec


def _values(value) -> list:
    """A feature value of a candidate row (scalar, list or array) as a flat python list."""
    if isinstance(value, (int, float, str, bytes)):
        return [value]
    return np.asarray(value).reshape(-1).tolist()


def _id_value(f: F.InputFeature, value):
    if f.is_string:
        return value.encode() if isinstance(value, str) else bytes(value)
    return int(value)


def fixed_width(f: F.InputFeature, value) -> list:
    """One row's value of `f` as exactly `f.width` values: multivalent ids cut to `width` and padded
    with the pad value; dense as they are (ValueError unless `width` values)."""
    values = _values(value)
    if f.is_dense:
        if len(values) != f.width:
            raise ValueError(f"{f.name} needs {f.width} values, got {len(values)}")
        return [float(v) for v in values]
    values = [_id_value(f, v) for v in values[:f.width]]
    return values + [f.pad_value] * (f.width - len(values))


def build_request_list(rows: Sequence[Mapping[str, object]], list_size: int = LIST_SIZE,
                       features: F.FeatureConfig = F.DEFAULT) -> Dict[str, List]:
    """Packs the candidate rows (feature dicts) of one request into request-list feature values.

    Rows carry the candidate-row features (`schema.features`); a row's `stage` may also be
    "random_neg". Missing optional values take their defaults. Raises ValueError if the rows
    belong to several requests or are more than `list_size`.
    """
    if not rows:
        raise ValueError("a request list needs at least one candidate")
    if len(rows) > list_size:
        raise ValueError(f"{len(rows)} candidates do not fit a list of size {list_size}")
    first = rows[0]
    request_ids = {int(np.asarray(r["request_id"]).reshape(-1)[0]) for r in rows}
    if len(request_ids) != 1:
        raise ValueError(f"rows of several requests in one list: {sorted(request_ids)[:5]}")

    def scalar(row, name, default=None):
        value = row.get(name, default)
        if value is None or isinstance(value, (int, float, str, bytes)):
            return value  # the common case, kept off numpy's slower path
        return np.asarray(value).reshape(-1)[0].item()

    out: Dict[str, List] = {name: [int(scalar(first, name))] for name in REQUEST_KEYS}
    for f in query_inputs(features):
        if f.multivalent:  # var-len: the list as it is, cut to its width, without padding
            out[f.name] = [_id_value(f, v) for v in _values(first.get(f.name, []))[:f.width]]
        else:
            out[f.name] = fixed_width(f, first[f.name])
    pad = list_size - len(rows)
    for f in candidate_inputs(features):
        out[f.name] = [v for r in rows for v in fixed_width(f, r.get(f.name, []) if f.multivalent else r[f.name])] \
            + [f.pad_value] * (pad * f.width)
    for name in candidate_int_keys(features):
        if name == F.STAGE_KEY:
            values = [TIER_INDEX[s.decode() if isinstance(s, bytes) else s] for s in (scalar(r, name) for r in rows)]
            out[name] = values + [PAD_STAGE] * pad
        elif name == F.MASK_KEY:
            out[name] = [1] * len(rows) + [0] * pad
        else:
            out[name] = [int(scalar(r, name)) for r in rows] + [0] * pad
    for name in CANDIDATE_FLOAT_FEATURES:
        default = F.OPTIONAL_DEFAULTS[name]
        out[name] = [float(scalar(r, name, default)) for r in rows] + [FLOAT_PADDING[name]] * pad
    return out


def _ragged_from_padded(values: tf.Tensor, f: F.InputFeature) -> tf.RaggedTensor:
    return tf.RaggedTensor.from_tensor(values, padding=tf.constant(f.pad_value, values.dtype))


def flatten_to_candidates(lists: Mapping[str, tf.Tensor], list_size: int = LIST_SIZE,
                          features: F.FeatureConfig = F.DEFAULT) -> Dict[str, tf.Tensor]:
    """Parsed request lists [B, ...] → candidate features [B·L, ...] in the candidate-row layout.

    Request features are repeated for each slot; multivalent candidate features become ragged
    (padding dropped); `mask`, `stage` (tier index) and the float features are kept, flattened.
    """
    batch = tf.shape(lists["mask"])[0]
    row_index = tf.repeat(tf.range(batch), list_size)
    out = {}
    for name in REQUEST_KEYS:
        out[name] = tf.reshape(tf.repeat(lists[name], list_size, axis=0), [-1, 1])
    for f in query_inputs(features):
        value = lists[f.name]
        if f.multivalent:
            if not isinstance(value, tf.RaggedTensor):
                value = _ragged_from_padded(tf.convert_to_tensor(value), f)
            out[f.name] = tf.gather(value, row_index)
        else:
            out[f.name] = tf.repeat(value, list_size, axis=0)
    for f in candidate_inputs(features):
        value = tf.reshape(lists[f.name], [-1, f.width])
        out[f.name] = _ragged_from_padded(value, f) if f.multivalent else value
    for name in candidate_int_keys(features) + CANDIDATE_FLOAT_FEATURES:
        out[name] = tf.reshape(lists[name], [-1, 1])
    return out
