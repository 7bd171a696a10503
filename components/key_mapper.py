"""KeyMapper: the pipeline's keys on logs that name them otherwise.

The components read a candidate row's request key, label and time by the names `request_id`
(int64), `click` (0/1) and `request_time` (int64). A log that calls them otherwise (`session`,
`clicked`, `ts`), or keys its requests by a string, names its own columns in the config's `keys`
(`schema.keys.KeyConfig`); this component, right after the ExampleGen, adds the three features to
every row, computed from those columns:

    request_id    = the key column's int64 value, or for a string key the first 8 bytes of its
                    BLAKE2b digest as an int64 in [0, 2^63) (the same in every process and run)
    click         = 1 if the label column's first value > 0 else 0 (int64 or float labels)
    request_time  = the time column's first int64 value (0 when `keys.request_time` is "")

The row keeps its own columns (they are in its schema, and not model inputs). As TeacherInference
does, an output record is the input record's bytes followed by a serialized Example holding the
three features: protobuf parses concatenated messages as their merge. A record that does not parse,
or lacks the key or the label, goes to the dead-letter output with the reason; the component fails
when they exceed `max_bad_fraction`. Counters (namespace `key_mapper`): records_parsed,
records_bad, string_keys_hashed. Written by hand: no TFX component renames or derives features
without a full Transform.
"""
import hashlib
import json
from typing import Any, Dict, List

import apache_beam as beam
import tensorflow as tf
from tfx import types
from tfx.dsl.components.base import base_beam_component, base_beam_executor, executor_spec
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from cascade_ranking.components import record_io
from cascade_ranking.models.config import config_from_dict, to_dict
from cascade_ranking.schema import features as F
from cascade_ranking.schema.keys import KeyConfig

NAMESPACE = "key_mapper"


def request_key(value) -> int:
    """The int64 request_id of a key value: an int as it is, a string (bytes) by its BLAKE2b digest."""
    if isinstance(value, int):
        return value
    return int.from_bytes(hashlib.blake2b(bytes(value), digest_size=8).digest(), "big") & (2 ** 63 - 1)


def _first(feature: tf.train.Feature):
    kind = feature.WhichOneof("kind")
    values = getattr(feature, kind).value if kind else ()
    return values[0] if len(values) else None


def canonical_keys(example: tf.train.Example, keys: KeyConfig) -> Dict[str, int]:
    """The three key features of a row, or ValueError naming what is missing."""
    fmap = example.features.feature
    missing = [name for name in (keys.request_id, keys.click) if name not in fmap or _first(fmap[name]) is None]
    if missing:
        raise ValueError(f"missing key feature(s): {', '.join(missing)}")
    out = {F.REQUEST_ID_KEY: request_key(_first(fmap[keys.request_id])),
           F.LABEL_KEY: 1 if _first(fmap[keys.click]) > 0 else 0, F.REQUEST_TIME_KEY: 0}
    if keys.request_time and keys.request_time in fmap and _first(fmap[keys.request_time]) is not None:
        out[F.REQUEST_TIME_KEY] = int(_first(fmap[keys.request_time]))
    return out


def keys_record(values: Dict[str, int]) -> bytes:
    example = tf.train.Example()
    for name, value in values.items():
        example.features.feature[name].int64_list.value.append(int(value))
    return example.SerializeToString(deterministic=True)


class _AddKeys(beam.DoFn):
    def __init__(self, keys: KeyConfig, split_names):
        self._keys = keys
        self._split_names = tuple(split_names)
        self._good = beam.metrics.Metrics.counter(NAMESPACE, "records_parsed")
        self._bad = beam.metrics.Metrics.counter(NAMESPACE, "records_bad")
        self._hashed = beam.metrics.Metrics.counter(NAMESPACE, "string_keys_hashed")

    def process(self, element):
        split, raw = element
        try:
            example = tf.train.Example.FromString(raw)
            values = canonical_keys(example, self._keys)
        except Exception as e:  # protobuf's DecodeError, or a missing key
            self._bad.inc()
            reason = str(e) if isinstance(e, ValueError) else f"unparseable tf.Example: {type(e).__name__}"
            yield beam.pvalue.TaggedOutput(record_io.DEAD_LETTER_TAG, (raw, reason))
            return
        self._good.inc()
        if example.features.feature[self._keys.request_id].WhichOneof("kind") == "bytes_list":
            self._hashed.inc()
        yield beam.pvalue.TaggedOutput(self._split_names[split], raw + keys_record(values))


class KeyMapperSpec(ComponentSpec):
    PARAMETERS = {
        "keys": ExecutionParameter(type=str),  # KeyConfig as JSON
        "splits": ExecutionParameter(type=str),
        "max_bad_fraction": ExecutionParameter(type=float),
    }
    INPUTS = {"examples": ChannelParameter(type=standard_artifacts.Examples)}
    OUTPUTS = {
        "output_examples": ChannelParameter(type=standard_artifacts.Examples),
        "dead_letters": ChannelParameter(type=record_io.DeadLetters),
    }


class Executor(base_beam_executor.BaseBeamExecutor):
    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        self._log_startup(input_dict, output_dict, exec_properties)
        keys = config_from_dict(KeyConfig, json.loads(exec_properties["keys"]))
        uris = record_io.required_split_uris(input_dict["examples"], json.loads(exec_properties["splits"]))
        split_names = sorted(uris)
        output = artifact_utils.get_single_instance(output_dict["output_examples"])
        output.split_names = artifact_utils.encode_split_names(split_names)
        dead = artifact_utils.get_single_instance(output_dict["dead_letters"])
        pipeline = self._make_beam_pipeline()
        mapped = (record_io.read_tagged_splits(pipeline, uris, split_names)
                  | "AddKeys" >> beam.ParDo(_AddKeys(keys, split_names)).with_outputs(record_io.DEAD_LETTER_TAG,
                                                                                    *split_names))
        record_io.write_dead_letters(mapped[record_io.DEAD_LETTER_TAG], dead.uri, "records")
        for split in split_names:
            record_io.write_split(mapped[split], artifact_utils.get_split_uri([output], split), split)
        counters = record_io.run_and_count(pipeline, NAMESPACE)
        record_io.record_counters(output, counters)
        record_io.check_bad_fraction(counters, float(exec_properties["max_bad_fraction"]), "KeyMapper")


class KeyMapper(base_beam_component.BaseBeamComponent):
    """Adds request_id, click and request_time, from the log's own key columns, to every row."""

    SPEC_CLASS = KeyMapperSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)

    def __init__(self, examples: types.BaseChannel, keys: KeyConfig, splits=("train", "eval"),
                 max_bad_fraction: float = record_io.DEFAULT_MAX_BAD_FRACTION):
        super().__init__(spec=KeyMapperSpec(
            examples=examples, keys=json.dumps(to_dict(keys), sort_keys=True), splits=json.dumps(list(splits)),
            max_bad_fraction=max_bad_fraction, output_examples=types.Channel(type=standard_artifacts.Examples),
            dead_letters=types.Channel(type=record_io.DeadLetters)))
