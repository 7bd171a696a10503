"""TeacherInference: the teacher pass of two-pass distillation (Factory Floor §4.1.2).

Runs the teacher SavedModel over every candidate row with Beam's RunInference
(`apache_beam.ml.inference`: batching, one model per worker process) and writes the rows back with
the teacher's output added as a feature (`teacher_logit` by default). Students then read it as the
soft label `sigmoid(teacher_logit)`.

Written by hand: `SerializedExampleHandler`, a RunInference model handler that feeds batches of
serialized tf.Examples to a SavedModel signature (Beam's TF handlers take tensors, not Examples),
and the append of the new feature. An output record is the input record's bytes followed by a
serialized `Example` holding only the new feature: protobuf parses concatenated messages as their
merge, and a map entry parsed later replaces an earlier one with the same key, so the result
parses as the input Example plus (or with a replaced) `teacher_logit`. This keeps the teacher pass
at a few µs of Python per row instead of a PredictionLog and a re-serialization per row
(tfx_bsl's RunInference + BulkInferrer's `prediction_to_example_utils`, about 10× slower here).

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
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference
import tensorflow as tf
from tfx import types
from tfx.dsl.components.base import base_beam_component, base_beam_executor, executor_spec
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter
from tfx.utils import path_utils

from cascade_ranking.components import record_io
from cascade_ranking.schema import features as F

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


class SerializedExampleHandler(ModelHandler[bytes, PredictionResult, Any]):
    """RunInference model handler: a batch of serialized tf.Examples → the SavedModel signature's
    `output_key` output, one float per example (its [N] or [N, 1] output flattened)."""

    def __init__(self, model_path: str, signature: str = "serving_default", input_key: str = "examples",
                 output_key: str = "logit", batch_size: int = 1024):
        self._model_path, self._signature = model_path, signature
        self._input_key, self._output_key, self._batch_size = input_key, output_key, batch_size

    def load_model(self):
        loaded = tf.saved_model.load(self._model_path)
        if self._signature not in loaded.signatures:
            raise ValueError(f"the teacher SavedModel has no signature {self._signature!r}")
        function = loaded.signatures[self._signature]
        if self._output_key not in function.structured_outputs:
            raise ValueError(f"the teacher's {self._signature} has no output {self._output_key!r} "
                             f"(it returns {sorted(function.structured_outputs)})")
        return loaded

    def run_inference(self, batch: Sequence[bytes], model, inference_args=None) -> Iterable[PredictionResult]:
        outputs = model.signatures[self._signature](**{self._input_key: tf.constant(list(batch))})
        values = tf.reshape(outputs[self._output_key], [-1]).numpy()
        if values.shape[0] != len(batch):
            raise ValueError(f"the teacher returned {values.shape[0]} values for {len(batch)} examples")
        return [PredictionResult(example, float(value)) for example, value in zip(batch, values)]

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        return {"min_batch_size": 1, "max_batch_size": self._batch_size}


def feature_record(name: str, value: float) -> bytes:
    """A serialized Example with the one float feature; appended to a serialized Example it adds
    (or replaces) that feature (see the module docstring)."""
    example = tf.train.Example()
    example.features.feature[name].float_list.value.append(value)
    return example.SerializeToString(deterministic=True)


class _AppendPrediction(beam.DoFn):
    """(split index, PredictionResult) → the input record with the prediction appended as the
    output feature, tagged with its split."""

    def __init__(self, feature: str, split_names):
        self._feature = feature
        self._split_names = tuple(split_names)
        self._written = beam.metrics.Metrics.counter(NAMESPACE, "records_written")

    def process(self, element):
        split, result = element
        self._written.inc()
        yield beam.pvalue.TaggedOutput(self._split_names[split], result.example + feature_record(self._feature, result.inference))


class Executor(base_beam_executor.BaseBeamExecutor):
    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        self._log_startup(input_dict, output_dict, exec_properties)
        splits = json.loads(exec_properties["splits"])
        uris = record_io.required_split_uris(input_dict["examples"], splits)
        model_path = path_utils.serving_model_path(artifact_utils.get_single_uri(input_dict["model"]))
        handler = KeyedModelHandler(SerializedExampleHandler(model_path, output_key=exec_properties["output_key"]))
        output = artifact_utils.get_single_instance(output_dict["output_examples"])
        output.split_names = artifact_utils.encode_split_names(sorted(uris))
        dead = artifact_utils.get_single_instance(output_dict["dead_letters"])
        feature = exec_properties["output_feature"]

        split_names = sorted(uris)
        pipeline = self._make_beam_pipeline()
        # After the reshuffle the parsing, inference and conversion of every split run in one stage
        # that the runner spreads over its workers.
        parsed = (
            record_io.read_tagged_splits(pipeline, uris, split_names)
            | "Validate" >> beam.ParDo(record_io.ParseOrDivert(NAMESPACE, keyed=True)).with_output_types(
                Tuple[int, bytes]).with_outputs(record_io.DEAD_LETTER_TAG, main="examples")
        )
        record_io.write_dead_letters(parsed[record_io.DEAD_LETTER_TAG], dead.uri, "records")
        written = (
            parsed.examples
            | "RunInference" >> RunInference(handler)
            | "AddTeacherOutput" >> beam.ParDo(_AppendPrediction(feature, split_names)).with_outputs(*split_names)
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
