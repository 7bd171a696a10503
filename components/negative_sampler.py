"""NegativeSampler: candidate rows → request lists with stage-aware negatives and sampling weights.

A Beam component (DESIGN §6 step 3). For each request it
  1. keeps the five logged tiers (`rerank_pos` … `prerank_neg`),
  2. applies the deterministic, importance-weighted sampling of shown non-clicks
     (`components.sampling`: class rebalancing, teacher-loss based, position based),
  3. adds random negatives from the item corpus with their sampling probability,
  4. packs the request into one request-list tf.Example (`schema.request_list`),
  5. writes it to the `train` or `eval` split: the input's split ("keep"), a hash of the
     request id ("hash"), or the latest `eval_fraction` of requests by time ("time").

The features are typed, and the required ones (presence min_fraction 1.0) named, by the pipeline's
Schema artifact (the optional `schema` input; without it, the packaged `schema/schema.pbtxt`). The
schema travels to the Beam workers inside the DoFns (serialized), and the path read is recorded as
the `schema_path` custom property of the `request_lists` output.

Besides the request lists, the `shown_rows` output (Examples, split `eval`) holds the candidate
rows, byte for byte as they came in, of the shown candidates (`ui_position > 0`) of every request
whose list went to the `eval` request-list split, in any split mode: the standard Evaluator (TFMA)
evaluates the ranker's CTR on exactly these rows, following the sampler's own train/eval split.
Rows dropped by the sampling are in it too (it is the unsampled data); rows of requests whose list
was not built (dead-lettered) are not.

Records that fail to parse, miss a required feature, have the wrong number of values or an
unknown stage go to the dead-letter output, as do requests with more candidates than a list
holds; the component fails when bad records exceed `max_bad_fraction`. Beam counters (namespace
`negative_sampler`) count what was read, kept, dropped (per reason), reweighted and written; they
are saved in `metrics.json` and as custom properties of the `request_lists` artifact;
`shown_rows_eval` counts the rows written to `shown_rows`. Counters of what the models will change
without a trace in the data: `nan_values_<dense feature>` (read as 0), `ids_folded_<sparse
feature>` (ids outside [0, num_buckets)), and `requests_without_ground_truth` (also per input
split); `data_counts` gathers them into the block a run prints.

Pipeline, laid out for DirectRunner's multi-processing mode, where each split's (gzipped, so
unsplittable) file is read by a single worker and only the stages after a shuffle are spread
over the workers:
    read → KeyByRequest   the only per-record work before the shuffle: the request id, read for
                          512 records at a time by tfx_bsl's C++ Example→Arrow decoder
    GroupByKey(request)   raw bytes: cheap to encode between stages
    DecodeRequests        64 requests per decoder call → numpy columns per request (with the raw
                          bytes of its shown rows beside them), the item corpus entries
                          (pre-aggregated per batch) and the request times
    item corpus           CombinePerKey → one compact, numpy-only `ItemCorpus` side input
    BuildLists            `sampling.sample_request_columns` (vectorised; per-row python only for
                          the ~10 shown non-clicks) → the request-list tf.Example, and the
                          request's shown rows when its list goes to eval
The output is the same bytes as the row-based reference (`sampling.sample_request` +
`schema.request_list.build_request_list`) and does not depend on the runner or its workers:
every order is fixed by sorting (input split, item id, raw bytes), never by arrival order.
`bench/component_throughput.py` measures its rows/s in each runner mode.
"""
import json
from typing import Any, Dict, Iterable, List, Optional, Tuple

import apache_beam as beam
import numpy as np
import tensorflow as tf
from tensorflow_metadata.proto.v0 import schema_pb2
from tfx import types
from tfx.dsl.components.base import base_beam_component, base_beam_executor, executor_spec
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter
from tfx.utils import io_utils
from tfx_bsl.coders import example_coder

from components import record_io
from components.sampling import (FLOAT_COLUMNS, ITEM_FEATURES, ROW_DEFAULTS, ItemCorpus, SamplerConfig,
                                 request_split_by_hash, sample_request_columns)
from models.config import config_from_dict, to_dict
from schema import features as F
from schema import request_list as RL

NAMESPACE = "negative_sampler"
LAYOUT_PROPERTY = "layout"
REQUEST_LIST_LAYOUT = "request_list"
SCHEMA_PATH_PROPERTY = "schema_path"
SHOWN_ROWS_SPLIT = "eval"


def _required_features(schema: schema_pb2.Schema) -> Tuple[str, ...]:
    """The features every row must have: presence min_fraction 1.0 in `schema`."""
    return tuple(f.name for f in schema.feature if f.presence.min_fraction == 1.0)


def _scalar_features(schema: Optional[schema_pb2.Schema] = None) -> frozenset:
    """The features with one value per row in `schema` (default: the packaged schema)."""
    schema = F.load_schema() if schema is None else schema
    return frozenset(
        f.name for f in schema.feature
        if (f.HasField("shape") and [d.size for d in f.shape.dim] == [1]) or f.value_count.max == 1
    )


def example_to_row(example: tf.train.Example, scalars: frozenset) -> Dict[str, Any]:
    """A candidate-row tf.Example as a python dict (scalars unwrapped, strings decoded)."""
    row = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value) if kind else []
        if kind == "bytes_list":
            values = [v.decode() for v in values]
        row[name] = values[0] if name in scalars and values else values
    return row


def _decoder_of(schema: schema_pb2.Schema, names) -> example_coder.ExamplesToRecordBatchDecoder:
    """tfx_bsl's C++ tf.Example → Arrow decoder for the features `names` of `schema` (typed by it).
    After a DecodeBatch that raised, a decoder must be replaced: it is left unusable."""
    sub = schema_pb2.Schema()
    sub.feature.extend(f for f in schema.feature if f.name in names)
    return example_coder.ExamplesToRecordBatchDecoder(sub.SerializeToString())


class _KeyByRequest(beam.DoFn):
    """Batches of raw records → (request_id, (split index, raw)) per record. The only per-record
    work done before the shuffle: a split's file is read by one worker, so this stage does not run
    in parallel. The request ids of a batch come from one call of the C++ decoder (reading only
    request_id, typed by the serialized schema `schema`); records that do not parse or have no
    request_id go to the dead-letter output."""

    def __init__(self, schema: bytes, split_index: int):
        self._schema_bytes = schema
        self._split_index = split_index
        self._schema = None
        self._decoder = None
        self._bad = beam.metrics.Metrics.counter(NAMESPACE, "records_bad")

    def setup(self):
        self._schema = schema_pb2.Schema.FromString(self._schema_bytes)
        self._decoder = _decoder_of(self._schema, (F.REQUEST_ID_KEY,))

    def _request_ids(self, raws: List[bytes]) -> List:
        """The request id of each record, or the reason it has none."""
        try:
            column = self._decoder.DecodeBatch(raws).column(F.REQUEST_ID_KEY)
            offsets = column.offsets.to_numpy()
            values = column.values.to_numpy()
            valid = np.diff(offsets) > 0
            if column.null_count:
                valid &= ~column.is_null().to_numpy(zero_copy_only=False)
            if valid.all():
                return values[offsets[:-1]].tolist()
        except RuntimeError:
            self._decoder = _decoder_of(self._schema, (F.REQUEST_ID_KEY,))  # a failed decode leaves it unusable
        out = []  # a bad record in the batch: one at a time, to tell which and why
        for raw in raws:
            try:
                example = tf.train.Example.FromString(raw)
            except Exception as e:  # protobuf raises DecodeError and friends
                out.append(f"unparseable tf.Example: {type(e).__name__}")
                continue
            features = example.features.feature
            value = features[F.REQUEST_ID_KEY].int64_list.value if F.REQUEST_ID_KEY in features else ()
            out.append(int(value[0]) if value else f"missing required feature(s): {F.REQUEST_ID_KEY}")
        return out

    def process(self, raws: List[bytes]):
        for raw, request_id in zip(raws, self._request_ids(raws)):
            if isinstance(request_id, str):
                self._bad.inc()
                yield beam.pvalue.TaggedOutput(record_io.DEAD_LETTER_TAG, (raw, request_id))
            else:
                yield request_id, (self._split_index, raw)


SCALAR_INT_COLUMNS = RL.REQUEST_INT_FEATURES + ("item_id", "item_category", "ui_position", "ui_format", "click")
FIXED_SIZE_COLUMNS = {"user_dense": 4, "item_dense": RL.ITEM_DENSE_SIZE}
RAGGED_COLUMNS = {"query_tokens": 1, "item_tags": 0}  # name → fewest values a row may have
DECODED_FEATURES = SCALAR_INT_COLUMNS + tuple(FIXED_SIZE_COLUMNS) + tuple(RAGGED_COLUMNS) + ("stage",) + FLOAT_COLUMNS


class CandidateDecoder:
    """Serialized candidate rows → numpy columns (`components.sampling`'s columnar layout) with
    tfx_bsl's C++ Example→Arrow decoder, and the reasons of the rows that cannot be used.

    `schema` types the features and names the required ones (`_required_features`); the decoder
    reads `DECODED_FEATURES` and the required features beyond them. A row is bad when it does not
    decode, misses a required feature, has the wrong number of values for a scalar or fixed-size
    feature, or names an unknown stage tier.
    """

    def __init__(self, schema: schema_pb2.Schema):
        self._schema = schema
        self._required = _required_features(schema)
        self._features = DECODED_FEATURES + tuple(name for name in self._required if name not in DECODED_FEATURES)
        self._decoder = _decoder_of(schema, self._features)

    def _decode(self, raws: List[bytes]):
        """(record batch of the decodable rows, their indices, {index: reason} of the others)."""
        try:
            return self._decoder.DecodeBatch(raws), np.arange(len(raws)), {}
        except RuntimeError:
            self._decoder = _decoder_of(self._schema, self._features)  # a failed decode leaves it unusable
        good, bad = [], {}
        for i, raw in enumerate(raws):
            try:
                self._decoder.DecodeBatch([raw])
                good.append(i)
            except RuntimeError as e:
                self._decoder = _decoder_of(self._schema, self._features)
                bad[i] = f"undecodable candidate row: {str(e).splitlines()[0]}"
        batch = self._decoder.DecodeBatch([raws[i] for i in good]) if good else None
        return batch, np.asarray(good, dtype=np.int64), bad

    def decode(self, raws: List[bytes]) -> Tuple[Dict[str, np.ndarray], np.ndarray, Dict[int, str]]:
        """(columns of the good rows, indices of the good rows in `raws`, {index: reason} of the bad)."""
        batch, rows, bad = self._decode(raws)
        n = rows.size
        problems: Dict[int, List[str]] = {}

        def flag(mask, text):
            for k in np.flatnonzero(mask).tolist():
                problems.setdefault(k, []).append(text)

        cols: Dict[str, np.ndarray] = {}
        lists = {}
        for name in self._features:
            column = batch.column(name) if batch is not None else None
            offsets = column.offsets.to_numpy() if column is not None else np.zeros(n + 1, dtype=np.int64)
            values = column.values.to_numpy(zero_copy_only=False) if column is not None else np.zeros(0)
            if column is None:
                present = np.zeros(n, dtype=bool)
            elif column.null_count == 0:
                present = np.ones(n, dtype=bool)
            else:
                present = ~column.is_null().to_numpy(zero_copy_only=False)
            lengths = np.diff(offsets)
            lists[name] = (offsets, values, present, lengths)
        missing = [(name, ~lists[name][2]) for name in self._required]
        if missing:
            missing_any = np.zeros(n, dtype=bool)
            for _, m in missing:
                missing_any |= m
            for k in np.flatnonzero(missing_any).tolist():
                names = [name for name, m in missing if m[k]]
                problems.setdefault(k, []).append(f"missing required feature(s): {', '.join(names)}")

        def first_values(name, default):
            offsets, values, present, lengths = lists[name]
            ok = present & (lengths > 0)
            if not values.size:
                return np.full(n, default, dtype=np.float64 if isinstance(default, float) else np.int64), ok
            return np.where(ok, values[np.where(ok, offsets[:-1], 0)], default), ok

        for name in SCALAR_INT_COLUMNS:
            cols[name], ok = first_values(name, 0)
            cols[name] = cols[name].astype(np.int64)
            flag(lists[name][2] & ~ok, f"{name} has no value")
        for name in FLOAT_COLUMNS:
            value, _ = first_values(name, ROW_DEFAULTS[name])
            cols[name] = value.astype(np.float64)
        for name, size in FIXED_SIZE_COLUMNS.items():
            offsets, values, present, lengths = lists[name]
            wrong = present & (lengths != size)
            flag(wrong, f"{name} needs {size} values")
            dense = np.zeros((n, size), dtype=np.float32)
            ok = np.flatnonzero(present & ~wrong)
            if ok.size:
                dense[ok] = values[offsets[ok][:, None] + np.arange(size)]
            cols[name] = dense
        for name, fewest in RAGGED_COLUMNS.items():
            offsets, values, present, lengths = lists[name]
            flag(present & (lengths < fewest), f"{name} has no value")
            cols[f"{name}_values"] = values.astype(np.int64)
            cols[f"{name}_offsets"] = offsets.astype(np.int64)
        offsets, values, present, lengths = lists["stage"]
        tier = np.full(n, -1, dtype=np.int64)
        for k in np.flatnonzero(present & (lengths > 0)).tolist():
            tier[k] = TIER_BY_NAME.get(values[offsets[k]], -1)
        flag(present & (tier < 0), "unknown stage tier")
        cols["tier"] = tier
        good = np.ones(n, dtype=bool)
        for k, texts in problems.items():
            good[k] = False
            bad[int(rows[k])] = "; ".join(texts)
        return select_rows(cols, np.flatnonzero(good)), rows[good], bad


TIER_BY_NAME = {name.encode(): index for name, index in RL.TIER_INDEX.items() if name != RL.RANDOM_NEG_TIER}
GROUND_TRUTH_TIER_INDEX = RL.TIER_INDEX[F.GROUND_TRUTH_TIER]
REQUESTS_WITHOUT_GROUND_TRUTH = "requests_without_ground_truth"  # also per input split: ..._<split>
NAN_PREFIX = "nan_values_"  # + a dense feature: its NaN values, which the models read as 0
BUCKETS_PREFIX = "buckets_"  # + a sparse feature: the bucket count the run's models embed it with
FOLDED_PREFIX = "ids_folded_"  # + a sparse feature: its ids outside [0, num_buckets), folded by id mod num_buckets


def value_counts(cols: Dict[str, np.ndarray],
                 sparse_features: Tuple[F.SparseFeature, ...] = F.SPARSE_FEATURES) -> Dict[str, int]:
    """What the models will change in the decoded rows `cols`, per feature: NaN values of each dense
    feature (`NAN_PREFIX`; the embedding reads them as 0, `models.embedding`) and ids outside
    [0, num_buckets) of each sparse feature (`FOLDED_PREFIX`; folded into the buckets, so two ids
    share an embedding). `schema.features` names the features and their bucket counts."""
    out = {}
    for feature in F.DENSE_FEATURES:
        if feature.name in cols:
            out[NAN_PREFIX + feature.name] = int(np.isnan(cols[feature.name]).sum())
    for feature in sparse_features:
        values = cols.get(f"{feature.name}_values" if feature.multivalent else feature.name)
        if values is not None:
            out[FOLDED_PREFIX + feature.name] = int(((values < 0) | (values >= feature.num_buckets)).sum())
    return out


def select_rows(cols: Dict[str, np.ndarray], index: np.ndarray) -> Dict[str, np.ndarray]:
    """The rows `index` (in that order) of a columnar request."""
    out = {}
    for name, value in cols.items():
        if name.endswith("_offsets"):
            continue
        if name.endswith("_values"):
            base = name[: -len("_values")]
            offsets = cols[f"{base}_offsets"]
            starts, ends = offsets[index], offsets[index + 1]
            out[f"{base}_offsets"] = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
            out[name] = (np.concatenate([value[a:b] for a, b in zip(starts.tolist(), ends.tolist())])
                         if index.size else value[:0]).astype(np.int64)
        else:
            out[name] = value[index]
    return out


def slice_rows(cols: Dict[str, np.ndarray], start: int, stop: int) -> Dict[str, np.ndarray]:
    """The contiguous rows [start, stop) of a columnar batch (cheap: views, offsets rebased)."""
    out = {}
    for name, value in cols.items():
        if name.endswith("_offsets"):
            continue
        if name.endswith("_values"):
            base = name[: -len("_values")]
            offsets = cols[f"{base}_offsets"][start:stop + 1]
            out[name] = value[offsets[0]:offsets[-1]]
            out[f"{base}_offsets"] = offsets - offsets[0]
        else:
            out[name] = value[start:stop]
    return out


class _DecodeRequests(beam.DoFn):
    """Batches of requests' raw rows (after the shuffle, so this runs on every worker) → one
    element per request: (request_id, (its columns, the raw bytes of its shown rows)), both in a
    deterministic order (input split, item id, raw bytes). Also emits, per batch, (item_id, (count,
    features)) for the item corpus, and each request's time for the time split. Bad rows go to the
    dead-letter output; so does, under split="keep", a request that spans input splits. A batch is
    decoded by one call of the C++ decoder, built in `setup` from the serialized schema `schema`."""

    def __init__(self, schema: bytes, config: SamplerConfig, split_names: Tuple[str, ...],
                 sparse_features: Tuple[F.SparseFeature, ...] = F.SPARSE_FEATURES):
        self._schema_bytes = schema
        self._config = config
        self._split_names = split_names
        self._sparse_features = tuple(sparse_features)
        self._decoder = None
        self._parsed = beam.metrics.Metrics.counter(NAMESPACE, "records_parsed")
        self._bad = beam.metrics.Metrics.counter(NAMESPACE, "records_bad")
        self._requests = beam.metrics.Metrics.counter(NAMESPACE, "requests")
        self._requests_bad = beam.metrics.Metrics.counter(NAMESPACE, "requests_bad")
        self._counters: Dict[str, beam.metrics.metricbase.Counter] = {}

    def _inc(self, name: str, n: int = 1):
        if name not in self._counters:
            self._counters[name] = beam.metrics.Metrics.counter(NAMESPACE, name)
        self._counters[name].inc(n)

    def setup(self):
        self._decoder = CandidateDecoder(schema_pb2.Schema.FromString(self._schema_bytes))

    def process(self, batch):
        raws: List[bytes] = []
        splits: List[int] = []
        starts = [0]
        request_ids = []
        for request_id, tagged in batch:
            for split, raw in sorted(tagged):
                splits.append(split)
                raws.append(raw)
            starts.append(len(raws))
            request_ids.append(request_id)
        cols, rows, bad = self._decoder.decode(raws)
        for i, reason in sorted(bad.items()):
            self._bad.inc()
            yield beam.pvalue.TaggedOutput(record_io.DEAD_LETTER_TAG, (raws[i], reason))
        self._parsed.inc(int(rows.size))
        for name, count in value_counts(cols, self._sparse_features).items():
            if count:
                self._inc(name, count)
        bounds = np.searchsorted(rows, starts).tolist()  # the good rows of request k: bounds[k]:bounds[k + 1]
        all_splits = np.asarray(splits, dtype=np.int64)[rows]
        good_raws = [raws[i] for i in rows.tolist()]
        items: Dict[int, list] = {}
        for k, request_id in enumerate(request_ids):
            a, b = bounds[k], bounds[k + 1]
            if a == b:
                continue
            request = slice_rows(cols, a, b)
            request_splits = all_splits[a:b]
            order = np.lexsort((request["item_id"], request_splits))  # stable: ties keep the raw-bytes order
            request, request_splits = select_rows(request, order), request_splits[order]
            raws_of = [good_raws[a + i] for i in order.tolist()]  # the request's raw rows, in its order
            self._requests.inc()
            if not (request["tier"] == GROUND_TRUTH_TIER_INDEX).any():
                self._inc(REQUESTS_WITHOUT_GROUND_TRUTH)
                self._inc(f"{REQUESTS_WITHOUT_GROUND_TRUTH}_{self._split_names[int(request_splits[0])]}")
            if self._config.split == "keep" and np.unique(request_splits).size != 1:
                self._requests_bad.inc()
                names = sorted({self._split_names[s] for s in request_splits.tolist()})
                self._inc("candidates_diverted_split", len(raws_of))
                for raw in raws_of:  # the rows themselves, so nothing is lost
                    yield beam.pvalue.TaggedOutput(record_io.DEAD_LETTER_TAG, (
                        raw, f"request {request_id} spans input splits {names}"))
                continue
            if request["item_id"].size > self._config.list_size:
                keep = truncation_order(request)[:self._config.list_size]
                cut = np.setdiff1d(np.arange(request["item_id"].size), keep)
                self._inc("requests_truncated")
                self._inc("candidates_truncated", int(cut.size))
                reason = (f"request {request_id} has {request['item_id'].size} candidates, more than the list size "
                          f"{self._config.list_size}: cut ({TRUNCATION_RULE})")
                for i in cut.tolist():
                    yield beam.pvalue.TaggedOutput(record_io.DEAD_LETTER_TAG, (raws_of[i], reason))
                keep = np.sort(keep)  # the kept rows stay in the request's order
                request, raws_of = select_rows(request, keep), [raws_of[i] for i in keep.tolist()]
                request_splits = request_splits[keep]
            shown = [raw for raw, position in zip(raws_of, request["ui_position"].tolist()) if position > 0]
            request["input_split"] = request_splits[:1]
            tag_offsets = request["item_tags_offsets"].tolist()
            tags = request["item_tags_values"].tolist()
            for j, (item, category, dense) in enumerate(zip(request["item_id"].tolist(), request["item_category"].tolist(),
                                                            request["item_dense"].tolist())):
                features = (category, tuple(tags[tag_offsets[j]:tag_offsets[j + 1]]), tuple(dense))
                entry = items.get(item)
                if entry is None:
                    items[item] = [1, features]
                else:
                    entry[0] += 1
                    if features < entry[1]:
                        entry[1] = features
            yield beam.pvalue.TaggedOutput(TIMES_TAG, int(request["request_time"].max()))
            yield request_id, (request, shown)
        for item, (count, features) in items.items():
            yield beam.pvalue.TaggedOutput(ITEMS_TAG, (item, (count, features)))


ITEMS_TAG, TIMES_TAG, SHOWN_ROWS_TAG = "items", "times", "shown_rows"
TRUNCATION_RULE = "keeps the shown rows by position, then the best tiers first, by item id within a tier"


def truncation_order(request: Dict[str, np.ndarray]) -> np.ndarray:
    """The order in which an over-long request keeps its rows (`TRUNCATION_RULE`): shown rows by
    ui_position, then the unshown ones by tier (best first) and item id."""
    position = request["ui_position"]
    shown = position > 0
    return np.lexsort((request["item_id"], request["tier"], np.where(shown, position, np.iinfo(np.int64).max), ~shown))


# The counters of rows a run read but did not turn into list candidates, each with its dead letters:
# records that do not parse or miss a feature, rows of a request that spans input splits, rows cut
# from a request longer than the list. They count against `max_bad_fraction`.
DIVERTED_COUNTERS = ("records_bad", "candidates_diverted_split", "candidates_truncated")


def check_diverted_fraction(counters: Dict[str, int], max_bad_fraction: float) -> None:
    """`record_io.check_bad_fraction` over every diverted row (`DIVERTED_COUNTERS`)."""
    diverted = sum(counters.get(name, 0) for name in DIVERTED_COUNTERS)
    total = counters.get("records_bad", 0) + counters.get("records_parsed", 0)
    if total and diverted / total > max_bad_fraction:
        reasons = ", ".join(f"{name} {counters[name]}" for name in DIVERTED_COUNTERS if counters.get(name))
        raise record_io.BadInputError(
            f"NegativeSampler: {diverted} of {total} records were diverted ({diverted / total:.2%} > "
            f"{max_bad_fraction:.2%}: {reasons}); see the dead-letter output")


DIVERTED_LABELS = {"records_bad": "bad records", "candidates_diverted_split": "rows of requests spanning splits",
                   "candidates_truncated": "rows cut from over-long requests"}


def data_counts(counters: Dict[str, int]) -> Dict[str, Any]:
    """The counts a user sees at the end of a run (`pipelines.report.counts_block`) and that the
    CascadeEvaluator writes into its evaluation, from the sampler's counters: rows read, used in the
    request lists and diverted (by reason), requests without a ground-truth candidate (per input
    split; the recall metrics leave them out), NaN values read as 0 per dense feature, and ids
    folded per sparse feature with its bucket count. rows_read = rows_used + Σ rows_diverted."""
    splits = {name[len(REQUESTS_WITHOUT_GROUND_TRUTH) + 1:]: value for name, value in sorted(counters.items())
              if name.startswith(REQUESTS_WITHOUT_GROUND_TRUTH + "_")}
    return {
        "rows_read": counters.get("records_parsed", 0) + counters.get("records_bad", 0),
        "rows_used": counters.get("candidates_kept", 0),
        "rows_diverted": {name: counters.get(name, 0) for name in DIVERTED_COUNTERS},
        "requests": counters.get("requests", 0),
        "requests_without_ground_truth": {"total": counters.get(REQUESTS_WITHOUT_GROUND_TRUTH, 0), **splits},
        "nan_values_read_as_0": {f.name: counters.get(NAN_PREFIX + f.name, 0) for f in F.DENSE_FEATURES},
        "ids_folded": {f.name: {"ids": counters.get(FOLDED_PREFIX + f.name, 0),
                                "buckets": counters.get(BUCKETS_PREFIX + f.name, f.num_buckets)}
                       for f in F.SPARSE_FEATURES},
    }


def data_warnings(counts: Dict[str, Any]) -> List[str]:
    """One phrase per thing `data_counts` says was diverted or will be changed, none when the data
    went through whole: what the run prints as its last line."""
    diverted = counts["rows_diverted"]
    out = [f"{diverted[name]:,} {label}" for name, label in DIVERTED_LABELS.items() if diverted.get(name)]
    if counts["requests_without_ground_truth"]["total"]:
        out.append(f"{counts['requests_without_ground_truth']['total']:,} requests without ground truth")
    out += [f"{n:,} NaN values of {name} read as 0" for name, n in counts["nan_values_read_as_0"].items() if n]
    out += [f"{v['ids']:,} ids of {name} folded into its {v['buckets']:,} buckets"
            for name, v in counts["ids_folded"].items() if v["ids"]]
    return out


KEY_BATCH = 512  # records whose request ids are decoded together
DECODE_BATCH = 64  # requests decoded together (the decoder's per-call cost is then negligible)


class _CountAndPickFeatures(beam.CombineFn):
    """Per item: how often it occurs, and one deterministic choice of its features (the least)."""

    def create_accumulator(self):
        return 0, None

    def add_input(self, acc, value):
        count, features = acc
        n, f = value
        return count + n, f if features is None or f < features else features

    def merge_accumulators(self, accs):
        count, features = 0, None
        for c, f in accs:
            count += c
            if f is not None and (features is None or f < features):
                features = f
        return count, features

    def extract_output(self, acc):
        return acc


def _to_corpus(items: List[Tuple[int, Tuple[int, Tuple]]]) -> ItemCorpus:
    """(item_id, (count, (item_category, item_tags, item_dense))) → the compact (numpy-only) corpus."""
    return ItemCorpus.from_items(
        [(item, count, dict(zip(ITEM_FEATURES, (category, list(tags), list(dense)))))
         for item, (count, (category, tags, dense)) in items],
        keep_features=False,
    )


FLOAT_FEATURES = frozenset(RL.CANDIDATE_FLOAT_FEATURES + ("user_dense", "item_dense"))


def packed_example(packed: Dict[str, List]) -> tf.train.Example:
    """`make_example` for packed request-list values (python lists typed by feature name)."""
    example = tf.train.Example()
    features = example.features.feature
    for name, values in packed.items():
        if name in FLOAT_FEATURES:
            features[name].float_list.value.extend(values)
        else:
            features[name].int64_list.value.extend(values)
    return example


class _BuildRequestLists(beam.DoFn):
    """One request's columns → a serialized request list, tagged with its output split; when that
    split is eval, also the raw bytes of the request's shown rows (tagged `SHOWN_ROWS_TAG`)."""

    def __init__(self, config: SamplerConfig, split_names: Tuple[str, ...]):
        self._config = config
        self._split_names = split_names
        self._counters: Dict[str, beam.metrics.metricbase.Counter] = {}

    def _inc(self, name: str, n: int = 1):
        if name not in self._counters:
            self._counters[name] = beam.metrics.Metrics.counter(NAMESPACE, name)
        self._counters[name].inc(n)

    def process(self, element, corpus: ItemCorpus, time_cutoff):
        request_id, (cols, shown) = element
        if self._config.split == "keep":
            split = self._split_names[int(cols["input_split"][0])]
        elif self._config.split == "hash":
            split = request_split_by_hash(request_id, self._config.eval_fraction, self._config.seed)
        else:
            split = "eval" if int(cols["request_time"][0]) > time_cutoff else "train"
        counts: Dict[str, int] = {}
        try:
            packed = sample_request_columns(cols, corpus, self._config, counts)
        except ValueError as e:
            packed, error = None, e
        for name, n in counts.items():
            self._inc(name, n)
        if packed is None:
            self._inc("requests_bad")
            yield beam.pvalue.TaggedOutput(record_io.DEAD_LETTER_TAG, (
                json.dumps({"request_id": request_id, "candidates": int(cols["item_id"].size)}).encode(), str(error)))
            return
        self._inc(f"lists_{split}")
        yield beam.pvalue.TaggedOutput(split, packed_example(packed).SerializeToString(deterministic=True))
        if split == SHOWN_ROWS_SPLIT:
            self._inc("shown_rows_eval", len(shown))
            for raw in shown:
                yield beam.pvalue.TaggedOutput(SHOWN_ROWS_TAG, raw)


def _time_cutoff(quantiles: List[int], eval_fraction: float) -> int:
    """The request time above which requests go to eval (any, when there are no requests)."""
    if not quantiles:
        return 0
    index = int(round((1.0 - eval_fraction) * (len(quantiles) - 1)))
    return quantiles[index]


def _load_schema(schemas: Optional[List[types.Artifact]]) -> Tuple[schema_pb2.Schema, str]:
    """(schema, path read): the Schema artifact's file, or the packaged schema without one. Fails
    when the schema lacks a feature the sampler decodes or types it unlike the packaged schema."""
    if schemas:
        path = io_utils.get_only_uri_in_dir(artifact_utils.get_single_instance(list(schemas)).uri)
        schema = io_utils.parse_pbtxt_file(path, schema_pb2.Schema())
    else:
        path, schema = F.SCHEMA_PATH, F.load_schema()
    types_in = {f.name: f.type for f in schema.feature}
    expected = {f.name: f.type for f in F.load_schema().feature if f.name in DECODED_FEATURES}
    wrong = sorted(name for name, kind in expected.items() if types_in.get(name) != kind)
    if wrong:
        raise record_io.BadInputError(
            f"schema {path} lacks or retypes features the NegativeSampler decodes: {', '.join(wrong)}")
    return schema, path


class NegativeSamplerSpec(ComponentSpec):
    PARAMETERS = {
        "config": ExecutionParameter(type=str),  # SamplerConfig as JSON
        "input_splits": ExecutionParameter(type=str),  # JSON list of the input splits to read
        "features": ExecutionParameter(type=str, optional=True),  # schema.features.FeatureConfig as JSON
    }
    INPUTS = {
        "examples": ChannelParameter(type=standard_artifacts.Examples),
        "schema": ChannelParameter(type=standard_artifacts.Schema, optional=True),
    }
    OUTPUTS = {
        "request_lists": ChannelParameter(type=standard_artifacts.Examples),
        "shown_rows": ChannelParameter(type=standard_artifacts.Examples),  # split "eval" only
        "dead_letters": ChannelParameter(type=record_io.DeadLetters),
    }


class Executor(base_beam_executor.BaseBeamExecutor):
    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        self._log_startup(input_dict, output_dict, exec_properties)
        config = config_from_dict(SamplerConfig, json.loads(exec_properties["config"]))
        features = config_from_dict(F.FeatureConfig, json.loads(exec_properties.get("features") or "{}"))
        input_uris = record_io.required_split_uris(input_dict["examples"], json.loads(exec_properties["input_splits"]))
        output_splits = tuple(sorted(input_uris)) if config.split == "keep" else ("eval", "train")
        output = artifact_utils.get_single_instance(output_dict["request_lists"])
        output.split_names = artifact_utils.encode_split_names(list(output_splits))
        shown_rows = artifact_utils.get_single_instance(output_dict["shown_rows"])
        shown_rows.split_names = artifact_utils.encode_split_names([SHOWN_ROWS_SPLIT])
        dead = artifact_utils.get_single_instance(output_dict["dead_letters"])
        schema, schema_path = _load_schema(input_dict.get("schema"))
        schema_bytes = schema.SerializeToString()

        split_names = tuple(sorted(input_uris))
        pipeline = self._make_beam_pipeline()
        keyed = []
        for index, split in enumerate(split_names):
            parsed = (
                record_io.read_split(pipeline, input_uris[split], split)
                | f"Batch[{split}]" >> beam.BatchElements(min_batch_size=KEY_BATCH, max_batch_size=KEY_BATCH)
                | f"KeyByRequest[{split}]" >> beam.ParDo(_KeyByRequest(schema_bytes, index)).with_outputs(
                    record_io.DEAD_LETTER_TAG, main="keyed")
            )
            record_io.write_dead_letters(parsed[record_io.DEAD_LETTER_TAG], dead.uri, f"records-{split}")
            keyed.append(parsed.keyed)
        requests = (
            keyed
            | "AllSplits" >> beam.Flatten()
            | "GroupRequests" >> beam.GroupByKey()
            | "BatchRequests" >> beam.BatchElements(min_batch_size=DECODE_BATCH, max_batch_size=DECODE_BATCH)
            | "DecodeRequests" >> beam.ParDo(_DecodeRequests(schema_bytes, config, split_names,
                                                             features.sparse_features())).with_outputs(
                record_io.DEAD_LETTER_TAG, ITEMS_TAG, TIMES_TAG, main="requests")
        )
        record_io.write_dead_letters(requests[record_io.DEAD_LETTER_TAG], dead.uri, "candidates")
        corpus = (
            requests[ITEMS_TAG]
            | "PerItem" >> beam.CombinePerKey(_CountAndPickFeatures())
            | "CorpusList" >> beam.combiners.ToList()
            | "Corpus" >> beam.Map(_to_corpus)
        )
        request_times = (
            requests[TIMES_TAG]
            | "Quantiles" >> beam.ApproximateQuantiles.Globally(1001)
            | "Cutoff" >> beam.Map(_time_cutoff, config.eval_fraction)
        )
        lists = (
            requests.requests
            | "BuildLists" >> beam.ParDo(
                _BuildRequestLists(config, split_names),
                corpus=beam.pvalue.AsSingleton(corpus),
                time_cutoff=beam.pvalue.AsSingleton(request_times),
            ).with_outputs(record_io.DEAD_LETTER_TAG, SHOWN_ROWS_TAG, *output_splits)
        )
        record_io.write_dead_letters(lists[record_io.DEAD_LETTER_TAG], dead.uri, "requests")
        for split in output_splits:
            record_io.write_split(lists[split], artifact_utils.get_split_uri([output], split), split)
        record_io.write_split(lists[SHOWN_ROWS_TAG], artifact_utils.get_split_uri([shown_rows], SHOWN_ROWS_SPLIT),
                              f"shown_rows-{SHOWN_ROWS_SPLIT}")
        counters = record_io.run_and_count(pipeline, NAMESPACE)
        counters.update({BUCKETS_PREFIX + f.name: f.num_buckets for f in features.sparse_features()})
        record_io.record_counters(output, counters)
        output.set_string_custom_property(LAYOUT_PROPERTY, REQUEST_LIST_LAYOUT)
        output.set_string_custom_property(SCHEMA_PATH_PROPERTY, schema_path)
        output.set_int_custom_property("list_size", config.list_size)
        warnings = data_warnings(data_counts(counters))
        if warnings:
            print(f"NegativeSampler: warning: {'; '.join(warnings)} (dead letters: {dead.uri})", flush=True)
        check_diverted_fraction(counters, config.max_bad_fraction)


class NegativeSampler(base_beam_component.BaseBeamComponent):
    """Candidate rows (Examples) → request lists (Examples, train/eval) with sampling weights, and
    the shown rows of the eval requests (Examples, eval); features typed by the `schema` channel
    when given, else by the packaged schema."""

    SPEC_CLASS = NegativeSamplerSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)

    def __init__(self, examples: types.BaseChannel, schema: types.BaseChannel = None,
                 config: SamplerConfig = SamplerConfig(), input_splits: Iterable[str] = ("train", "eval"),
                 features: F.FeatureConfig = F.FeatureConfig()):
        spec = NegativeSamplerSpec(
            examples=examples,
            schema=schema,
            config=json.dumps(to_dict(config), sort_keys=True),
            input_splits=json.dumps(list(input_splits)),
            features=json.dumps(to_dict(features), sort_keys=True),
            request_lists=types.Channel(type=standard_artifacts.Examples),
            shown_rows=types.Channel(type=standard_artifacts.Examples),
            dead_letters=types.Channel(type=record_io.DeadLetters),
        )
        super().__init__(spec=spec)
