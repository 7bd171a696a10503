"""Tests of the converters' native layouts (datasources/movielens.py, datasources/open_bandit.py):
the datasets' own features, nothing invented, and a clicks-only MovieLens log without tiers.

Most tests run on tiny hand-made CSVs in tmp_path (seconds). The tests on the real datasets read
them in place from the shared data directory and skip, naming the missing path, where it is absent
(`tests.test_converters._need`). Expected values are recomputed here from the CSVs.
"""
import collections
import os
import re

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from cascade_ranking.datasources.example_io import InputError, read_examples
from cascade_ranking.datasources.movielens import convert_movielens
from cascade_ranking.datasources.open_bandit import convert_open_bandit
from tests.test_converters import ML_DIR, OBD_DIR, SPLITS, _need, _same_bytes, _tiny_open_bandit, _write_csv

ML_KEYS = {"request_id", "request_time", "click"}
ML_NATIVE_QUERY = {"user", "hour", "weekday", "history_genres"}
ML_NATIVE_ITEM = {"movie", "genres", "tags", "year"}
ML_NATIVE = ML_KEYS | ML_NATIVE_QUERY | ML_NATIVE_ITEM | {"stage", "ui_position"}
ML_CLICKS = ML_KEYS | ML_NATIVE_QUERY | ML_NATIVE_ITEM
OBD_USER = {f"user_feature_{k}" for k in range(4)}
OBD_NATIVE = ({"request_id", "request_time", "click", "stage", "propensity_score", "logging_policy", "hour", "item",
               "item_feature_0", "item_feature_1", "item_feature_2", "item_feature_3", "user_item_affinity",
               "ui_position"} | OBD_USER)
YEAR = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*\d{4})?\)\s*$")


def _rows(out_dir):
    """Every row of both splits as {feature: [values]} (bytes decoded), plus "split"."""
    out = []
    for split in SPLITS:
        for example in read_examples(os.path.join(str(out_dir), f"Split-{split}")):
            row = {"split": split}
            for name, feature in example.features.feature.items():
                kind = feature.WhichOneof("kind")
                values = list(getattr(feature, kind).value)
                row[name] = [v.decode() for v in values] if kind == "bytes_list" else values
            out.append(row)
    return out


def _one(row, name):
    (value,) = row[name]
    return value


# ---- tiny MovieLens ----------------------------------------------------------------------------

M = 1_000  # movie m of the tiny MovieLens has movieId M × m (sparse ids, as MovieLens's)


def _genres(m):
    return ("Comedy|Drama", "Action|Sci-Fi|Action", "(no genres listed)")[m % 3]


def _tiny_movielens(root):
    """Movie m is movieId M × m. User 1 rates movies 1..24 at t = 1000 + m (train: 19 in 2 requests,
    eval: the last 5 from t = 1020); user 7 rates 20..26 at t = 2000 + m (train: 5, eval: 2 from
    t = 2025). Movie 5 has no year."""
    movies = [[M * m, f"Movie {m} (19{m + 30})" if m != 5 else "A Movie Without Year", _genres(m)]
              for m in range(1, 61)]
    ratings = [[1, M * m, 3.0 + (m % 5) / 2, 1_000 + m] for m in range(1, 25)]
    ratings += [[7, M * m, 4.5 if m % 2 else 2.0, 2_000 + m] for m in range(20, 27)]
    tags = [
        [1, 3 * M, "Funny", 1_005], [7, 3 * M, " funny ", 1_500], [1, 3 * M, "Dark", 1_006],
        [1, 3 * M, "Later", 1_030],  # user 1 rated movie 3 in train: counted, whenever tagged
        [7, 4 * M, "Classic", 2_030],  # user 7 never rated movie 4: counted
        [1, 22 * M, "Spoiler", 1_022],  # user 1 rated movie 22 in eval: not counted
        [7, 22 * M, "Train Tag", 2_022],  # user 7 rated movie 22 in train: counted
        [7, 25 * M, "eval tag", 2_025],  # user 7 rated movie 25 in eval: not counted, movie 25 has no tag
        [1, 99_999, "ghost", 1],  # unknown movieId: rejected
        [1, 2 * M, "  ", 1],  # empty tag: rejected
    ]
    tags += [[7, 6 * M, f"tag {chr(ord('l') - k)}", 100 + k] for k in range(12)]  # 12 tags of 1: the first 10 by name
    _write_csv(os.path.join(root, "movies.csv"), ["movieId", "title", "genres"], movies)
    _write_csv(os.path.join(root, "ratings.csv"), ["userId", "movieId", "rating", "timestamp"], ratings)
    _write_csv(os.path.join(root, "tags.csv"), ["userId", "movieId", "tag", "timestamp"], tags)
    return root


@pytest.fixture
def tiny_ml(tmp_path):
    return _tiny_movielens(str(tmp_path / "src"))


EXPECTED_TAGS = {  # movie 6: 12 tags of one use each, the first 10 by name
    3 * M: ["funny", "dark", "later"], 4 * M: ["classic"], 22 * M: ["train tag"],
    6 * M: sorted(f"tag {chr(ord('l') - k)}" for k in range(12))[:10],
}


def test_movielens_native_rows_carry_exactly_movielens_features(tiny_ml, tmp_path):
    report = convert_movielens(tiny_ml, str(tmp_path / "native"), seed=3, layout="native")
    rows = _rows(tmp_path / "native")
    assert report["layout"] == "native" and report["rows_read"]["tags.csv"] == 22
    assert report["rejected"] == {"tags.csv: empty tag": 1, "tags.csv: unknown movieId": 1}
    movies = pd.read_csv(os.path.join(tiny_ml, "movies.csv")).set_index("movieId")
    ratings = pd.read_csv(os.path.join(tiny_ml, "ratings.csv"))
    rated = set(zip(ratings["userId"], ratings["movieId"]))
    for row in rows:
        assert set(row) - {"split"} == ML_NATIVE, "a feature that MovieLens does not have"
        movie = _one(row, "movie")
        title, genres = movies.loc[movie, "title"], movies.loc[movie, "genres"]
        assert row["genres"] == list(dict.fromkeys(genres.split("|")))  # the real genre names, deduplicated
        year = YEAR.search(title)
        assert row["year"] == [int(year.group(1)) if year else 0]
        assert row["tags"] == EXPECTED_TAGS.get(movie, ["(no tag)"])
        time = pd.Timestamp(_one(row, "request_time"), unit="s", tz="UTC")
        assert row["hour"] == [time.hour] and row["weekday"] == [time.weekday()]
        shown = _one(row, "ui_position") > 0
        assert shown == ((_one(row, "user"), movie) in rated)
        tiers = ("rerank_pos", "rerank_neg") if shown else ("rank_neg", "coarse_neg", "prerank_neg")
        assert _one(row, "stage") in tiers
    by_request = collections.defaultdict(list)
    for row in rows:
        by_request[_one(row, "request_id")].append(row)
    for request in by_request.values():  # query features: one value per request
        for name in ML_NATIVE_QUERY:
            assert all(r[name] == request[0][name] for r in request)
    assert {_one(r[0], "request_id"): r[0]["history_genres"] for r in by_request.values()} == {
        0: ["(no history)"],  # user 1's first train request
        1: ["Action", "Comedy", "Drama", "Sci-Fi"],  # movies 6..10: 2 × C|D, 2 × A|S (ties by name), 1 none
        2: ["Action", "Comedy", "Drama", "Sci-Fi"],  # user 1 eval: movies 15..19, the same
        3: ["(no history)"],  # user 7 train (5 ratings)
        4: ["Comedy", "Drama", "Action", "Sci-Fi"],  # user 7 eval: movies 20..24: 2 × C|D, 1 × A|S, 2 none
    }
    assert [by_request[k][0]["user"] for k in sorted(by_request)] == [[1], [1], [1], [7], [7]]  # raw userIds


def test_movielens_native_has_the_package_layouts_requests_and_candidates(tiny_ml, tmp_path):
    convert_movielens(tiny_ml, str(tmp_path / "package"), seed=3)
    convert_movielens(tiny_ml, str(tmp_path / "native"), seed=3, layout="native")
    movie_ids = np.sort(pd.read_csv(os.path.join(tiny_ml, "movies.csv"))["movieId"].to_numpy())
    package = [(r["split"], _one(r, "request_id"), int(movie_ids[_one(r, "item_id")]), _one(r, "stage"),
                _one(r, "ui_position"), _one(r, "click"), _one(r, "request_time")) for r in _rows(tmp_path / "package")]
    native = [(r["split"], _one(r, "request_id"), _one(r, "movie"), _one(r, "stage"), _one(r, "ui_position"),
               _one(r, "click"), _one(r, "request_time")) for r in _rows(tmp_path / "native")]
    assert native == package
    assert len(native) == 31 + 5 * 30


def test_movielens_clicks_layout_is_a_log_without_tiers(tiny_ml, tmp_path):
    report = convert_movielens(tiny_ml, str(tmp_path / "clicks"), layout="clicks")
    rows = _rows(tmp_path / "clicks")
    ratings = pd.read_csv(os.path.join(tiny_ml, "ratings.csv"))
    rating = {(u, m): r for u, m, r in zip(ratings["userId"], ratings["movieId"], ratings["rating"])}
    assert len(rows) == len(ratings) == sum(report["rows"].values())  # only the rated movies
    assert all(set(r) - {"split"} == ML_CLICKS for r in rows)  # no stage, no ui_position
    in_requests = sorted(rows, key=lambda r: _one(r, "request_id"))  # stable: time order within a request
    assert [(_one(r, "user"), _one(r, "movie")) for r in in_requests] == sorted(rating)
    assert all(_one(r, "click") == int(rating[_one(r, "user"), _one(r, "movie")] >= 4.0) for r in rows)
    assert report["clicks"] == {s: sum(_one(r, "click") for r in rows if r["split"] == s) for s in SPLITS}
    assert report["requests"] == {"train": 3, "eval": 2} and "rows_by_stage" not in report
    native = convert_movielens(tiny_ml, str(tmp_path / "native"), layout="native")
    shown = [r for r in _rows(tmp_path / "native") if _one(r, "ui_position") > 0]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("stage", "ui_position")}  # noqa: E731
    assert [strip(r) for r in shown] == rows  # the native layout's shown rows, untiered
    assert report["requests"] == native["requests"]


def test_native_layouts_are_deterministic(tiny_ml, tmp_path):
    for layout in ("native", "clicks"):
        a = convert_movielens(tiny_ml, str(tmp_path / f"{layout}_a"), layout=layout)
        b = convert_movielens(tiny_ml, str(tmp_path / f"{layout}_b"), layout=layout)
        assert a == b and _same_bytes(str(tmp_path / f"{layout}_a"), str(tmp_path / f"{layout}_b"))


def test_unknown_layouts_are_refused(tiny_ml, tmp_path):
    with pytest.raises(InputError, match="layout"):
        convert_movielens(tiny_ml, str(tmp_path / "out"), layout="wide")
    with pytest.raises(InputError, match="layout"):
        convert_open_bandit(str(tmp_path), str(tmp_path / "out"), layout="clicks")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_native_movielens_needs_tags_csv(tiny_ml, tmp_path):
    os.remove(os.path.join(tiny_ml, "tags.csv"))
    convert_movielens(tiny_ml, str(tmp_path / "package"))  # the package layout does not read it
    with pytest.raises(InputError, match="tags.csv"):
        convert_movielens(tiny_ml, str(tmp_path / "native"), layout="native")


# ---- tiny Open Bandit ---------------------------------------------------------------------------

def test_open_bandit_native_rows_carry_the_raw_strings(tmp_path):
    src = _tiny_open_bandit(str(tmp_path / "src"))
    package = convert_open_bandit(src, str(tmp_path / "package"))
    native = convert_open_bandit(src, str(tmp_path / "native"), layout="native")
    assert native == dict(package, layout="native")
    rows = _rows(tmp_path / "native")
    assert len(rows) == 16
    for row in rows:
        assert set(row) - {"split"} == OBD_NATIVE, "a feature that the OBD does not have"
        n = _one(row, "request_id") % 10**9 - 2  # the log's index column (line 2 is row 0)
        item = n % 3
        assert [row[f"user_feature_{k}"] for k in range(4)] == [["a"], ["b"], [f"u{n % 2}"], ["d"]]
        assert row["item"] == [item] and row["item_feature_0"] == [0.5 * item]
        assert [row[f"item_feature_{k}"] for k in (1, 2, 3)] == [[f"c{item % 2}"], [f"d{item}"], ["e"]]
        assert row["user_item_affinity"] == [float(n % 2) if item == 1 else 0.0]
        assert row["ui_position"] == [1 + n % 3] and row["click"] == [int(n == 4)]
        assert row["stage"] == ["rerank_pos"] and row["propensity_score"] == [0.25]
    package_rows = _rows(tmp_path / "package")
    keys = ("split", "request_id", "request_time", "click", "ui_position", "logging_policy")
    assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in package_rows]


# ---- the native layouts are usable by the pipeline: `cascade init` -------------------------------

@pytest.mark.parametrize("layout", ["native", "clicks"])
def test_cascade_init_reads_native_movielens(tiny_ml, tmp_path, capsys, layout):
    from cascade_ranking.pipelines import cli

    out = str(tmp_path / layout)
    assert cli.main(["convert", "movielens", "--src", tiny_ml, "--out", out, "--layout", layout]) == 0
    assert f"({layout} layout)" in capsys.readouterr().out
    assert cli.main(["init", "--examples-dir", out, "--out", str(tmp_path / "start")]) == 0
    printed = capsys.readouterr().out
    for line in ("movie: item, id int64", "genres: item, ids string", "tags: item, ids string",
                 "year: item, id int64", "user: query, id int64", "history_genres: query, ids string",
                 "hour: query, id int64", "weekday: query, id int64", "item_key: movie"):
        assert line in printed, printed
    assert ("ui_position: ui" in printed) == (layout == "native")
    assert ("no stage (tiers)" in printed) == (layout == "clicks")
    assert os.path.isfile(tmp_path / "start" / "cascade.yaml")


def test_cli_refuses_clicks_layout_for_obd(tmp_path, capsys):
    from cascade_ranking.pipelines import cli

    code = cli.main(["convert", "obd", "--src", str(tmp_path), "--out", str(tmp_path / "out"), "--layout", "clicks"])
    err = capsys.readouterr().err
    assert code == 2 and "--layout clicks is only for movielens" in err and len(err.strip().splitlines()) == 1


# ---- the real datasets ---------------------------------------------------------------------------

def _parse(out_dir, scalars, lists=()):
    """Int64 scalars and bytes lists of both splits (tf.io.parse_example, fast on 100k rows)."""
    spec = {k: tf.io.FixedLenFeature([], tf.int64) for k in scalars}
    spec.update({k: tf.io.VarLenFeature(tf.string) for k in lists})
    files = sorted(tf.io.gfile.glob(os.path.join(str(out_dir), "Split-*", "*.gz")))
    parts = collections.defaultdict(list)
    for batch in tf.data.TFRecordDataset(files, compression_type="GZIP").batch(16384).map(
            lambda b: tf.io.parse_example(b, spec)):
        for k in scalars:
            parts[k].append(batch[k].numpy())
        for k in lists:
            dense = tf.sparse.to_dense(batch[k], default_value=b"").numpy()
            parts[k].extend(tuple(v.decode() for v in r if v) for r in dense)
    return pd.DataFrame({k: np.concatenate(parts[k]) if k in scalars else parts[k] for k in spec})


def test_real_movielens_clicks_rows_are_the_ratings_with_their_genres_and_tags(tmp_path):
    _need(ML_DIR)
    report = convert_movielens(ML_DIR, str(tmp_path / "clicks"), layout="clicks")
    rows = _parse(tmp_path / "clicks", ("user", "movie", "click"), ("genres", "tags"))
    ratings = pd.read_csv(os.path.join(ML_DIR, "ratings.csv"))
    assert len(rows) == len(ratings) == sum(report["rows"].values()) == 100_836
    joined = rows.merge(ratings, left_on=["user", "movie"], right_on=["userId", "movieId"], validate="1:1")
    assert len(joined) == len(rows) and (joined["click"] == (joined["rating"] >= 4.0)).all()
    movies = pd.read_csv(os.path.join(ML_DIR, "movies.csv")).set_index("movieId")
    genres = movies["genres"].str.split("|").map(tuple)
    assert (rows["genres"] == rows["movie"].map(genres)).all()
    tags = pd.read_csv(os.path.join(ML_DIR, "tags.csv"))
    real = tags.assign(tag=tags["tag"].str.strip().str.lower()).groupby("movieId")["tag"].agg(set)
    tagged = rows[rows["tags"] != ("(no tag)",)]
    assert len(tagged) > 10_000
    assert all(set(t) <= real[m] for m, t in zip(tagged["movie"], tagged["tags"]))  # the movie's real tags
    assert (rows["tags"].map(len) <= 10).all()


def test_real_open_bandit_native_rows_carry_the_raw_strings(tmp_path):
    _need(OBD_DIR)
    report = convert_open_bandit(OBD_DIR, str(tmp_path / "native"), layout="native")
    rows = _parse(tmp_path / "native", ("request_id", "item"), sorted(OBD_USER) + ["logging_policy"])
    assert len(rows) == sum(report["rows"].values()) == 20_000
    for policy in ("random", "bts"):
        log = pd.read_csv(os.path.join(OBD_DIR, policy, "all", "all.csv"), index_col=0, dtype=str)
        mine = rows[rows["logging_policy"] == (policy,)]
        lines = mine["request_id"].to_numpy() % 10**9 - 2
        for k in range(4):
            assert (mine[f"user_feature_{k}"].map(lambda v: v[0]).to_numpy()
                    == log[f"user_feature_{k}"].to_numpy()[lines]).all()
        assert (mine["item"].to_numpy() == log["item_id"].astype(int).to_numpy()[lines]).all()
