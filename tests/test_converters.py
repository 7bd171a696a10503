"""Tests of the real-data converters (datasources/movielens.py, datasources/open_bandit.py).

The full conversions read the shared datasets (never copied into the project) and are skipped, with
the missing path named, where they are absent. Expected figures are recomputed here from the source
CSVs, independently of the converters. The bad-input tests write tiny hand-made CSVs to tmp_path.
"""
import csv
import filecmp
import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from cascade_ranking.datasources import shared_data
from cascade_ranking.datasources.example_io import InputError
from cascade_ranking.datasources.movielens import convert_movielens
from cascade_ranking.datasources.open_bandit import convert_open_bandit
from cascade_ranking.schema import features

ML_DIR = shared_data.shared_data_path("ml-latest-small")
OBD_DIR = shared_data.shared_data_path("open-bandit-small")
SPLITS = ("train", "eval")
SHOWN = ("rerank_pos", "rerank_neg")
SAMPLED = ("rank_neg", "coarse_neg", "prerank_neg")
INT_KEYS = ("request_id", "request_time", "user_id", "item_id", "ui_position", "click", "hour")


def _need(path):
    if not os.path.isdir(path):
        pytest.skip(f"shared dataset not found: {path} (set ${shared_data.ENV_VAR} to the shared data dir)")


def _load(out_dir, split, strings=("stage",), dense=()):
    """The scalar features (and dense vectors) of one split as a DataFrame."""
    spec = {k: tf.io.FixedLenFeature([], tf.int64) for k in INT_KEYS}
    spec.update({k: tf.io.FixedLenFeature([], tf.string) for k in strings})
    spec.update({k: tf.io.FixedLenFeature([4], tf.float32) for k in dense})
    files = tf.io.gfile.glob(os.path.join(str(out_dir), f"Split-{split}", "*.gz"))
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(16384)
    parts = {k: [] for k in spec}
    for batch in dataset.map(lambda b: tf.io.parse_example(b, spec)).as_numpy_iterator():
        for k, v in batch.items():
            parts[k].append(v)
    frame = pd.DataFrame({k: np.concatenate(v) for k, v in parts.items() if k not in dense})
    for k in strings:
        frame[k] = frame[k].map(bytes.decode)
    for k in dense:
        frame[[f"{k}_{i}" for i in range(4)]] = np.concatenate(parts[k])
    frame["split"] = split
    return frame


def _load_all(out_dir, **kwargs):
    return pd.concat([_load(out_dir, s, **kwargs) for s in SPLITS], ignore_index=True)


def _same_bytes(a, b):
    files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    assert files == sorted(os.path.relpath(os.path.join(d, f), b) for d, _, fs in os.walk(b) for f in fs)
    return all(filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False) for f in files)


def _tfdv_anomalies(out_dir):
    import tensorflow_data_validation as tfdv  # heavy import, only where used

    stats = tfdv.generate_statistics_from_tfrecord(data_location=os.path.join(str(out_dir), "Split-*", "*.gz"))
    return tfdv.validate_statistics(stats, features.load_schema(), environment="TRAINING").anomaly_info


def _write_csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _rejected(out_dir):
    with open(os.path.join(str(out_dir), "rejected.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---- MovieLens on the shared data ------------------------------------------------------------

@pytest.fixture(scope="module")
def ml_out(tmp_path_factory):
    _need(ML_DIR)
    out = tmp_path_factory.mktemp("movielens") / "examples"
    report = convert_movielens(ML_DIR, str(out), seed=0)
    return out, report


@pytest.fixture(scope="module")
def ml_rows(ml_out):
    """Output rows joined to their source rating, with the split each rating should be in."""
    out, _ = ml_out
    rows = _load_all(out, dense=("item_dense",))
    ratings = pd.read_csv(os.path.join(ML_DIR, "ratings.csv"))
    movie_ids = np.sort(pd.read_csv(os.path.join(ML_DIR, "movies.csv"))["movieId"].to_numpy())
    user_ids = np.sort(ratings["userId"].unique())
    rows["userId"] = user_ids[rows["user_id"]]
    rows["movieId"] = movie_ids[rows["item_id"]]
    ratings = ratings.sort_values(["userId", "timestamp", "movieId"]).reset_index(drop=True)
    ratings["rank"] = ratings.groupby("userId").cumcount()
    n = ratings.groupby("userId")["userId"].transform("size")
    n_eval = n.map(lambda k: math.ceil(k / 5))
    ratings["expected_split"] = np.where(ratings["rank"] >= n - n_eval, "eval", "train")
    return rows, ratings


def test_movielens_counts(ml_out, ml_rows):
    out, report = ml_out
    rows, ratings = ml_rows
    shown = rows[rows["stage"].isin(SHOWN)]
    assert len(shown) == len(ratings) == report["rows_read"]["ratings.csv"]
    assert report["rejected_total"] == 0
    per_user = ratings.groupby("userId").size()
    n_eval = per_user.map(lambda n: math.ceil(n / 5))
    assert (shown["split"] == "eval").sum() == n_eval.sum()
    expected_requests = {
        "train": int(((per_user - n_eval) / 10).map(math.ceil).sum()),
        "eval": int((n_eval / 10).map(math.ceil).sum()),
    }
    for split in SPLITS:
        part = rows[rows["split"] == split]
        assert report["rows"][split] == len(part)
        assert report["requests"][split] == part["request_id"].nunique() == expected_requests[split]
    tiers = rows[rows["stage"].isin(SAMPLED)].groupby(["request_id", "stage"]).size()
    assert len(tiers) == 3 * rows["request_id"].nunique() and (tiers == 10).all()


def test_movielens_split_rule_and_windows(ml_rows):
    rows, ratings = ml_rows
    shown = rows[rows["stage"].isin(SHOWN)].merge(ratings, on=["userId", "movieId"], how="left", validate="1:1")
    assert shown["rating"].notna().all()
    # each rating is in its user's split: eval = the latest 20 % (ceil) of the user's ratings
    assert (shown["split"] == shown["expected_split"]).all()
    # a request is a window of <= 10 consecutive ratings of one user, shown at positions 1..k in time order
    by_request = shown.groupby("request_id")
    assert (by_request["userId"].nunique() == 1).all() and (by_request["split"].nunique() == 1).all()
    assert (by_request.size() <= 10).all()
    assert ((shown["rank"] - shown["ui_position"]).groupby(shown["request_id"]).nunique() == 1).all()
    assert (by_request["ui_position"].min() == 1).all()
    assert (by_request["request_time"].first() == by_request["timestamp"].max()).all()
    assert (shown["hour"] == pd.to_datetime(shown["request_time"], unit="s", utc=True).dt.hour).all()


def test_movielens_requests_do_not_mix_users_or_splits(ml_rows):
    rows, ratings = ml_rows
    by_request = rows.groupby("request_id")
    assert (by_request["user_id"].nunique() == 1).all()
    assert (by_request["split"].nunique() == 1).all()
    assert (by_request["request_time"].nunique() == 1).all()
    assert not rows.duplicated(["request_id", "item_id"]).any()
    sampled = rows[rows["stage"].isin(SAMPLED)]
    assert (sampled["ui_position"] == 0).all() and (sampled["click"] == 0).all()
    rated = sampled.merge(ratings[["userId", "movieId"]], on=["userId", "movieId"], how="inner")
    assert rated.empty, "a sampled negative was rated by its user"


def test_movielens_ground_truth_is_ratings_of_4_or_more(ml_rows):
    rows, ratings = ml_rows
    shown = rows[rows["stage"].isin(SHOWN)].merge(ratings, on=["userId", "movieId"], validate="1:1")
    assert ((shown["stage"] == "rerank_pos") == (shown["rating"] >= 4.0)).all()
    assert (shown["click"] == (shown["rating"] >= 4.0)).all()
    assert (rows["stage"] == "rerank_pos").sum() == (ratings["rating"] >= 4.0).sum()


def test_movielens_item_statistics_come_from_train_only(ml_rows):
    rows, ratings = ml_rows
    train_counts = ratings[ratings["expected_split"] == "train"].groupby("movieId").size()
    expected = np.log1p(rows["movieId"].map(train_counts).fillna(0).to_numpy())
    np.testing.assert_allclose(rows["item_dense_0"], expected, rtol=1e-6)


@pytest.mark.slow  # about 25 s: TFDV statistics over 420k rows
def test_movielens_passes_tfdv(ml_out):
    out, _ = ml_out
    assert dict(_tfdv_anomalies(out)) == {}


def test_movielens_is_deterministic(ml_out, tmp_path):
    out, report = ml_out
    again = convert_movielens(ML_DIR, str(tmp_path / "again"), seed=0)
    assert again == report
    assert _same_bytes(str(out), str(tmp_path / "again"))


# ---- Open Bandit on the shared data ----------------------------------------------------------

@pytest.fixture(scope="module")
def obd_out(tmp_path_factory):
    _need(OBD_DIR)
    out = tmp_path_factory.mktemp("obd") / "examples"
    report = convert_open_bandit(OBD_DIR, str(out), campaign="all", split="time")
    return out, report


@pytest.fixture(scope="module")
def obd_logs():
    _need(OBD_DIR)
    return {p: pd.read_csv(os.path.join(OBD_DIR, p, "all", "all.csv"), index_col=0) for p in ("random", "bts")}


def test_open_bandit_counts_and_time_split(obd_out, obd_logs):
    out, report = obd_out
    rows = _load_all(out, strings=("stage", "logging_policy"))
    assert len(rows) == sum(len(log) for log in obd_logs.values()) - report["rejected_total"]
    assert report["rejected_total"] == 0
    assert rows["request_id"].is_unique  # one shown candidate per request
    assert (rows["stage"] == "rerank_pos").all()
    assert rows["click"].sum() == sum(int(log["click"].sum()) for log in obd_logs.values())
    for policy, log in obd_logs.items():
        mine = rows[rows["logging_policy"] == policy]
        assert len(mine) == len(log)
        eval_rows, train_rows = mine[mine["split"] == "eval"], mine[mine["split"] == "train"]
        assert len(eval_rows) == math.ceil(len(log) / 5)
        assert train_rows["request_time"].max() <= eval_rows["request_time"].min()
        assert sorted(mine["ui_position"].unique()) == sorted(log["position"].unique())
    for split in SPLITS:
        assert report["rows"][split] == report["requests"][split] == (rows["split"] == split).sum()
    times = pd.to_datetime(pd.concat(list(obd_logs.values()))["timestamp"], utc=True)
    assert rows["request_time"].min() == int(times.min().timestamp())
    assert (rows["hour"] == pd.to_datetime(rows["request_time"], unit="s", utc=True).dt.hour).all()


def test_open_bandit_policy_split(tmp_path, obd_logs):
    report = convert_open_bandit(OBD_DIR, str(tmp_path / "out"), split="policy")
    rows = _load_all(tmp_path / "out", strings=("logging_policy",))
    assert (rows.loc[rows["split"] == "train", "logging_policy"] == "bts").all()
    assert (rows.loc[rows["split"] == "eval", "logging_policy"] == "random").all()
    assert report["rows"] == {"train": len(obd_logs["bts"]), "eval": len(obd_logs["random"])}


def test_open_bandit_passes_tfdv(obd_out):
    out, _ = obd_out
    assert dict(_tfdv_anomalies(out)) == {}


def test_open_bandit_is_deterministic(obd_out, tmp_path):
    out, report = obd_out
    assert convert_open_bandit(OBD_DIR, str(tmp_path / "again")) == report
    assert _same_bytes(str(out), str(tmp_path / "again"))


# ---- bad input (tiny hand-made CSVs) ---------------------------------------------------------

def _tiny_movielens(root, drop_column=None):
    movies = [[m, f"Movie {m} (19{m + 50})", "Comedy|Drama" if m % 2 else "Action"] for m in range(1, 61)]
    ratings = [[1, m, 3.0 + (m % 5) / 2, 1_000 + m] for m in range(1, 13)]
    ratings += [[2, m, 4.5, 2_000 + m] for m in range(20, 27)]
    ratings += [
        [1, 40, "abc", 1_500],  # non-numeric rating
        [1, 41, 7.0, 1_501],  # rating out of range
        [2, 99_999, 4.0, 1_502],  # unknown movieId
        [2, 42, 4.0],  # wrong number of fields
    ]
    header = ["userId", "movieId", "rating", "timestamp"]
    if drop_column:
        i = header.index(drop_column)
        header = header[:i] + header[i + 1:]
        ratings = [r[:i] + r[i + 1:] for r in ratings[:-1]]
    _write_csv(os.path.join(root, "ratings.csv"), header, ratings)
    _write_csv(os.path.join(root, "movies.csv"), ["movieId", "title", "genres"], movies)
    return root


def test_movielens_bad_rows_are_rejected_and_counted(tmp_path):
    src = _tiny_movielens(str(tmp_path / "src"))
    report = convert_movielens(src, str(tmp_path / "out"))
    assert report["rejected"] == {
        "ratings.csv: non-numeric rating": 1,
        "ratings.csv: rating outside 0.5..5.0": 1,
        "ratings.csv: unknown movieId": 1,
        "ratings.csv: wrong number of fields": 1,
    }
    assert report["rows_read"] == {"ratings.csv": 23, "movies.csv": 60}
    assert len(_rejected(tmp_path / "out")) == 4
    rows = _load_all(tmp_path / "out")
    assert rows["stage"].isin(SHOWN).sum() == 19  # the valid ratings
    assert report["requests"] == {"train": 2, "eval": 2}  # user 1: 9 + 3 ratings, user 2: 5 + 2
    assert len(rows) == 19 + 4 * 30


def test_movielens_seed_changes_only_the_sampled_negatives(tmp_path):
    src = _tiny_movielens(str(tmp_path / "src"))
    convert_movielens(src, str(tmp_path / "a"), seed=1)
    convert_movielens(src, str(tmp_path / "b"), seed=2)
    a, b = _load_all(tmp_path / "a"), _load_all(tmp_path / "b")
    shown = [r[r["stage"].isin(SHOWN)].reset_index(drop=True) for r in (a, b)]
    pd.testing.assert_frame_equal(shown[0], shown[1])
    assert not a["item_id"].equals(b["item_id"])


@pytest.mark.parametrize("column", ["timestamp", "rating"])
def test_movielens_missing_column_names_it(tmp_path, column):
    src = _tiny_movielens(str(tmp_path / "src"), drop_column=column)
    with pytest.raises(InputError, match=f"'{column}'"):
        convert_movielens(src, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["src"]  # nothing half-written


def test_movielens_missing_file_names_it(tmp_path):
    src = _tiny_movielens(str(tmp_path / "src"))
    os.remove(os.path.join(src, "ratings.csv"))
    with pytest.raises(InputError, match="ratings.csv"):
        convert_movielens(src, str(tmp_path / "out"))


def _tiny_open_bandit(root, drop_column=None):
    items = [[i, i, 0.5 * i, f"c{i % 2}", f"d{i}", "e"] for i in range(3)]
    header = ["", "timestamp", "item_id", "position", "click", "propensity_score"]
    header += [f"user_feature_{k}" for k in range(4)] + [f"user-item_affinity_{i}" for i in range(3)]
    for policy in ("random", "bts"):
        log = [[n, f"2019-11-24 0{n}:00:00.5+00:00", n % 3, 1 + n % 3, int(n == 4), 0.25, "a", "b", f"u{n % 2}", "d",
                0.0, float(n % 2), 0.0] for n in range(10)]
        log[2][3] = 0  # position 0: not a shown slot
        log[5][2] = 7  # item not in item_context.csv
        cols = header
        if drop_column:
            i = header.index(drop_column)
            cols, log = header[:i] + header[i + 1:], [r[:i] + r[i + 1:] for r in log]
        _write_csv(os.path.join(root, policy, "all", "all.csv"), cols, log)
        _write_csv(os.path.join(root, policy, "all", "item_context.csv"),
                   ["", "item_id", "item_feature_0", "item_feature_1", "item_feature_2", "item_feature_3"], items)
    return root


def test_open_bandit_bad_rows_are_rejected_and_counted(tmp_path):
    src = _tiny_open_bandit(str(tmp_path / "src"))
    report = convert_open_bandit(src, str(tmp_path / "out"))
    assert report["rejected"] == {
        "random/all/all.csv: position outside 1..10": 1, "random/all/all.csv: unknown item_id": 1,
        "bts/all/all.csv: position outside 1..10": 1, "bts/all/all.csv: unknown item_id": 1,
    }
    assert [r["record"]["line"] for r in _rejected(tmp_path / "out")] == [4, 7, 4, 7]
    assert report["rows"] == {"train": 12, "eval": 4}  # 8 valid rows per policy, ceil(8 / 5) = 2 eval
    rows = _load_all(tmp_path / "out", strings=("logging_policy",))
    assert len(rows) == 16 and rows["request_id"].is_unique


@pytest.mark.parametrize("column", ["click", "user-item_affinity_2"])
def test_open_bandit_missing_column_names_it(tmp_path, column):
    src = _tiny_open_bandit(str(tmp_path / "src"), drop_column=column)
    with pytest.raises(InputError, match=f"'{column}'"):
        convert_open_bandit(src, str(tmp_path / "out"))


def test_open_bandit_rejects_unknown_arguments(tmp_path):
    with pytest.raises(InputError, match="campaign"):
        convert_open_bandit(str(tmp_path), str(tmp_path / "out"), campaign="kids")
    with pytest.raises(InputError, match="split"):
        convert_open_bandit(str(tmp_path), str(tmp_path / "out"), split="hash")
