"""NegativeSampler: candidate rows → request lists with stage-aware negatives and sampling weights.

A Beam component (DESIGN §6 step 3). For each request it
  1. keeps the five logged tiers (`rerank_pos` … `prerank_neg`),
  2. applies the deterministic, importance-weighted sampling of shown non-clicks
     (`components.sampling`: class rebalancing, teacher-loss based, position based),
  3. adds random negatives from the item corpus with their sampling probability,
  4. packs the request into one request-list tf.Example (`schema.request_list`),
  5. writes it to the `train` or `eval` split: the input's split ("keep"), a hash of the
     request id ("hash"), or the latest `eval_fraction` of requests by time ("time").

The columns it decodes and packs derive from the run's feature registry (`schema.features.
FeatureConfig`, the exec param "features"): the request-level features of a list are the registry's
query-side inputs, its candidate features the item-side and UI inputs, of any number and kind (id
int64 or string, multivalent ids up to `width`, dense of `width` floats); the item corpus keys on
`features.item_key` and stores the other item-side inputs. Besides them it reads request_id,
request_time, click, ui_position (`F.SHOWN_KEY`: > 0 = shown), stage and the float columns by
name. stage and ui_position are optional (a log without tiers, an impression log): a row without a
stage is ground truth when clicked (`F.tier_without_stage`), a row without ui_position was shown. The registry must match the schema
(`FeatureConfig.check_schema`; the component fails with its one-line message).

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
without a trace in the data: `nan_values_<dense feature>` (read as 0), `ids_folded_<int64 id
feature>` (ids outside [0, num_buckets)), `values_cut_<multivalent feature>` (values beyond its
width, cut in the lists), and `requests_without_ground_truth` (also per input split);
`data_counts` gathers them into the block a run prints.

Pipeline, laid out for DirectRunner's multi-processing mode, where each split's (gzipped, so
unsplittable) file is read by a single worker and only the stages after a shuffle are spread
over the workers. The shuffle by request goes through files, so that no process holds more than
one bucket of rows: DirectRunner's GroupByKey holds every row of the input in the runner process
(the sampler's peak was 15.9 GB at 16× the demo's data with one, 2.2 GB without; BENCHMARKS §5).
    read → WriteBuckets   the only per-record work before the shuffle: the request id, parsed for
                          512 records at a time, picks the row's bucket file (`bucket_of`; about
                          `BUCKET_BYTES` of rows per bucket, at least two buckets per worker)
    Corpus                per bucket, once every bucket file is complete (a side input lists
                          them): decodes only the item features and request keys → the item
                          corpus (CombinePerKey → one compact, numpy-only `ItemCorpus` side
                          input) and each request's time (→ the time split's cutoff)
    DecodeRequests        per bucket: its rows grouped by request, 64 requests per decoder call
                          → numpy columns per request (with the raw bytes of its shown rows)
    BuildLists            `sampling.sample_request_columns` (vectorised; per-row python only for
                          the ~10 shown non-clicks) → the request-list tf.Example, and the
                          request's shown rows when its list goes to eval
The bucket files live under `<request_lists>/.request_buckets/` and are removed when the run ends,
whether it succeeds or fails. The corpus counts every row whose item features decode, those cut
from over-long requests or diverted with a request that spans splits included.
The output is the same bytes as the row-based reference (`sampling.sample_request` +
`schema.request_list.build_request_list`) and does not depend on the runner or its workers:
every order is fixed by sorting (input split, item id, raw bytes), never by arrival order.
`bench/component_throughput.py` measures its rows/s in each runner mode.
"""
import functools
import json
import os
import struct
import uuid
import zlib
from typing import Any, Dict, Iterable, List, Optional, Tuple

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue
from tensorflow_metadata.proto.v0 import schema_pb2
from tfx import types
from tfx.dsl.components.base import base_beam_component, base_beam_executor, executor_spec
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter
from tfx.utils import io_utils
from tfx_bsl.coders import example_coder

from cascade_ranking.components import record_io
from cascade_ranking.components.sampling import (FLOAT_COLUMNS, ROW_DEFAULTS, ItemCorpus, SamplerConfig, item_features,
                                 request_split_by_hash, sample_request_columns)
from cascade_ranking.models.config import config_from_dict, to_dict
from cascade_ranking.schema import features as F
from cascade_ranking.schema import request_list as RL

NAMESPACE = "negative_sampler"
LAYOUT_PROPERTY = "layout"
REQUEST_LIST_LAYOUT = "request_list"
SCHEMA_PATH_PROPERTY = "schema_path"
FEATURES_PROPERTY = "features"  # the registry the lists were packed with (FeatureConfig as JSON)
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


def decoded_keys(features: F.FeatureConfig = F.DEFAULT) -> Tuple[str, ...]:
    """The features the sampler decodes beside the registry's inputs: the request keys, ui_position
    (when not an input), click, stage and the float columns (typed as the packaged schema types them)."""
    shown = () if F.SHOWN_KEY in features.model_inputs else (F.SHOWN_KEY,)
    return RL.REQUEST_KEYS + shown + (F.LABEL_KEY, F.STAGE_KEY) + FLOAT_COLUMNS


def decoded_features(features: F.FeatureConfig = F.DEFAULT) -> Tuple[str, ...]:
    """Every feature the sampler decodes: the registry's inputs and `decoded_keys`."""
    return features.model_inputs + decoded_keys(features)


DECODED_FEATURES = decoded_features(F.DEFAULT)
INTERNAL_COLUMNS = ("tier", "input_split")  # columns of a decoded request beside the features


def check_registry(features: F.FeatureConfig) -> None:
    """Raises ValueError (one line) for a registry the sampler cannot decode: ui_position declared
    other than as an int64 id (the shown indicator), or a name that clashes with a column of the
    decoded requests (`INTERNAL_COLUMNS`, the `<name>_values`/`<name>_offsets` of a multivalent input)."""
    inputs = features.resolved()
    if F.SHOWN_KEY in features.model_inputs:
        shown = features.feature(F.SHOWN_KEY)
        if shown.kind != "id" or shown.is_string:
            raise ValueError(f"features: {F.SHOWN_KEY} is the shown indicator, an int64 id; declared {shown.kind} "
                             f"{shown.dtype}")
    taken = set(INTERNAL_COLUMNS) | {f"{f.name}{suffix}" for f in inputs if f.multivalent
                                     for suffix in ("_values", "_offsets")}
    clashes = sorted(f.name for f in inputs if f.name in taken)
    if clashes:
        raise ValueError(f"features: {', '.join(clashes)} clashes with a column the NegativeSampler decodes")


def _undecodable(raw: bytes, error: BaseException) -> str:
    return f"undecodable candidate row: {str(error).splitlines()[0]}"


class CandidateDecoder:
    """Serialized candidate rows → numpy columns (`components.sampling`'s columnar layout) with
    tfx_bsl's C++ Example→Arrow decoder, and the reasons of the rows that cannot be used.

    The columns derive from the registry `features`: each id input (int64, or bytes for a string
    id), each dense input [n, width] float32, each multivalent input as `<name>_values` (all of a
    row's values: `pack_request_list` cuts them to the width) and `<name>_offsets`, besides the
    `decoded_keys`. `schema` types the features and names the required ones
    (`_required_features`); the decoder reads `decoded_features(features)` and the required
    features beyond them. A row is bad when it does not decode, misses a required feature, has the
    wrong number of values for a scalar or dense feature (the reason names it), has no value for
    a query-side multivalent feature, or names an unknown stage tier.
    """

    def __init__(self, schema: schema_pb2.Schema, features: F.FeatureConfig = F.DEFAULT,
                 columns: Optional[Iterable[str]] = None):
        check_registry(features)
        self._schema = schema
        self._required = _required_features(schema)
        inputs = features.resolved()
        if columns is not None:  # only these features, and only their own problems
            columns = set(columns)
            self._required = tuple(name for name in self._required if name in columns)
            inputs = tuple(f for f in inputs if f.name in columns)
        # A row without ui_position was shown (a log without positions: `F.SHOWN_WITHOUT_POSITION`).
        defaults = {F.SHOWN_KEY: F.SHOWN_WITHOUT_POSITION}
        self._scalars = ([(name, 0) for name in RL.REQUEST_KEYS]
                         + [(f.name, defaults.get(f.name, f.pad_value)) for f in inputs if f.kind == "id"]
                         + [(name, defaults.get(name, 0)) for name in decoded_keys(features)
                            if name in (F.SHOWN_KEY, F.LABEL_KEY)])
        self._dense = {f.name: f.width for f in inputs if f.is_dense}
        # name → (fewest values a row may have, dtype): a query-side list has at least one value
        self._ragged = {f.name: (1 if f.role == "query" else 0, f.np_dtype) for f in inputs if f.multivalent}
        decoded = decoded_features(features)
        self._features = decoded + tuple(name for name in self._required if name not in decoded)
        if columns is not None:
            self._scalars = [(name, default) for name, default in self._scalars if name in columns]
            self._features = tuple(name for name in self._features if name in columns)
        self._decoder = _decoder_of(schema, self._features)

    def _decode(self, raws: List[bytes]):
        """(record batch of the decodable rows, their indices, {index: reason} of the others)."""
        return record_io.decode_block_or_each(raws, self._decode_batch, (RuntimeError,), _undecodable)

    def _decode_batch(self, raws: List[bytes]):
        try:
            return self._decoder.DecodeBatch(raws)
        except RuntimeError:
            self._decoder = _decoder_of(self._schema, self._features)  # a failed decode leaves it unusable
            raise

    def _feature_lists(self, raws: List[bytes]):
        """({feature: (offsets [n+1], values, present [n], lengths [n])} of the decodable rows, their
        indices, {index: reason} of the others)."""
        batch, rows, bad = self._decode(raws)
        n = rows.size
        lists = {}
        names = set(batch.schema.names) if batch is not None else set()
        for name in self._features:
            column = batch.column(name) if name in names else None  # a feature the schema lacks: absent
            offsets = column.offsets.to_numpy() if column is not None else np.zeros(n + 1, dtype=np.int64)
            values = column.values.to_numpy(zero_copy_only=False) if column is not None else np.zeros(0)
            if column is None:
                present = np.zeros(n, dtype=bool)
            elif column.null_count == 0:
                present = np.ones(n, dtype=bool)
            else:
                present = ~column.is_null().to_numpy(zero_copy_only=False)
            lists[name] = (offsets, values, present, np.diff(offsets))
        return lists, rows, bad

    def decode(self, raws: List[bytes]) -> Tuple[Dict[str, np.ndarray], np.ndarray, Dict[int, str]]:
        """(columns of the good rows, indices of the good rows in `raws`, {index: reason} of the bad)."""
        lists, rows, bad = self._feature_lists(raws)
        n = rows.size
        problems: Dict[int, List[str]] = {}

        def flag(mask, text):
            for k in np.flatnonzero(mask).tolist():
                problems.setdefault(k, []).append(text)

        cols: Dict[str, np.ndarray] = {}
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
                dtype = np.float64 if isinstance(default, float) else object if isinstance(default, bytes) else np.int64
                return np.full(n, default, dtype=dtype), ok
            return np.where(ok, values[np.where(ok, offsets[:-1], 0)], default), ok

        for name, default in self._scalars:
            value, ok = first_values(name, default)
            cols[name] = value.astype(object if isinstance(default, bytes) else np.int64)
            flag(lists[name][2] & ~ok, f"{name} has no value")
        for name in FLOAT_COLUMNS:
            if name not in lists:
                continue
            value, _ = first_values(name, ROW_DEFAULTS[name])
            cols[name] = value.astype(np.float64)
        for name, size in self._dense.items():
            offsets, values, present, lengths = lists[name]
            wrong = present & (lengths != size)
            flag(wrong, f"{name} needs {size} values")
            dense = np.zeros((n, size), dtype=np.float32)
            ok = np.flatnonzero(present & ~wrong)
            if ok.size:
                dense[ok] = values[offsets[ok][:, None] + np.arange(size)]
            cols[name] = dense
        for name, (fewest, dtype) in self._ragged.items():
            offsets, values, present, lengths = lists[name]
            flag(present & (lengths < fewest), f"{name} has no value")
            cols[f"{name}_values"] = values.astype(dtype)
            cols[f"{name}_offsets"] = offsets.astype(np.int64)
        if F.STAGE_KEY not in lists:  # a decoder of some columns only (`columns`)
            return self._selected(cols, rows, bad, problems)
        offsets, values, present, lengths = lists[F.STAGE_KEY]
        # A row without a stage (a log without tiers) is ground truth when clicked (`F.tier_without_stage`).
        tier = np.where(cols[F.LABEL_KEY] > 0, RL.TIER_INDEX[F.tier_without_stage(1)],
                        RL.TIER_INDEX[F.tier_without_stage(0)]).astype(np.int64)
        for k in np.flatnonzero(present & (lengths > 0)).tolist():
            tier[k] = TIER_BY_NAME.get(values[offsets[k]], -1)
        flag(present & (tier < 0), "unknown stage tier")
        cols["tier"] = tier
        return self._selected(cols, rows, bad, problems)

    @staticmethod
    def _selected(cols, rows, bad, problems):
        good = np.ones(rows.size, dtype=bool)
        for k, texts in problems.items():
            good[k] = False
            bad[int(rows[k])] = "; ".join(texts)
        return select_rows(cols, np.flatnonzero(good)), rows[good], bad


class ItemColumnsDecoder(CandidateDecoder):
    """`CandidateDecoder` of the `corpus_columns` only, parsed by `tf.io.parse_example` (each a
    VarLenFeature typed by the schema): 894k rows/s against 90k for tfx_bsl's decoder, which
    parses every feature of a row whatever it is asked for. A feature present with no value reads
    as absent here (one sparse tensor cannot tell them apart): a row takes the default of such an
    optional feature where `CandidateDecoder` calls it bad (a required one is bad in both). A
    record that does not parse, or holds a feature with another type, is bad."""

    def __init__(self, schema: schema_pb2.Schema, features: F.FeatureConfig = F.DEFAULT):
        super().__init__(schema, features, columns=corpus_columns(features))
        types = {f.name: f.type for f in schema.feature}
        dtypes = {schema_pb2.INT: tf.int64, schema_pb2.FLOAT: tf.float32, schema_pb2.BYTES: tf.string}
        self._spec = {name: tf.io.VarLenFeature(dtypes[types[name]]) for name in self._features if name in types}

    def _parse(self, raws: List[bytes]):
        """(parsed sparse tensors of the rows that parse, their indices, {index: reason})."""
        return record_io.decode_block_or_each(
            raws, lambda block: tf.io.parse_example(tf.constant(block, tf.string), self._spec),
            (tf.errors.InvalidArgumentError, ValueError), _undecodable)

    def _feature_lists(self, raws: List[bytes]):
        parsed, rows, bad = self._parse(raws)
        n = rows.size
        lists = {}
        for name in self._features:
            if parsed is None or name not in parsed:
                lists[name] = (np.zeros(n + 1, dtype=np.int64), np.zeros(0), np.zeros(n, dtype=bool),
                               np.zeros(n, dtype=np.int64))
                continue
            sparse = parsed[name]
            lengths = np.bincount(sparse.indices.numpy()[:, 0], minlength=n).astype(np.int64)
            values = sparse.values.numpy()
            lists[name] = (np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), values, lengths > 0, lengths)
        return lists, rows, bad


TIER_BY_NAME = {name.encode(): index for name, index in RL.TIER_INDEX.items() if name != RL.RANDOM_NEG_TIER}
GROUND_TRUTH_TIER_INDEX = RL.TIER_INDEX[F.GROUND_TRUTH_TIER]
REQUESTS_WITHOUT_GROUND_TRUTH = "requests_without_ground_truth"  # also per input split: ..._<split>
NAN_PREFIX = "nan_values_"  # + a dense feature: its NaN values, which the models read as 0
BUCKETS_PREFIX = "buckets_"  # + a sparse feature: the bucket count the run's models embed it with
FOLDED_PREFIX = "ids_folded_"  # + a sparse feature: its ids outside [0, num_buckets), folded by id mod num_buckets


CUT_PREFIX = "values_cut_"  # + a multivalent feature: values beyond its width, cut when packed


def value_counts(cols: Dict[str, np.ndarray], features: F.FeatureConfig = F.DEFAULT) -> Dict[str, int]:
    """What the models will change in the decoded rows `cols`, per feature of the registry
    `features`: NaN values of each dense feature (`NAN_PREFIX`; the embedding reads them as 0,
    `models.embedding`), ids outside [0, buckets) of each int64 id feature (`FOLDED_PREFIX`; folded
    into the buckets, so two ids share an embedding; string ids are hashed, never folded) and the
    values of each multivalent feature beyond its width (`CUT_PREFIX`; request lists cut them)."""
    out = {}
    for f in features.resolved():
        if f.is_dense:
            if f.name in cols:
                out[NAN_PREFIX + f.name] = int(np.isnan(cols[f.name]).sum())
            continue
        values = cols.get(f"{f.name}_values" if f.multivalent else f.name)
        if values is None:
            continue
        if not f.is_string and not f.has_vocabulary:  # vocabulary ids are looked up, not folded
            out[FOLDED_PREFIX + f.name] = int(((values < 0) | (values >= f.buckets)).sum())
        if f.multivalent:
            out[CUT_PREFIX + f.name] = int(np.maximum(np.diff(cols[f"{f.name}_offsets"]) - f.width, 0).sum())
    return out


def _is_values(cols: Dict[str, np.ndarray], name: str) -> bool:
    """Whether column `name` is the values of a multivalent feature (beside its `_offsets`)."""
    return name.endswith("_values") and f"{name[:-len('_values')]}_offsets" in cols


def _is_offsets(cols: Dict[str, np.ndarray], name: str) -> bool:
    return name.endswith("_offsets") and f"{name[:-len('_offsets')]}_values" in cols


def select_rows(cols: Dict[str, np.ndarray], index: np.ndarray) -> Dict[str, np.ndarray]:
    """The rows `index` (in that order) of a columnar request."""
    out = {}
    for name, value in cols.items():
        if _is_offsets(cols, name):
            continue
        if _is_values(cols, name):
            base = name[: -len("_values")]
            offsets = cols[f"{base}_offsets"]
            starts, ends = offsets[index], offsets[index + 1]
            out[f"{base}_offsets"] = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
            out[name] = (np.concatenate([value[a:b] for a, b in zip(starts.tolist(), ends.tolist())])
                         if index.size else value[:0]).astype(value.dtype, copy=False)
        else:
            out[name] = value[index]
    return out


def slice_rows(cols: Dict[str, np.ndarray], start: int, stop: int) -> Dict[str, np.ndarray]:
    """The contiguous rows [start, stop) of a columnar batch (cheap: views, offsets rebased)."""
    out = {}
    for name, value in cols.items():
        if _is_offsets(cols, name):
            continue
        if _is_values(cols, name):
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
    deterministic order (input split, item id, raw bytes). Bad rows go to the dead-letter output;
    so do, under split="keep", a request that spans input splits, and the rows cut from a request
    longer than the list (`truncation_order`). A batch is decoded by one call of the C++
    decoder, built in `setup` from the serialized schema `schema` and the registry `features`."""

    def __init__(self, schema: bytes, config: SamplerConfig, split_names: Tuple[str, ...],
                 features: F.FeatureConfig = F.DEFAULT):
        self._schema_bytes = schema
        self._config = config
        self._split_names = split_names
        self._features = features
        self._decoder = None
        self._counters: Dict[str, beam.metrics.metricbase.Counter] = {}

    def _inc(self, name: str, n: int = 1):
        if name not in self._counters:
            self._counters[name] = beam.metrics.Metrics.counter(NAMESPACE, name)
        self._counters[name].inc(n)

    def setup(self):
        self._decoder = CandidateDecoder(schema_pb2.Schema.FromString(self._schema_bytes), self._features)

    def process(self, batch):
        """One batch of requests: [(request_id, [[(split index, raw), ...], ...]), ...]."""
        raws: List[bytes] = []
        splits: List[int] = []
        starts = [0]
        request_ids = []
        for request_id, groups in batch:
            for split, raw in sorted(row for group in groups for row in group):
                splits.append(split)
                raws.append(raw)
            starts.append(len(raws))
            request_ids.append(request_id)
        cols, rows, bad = self._decoder.decode(raws)
        for i, reason in sorted(bad.items()):
            self._inc("records_bad")
            yield beam.pvalue.TaggedOutput(record_io.DEAD_LETTER_TAG, (raws[i], reason))
        self._inc("records_parsed", int(rows.size))
        for name, count in value_counts(cols, self._features).items():
            if count:
                self._inc(name, count)
        bounds = np.searchsorted(rows, starts).tolist()  # the good rows of request k: bounds[k]:bounds[k + 1]
        all_splits = np.asarray(splits, dtype=np.int64)[rows]
        good_raws = [raws[i] for i in rows.tolist()]
        key = self._features.item_key
        for k, request_id in enumerate(request_ids):
            a, b = bounds[k], bounds[k + 1]
            if a == b:
                continue
            request = slice_rows(cols, a, b)
            request_splits = all_splits[a:b]
            order = np.lexsort((request[key], request_splits))  # stable: ties keep the raw-bytes order
            request, request_splits = select_rows(request, order), request_splits[order]
            raws_of = [good_raws[a + i] for i in order.tolist()]  # the request's raw rows, in its order
            self._inc("requests")
            if not (request["tier"] == GROUND_TRUTH_TIER_INDEX).any():
                self._inc(REQUESTS_WITHOUT_GROUND_TRUTH)
                self._inc(f"{REQUESTS_WITHOUT_GROUND_TRUTH}_{self._split_names[int(request_splits[0])]}")
            if self._config.split == "keep" and np.unique(request_splits).size != 1:
                self._inc("requests_bad")
                names = sorted({self._split_names[s] for s in request_splits.tolist()})
                self._inc("candidates_diverted_split", len(raws_of))
                for raw in raws_of:  # the rows themselves, so nothing is lost
                    yield beam.pvalue.TaggedOutput(record_io.DEAD_LETTER_TAG, (
                        raw, f"request {request_id} spans input splits {names}"))
                continue
            size = int(request["tier"].size)
            if size > self._config.list_size:
                keep = truncation_order(request, key)[:self._config.list_size]
                cut = np.setdiff1d(np.arange(size), keep)
                self._inc("requests_truncated")
                self._inc("candidates_truncated", int(cut.size))
                reason = (f"request {request_id} has {size} candidates, more than the list size "
                          f"{self._config.list_size}: cut ({TRUNCATION_RULE})")
                for i in cut.tolist():
                    yield beam.pvalue.TaggedOutput(record_io.DEAD_LETTER_TAG, (raws_of[i], reason))
                keep = np.sort(keep)  # the kept rows stay in the request's order
                request, raws_of = select_rows(request, keep), [raws_of[i] for i in keep.tolist()]
                request_splits = request_splits[keep]
            shown = [raw for raw, position in zip(raws_of, request[F.SHOWN_KEY].tolist()) if position > 0]
            request["input_split"] = request_splits[:1]
            yield request_id, (request, shown)


ITEMS_TAG, TIMES_TAG, SHOWN_ROWS_TAG = "items", "times", "shown_rows"


# The shuffle by request, through files (`_WriteBuckets` → `_DecodeBuckets`): each worker holds one
# bucket of rows at a time, where DirectRunner's GroupByKey held every row of the input at once.
BUCKET_BYTES = 32 << 20  # raw bytes of candidate rows per bucket
GZIP_RATIO = 10  # raw bytes per gzipped byte of candidate rows (synthetic rows: 372 B raw, 38 B gzipped)
MAX_BUCKETS = 1024
BUCKETS_DIR = ".request_buckets"  # under the request_lists artifact while the sampler runs; removed after
_HEADER = struct.Struct("<HI")  # a bucket record: input split index, key length; then the key and the row


def bucket_count(files: Iterable[str], parallelism: int) -> int:
    """Buckets for input files `files`: about `BUCKET_BYTES` of raw rows each (gzipped files count
    `GZIP_RATIO` times their size), at least two per worker so every worker has some, and at most
    `MAX_BUCKETS` (a bundle of the first stage keeps one open file per bucket it writes to; past
    32 GB of rows the buckets grow instead)."""
    raw = sum(tf.io.gfile.stat(path).length * (GZIP_RATIO if path.endswith(".gz") else 1) for path in files)
    return max(2 * parallelism, min(MAX_BUCKETS, -(-raw // BUCKET_BYTES)))


def _request_key(request_id) -> bytes:
    """A request id (int, or bytes for a string id) as bytes that decode back to it."""
    return b"s" + request_id if isinstance(request_id, bytes) else b"i" + struct.pack("<q", request_id)


def bucket_record(split_index: int, request_id, raw: bytes) -> bytes:
    """One row in a bucket file: its input split, its request id and its raw bytes."""
    key = _request_key(request_id)
    return _HEADER.pack(split_index, len(key)) + key + raw


def parse_bucket_record(record: bytes) -> Tuple[Any, int, bytes]:
    """(request id, input split index, raw row) of a `bucket_record`."""
    split_index, size = _HEADER.unpack_from(record)
    start = _HEADER.size
    key = record[start:start + size]
    request_id = key[1:] if key[:1] == b"s" else struct.unpack("<q", key[1:])[0]
    return request_id, split_index, record[start + size:]


def bucket_of(request_id, buckets: int) -> int:
    """The bucket of a request: a hash of its id that is the same in every process."""
    return zlib.crc32(_request_key(request_id)) % buckets


def _bucket_file_index(path: str) -> int:
    return int(os.path.basename(path).split("-")[1])


class _WriteBuckets(beam.DoFn):
    """Blocks of raw records of one input split (tf.data reads a file `KEY_BATCH` records at a time)
    → each row appended to its request's bucket file (`bucket_record`, uncompressed TFRecords under
    `directory`, one file per bucket and bundle, renamed `bucket-<index>-<unique>` once complete).
    Emits the complete files' paths at the end of the bundle. The only per-record work before the
    shuffle, where a split's (gzipped) file is read by one worker: the request ids of a block come
    from one `tf.io.parse_example` (reading only request_id, typed by the serialized schema
    `schema`: 745k rows/s against 163k for tfx_bsl's decoder of the whole row); records that do not
    parse or have no request_id go to the dead-letter output."""

    def __init__(self, schema: bytes, split_index: int, directory: str, buckets: int):
        self._schema_bytes = schema
        self._split_index = split_index
        self._directory = directory
        self._buckets = buckets
        self._spec = None
        self._bad = beam.metrics.Metrics.counter(NAMESPACE, "records_bad")

    def setup(self):
        schema = schema_pb2.Schema.FromString(self._schema_bytes)
        kinds = {f.name: f.type for f in schema.feature}
        dtype = tf.string if kinds.get(F.REQUEST_ID_KEY) == schema_pb2.BYTES else tf.int64
        self._spec = {F.REQUEST_ID_KEY: tf.io.VarLenFeature(dtype)}

    def _request_ids(self, raws: List[bytes]) -> List:
        """The request id of each record (its first value), or the reason it has none."""
        parsed, rows, bad = record_io.decode_block_or_each(
            raws, lambda block: tf.io.parse_example(tf.constant(block, tf.string), self._spec)[F.REQUEST_ID_KEY],
            (tf.errors.InvalidArgumentError, ValueError),
            lambda raw, e: (record_io.record_problem(raw)
                            or f"{F.REQUEST_ID_KEY} is not {self._spec[F.REQUEST_ID_KEY].dtype.name}"))
        out: List = [bad.get(i) for i in range(len(raws))]
        if parsed is not None:  # rows come in order: a row's first value has index [row, 0]
            indices, values = parsed.indices.numpy(), parsed.values.numpy()
            first = indices[:, 1] == 0
            for row, value in zip(rows[indices[first, 0]].tolist(), values[first].tolist()):
                out[row] = value
        for i in rows.tolist():  # parsed without a value: tf.io's lenient parser reads some garbage as empty
            if out[i] is None:
                out[i] = record_io.record_problem(raws[i]) or f"missing required feature(s): {F.REQUEST_ID_KEY}"
        return out

    def start_bundle(self):
        self._writers: Dict[int, Tuple[str, Any]] = {}

    def _writer(self, bucket: int):
        entry = self._writers.get(bucket)
        if entry is None:
            temp = os.path.join(self._directory, f"incomplete-{uuid.uuid4().hex}")
            entry = self._writers[bucket] = (temp, tf.io.TFRecordWriter(temp))
        return entry[1]

    def process(self, raws: List[bytes]):
        for raw, request_id in zip(raws, self._request_ids(raws)):
            if isinstance(request_id, str):
                self._bad.inc()
                yield beam.pvalue.TaggedOutput(record_io.DEAD_LETTER_TAG, (raw, request_id))
            else:
                self._writer(bucket_of(request_id, self._buckets)).write(
                    bucket_record(self._split_index, request_id, raw))

    def finish_bundle(self):
        for bucket, (temp, writer) in sorted(self._writers.items()):
            writer.close()
            path = os.path.join(self._directory, f"bucket-{bucket:05d}-{uuid.uuid4().hex}")
            tf.io.gfile.rename(temp, path)
            yield WindowedValue(path, MIN_TIMESTAMP, [GlobalWindow()])
        self._writers = {}


def bucket_rows(files: Iterable[str], bucket: int) -> Iterable[Tuple[Any, int, bytes]]:
    """The rows of one bucket as (request id, input split index, raw), in the order of its files'
    names (which are random) and their records."""
    for path in sorted(p for p in files if _bucket_file_index(p) == bucket):
        for records in record_io.file_blocks(path, BUCKET_READ_BLOCK):
            for record in records:
                yield parse_bucket_record(record)


def read_bucket(files: Iterable[str], bucket: int) -> Dict[Any, List[Tuple[int, bytes]]]:
    """`bucket_rows` grouped by request: request id → [(input split index, raw), ...]. The order is
    the files' (random): `_DecodeRequests` sorts each request's rows."""
    requests: Dict[Any, List[Tuple[int, bytes]]] = {}
    for request_id, split_index, raw in bucket_rows(files, bucket):
        requests.setdefault(request_id, []).append((split_index, raw))
    return requests


class _DecodeBuckets(_DecodeRequests):
    """A bucket index → its requests, decoded by `_DecodeRequests`, `DECODE_BATCH` at a time. The
    side input `files` lists every complete bucket file (so this runs after `_WriteBuckets`); the
    bucket's rows are read and grouped by request here, one bucket in memory at a time."""

    def process(self, bucket: int, files: List[str]):
        requests = read_bucket(files, bucket)
        ids = sorted(requests)
        for start in range(0, len(ids), DECODE_BATCH):
            yield from super().process([(request_id, [requests.pop(request_id)])
                                        for request_id in ids[start:start + DECODE_BATCH]])


def corpus_columns(features: F.FeatureConfig = F.DEFAULT) -> Tuple[str, ...]:
    """What the corpus pass decodes: the request keys, the item key and the other item-side inputs."""
    return RL.REQUEST_KEYS + (features.item_key,) + tuple(f.name for f in item_features(features))


def item_feature_tuples(cols: Dict[str, np.ndarray], features: F.FeatureConfig = F.DEFAULT) -> List[Tuple]:
    """Each decoded row's item features (`item_features` of the registry, in its order) as a tuple:
    an id as it is, a list of ids (all of them) or a dense vector as a tuple."""
    per_feature = []
    for f in item_features(features):
        if f.multivalent:
            offsets, values = cols[f"{f.name}_offsets"].tolist(), cols[f"{f.name}_values"].tolist()
            per_feature.append([tuple(values[a:b]) for a, b in zip(offsets[:-1], offsets[1:])])
        elif f.is_dense:
            per_feature.append([tuple(v) for v in cols[f.name].tolist()])
        else:
            per_feature.append(cols[f.name].tolist())
    return list(zip(*per_feature)) if per_feature else [()] * int(cols[features.item_key].size)


class _BucketCorpus(beam.DoFn):
    """A bucket index → what the lists pass needs from the whole input, as side inputs: per item
    (`ITEMS_TAG`) its count and one deterministic choice of its features, pre-aggregated over the
    bundle; per request (`TIMES_TAG`) its latest request time. It parses only `corpus_columns`
    (`ItemColumnsDecoder`), so the corpus counts every row whose request keys and item features
    decode, whatever becomes of the row's other features, its request's split or the list size
    (the rows the lists pass cuts or diverts are items of the log all the same)."""

    def __init__(self, schema: bytes, features: F.FeatureConfig = F.DEFAULT):
        self._schema_bytes = schema
        self._features = features
        self._decoder = None

    def setup(self):
        self._decoder = ItemColumnsDecoder(schema_pb2.Schema.FromString(self._schema_bytes), self._features)

    def start_bundle(self):
        self._items: Dict[Any, list] = {}  # item id → [count, least features], over the bundle

    def finish_bundle(self):
        """The bundle's items, each once (`_CountAndPickFeatures` merges them over bundles)."""
        for item, (count, features) in self._items.items():
            yield beam.pvalue.TaggedOutput(ITEMS_TAG, WindowedValue((item, (count, features)), MIN_TIMESTAMP, [GlobalWindow()]))
        self._items = {}

    def process(self, bucket: int, files: List[str]):
        raws = [raw for _, _, raw in bucket_rows(files, bucket)]  # the corpus needs no grouping by request
        items, key, latest = self._items, self._features.item_key, {}
        for start in range(0, len(raws), BUCKET_READ_BLOCK):
            cols, _, _ = self._decoder.decode(raws[start:start + BUCKET_READ_BLOCK])
            for item, features in zip(cols[key].tolist(), item_feature_tuples(cols, self._features)):
                entry = items.get(item)
                if entry is None:
                    items[item] = [1, features]
                else:
                    entry[0] += 1
                    if features < entry[1]:
                        entry[1] = features
            for request_id, time in zip(cols[F.REQUEST_ID_KEY].tolist(), cols[F.REQUEST_TIME_KEY].tolist()):
                latest[request_id] = max(time, latest.get(request_id, time))
        for time in latest.values():
            yield beam.pvalue.TaggedOutput(TIMES_TAG, int(time))


BUCKET_READ_BLOCK = 4096  # bucket records read together
TRUNCATION_RULE = "keeps the shown rows by position, then the best tiers first, by item id within a tier"


def truncation_order(request: Dict[str, np.ndarray], item_key: str = F.ITEM_KEY) -> np.ndarray:
    """The order in which an over-long request keeps its rows (`TRUNCATION_RULE`): shown rows by
    ui_position (`F.SHOWN_KEY`), then the unshown ones by tier (best first) and item id (the
    column `item_key`: int64 or bytes)."""
    position = request[F.SHOWN_KEY]
    shown = position > 0
    return np.lexsort((request[item_key], request["tier"], np.where(shown, position, np.iinfo(np.int64).max), ~shown))


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


def data_counts(counters: Dict[str, int], features: F.FeatureConfig = F.DEFAULT) -> Dict[str, Any]:
    """The counts a user sees at the end of a run (`pipelines.report.counts_block`) and that the
    CascadeEvaluator writes into its evaluation, from the sampler's counters: rows read, used in the
    request lists and diverted (by reason), requests without a ground-truth candidate (per input
    split; the recall metrics leave them out), NaN values read as 0 per dense feature, ids folded
    per sparse feature with its bucket count (features of the run's registry `features`), and
    values cut per multivalent feature with its width (only those with cuts: "values_cut").
    rows_read = rows_used + Σ rows_diverted."""
    splits = {name[len(REQUESTS_WITHOUT_GROUND_TRUTH) + 1:]: value for name, value in sorted(counters.items())
              if name.startswith(REQUESTS_WITHOUT_GROUND_TRUTH + "_")}
    inputs = features.resolved()
    counts = {
        "rows_read": counters.get("records_parsed", 0) + counters.get("records_bad", 0),
        "rows_used": counters.get("candidates_kept", 0),
        "rows_diverted": {name: counters.get(name, 0) for name in DIVERTED_COUNTERS},
        "requests": counters.get("requests", 0),
        "requests_without_ground_truth": {"total": counters.get(REQUESTS_WITHOUT_GROUND_TRUTH, 0), **splits},
        "nan_values_read_as_0": {f.name: counters.get(NAN_PREFIX + f.name, 0) for f in inputs if f.is_dense},
        "ids_folded": {f.name: {"ids": counters.get(FOLDED_PREFIX + f.name, 0),
                                "buckets": counters.get(BUCKETS_PREFIX + f.name, f.buckets)}
                       for f in inputs if not f.is_dense and not f.is_string and not f.has_vocabulary},
        # strings are hashed; vocabulary ids go to OOV rows, not folded
    }
    cut = {f.name: {"values": counters[CUT_PREFIX + f.name], "width": f.width}
           for f in inputs if f.multivalent and counters.get(CUT_PREFIX + f.name)}
    if cut:  # only then, so the counts of data without long lists read as they always did
        counts["values_cut"] = cut
    return counts


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
    out += [f"{v['values']:,} values of {name} cut to its width {v['width']:,}"
            for name, v in counts.get("values_cut", {}).items() if v["values"]]
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


def _to_corpus(items: List[Tuple[Any, Tuple[int, Tuple]]], features: F.FeatureConfig = F.DEFAULT) -> ItemCorpus:
    """(item id, (count, item features in the order of `item_features(features)`)) → the compact
    (numpy-only) corpus."""
    names = [f.name for f in item_features(features)]
    return ItemCorpus.from_items([(item, count, dict(zip(names, values))) for item, (count, values) in items],
                                 keep_features=False, features=features)


@functools.lru_cache(maxsize=None)
def _value_kinds(features: F.FeatureConfig) -> Tuple[frozenset, frozenset]:
    """(float features, bytes features) of a request list of the registry `features`."""
    inputs = features.resolved()
    return (frozenset(RL.CANDIDATE_FLOAT_FEATURES + tuple(f.name for f in inputs if f.is_dense)),
            frozenset(f.name for f in inputs if f.is_string))


def packed_example(packed: Dict[str, List], features: F.FeatureConfig = F.DEFAULT) -> tf.train.Example:
    """`make_example` for packed request-list values (python lists typed by the registry
    `features`: float for its dense inputs and the float columns, bytes for its string ids, int64
    otherwise)."""
    floats, strings = _value_kinds(features)
    example = tf.train.Example()
    out = example.features.feature
    for name, values in packed.items():
        if name in floats:
            out[name].float_list.value.extend(values)
        elif name in strings:
            out[name].bytes_list.value.extend(values)
        else:
            out[name].int64_list.value.extend(values)
    return example


class _BuildRequestLists(beam.DoFn):
    """One request's columns → a serialized request list, tagged with its output split; when that
    split is eval, also the raw bytes of the request's shown rows (tagged `SHOWN_ROWS_TAG`)."""

    def __init__(self, config: SamplerConfig, split_names: Tuple[str, ...], features: F.FeatureConfig = F.DEFAULT):
        self._config = config
        self._split_names = split_names
        self._features = features
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
            packed = sample_request_columns(cols, corpus, self._config, counts, self._features)
        except ValueError as e:
            packed, error = None, e
        for name, n in counts.items():
            self._inc(name, n)
        if packed is None:
            self._inc("requests_bad")
            yield beam.pvalue.TaggedOutput(record_io.DEAD_LETTER_TAG, (
                json.dumps({"request_id": request_id, "candidates": int(cols["tier"].size)}).encode(), str(error)))
            return
        self._inc(f"lists_{split}")
        example = packed_example(packed, self._features)
        yield beam.pvalue.TaggedOutput(split, example.SerializeToString(deterministic=True))
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


def _load_schema(schemas: Optional[List[types.Artifact]],
                 features: F.FeatureConfig = F.DEFAULT) -> Tuple[schema_pb2.Schema, str]:
    """(schema, path read): the Schema artifact's file, or the packaged schema without one. Fails
    (BadInputError, one line) when the sampler cannot decode the registry `features`
    (`check_registry`), the schema lacks one of its inputs or types it unlike its declaration
    (`FeatureConfig.check_schema`), or lacks one of the `decoded_keys` or types it unlike the
    packaged schema."""
    if schemas:
        path = io_utils.get_only_uri_in_dir(artifact_utils.get_single_instance(list(schemas)).uri)
        schema = io_utils.parse_pbtxt_file(path, schema_pb2.Schema())
    else:
        path, schema = F.SCHEMA_PATH, F.load_schema()
    try:
        check_registry(features)
        features.check_schema(schema)
    except ValueError as e:
        raise record_io.BadInputError(str(e)) from None
    types_in = {f.name: f.type for f in schema.feature}
    keys = decoded_keys(features)
    expected = {f.name: f.type for f in F.load_schema().feature if f.name in keys}
    optional = (F.STAGE_KEY, F.SHOWN_KEY)  # a log without tiers or positions (`F.tier_without_stage`)
    wrong = sorted(name for name, kind in expected.items()
                   if types_in.get(name) != kind and not (name in optional and name not in types_in))
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
        schema, schema_path = _load_schema(input_dict.get("schema"), features)
        schema_bytes = schema.SerializeToString()

        split_names = tuple(sorted(input_uris))
        files = {split: record_io.split_files(input_uris[split]) for split in split_names}
        buckets = bucket_count([path for split in split_names for path in files[split]],
                               record_io.beam_parallelism(self._beam_pipeline_args))
        buckets_dir = os.path.join(output.uri, BUCKETS_DIR)
        if tf.io.gfile.exists(buckets_dir):  # left by a run that was killed
            tf.io.gfile.rmtree(buckets_dir)
        tf.io.gfile.makedirs(buckets_dir)
        pipeline = self._make_beam_pipeline()
        written = []
        for index, split in enumerate(split_names):
            parsed = (
                record_io.read_blocks(pipeline, input_uris[split], split, KEY_BATCH)
                | f"WriteBuckets[{split}]" >> beam.ParDo(
                    _WriteBuckets(schema_bytes, index, buckets_dir, buckets)).with_outputs(
                    record_io.DEAD_LETTER_TAG, main="files")
            )
            record_io.write_dead_letters(parsed[record_io.DEAD_LETTER_TAG], dead.uri, f"records-{split}")
            written.append(parsed.files)
        bucket_files = beam.pvalue.AsSingleton(written | "AllBucketFiles" >> beam.Flatten()
                                               | "BucketFileList" >> beam.combiners.ToList())
        corpus_pass = (
            pipeline
            | "BucketsForCorpus" >> beam.Create(range(buckets))
            | "Corpus" >> beam.ParDo(_BucketCorpus(schema_bytes, features), files=bucket_files).with_outputs(
                ITEMS_TAG, TIMES_TAG)
        )
        requests = (
            pipeline
            | "Buckets" >> beam.Create(range(buckets))
            | "DecodeRequests" >> beam.ParDo(_DecodeBuckets(schema_bytes, config, split_names, features),
                                             files=bucket_files).with_outputs(record_io.DEAD_LETTER_TAG, main="requests")
        )
        record_io.write_dead_letters(requests[record_io.DEAD_LETTER_TAG], dead.uri, "candidates")
        corpus = (
            corpus_pass[ITEMS_TAG]
            | "PerItem" >> beam.CombinePerKey(_CountAndPickFeatures())
            | "CorpusList" >> beam.combiners.ToList()
            | "ToCorpus" >> beam.Map(_to_corpus, features)
        )
        request_times = (
            corpus_pass[TIMES_TAG]
            | "Quantiles" >> beam.ApproximateQuantiles.Globally(1001)
            | "Cutoff" >> beam.Map(_time_cutoff, config.eval_fraction)
        )
        lists = (
            requests.requests
            | "BuildLists" >> beam.ParDo(
                _BuildRequestLists(config, split_names, features),
                corpus=beam.pvalue.AsSingleton(corpus),
                time_cutoff=beam.pvalue.AsSingleton(request_times),
            ).with_outputs(record_io.DEAD_LETTER_TAG, SHOWN_ROWS_TAG, *output_splits)
        )
        record_io.write_dead_letters(lists[record_io.DEAD_LETTER_TAG], dead.uri, "requests")
        for split in output_splits:
            record_io.write_split(lists[split], artifact_utils.get_split_uri([output], split), split)
        record_io.write_split(lists[SHOWN_ROWS_TAG], artifact_utils.get_split_uri([shown_rows], SHOWN_ROWS_SPLIT),
                              f"shown_rows-{SHOWN_ROWS_SPLIT}")
        try:
            counters = record_io.run_and_count(pipeline, NAMESPACE)
        finally:
            tf.io.gfile.rmtree(buckets_dir)
        counters.update({BUCKETS_PREFIX + f.name: f.buckets for f in features.resolved()
                         if not f.is_dense and not f.has_vocabulary})
        record_io.record_counters(output, counters)
        output.set_string_custom_property(LAYOUT_PROPERTY, REQUEST_LIST_LAYOUT)
        output.set_string_custom_property(SCHEMA_PATH_PROPERTY, schema_path)
        output.set_string_custom_property(FEATURES_PROPERTY, json.dumps(to_dict(features), sort_keys=True))
        output.set_int_custom_property("list_size", config.list_size)
        warnings = data_warnings(data_counts(counters, features))
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
