"""Request lists: one tf.Example per request, for the listwise losses (RankNet per request, LCRON).

A request list holds one request's candidates together with a fixed list size L and a mask, so a
candidate never ends up in another batch than its request (DESIGN §4). Features:

    request level   request_id, request_time, user_id, hour, device        int64 [1]
                    user_dense                                               float [4]
                    query_tokens                                             int64 [1..8] (var-len)
    candidate level item_id, item_category, ui_position, ui_format, click   int64 [L]
                    stage          tier index: 0 rerank_pos … 4 prerank_neg, 5 random_neg   int64 [L]
                    item_tags      L × MAX_ITEM_TAGS, 0-padded                int64 [L·T]
                    item_dense     L × 4                                      float [L·4]
                    true_ctr (−1 = unknown), teacher_logit (NaN = none),
                    sample_weight, sampling_probability                      float [L]
                    mask           1 = real candidate, 0 = padding           int64 [L]

Padded slots carry mask 0, stage −1 and zeros elsewhere; every loss and metric must ignore them.
`flatten_to_candidates` turns a batch of parsed lists into candidate rows ([B·L]) that the
candidate-level towers (`models.embedding.FeatureEmbedding`) read.
"""
import math
from typing import Dict, List, Mapping, Sequence

import numpy as np
import tensorflow as tf

from schema import features as F

LIST_SIZE = 60  # 50 logged candidates (5 tiers × 10) + up to 10 random negatives
MAX_ITEM_TAGS = 8
ITEM_DENSE_SIZE = 4
RANDOM_NEG_TIER = "random_neg"
TIERS = F.STAGE_TIERS + (RANDOM_NEG_TIER,)
TIER_INDEX = {t: i for i, t in enumerate(TIERS)}
PAD_STAGE = -1

REQUEST_INT_FEATURES = ("request_id", "request_time", "user_id", "hour", "device")
CANDIDATE_INT_FEATURES = ("item_id", "item_category", "ui_position", "ui_format", "click", "stage", "mask")
CANDIDATE_FLOAT_FEATURES = ("true_ctr", "teacher_logit", "sample_weight", "sampling_probability")
FLOAT_PADDING = {"true_ctr": -1.0, "teacher_logit": math.nan, "sample_weight": 0.0, "sampling_probability": 1.0}


def parse_spec(list_size: int = LIST_SIZE) -> Dict[str, object]:
    spec = {name: tf.io.FixedLenFeature([1], tf.int64) for name in REQUEST_INT_FEATURES}
    spec["user_dense"] = tf.io.FixedLenFeature([4], tf.float32)
    spec["query_tokens"] = tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int64)
    for name in CANDIDATE_INT_FEATURES:
        spec[name] = tf.io.FixedLenFeature([list_size], tf.int64)
    for name in CANDIDATE_FLOAT_FEATURES:
        spec[name] = tf.io.FixedLenFeature([list_size], tf.float32)
    spec["item_tags"] = tf.io.FixedLenFeature([list_size * MAX_ITEM_TAGS], tf.int64)
    spec["item_dense"] = tf.io.FixedLenFeature([list_size * ITEM_DENSE_SIZE], tf.float32)
    return spec


def build_request_list(rows: Sequence[Mapping[str, object]], list_size: int = LIST_SIZE) -> Dict[str, List]:
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

    out: Dict[str, List] = {name: [scalar(first, name)] for name in REQUEST_INT_FEATURES}
    out["user_dense"] = [float(v) for v in np.asarray(first["user_dense"], dtype=np.float32).reshape(-1)]
    out["query_tokens"] = [int(v) for v in np.asarray(first["query_tokens"]).reshape(-1)]
    pad = list_size - len(rows)
    for name in CANDIDATE_INT_FEATURES:
        if name == "stage":
            values = [TIER_INDEX[s.decode() if isinstance(s, bytes) else s] for s in (scalar(r, "stage") for r in rows)]
            out[name] = values + [PAD_STAGE] * pad
        elif name == "mask":
            out[name] = [1] * len(rows) + [0] * pad
        else:
            out[name] = [int(scalar(r, name)) for r in rows] + [0] * pad
    for name in CANDIDATE_FLOAT_FEATURES:
        default = F.OPTIONAL_DEFAULTS[name]
        out[name] = [float(scalar(r, name, default)) for r in rows] + [FLOAT_PADDING[name]] * pad
    tags = np.zeros((list_size, MAX_ITEM_TAGS), dtype=np.int64)
    dense = np.zeros((list_size, ITEM_DENSE_SIZE), dtype=np.float32)
    for i, r in enumerate(rows):
        t = np.asarray(r["item_tags"]).reshape(-1)[:MAX_ITEM_TAGS]
        tags[i, : t.size] = t
        dense[i] = np.asarray(r["item_dense"], dtype=np.float32).reshape(-1)
    out["item_tags"] = tags.reshape(-1).tolist()
    out["item_dense"] = dense.reshape(-1).tolist()
    return out


def flatten_to_candidates(lists: Mapping[str, tf.Tensor], list_size: int = LIST_SIZE) -> Dict[str, tf.Tensor]:
    """Parsed request lists [B, ...] → candidate features [B·L, ...] in the candidate-row layout.

    Request features are repeated for each slot; item_tags become ragged (0-padding dropped);
    `mask`, `stage` (tier index) and the float features are kept, flattened.
    """
    batch = tf.shape(lists["mask"])[0]
    out = {}
    for name in REQUEST_INT_FEATURES:
        out[name] = tf.reshape(tf.repeat(lists[name], list_size, axis=0), [-1, 1])
    out["user_dense"] = tf.repeat(lists["user_dense"], list_size, axis=0)
    query = lists["query_tokens"]
    if not isinstance(query, tf.RaggedTensor):
        query = tf.RaggedTensor.from_tensor(query, padding=0)
    row_index = tf.repeat(tf.range(batch), list_size)
    out["query_tokens"] = tf.gather(query, row_index)
    for name in CANDIDATE_INT_FEATURES + CANDIDATE_FLOAT_FEATURES:
        out[name] = tf.reshape(lists[name], [-1, 1])
    tags = tf.reshape(lists["item_tags"], [-1, MAX_ITEM_TAGS])
    out["item_tags"] = tf.RaggedTensor.from_tensor(tags, padding=0)
    out["item_dense"] = tf.reshape(lists["item_dense"], [-1, ITEM_DENSE_SIZE])
    return out
