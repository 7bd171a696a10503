"""TeacherInference: the teacher pass of two-pass distillation (Factory Floor §4.1.2).

Runs the teacher SavedModel over every candidate row with tfx_bsl's RunInference (the batching
and model loading BulkInferrer uses) and writes the rows back with the teacher's output added as
a feature (`teacher_logit` by default), via BulkInferrer's own `prediction_to_example_utils`.
Students then read it as the soft label `sigmoid(teacher_logit)`.

As many records come out as go in: the counters `records_parsed`, `records_written` and
`records_bad` are written to `metrics.json` in the output artifact and set as its custom
properties; records that do not parse go to the dead-letter output, and the component fails when
they exceed `max_bad_fraction` of the input.
"""
import json
from typing import Any, Dict, List

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


def _strip_feature(example: tf.train.Example, name: str) -> tf.train.Example:
    """A rerun replaces the previous teacher output rather than colliding with it."""
    if name in example.features.feature:
        del example.features.feature[name]
    return example


class _CountWritten(beam.DoFn):
    def __init__(self):
        self._written = beam.metrics.Metrics.counter(NAMESPACE, "records_written")

    def process(self, example: tf.train.Example):
        self._written.inc()
        yield example.SerializeToString(deterministic=True)


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

        pipeline = self._make_beam_pipeline()
        for split, uri in sorted(uris.items()):
            parsed = (
                record_io.read_split(pipeline, uri, split)
                | f"Parse[{split}]" >> beam.ParDo(record_io.ParseOrDivert(NAMESPACE)).with_outputs(
                    record_io.DEAD_LETTER_TAG, main="examples")
            )
            record_io.write_dead_letters(parsed[record_io.DEAD_LETTER_TAG], dead.uri, split)
            written = (
                parsed.examples
                | f"Strip[{split}]" >> beam.Map(_strip_feature, feature)
                | f"RunInference[{split}]" >> run_inference.RunInference(inference_spec)
                | f"AddTeacherOutput[{split}]" >> beam.Map(prediction_to_example_utils.convert, output_example_spec=output_spec)
                | f"Count[{split}]" >> beam.ParDo(_CountWritten())
            )
            record_io.write_split(written, artifact_utils.get_split_uri([output], split), split)
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
