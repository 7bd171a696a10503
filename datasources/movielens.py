"""MovieLens ml-latest-small -> candidate rows (DESIGN §4), one tf.Example per request x item.

Rule (datasources/README.md has the full feature table):
- Each user's ratings are sorted by (timestamp, movieId). The last ceil(n/5) (20 %, rounded up) are
  the eval part, the rest the train part.
- A request is a window of up to 10 consecutive ratings of one user within one part (windows start
  at the first rating of the part). Its rated items are the shown items: ui_position 1..k in time
  order, ui_format 0; rating >= 4.0 -> stage `rerank_pos`, click 1; else `rerank_neg`, click 0.
- Then 10 `rank_neg` items sampled in proportion to train popularity (+1), 10 `coarse_neg` in
  proportion to sqrt(train popularity + 1) and 10 `prerank_neg` uniformly, all without replacement
  from the movies the user never rated, no item twice in a request; click 0, ui_position 0. The rng
  is `np.random.default_rng([seed, request_id])`.
- Item statistics come from the train part only; user statistics from the user's ratings before
  the window. request_time is the timestamp of the window's last rating; hour is its UTC hour.
- A malformed rating or movie row is diverted to rejected.jsonl; a missing file or column raises
  InputError.

Layouts (`layout=`):
- "package" (default): the package's own 13-feature layout above (user_dense, query_tokens,
  item_dense, ...), byte-identical to earlier versions.
- "native": the same requests and candidates (same windows, same sampled negatives for a seed), with
  MovieLens's own features and nothing invented: `user` (userId), `hour`, `weekday`,
  `history_genres` (query side); `movie` (movieId, the item id), `genres`, `tags`, `year` (item
  side); `ui_position`, `click`, `stage`. Also reads tags.csv.
- "clicks": a clicks-only log: the shown (rated) rows of the same windows only, no sampled
  negatives, no `stage` and no `ui_position`; click = rating >= 4; the native features.
  Its ground truth is the clicked rows, and every row was shown (schema.features.tier_without_stage).
In the native layouts a movie's `tags` are its most frequent tags of tags.csv (lower-cased, at most
10; "(no tag)" when none), counted over the tag rows whose tagger did not rate that movie in their
eval part: like popularity, tags come from the train part, and no tag reveals an eval rating.
"""
import collections
import functools
import math
import os
import re
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pandas as pd
import tensorflow as tf

from cascade_ranking.datasources import shared_data
from cascade_ranking.datasources.example_io import (
    InputError, RejectLog, SplitWriter, atomic_output_dir, make_example, write_report,
)

RATINGS_FILE = "ratings.csv"
MOVIES_FILE = "movies.csv"
TAGS_FILE = "tags.csv"
LAYOUTS = ("package", "native", "clicks")
SPLITS = ("train", "eval")
WINDOW = 10  # shown items per request
NEGATIVES_PER_TIER = 10
SAMPLED_TIERS = ("rank_neg", "coarse_neg", "prerank_neg")
POSITIVE_RATING = 4.0
MIN_RATING, MAX_RATING = 0.5, 5.0
HISTORY_MOVIES = 5  # movies whose genres make the query tokens
MAX_TOKENS = 8  # value_count max of query_tokens and item_tags in the schema
_REJECTION_ROUNDS = 4

# The MovieLens genre list (README.txt, plus IMAX, which the data uses); anything else is "other".
GENRES = (
    "(no genres listed)", "Action", "Adventure", "Animation", "Children", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
NO_GENRE = 0
OTHER_GENRE = len(GENRES)
GENRE_INDEX = {g: i for i, g in enumerate(GENRES)}
NO_HISTORY_TOKEN = OTHER_GENRE + 2  # genre tokens are genre id + 1, so 1..OTHER_GENRE+1
_YEAR = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*\d{4})?\)\s*$")
# The native layouts (see the module docstring and datasources/README.md).
MAX_TAGS = 10  # a movie's most frequent tags kept
NO_TAG = "(no tag)"  # the `tags` of a movie without a (train-part) tag
NO_HISTORY = "(no history)"  # the `history_genres` of a user's first window
NO_YEAR = 0  # the `year` of a title without a (YYYY)


def _genre_ids(genres: str) -> List[int]:
    ids = []
    for name in genres.split("|") if genres.strip() else [GENRES[NO_GENRE]]:
        g = GENRE_INDEX.get(name.strip(), OTHER_GENRE)
        if g not in ids:
            ids.append(g)
    return ids


def _read_movies(path: str, rejects: RejectLog) -> Tuple[pd.DataFrame, int]:
    """Valid movies sorted by movieId (row i is item index i), and the rows read."""
    frame, n_read = shared_data.read_csv(path, ("movieId", "title", "genres"), rejects, MOVIES_FILE)
    movie_id = shared_data.integer_values(frame["movieId"])
    reasons = np.where(np.isnan(movie_id) | (movie_id < 0), "bad movieId", "")
    reasons = np.where((reasons == "") & pd.Series(movie_id).duplicated().to_numpy(), "duplicate movieId", reasons)
    keep = shared_data.reject_rows(frame, reasons, rejects, MOVIES_FILE)
    movies = pd.DataFrame(
        {"movieId": movie_id[keep].astype(np.int64), "title": frame["title"][keep], "genres": frame["genres"][keep]}
    )
    return movies.sort_values("movieId", kind="stable").reset_index(drop=True), n_read


def _read_ratings(path: str, movies: pd.DataFrame, rejects: RejectLog) -> Tuple[pd.DataFrame, int]:
    """Valid ratings with dense item indices, and the rows read."""
    frame, n_read = shared_data.read_csv(path, ("userId", "movieId", "rating", "timestamp"), rejects, RATINGS_FILE)
    user, movie, time = (shared_data.integer_values(frame[c]) for c in ("userId", "movieId", "timestamp"))
    rating = pd.to_numeric(frame["rating"], errors="coerce").to_numpy(dtype=float)
    movie_ids = movies["movieId"].to_numpy()
    known = np.isin(movie, movie_ids)
    with np.errstate(invalid="ignore"):
        reasons = np.select(
            [np.isnan(user) | (user < 0), np.isnan(movie), np.isnan(time) | (time < 0), np.isnan(rating),
             ~((rating >= MIN_RATING) & (rating <= MAX_RATING)), ~known],
            ["bad userId", "bad movieId", "bad timestamp", "non-numeric rating",
             f"rating outside {MIN_RATING}..{MAX_RATING}", "unknown movieId"],
            default="",
        )
    keep = shared_data.reject_rows(frame, reasons, rejects, RATINGS_FILE)
    ratings = pd.DataFrame({
        "userId": user[keep].astype(np.int64), "item": np.searchsorted(movie_ids, movie[keep]).astype(np.int64),
        "rating": rating[keep], "timestamp": time[keep].astype(np.int64),
    })
    return ratings, n_read


def _read_tags(path: str, movies: pd.DataFrame, rejects: RejectLog) -> Tuple[pd.DataFrame, int]:
    """Valid tag applications (userId, item index, tag lower-cased and stripped, timestamp), and the rows read."""
    frame, n_read = shared_data.read_csv(path, ("userId", "movieId", "tag", "timestamp"), rejects, TAGS_FILE)
    user, movie, time = (shared_data.integer_values(frame[c]) for c in ("userId", "movieId", "timestamp"))
    tag = frame["tag"].astype(str).str.strip().str.lower().to_numpy()
    movie_ids = movies["movieId"].to_numpy()
    with np.errstate(invalid="ignore"):
        reasons = np.select(
            [np.isnan(user) | (user < 0), np.isnan(movie), np.isnan(time) | (time < 0), tag == "",
             ~np.isin(movie, movie_ids)],
            ["bad userId", "bad movieId", "bad timestamp", "empty tag", "unknown movieId"],
            default="",
        )
    keep = shared_data.reject_rows(frame, reasons, rejects, TAGS_FILE)
    tags = pd.DataFrame({
        "userId": user[keep].astype(np.int64), "item": np.searchsorted(movie_ids, movie[keep]).astype(np.int64),
        "tag": tag[keep], "timestamp": time[keep].astype(np.int64),
    })
    return tags, n_read


def _item_parts(movies: pd.DataFrame, train: pd.DataFrame) -> Tuple[List[bytes], List[List[int]]]:
    """The item features of every candidate row (see `_join`) per item index, and its genre ids."""
    n = len(movies)
    popularity = np.bincount(train["item"], minlength=n).astype(float)
    rating_sum = np.bincount(train["item"], weights=train["rating"], minlength=n)
    mean = np.divide(rating_sum, popularity, out=np.full(n, 3.5), where=popularity > 0)
    examples, genre_ids = [], []
    for i, (title, genres) in enumerate(zip(movies["title"], movies["genres"])):
        ids = _genre_ids(genres)
        year = _YEAR.search(title.strip())
        n_genres = sum(g != NO_GENRE for g in ids)
        dense = [math.log1p(popularity[i]), mean[i] - 3.5, (int(year.group(1)) - 2000) / 20 if year else 0.0,
                 n_genres / 5]
        examples.append(_features_bytes(make_example({
            "item_id": i, "item_category": ids[0], "item_tags": [g + 1 for g in ids[:MAX_TOKENS]],
            "item_dense": [float(v) for v in dense],
        })))
        genre_ids.append(ids)
    return examples, genre_ids


def _query_tokens(history_items: Sequence[int], genre_ids: List[List[int]]) -> List[int]:
    """Genre tokens of the recent history: most frequent first, ties by genre id, at most 8."""
    if len(history_items) == 0:
        return [NO_HISTORY_TOKEN]
    counts = collections.Counter(g for item in history_items for g in genre_ids[item])
    return [g + 1 for g, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_TOKENS]]


def _sample(rng: np.random.Generator, weights: np.ndarray, cdf: np.ndarray, available: np.ndarray, k: int) -> List[int]:
    """Up to k available items drawn one by one without replacement, each in proportion to weights
    among the items still available (successive sampling, as `rng.choice(replace=False, p=...)`).

    Draws from the whole catalogue and rejects unavailable items, which has the same law and is
    fast; when the available items hold so little mass that this stalls, it finishes exactly.
    `cdf` is np.cumsum(weights). Marks the picked items unavailable.
    """
    picks: List[int] = []
    for _ in range(_REJECTION_ROUNDS):
        draws = np.searchsorted(cdf, rng.random(4 * k) * cdf[-1], side="right")
        for item in np.minimum(draws, len(cdf) - 1):
            if len(picks) == k:
                return picks
            if available[item]:
                available[item] = False
                picks.append(int(item))
    rest = min(k - len(picks), int(np.count_nonzero(available)))
    if rest > 0:
        p = np.where(available, weights, 0.0)
        extra = rng.choice(len(weights), size=rest, replace=False, p=p / p.sum())
        available[extra] = False
        picks.extend(int(i) for i in extra)
    return picks


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _features_bytes(part: tf.train.Example) -> bytes:
    """The serialized map entries of a partial example (deterministic: sorted by feature name)."""
    return part.features.SerializeToString(deterministic=True)


def _join(*parts: bytes) -> bytes:
    """A serialized tf.train.Example whose features are the union of the parts' disjoint features.

    In the protobuf wire format a map is a repeated field of entries, so the concatenated entries
    of the parts are one `Features` message; wrapped as field 1 (tag 0x0A, then its length) they
    are an Example. This avoids a merge and a re-serialization per row (the conversion's hot path).
    """
    body = b"".join(parts)
    return b"\n" + _varint(len(body)) + body


@functools.lru_cache(maxsize=None)
def _row_part(position: int, click: int, stage: str) -> bytes:
    """The UI treatment and label features of a candidate row (see `_join`)."""
    return _features_bytes(make_example({"ui_position": position, "ui_format": 0, "click": click, "stage": stage}))


@functools.lru_cache(maxsize=None)
def _native_row_part(position: int, click: int, stage: str) -> bytes:
    """The position and label features of a candidate row of the native layout (no ui_format)."""
    return _features_bytes(make_example({"ui_position": position, "click": click, "stage": stage}))


@functools.lru_cache(maxsize=None)
def _click_part(click: int) -> bytes:
    """The label of a row of the clicks layout: no stage, no ui_position (every row was shown)."""
    return _features_bytes(make_example({"click": click}))


def _n_eval(n_ratings):
    """How many of a user's latest ratings are eval data: ceil(n / 5), in integers."""
    return (n_ratings + 4) // 5


class _PackageLayout:
    """The package's own 13-feature layout (the default; its bytes are unchanged)."""

    sample_negatives = True

    def __init__(self, item_parts: List[bytes], genre_ids: List[List[int]]):
        self.item_parts, self.genre_ids = item_parts, genre_ids

    def context(self, request_id: int, request_time: int, user_index: int, user_id: int, start: int,
                items: np.ndarray, values: np.ndarray) -> bytes:
        return _features_bytes(make_example({
            "request_id": request_id, "request_time": request_time, "user_id": user_index,
            "user_dense": [math.log1p(start), float(values[:start].mean()) - 3.5 if start else 0.0, 0.0, 0.0],
            "query_tokens": _query_tokens(items[max(0, start - HISTORY_MOVIES):start], self.genre_ids),
            "hour": (request_time // 3600) % 24, "device": 0,
        }))

    def row(self, position: int, click: int, stage: str) -> bytes:
        return _row_part(position, click, stage)


def _genre_names(genres: str) -> List[str]:
    """The movie's genre names as movies.csv spells them, in file order, deduplicated; an empty
    field is MovieLens's own "(no genres listed)"."""
    names: List[str] = []
    for name in genres.split("|"):
        name = name.strip()
        if name and name not in names:
            names.append(name)
    return names or [GENRES[NO_GENRE]]


def _history_genres(history: Sequence[int], genre_names: List[List[str]]) -> List[str]:
    """The genre names of the recent history: most frequent first, ties by name; `NO_HISTORY` if none."""
    counts = collections.Counter(g for item in history for g in genre_names[item] if g != GENRES[NO_GENRE])
    return [g for g, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))] or [NO_HISTORY]


def _movie_tags(tags: pd.DataFrame, eval_ratings: pd.DataFrame, n_items: int) -> List[List[str]]:
    """Per item index, its at most `MAX_TAGS` most frequent tags (ties by tag), counted over the tag
    rows whose (userId, item) is not one of `eval_ratings` (94 % of ml-latest-small's tags are the
    tagger's tag of a movie they rated: one of an eval rating would reveal it)."""
    pairs = eval_ratings[["userId", "item"]].drop_duplicates()
    marked = tags.merge(pairs, on=["userId", "item"], how="left", indicator=True)
    train = marked[(marked["_merge"] == "left_only").to_numpy()]
    counts = train.groupby(["item", "tag"]).size().rename("n").reset_index()
    counts = counts.sort_values(["item", "n", "tag"], ascending=[True, False, True], kind="stable")
    out: List[List[str]] = [[] for _ in range(n_items)]
    for item, tag in zip(counts["item"], counts["tag"]):
        if len(out[item]) < MAX_TAGS:
            out[item].append(tag)
    return out


class _NativeLayout:
    """MovieLens's own features (datasources/README.md, "native layout"); `clicks` drops the sampled
    negatives, `stage` and `ui_position` (a clicks-only log)."""

    def __init__(self, movies: pd.DataFrame, movie_tags: List[List[str]], clicks: bool):
        self.sample_negatives = not clicks
        self.clicks = clicks
        self.genre_names = [_genre_names(g) for g in movies["genres"]]
        self.item_parts = []
        for movie_id, title, genres, tags in zip(movies["movieId"], movies["title"], self.genre_names, movie_tags):
            year = _YEAR.search(title.strip())
            self.item_parts.append(_features_bytes(make_example({
                "movie": int(movie_id), "genres": genres, "tags": tags or [NO_TAG],
                "year": int(year.group(1)) if year else NO_YEAR,
            })))

    def context(self, request_id: int, request_time: int, user_index: int, user_id: int, start: int,
                items: np.ndarray, values: np.ndarray) -> bytes:
        return _features_bytes(make_example({
            "request_id": request_id, "request_time": request_time, "user": user_id,
            "hour": (request_time // 3600) % 24, "weekday": (request_time // 86_400 + 3) % 7,  # 1970-01-01: Thu
            "history_genres": _history_genres(items[max(0, start - HISTORY_MOVIES):start], self.genre_names),
        }))

    def row(self, position: int, click: int, stage: str) -> bytes:
        return _click_part(click) if self.clicks else _native_row_part(position, click, stage)


def _write_user(writer: SplitWriter, stats: dict, user_index: int, user_id: int, first_request_id: int, seed: int,
                ratings: pd.DataFrame, layout, tiers: Dict[str, Tuple[np.ndarray, np.ndarray]]) -> int:
    """Writes the requests of one user (ratings in time order); returns the next request id."""
    items, values, times = (ratings[c].to_numpy() for c in ("item", "rating", "timestamp"))
    item_parts = layout.item_parts
    unseen = np.ones(len(item_parts), dtype=bool)
    unseen[items] = False
    n_train = len(items) - _n_eval(len(items))
    request_id = first_request_id
    for split, lo, hi in (("train", 0, n_train), ("eval", n_train, len(items))):
        for start in range(lo, hi, WINDOW):
            window = range(start, min(start + WINDOW, hi))
            request_time = int(times[window[-1]])
            context = layout.context(request_id, request_time, user_index, user_id, start, items, values)
            for position, j in enumerate(window, start=1):
                click = int(values[j] >= POSITIVE_RATING)
                stage = "rerank_pos" if click else "rerank_neg"
                writer.write(split, _join(context, item_parts[items[j]], layout.row(position, click, stage)))
                stats["stages"][split][stage] += 1
            if layout.sample_negatives:
                rng = np.random.default_rng([seed, request_id])
                available = unseen.copy()
                for tier in SAMPLED_TIERS:
                    for item in _sample(rng, *tiers[tier], available, NEGATIVES_PER_TIER):
                        writer.write(split, _join(context, item_parts[item], layout.row(0, 0, tier)))
                        stats["stages"][split][tier] += 1
            stats["requests"][split] += 1
            request_id += 1
    return request_id


def convert_movielens(src_dir: str, out_dir: str, seed: int = 0, overwrite: bool = False,
                      layout: str = "package") -> dict:
    """Converts ml-latest-small at `src_dir` into an Examples directory at `out_dir`; returns the report.

    `layout`: "package" (the package's own features, the default), "native" (MovieLens's own
    features) or "clicks" (native features, a clicks-only log without tiers); see the module docstring."""
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    with atomic_output_dir(out_dir, overwrite) as root:
        rows_read = {}
        with RejectLog(root) as rejects:
            movies, rows_read[MOVIES_FILE] = _read_movies(os.path.join(src_dir, MOVIES_FILE), rejects)
            ratings, rows_read[RATINGS_FILE] = _read_ratings(os.path.join(src_dir, RATINGS_FILE), movies, rejects)
            if layout != "package":
                tags, rows_read[TAGS_FILE] = _read_tags(os.path.join(src_dir, TAGS_FILE), movies, rejects)
        ratings = ratings.sort_values(["userId", "timestamp", "item"], kind="stable").reset_index(drop=True)
        users, starts, counts = np.unique(ratings["userId"].to_numpy(), return_index=True, return_counts=True)
        rank = np.arange(len(ratings)) - np.repeat(starts, counts)
        is_eval = rank >= np.repeat(counts - _n_eval(counts), counts)
        if layout == "package":
            writer_layout = _PackageLayout(*_item_parts(movies, ratings[~is_eval]))
        else:
            writer_layout = _NativeLayout(movies, _movie_tags(tags, ratings[is_eval], len(movies)),
                                          clicks=layout == "clicks")

        popularity = np.bincount(ratings["item"][~is_eval], minlength=len(movies)) + 1.0
        weights = {"rank_neg": popularity, "coarse_neg": np.sqrt(popularity), "prerank_neg": np.ones(len(movies))}
        tiers = {tier: (w, np.cumsum(w)) for tier, w in weights.items()}

        stats = {"requests": {s: 0 for s in SPLITS}, "stages": {s: collections.Counter() for s in SPLITS}}
        request_id = 0
        with SplitWriter(root, SPLITS) as writer:
            for user_index, (start, count) in enumerate(zip(starts, counts)):
                request_id = _write_user(writer, stats, user_index, int(users[user_index]), request_id, seed,
                                         ratings[start:start + count], writer_layout, tiers)
            rows = dict(writer.counts)
        report = {"source": "movielens", "seed": seed, "rows": rows, "requests": stats["requests"]}
        if layout == "clicks":  # no tiers in the data: the clicks per split
            report["clicks"] = {s: stats["stages"][s]["rerank_pos"] for s in SPLITS}
        else:
            report["rows_by_stage"] = {s: dict(sorted(stats["stages"][s].items())) for s in SPLITS}
        report.update({
            "rows_read": rows_read, "users": int(len(users)), "items": int(len(movies)),
            "rejected": dict(sorted(rejects.counts.items())), "rejected_total": sum(rejects.counts.values()),
        })
        if layout != "package":  # the package layout's report is unchanged
            report["layout"] = layout
        write_report(root, report)
    return report
