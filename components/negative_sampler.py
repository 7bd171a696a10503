"""NegativeSampler: candidate rows → request lists with stage-aware negatives and sampling weights.

A Beam component (DESIGN §6 step 3). For each request it
  1. keeps the five logged tiers (`rerank_pos` … `prerank_neg`),
  2. applies the deterministic, importance-weighted sampling of shown non-clicks
     (`components.sampling`: class rebalancing, teacher-loss based, position based),
  3. adds random negatives from the item corpus with their sampling probability,
  4. packs the request into one request-list tf.Example (`schema.request_list`),
  5. writes it to the `train` or `eval` split: the input's split ("keep"), a hash of the
     request id ("hash"), or the latest `eval_fraction` of requests by time ("time").

Records that fail to parse or miss a required feature go to the dead-letter output, as do
requests with more candidates than a list holds; the component fails when bad records exceed
`max_bad_fraction`. Beam counters (namespace `negative_sampler`) count what was read, kept,
dropped (per reason), reweighted and written; they are saved in `metrics.json` and as custom
properties of the output artifact.
"""
import dataclasses
import json
from typing import Any, Dict, Iterable, List, Tuple

import apache_beam as beam
import tensorflow as tf
from tfx import types
from tfx.dsl.components.base import base_beam_component, base_beam_executor, executor_spec
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from components import record_io
from components.sampling import ITEM_FEATURES, ItemCorpus, SamplerConfig, request_split_by_hash, sample_request
from datasources.example_io import make_example
from schema import features as F
from schema import request_list as RL

NAMESPACE = "negative_sampler"
LAYOUT_PROPERTY = "layout"
REQUEST_LIST_LAYOUT = "request_list"


def _required_features() -> Tuple[str, ...]:
    return tuple(f.name for f in F.load_schema().feature if f.presence.min_fraction == 1.0)


def _scalar_features() -> frozenset:
    schema = F.load_schema()
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


def _item_entry(row: Dict[str, Any]) -> Tuple[int, Tuple[int, Tuple]]:
    features = tuple((name, tuple(row[name]) if isinstance(row[name], list) else row[name]) for name in ITEM_FEATURES)
    return int(row["item_id"]), (1, features)


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
    return ItemCorpus.from_items(
        [(item, count, {name: list(v) if isinstance(v, tuple) else v for name, v in features})
         for item, (count, features) in items]
    )


class _BuildRequestLists(beam.DoFn):
    """One request's rows → a serialized request list, tagged with its output split."""

    def __init__(self, config: SamplerConfig):
        self._config = config
        self._counters: Dict[str, beam.metrics.metricbase.Counter] = {}

    def _inc(self, name: str, n: int = 1):
        if name not in self._counters:
            self._counters[name] = beam.metrics.Metrics.counter(NAMESPACE, name)
        self._counters[name].inc(n)

    def process(self, element, corpus: ItemCorpus, time_cutoff):
        request_id, tagged_rows = element
        tagged_rows = sorted(tagged_rows, key=lambda t: (t[1], int(t[0]["item_id"])))
        rows = [r for r, _ in tagged_rows]
        self._inc("requests")
        input_splits = {s for _, s in tagged_rows}
        if self._config.split == "keep":
            if len(input_splits) != 1:
                self._inc("requests_bad")
                yield beam.pvalue.TaggedOutput(record_io.DEAD_LETTER_TAG, (
                    json.dumps({"request_id": request_id}).encode(), f"request spans input splits {sorted(input_splits)}"))
                return
            split = input_splits.pop()
        elif self._config.split == "hash":
            split = request_split_by_hash(request_id, self._config.eval_fraction, self._config.seed)
        else:
            split = "eval" if int(rows[0]["request_time"]) > time_cutoff else "train"
        counts: Dict[str, int] = {}
        list_rows = sample_request(rows, corpus, self._config, counts)
        for name, n in counts.items():
            self._inc(name, n)
        try:
            packed = RL.build_request_list(list_rows, self._config.list_size)
        except ValueError as e:
            self._inc("requests_bad")
            yield beam.pvalue.TaggedOutput(record_io.DEAD_LETTER_TAG, (
                json.dumps({"request_id": request_id, "candidates": len(list_rows)}).encode(), str(e)))
            return
        self._inc(f"lists_{split}")
        yield beam.pvalue.TaggedOutput(split, make_example(packed).SerializeToString(deterministic=True))


def _time_cutoff(quantiles: List[int], eval_fraction: float) -> int:
    """The request time above which requests go to eval."""
    index = int(round((1.0 - eval_fraction) * (len(quantiles) - 1)))
    return quantiles[index]


class NegativeSamplerSpec(ComponentSpec):
    PARAMETERS = {
        "config": ExecutionParameter(type=str),  # SamplerConfig as JSON
        "input_splits": ExecutionParameter(type=str),  # JSON list of the input splits to read
    }
    INPUTS = {"examples": ChannelParameter(type=standard_artifacts.Examples)}
    OUTPUTS = {
        "request_lists": ChannelParameter(type=standard_artifacts.Examples),
        "dead_letters": ChannelParameter(type=record_io.DeadLetters),
    }


class Executor(base_beam_executor.BaseBeamExecutor):
    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        self._log_startup(input_dict, output_dict, exec_properties)
        config = SamplerConfig(**json.loads(exec_properties["config"]))
        config.validate()
        input_uris = record_io.required_split_uris(input_dict["examples"], json.loads(exec_properties["input_splits"]))
        output_splits = tuple(sorted(input_uris)) if config.split == "keep" else ("eval", "train")
        output = artifact_utils.get_single_instance(output_dict["request_lists"])
        output.split_names = artifact_utils.encode_split_names(list(output_splits))
        dead = artifact_utils.get_single_instance(output_dict["dead_letters"])
        required, scalars = _required_features(), _scalar_features()

        pipeline = self._make_beam_pipeline()
        tagged = []
        for split, uri in sorted(input_uris.items()):
            parsed = (
                record_io.read_split(pipeline, uri, split)
                | f"Parse[{split}]" >> beam.ParDo(record_io.ParseOrDivert(NAMESPACE, required)).with_outputs(
                    record_io.DEAD_LETTER_TAG, main="examples")
            )
            record_io.write_dead_letters(parsed[record_io.DEAD_LETTER_TAG], dead.uri, f"records-{split}")
            tagged.append(parsed.examples | f"ToRows[{split}]" >> beam.Map(lambda e, s=split: (example_to_row(e, scalars), s)))
        rows = tagged | "AllSplits" >> beam.Flatten()
        corpus = (
            rows
            | "ItemEntries" >> beam.Map(lambda t: _item_entry(t[0]))
            | "PerItem" >> beam.CombinePerKey(_CountAndPickFeatures())
            | "CorpusList" >> beam.combiners.ToList()
            | "Corpus" >> beam.Map(_to_corpus)
        )
        request_times = (
            rows
            | "RequestTime" >> beam.Map(lambda t: (int(t[0]["request_id"]), int(t[0]["request_time"])))
            | "OnePerRequest" >> beam.CombinePerKey(max)
            | "Times" >> beam.Values()
            | "Quantiles" >> beam.ApproximateQuantiles.Globally(1001)
            | "Cutoff" >> beam.Map(_time_cutoff, config.eval_fraction)
        )
        lists = (
            rows
            | "ByRequest" >> beam.Map(lambda t: (int(t[0]["request_id"]), t))
            | "GroupRequests" >> beam.GroupByKey()
            | "BuildLists" >> beam.ParDo(
                _BuildRequestLists(config),
                corpus=beam.pvalue.AsSingleton(corpus),
                time_cutoff=beam.pvalue.AsSingleton(request_times),
            ).with_outputs(record_io.DEAD_LETTER_TAG, *output_splits)
        )
        record_io.write_dead_letters(lists[record_io.DEAD_LETTER_TAG], dead.uri, "requests")
        for split in output_splits:
            record_io.write_split(lists[split], artifact_utils.get_split_uri([output], split), split)
        counters = record_io.run_and_count(pipeline, NAMESPACE)
        record_io.record_counters(output, counters)
        output.set_string_custom_property(LAYOUT_PROPERTY, REQUEST_LIST_LAYOUT)
        output.set_int_custom_property("list_size", config.list_size)
        record_io.check_bad_fraction(counters, config.max_bad_fraction, "NegativeSampler")


class NegativeSampler(base_beam_component.BaseBeamComponent):
    """Candidate rows (Examples) → request lists (Examples, train/eval) with sampling weights."""

    SPEC_CLASS = NegativeSamplerSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)

    def __init__(self, examples: types.BaseChannel, config: SamplerConfig = SamplerConfig(),
                 input_splits: Iterable[str] = ("train", "eval")):
        config.validate()
        spec = NegativeSamplerSpec(
            examples=examples,
            config=json.dumps(dataclasses.asdict(config), sort_keys=True),
            input_splits=json.dumps(list(input_splits)),
            request_lists=types.Channel(type=standard_artifacts.Examples),
            dead_letters=types.Channel(type=record_io.DeadLetters),
        )
        super().__init__(spec=spec)
