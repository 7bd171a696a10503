"""TeacherInference: the teacher pass of two-pass distillation (Factory Floor §4.1.2).

Runs the teacher SavedModel over every candidate row with tfx_bsl's RunInference (the batching
and model loading BulkInferrer uses) and writes the rows back with the teacher's output added as
a feature (`teacher_logit` by default), via BulkInferrer's own `prediction_to_example_utils`.
Students then read it as the soft label `sigmoid(teacher_logit)`.

As many records come out as go in: the counters `records_parsed`, `records_written` and
`records_bad` are written to `metrics.json` in the output artifact and set as its custom
properties; records that do not parse (or have no request_id) go to the dead-letter output, and
the component fails when they exceed `max_bad_fraction` of the input.

Parallelism: a split's file is read by one worker, so the records of every split are reshuffled
right after reading; parsing, inference and conversion then run in one stage that Beam spreads
over the workers (each worker loads the SavedModel once: RunInference shares it per process).
Records go to RunInference as their serialized bytes, not re-serialized.
"""
import json
from typing import Any, Dict, List, Tuple

import apache_beam as beam
import tensorflow as tf
from tfx import types
from tfx.components.bulk_inferrer import prediction_to_example_utils
from tfx.dsl.components.base import base_beam_component, base_beam_executor, executor_spec
from tfx.proto import bulk_inferrer_pb2
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter
from tfx.utils import path_utils
from tfx_bsl.public.beam import run_inference
from tfx_bsl.public.proto import model_spec_pb2

from components import record_io
from schema import features as F

NAMESPACE = "teacher_inference"


class TeacherInferenceSpec(ComponentSpec):
    PARAMETERS = {
        "splits": ExecutionParameter(type=str),  # JSON list of split names
        "output_key": ExecutionParameter(type=str),
        "output_feature": ExecutionParameter(type=str),
        "max_bad_fraction": ExecutionParameter(type=float),
    }
    INPUTS = {
        "examples": ChannelParameter(type=standard_artifacts.Examples),
        "model": ChannelParameter(type=standard_artifacts.Model),
    }
    OUTPUTS = {
        "output_examples": ChannelParameter(type=standard_artifacts.Examples),
        "dead_letters": ChannelParameter(type=record_io.DeadLetters),
    }


class _ParseAndStrip(beam.DoFn):
    """(split index, raw record) → (split index, serialized tf.Example) for RunInference: records
    that do not parse or have no request_id go to the dead-letter output; a record that already
    has the output feature (a rerun) has it removed, so the new prediction replaces it. Other
    records pass through as the input bytes (no re-serialization)."""

    def __init__(self, feature: str, required=(F.REQUEST_ID_KEY,)):
        self._feature = feature
        self._required = tuple(required)
        self._good = beam.metrics.Metrics.counter(NAMESPACE, "records_parsed")
        self._bad = beam.metrics.Metrics.counter(NAMESPACE, "records_bad")

    def process(self, element):
        split, raw = element
        try:
            example = tf.train.Example.FromString(raw)
        except Exception as e:  # protobuf raises DecodeError and friends
            self._bad.inc()
            yield beam.pvalue.TaggedOutput(record_io.DEAD_LETTER_TAG, (raw, f"unparseable tf.Example: {type(e).__name__}"))
            return
        features = example.features.feature
        missing = [name for name in self._required if name not in features]
        if missing:
            self._bad.inc()
            yield beam.pvalue.TaggedOutput(record_io.DEAD_LETTER_TAG, (raw, f"missing required feature(s): {', '.join(missing)}"))
            return
        self._good.inc()
        if self._feature in features:
            del features[self._feature]
            raw = example.SerializeToString()
        yield split, raw


class _ToExample(beam.DoFn):
    """(split index, PredictionLog) → the serialized example with the prediction added (BulkInferrer's
    `prediction_to_example_utils.convert`), as an output tagged with its split."""

    def __init__(self, output_spec: bulk_inferrer_pb2.OutputExampleSpec, split_names):
        self._output_spec = output_spec
        self._split_names = tuple(split_names)
        self._written = beam.metrics.Metrics.counter(NAMESPACE, "records_written")

    def process(self, element):
        split, prediction_log = element
        example = prediction_to_example_utils.convert(prediction_log, self._output_spec)
        self._written.inc()
        yield beam.pvalue.TaggedOutput(self._split_names[split], example.SerializeToString(deterministic=True))


class Executor(base_beam_executor.BaseBeamExecutor):
    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        self._log_startup(input_dict, output_dict, exec_properties)
        splits = json.loads(exec_properties["splits"])
        uris = record_io.required_split_uris(input_dict["examples"], splits)
        model_path = path_utils.serving_model_path(artifact_utils.get_single_uri(input_dict["model"]))
        inference_spec = model_spec_pb2.InferenceSpecType(
            saved_model_spec=model_spec_pb2.SavedModelSpec(model_path=model_path, signature_name=["serving_default"])
        )
        output_spec = bulk_inferrer_pb2.OutputExampleSpec(
            output_columns_spec=[
                bulk_inferrer_pb2.OutputColumnsSpec(
                    predict_output=bulk_inferrer_pb2.PredictOutput(
                        output_columns=[
                            bulk_inferrer_pb2.PredictOutputCol(
                                output_key=exec_properties["output_key"],
                                output_column=exec_properties["output_feature"],
                            )
                        ]
                    )
                )
            ]
        )
        output = artifact_utils.get_single_instance(output_dict["output_examples"])
        output.split_names = artifact_utils.encode_split_names(sorted(uris))
        dead = artifact_utils.get_single_instance(output_dict["dead_letters"])
        feature = exec_properties["output_feature"]

        split_names = sorted(uris)
        pipeline = self._make_beam_pipeline()
        records = [
            record_io.read_split(pipeline, uris[split], split) | f"Tag[{split}]" >> beam.Map(lambda raw, i=index: (i, raw))
            for index, split in enumerate(split_names)
        ]
        # A split's file is read by one worker; after the reshuffle the parsing, inference and
        # conversion of every split run in one stage that the runner spreads over its workers.
        parsed = (
            records
            | "AllSplits" >> beam.Flatten()
            | "Reshuffle" >> beam.Reshuffle()
            | "Parse" >> beam.ParDo(_ParseAndStrip(feature)).with_output_types(Tuple[int, bytes]).with_outputs(
                record_io.DEAD_LETTER_TAG, main="examples")
        )
        record_io.write_dead_letters(parsed[record_io.DEAD_LETTER_TAG], dead.uri, "records")
        written = (
            parsed.examples
            | "RunInference" >> run_inference.RunInference(inference_spec)
            | "AddTeacherOutput" >> beam.ParDo(_ToExample(output_spec, split_names)).with_outputs(*split_names)
        )
        for split in split_names:
            record_io.write_split(written[split], artifact_utils.get_split_uri([output], split), split)
        counters = record_io.run_and_count(pipeline, NAMESPACE)
        record_io.record_counters(output, counters)
        record_io.check_bad_fraction(counters, float(exec_properties["max_bad_fraction"]), "TeacherInference")


class TeacherInference(base_beam_component.BaseBeamComponent):
    """Adds the teacher's prediction to every candidate row (Examples in → Examples out)."""

    SPEC_CLASS = TeacherInferenceSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)

    def __init__(
        self,
        examples: types.BaseChannel,
        model: types.BaseChannel,
        splits=("train", "eval"),
        output_key: str = "logit",
        output_feature: str = F.TEACHER_LOGIT_KEY,
        max_bad_fraction: float = record_io.DEFAULT_MAX_BAD_FRACTION,
    ):
        spec = TeacherInferenceSpec(
            examples=examples,
            model=model,
            splits=json.dumps(list(splits)),
            output_key=output_key,
            output_feature=output_feature,
            max_bad_fraction=max_bad_fraction,
            output_examples=types.Channel(type=standard_artifacts.Examples),
            dead_letters=types.Channel(type=record_io.DeadLetters),
        )
        super().__init__(spec=spec)
