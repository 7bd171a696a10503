"""Open Bandit Dataset (small sample) -> candidate rows (DESIGN §4), one tf.Example per logged impression.

Rule (datasources/README.md has the full feature table):
- Both logging policies of the campaign are read: `random/<campaign>/` (uniform random) and
  `bts/<campaign>/` (Bernoulli Thompson Sampling), each a log CSV and an item_context.csv.
- The small sample keeps no request ids (the three slots of one impression are not kept
  together), so every CSV row is one shown candidate and its own request:
  request_id = policy code (random 0, bts 1) * 10^9 + the row's line number in its CSV.
  stage = `rerank_pos` (shown), ui_position = position (1..3), ui_format 0, click as logged, plus
  the logged propensity_score and logging_policy.
- Strings (user and item features) become ids through a stable md5 hash, never Python's hash().
- split="time": within each policy the latest ceil(n/5) valid rows by timestamp (ties by line) are
  eval, the rest train. split="policy": bts rows are train, random rows are eval.
- A malformed row is diverted to rejected.jsonl; a missing file or column raises InputError.

Layouts (`layout=`):
- "package" (default): the package's own 13-feature layout above (hashed ids, user_dense,
  item_dense, ...), byte-identical to earlier versions.
- "native": the OBD's own features, unhashed (strings stay strings: the model hashes them):
  `user_feature_0..3` (bytes) and `hour` (query side); `item` (item_id, the item id),
  `item_feature_0` (float), `item_feature_1..3` (bytes) and `user_item_affinity` (float: the row's
  user-item_affinity_<item_id>) (item side); `ui_position` = position; plus request_id,
  request_time, click, stage (`rerank_pos`), propensity_score and logging_policy as above.
"""
import hashlib
import math
import os
from typing import Dict, Tuple

import numpy as np
import pandas as pd

from cascade_ranking.datasources import shared_data
from cascade_ranking.datasources.example_io import (
    InputError, RejectLog, SplitWriter, atomic_output_dir, make_example, write_report,
)

SPLITS = ("train", "eval")
POLICIES = ("random", "bts")  # index = policy code in request_id
CAMPAIGNS = ("all", "men", "women")
SPLIT_RULES = ("time", "policy")
LAYOUTS = ("package", "native")
REQUEST_ID_STRIDE = 10**9
USER_FEATURES = tuple(f"user_feature_{k}" for k in range(4))
ITEM_FEATURES = tuple(f"item_feature_{k}" for k in range(4))
AFFINITY_PREFIX = "user-item_affinity_"
LOG_COLUMNS = ("timestamp", "item_id", "position", "click", "propensity_score") + USER_FEATURES
MAX_POSITION = 10  # ui_position domain of the schema
# Hash buckets, within the embedding sizes of schema/features.py (ids 0 are padding for lists).
USER_BUCKETS, CATEGORY_BUCKETS, TAG_BUCKETS, TOKEN_BUCKETS = 5_000, 64, 511, 2_047


def stable_hash(text: str, buckets: int) -> int:
    """A hash of `text` in [0, buckets) that is the same in every process and on every machine."""
    return int.from_bytes(hashlib.md5(text.encode("utf-8")).digest()[:8], "big") % buckets


def _read_items(path: str, label: str, rejects: RejectLog) -> Tuple[Dict[int, dict], int]:
    """item_id -> the item part of its candidate rows (minus the row's affinity), and rows read."""
    frame, n_read = shared_data.read_csv(path, ("item_id",) + ITEM_FEATURES, rejects, label)
    item_id = shared_data.integer_values(frame["item_id"])
    feature_0 = pd.to_numeric(frame["item_feature_0"], errors="coerce").to_numpy(dtype=float)
    blank = np.column_stack([frame[c].str.strip().eq("").to_numpy() for c in ITEM_FEATURES[1:]]).any(axis=1)
    with np.errstate(invalid="ignore"):
        reasons = np.select(
            [np.isnan(item_id) | (item_id < 0), pd.Series(item_id).duplicated().to_numpy(),
             ~np.isfinite(feature_0), blank],
            ["bad item_id", "duplicate item_id", "non-numeric item_feature_0", "empty item feature"],
            default="",
        )
    keep = shared_data.reject_rows(frame, reasons, rejects, label)
    items = {}
    for i in np.flatnonzero(keep):
        values = {c: frame[c].iat[i] for c in ITEM_FEATURES}
        items[int(item_id[i])] = {
            "item_id": int(item_id[i]),
            "item_category": stable_hash(f"item_feature_1={values['item_feature_1']}", CATEGORY_BUCKETS),
            "item_tags": [1 + stable_hash(f"{c}={values[c]}", TAG_BUCKETS) for c in ITEM_FEATURES[1:]],
            "feature_0": float(feature_0[i]),
            "raw": {c: values[c] for c in ITEM_FEATURES[1:]},  # the native layout's strings
        }
    return items, n_read


def _read_log(path: str, label: str, items: Dict[int, dict], rejects: RejectLog) -> Tuple[pd.DataFrame, int]:
    """The valid rows of one policy's log, parsed, and the rows read."""
    affinity_columns = [f"{AFFINITY_PREFIX}{i}" for i in sorted(items)]
    frame, n_read = shared_data.read_csv(path, LOG_COLUMNS + tuple(affinity_columns), rejects, label)
    time = pd.to_datetime(frame["timestamp"], utc=True, errors="coerce")
    item_id, position, click = (shared_data.integer_values(frame[c]) for c in ("item_id", "position", "click"))
    propensity = pd.to_numeric(frame["propensity_score"], errors="coerce").to_numpy(dtype=float)
    affinity = np.column_stack(
        [pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype=float) for c in affinity_columns]
    ) if affinity_columns else np.zeros((len(frame), 0))
    blank_user = np.column_stack([frame[c].str.strip().eq("").to_numpy() for c in USER_FEATURES]).any(axis=1)
    with np.errstate(invalid="ignore"):
        reasons = np.select(
            [time.isna().to_numpy() | (time < pd.Timestamp(0, tz="UTC")).to_numpy(),
             ~np.isin(item_id, list(items)),
             ~((position >= 1) & (position <= MAX_POSITION)), ~np.isin(click, (0, 1)),
             ~((propensity > 0) & (propensity <= 1)), blank_user,
             ~np.isfinite(affinity).all(axis=1) | (affinity < 0).any(axis=1)],
            ["bad timestamp", "unknown item_id", f"position outside 1..{MAX_POSITION}", "click not 0/1",
             "propensity_score outside (0, 1]", "empty user feature", "bad user-item affinity"],
            default="",
        )
    keep = shared_data.reject_rows(frame, reasons, rejects, label)
    item_index = np.searchsorted(sorted(items), np.nan_to_num(item_id, nan=-1))
    rows = pd.DataFrame({
        "line": frame[shared_data.LINE_COLUMN].to_numpy()[keep],
        "time_ns": time.to_numpy(dtype="datetime64[ns]").astype(np.int64)[keep],
        "item_id": item_id[keep].astype(np.int64),
        "position": position[keep].astype(np.int64),
        "click": click[keep].astype(np.int64),
        "propensity_score": propensity[keep],
        "affinity": affinity[keep, item_index[keep]] if affinity_columns else np.zeros(int(keep.sum())),
        "affinity_sum": affinity[keep].sum(axis=1),
        "affinity_items": (affinity[keep] > 0).sum(axis=1),
    })
    for c in USER_FEATURES:
        rows[c] = frame[c].to_numpy()[keep]
    return rows, n_read


def _assign_splits(logs: Dict[str, pd.DataFrame], split: str) -> None:
    """Adds the column `split` to each policy's rows."""
    for policy, rows in logs.items():
        if split == "policy":
            rows["split"] = "train" if policy == "bts" else "eval"
            continue
        order = np.lexsort((rows["line"].to_numpy(), rows["time_ns"].to_numpy()))
        n_eval = (len(rows) + 4) // 5  # ceil(n / 5)
        is_eval = np.zeros(len(rows), dtype=bool)
        is_eval[order[len(rows) - n_eval:]] = True
        rows["split"] = np.where(is_eval, "eval", "train")


def _example(policy: str, row, item: dict) -> bytes:
    users = [getattr(row, c) for c in USER_FEATURES]
    request_time = row.time_ns // 10**9
    return make_example({
        "request_id": POLICIES.index(policy) * REQUEST_ID_STRIDE + row.line,
        "request_time": request_time,
        "user_id": stable_hash("|".join(users), USER_BUCKETS),
        "user_dense": [math.log1p(row.affinity_sum), math.log1p(row.affinity_items), 0.0, 0.0],
        "query_tokens": [1 + stable_hash(f"{c}={v}", TOKEN_BUCKETS) for c, v in zip(USER_FEATURES, users)],
        "hour": (request_time // 3600) % 24,
        "device": 0,
        "item_id": item["item_id"],
        "item_category": item["item_category"],
        "item_tags": item["item_tags"],
        "item_dense": [item["feature_0"], float(row.affinity), 0.0, 0.0],
        "ui_position": row.position,
        "ui_format": 0,
        "click": row.click,
        "stage": "rerank_pos",
        "propensity_score": float(row.propensity_score),
        "logging_policy": policy,
    }).SerializeToString(deterministic=True)


def _native_example(policy: str, row, item: dict) -> bytes:
    """A candidate row of the native layout: the OBD's own features, unhashed."""
    request_time = row.time_ns // 10**9
    features = {
        "request_id": POLICIES.index(policy) * REQUEST_ID_STRIDE + row.line,
        "request_time": request_time,
        "hour": (request_time // 3600) % 24,
    }
    features.update({c: getattr(row, c) for c in USER_FEATURES})
    features.update({"item": item["item_id"], "item_feature_0": [item["feature_0"]]})
    features.update(item["raw"])
    features.update({
        "user_item_affinity": [float(row.affinity)],
        "ui_position": row.position,
        "click": row.click,
        "stage": "rerank_pos",
        "propensity_score": float(row.propensity_score),
        "logging_policy": policy,
    })
    return make_example(features).SerializeToString(deterministic=True)


def convert_open_bandit(src_dir: str, out_dir: str, campaign: str = "all", split: str = "time",
                        overwrite: bool = False, layout: str = "package") -> dict:
    """Converts both logging policies of one OBD campaign at `src_dir` into an Examples directory.

    `layout`: "package" (the package's own features, the default) or "native" (the OBD's own
    features, unhashed); see the module docstring."""
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {LAYOUTS} for the Open Bandit Dataset, got {layout!r}")
    if campaign not in CAMPAIGNS:
        raise InputError(f"campaign must be one of {CAMPAIGNS}, got {campaign!r}")
    if split not in SPLIT_RULES:
        raise InputError(f"split must be one of {SPLIT_RULES}, got {split!r}")
    with atomic_output_dir(out_dir, overwrite) as root:
        rows_read: Dict[str, int] = {}
        logs: Dict[str, pd.DataFrame] = {}
        items: Dict[str, Dict[int, dict]] = {}
        with RejectLog(root) as rejects:
            for policy in POLICIES:
                context_file = f"{policy}/{campaign}/item_context.csv"
                log_file = f"{policy}/{campaign}/{campaign}.csv"
                items[policy], rows_read[context_file] = _read_items(
                    os.path.join(src_dir, context_file), context_file, rejects)
                logs[policy], rows_read[log_file] = _read_log(
                    os.path.join(src_dir, log_file), log_file, items[policy], rejects)
        _assign_splits(logs, split)
        by_policy: Dict[str, Dict[str, int]] = {s: {} for s in SPLITS}
        clicks = {s: 0 for s in SPLITS}
        example = _example if layout == "package" else _native_example
        with SplitWriter(root, SPLITS) as writer:
            for policy in POLICIES:
                for row in logs[policy].itertuples(index=False):
                    writer.write(row.split, example(policy, row, items[policy][row.item_id]))
                    by_policy[row.split][policy] = by_policy[row.split].get(policy, 0) + 1
                    clicks[row.split] += row.click
            rows = dict(writer.counts)
        report = {
            "source": "open_bandit", "campaign": campaign, "split": split,
            "rows": rows, "requests": dict(rows),  # one request per logged row
            "rows_by_policy": by_policy, "clicks": clicks,
            "rows_read": rows_read,
            "rejected": dict(sorted(rejects.counts.items())), "rejected_total": sum(rejects.counts.values()),
        }
        if layout != "package":  # the package layout's report is unchanged
            report["layout"] = layout
        write_report(root, report)
    return report
