"""CascadeEvaluator: scores the eval split with every stage model and blesses the final one.

Beam part: the eval split's candidate rows are read, parsed (bad records to the dead-letter
output), batched, and scored by each model's `serving_default` (SavedModels are loaded once per
worker in `setup`). The scored rows are written to the ModelEvaluation artifact
(`scored_rows-*.gz`, tf.Examples) and the executor then computes the metrics of DESIGN §8 from
them (`components.evaluation`), writes `metrics.json`, `calibration.png` and `recall_at_k.png`,
and a ModelBlessing the TFX way: a `BLESSED`/`NOT_BLESSED` file plus the int custom property
`blessed`, `current_model`/`current_model_id` (and the baseline's), which Pusher reads.

Inputs: `examples` (candidate rows), `model` (the final ranker, the candidate for blessing),
optional `preranking_model` and `retrieval_model` (earlier cascade stages, for e2e recall) and
optional `baseline_model` (for PD and "not worse than baseline"). For TFMA's slicing views use
`tfma_eval_config()` with the standard Evaluator.
"""
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import apache_beam as beam
import numpy as np
import tensorflow as tf
import tensorflow_model_analysis as tfma
from tfx import types
from tfx.components.evaluator import constants
from tfx.dsl.components.base import base_beam_component, base_beam_executor, executor_spec
from tfx.dsl.io import fileio
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter
from tfx.utils import io_utils, path_utils

from components import evaluation, record_io
from components.evaluation import EvaluatorConfig
from schema import features as F

NAMESPACE = "cascade_evaluator"
STAGE_INPUTS = ("retrieval_model", "preranking_model", "model")  # cascade order
SCORED_ROWS_PREFIX = "scored_rows"
SCORE_OUTPUT_KEYS = ("ctr", "score", "scores", "logit")
_ROW_FIELDS = ("request_id", "item_id", "click", "ui_position", "stage", "true_ctr")


def _row_spec(shape) -> Dict[str, tf.io.FixedLenFeature]:
    """Parse spec of the row fields (true_ctr −1 when the data does not know it)."""
    dtypes = {"stage": tf.string, "true_ctr": tf.float32}
    spec = {name: tf.io.FixedLenFeature(shape, dtypes.get(name, tf.int64)) for name in _ROW_FIELDS}
    spec["true_ctr"] = tf.io.FixedLenFeature(shape, tf.float32, default_value=np.full(shape, -1.0).tolist())
    return spec


def score_output_key(outputs) -> str:
    for key in SCORE_OUTPUT_KEYS:
        if key in outputs:
            return key
    raise ValueError(f"serving_default has no score output; it returns {sorted(outputs)}")


class _ScoreBatch(beam.DoFn):
    """A batch of serialized tf.Examples → one scored row per example, with a score per model."""

    def __init__(self, model_paths: Dict[str, str], score_outputs: Dict[str, Tuple[str, Optional[str]]]):
        self._model_paths = model_paths
        self._score_outputs = score_outputs
        self._signatures = None
        self._scored = beam.metrics.Metrics.counter(NAMESPACE, "records_scored")

    def setup(self):
        self._signatures = {}
        for key, path in self._model_paths.items():
            signature_name, output_key = self._score_outputs[key]
            signatures = tf.saved_model.load(path).signatures
            if signature_name not in signatures:
                raise ValueError(f"{key}: the SavedModel {path} has no signature {signature_name!r} "
                                 f"(it has {sorted(signatures)})")
            signature = signatures[signature_name]
            outputs = signature.structured_outputs
            if output_key is None:
                output_key = score_output_key(outputs)
            elif output_key not in outputs:
                raise ValueError(f"{key}: signature {signature_name!r} has no output {output_key!r} "
                                 f"(it returns {sorted(outputs)})")
            self._signatures[key] = (signature, output_key)

    def process(self, batch: List[bytes]):
        serialized = tf.constant(batch)
        scores = {key: tf.reshape(sig(examples=serialized)[out], [-1]).numpy() for key, (sig, out) in self._signatures.items()}
        columns = {k: v.numpy().reshape(-1) for k, v in tf.io.parse_example(serialized, _row_spec([1])).items()}
        for i in range(len(batch)):
            self._scored.inc()
            feature = {k: columns[k][i] for k in _ROW_FIELDS}
            feature.update({f"score/{k}": float(v[i]) for k, v in scores.items()})
            yield _scored_example(feature).SerializeToString(deterministic=True)


def _scored_example(values: Dict[str, Any]) -> tf.train.Example:
    example = tf.train.Example()
    for k, v in values.items():
        f = example.features.feature[k]
        if isinstance(v, (bytes, np.bytes_)):
            f.bytes_list.value.append(bytes(v))
        elif isinstance(v, (float, np.floating)):
            f.float_list.value.append(float(v))
        else:
            f.int64_list.value.append(int(v))
    return example


def read_scored_rows(uri: str, score_keys: List[str]) -> Dict[str, np.ndarray]:
    files = fileio.glob(os.path.join(uri, SCORED_ROWS_PREFIX + "*"))
    spec = _row_spec([])
    spec.update({f"score/{k}": tf.io.FixedLenFeature([], tf.float32) for k in score_keys})
    columns: Dict[str, List[np.ndarray]] = {k: [] for k in spec}
    for batch in tf.data.TFRecordDataset(files, compression_type="GZIP").batch(8192):
        parsed = tf.io.parse_example(batch, spec)
        for k in spec:
            columns[k].append(parsed[k].numpy())
    rows = {k.replace("score/", ""): np.concatenate(v) if v else np.array([]) for k, v in columns.items()}
    rows["stage"] = rows["stage"].astype(str)
    return rows


class CascadeEvaluatorSpec(ComponentSpec):
    PARAMETERS = {"config": ExecutionParameter(type=str)}
    INPUTS = {
        "examples": ChannelParameter(type=standard_artifacts.Examples),
        "model": ChannelParameter(type=standard_artifacts.Model),
        "preranking_model": ChannelParameter(type=standard_artifacts.Model, optional=True),
        "retrieval_model": ChannelParameter(type=standard_artifacts.Model, optional=True),
        "baseline_model": ChannelParameter(type=standard_artifacts.Model, optional=True),
    }
    OUTPUTS = {
        "evaluation": ChannelParameter(type=standard_artifacts.ModelEvaluation),
        "blessing": ChannelParameter(type=standard_artifacts.ModelBlessing),
        "dead_letters": ChannelParameter(type=record_io.DeadLetters),
    }


class Executor(base_beam_executor.BaseBeamExecutor):
    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        self._log_startup(input_dict, output_dict, exec_properties)
        config = EvaluatorConfig.from_json(exec_properties["config"])
        uri = record_io.required_split_uris(input_dict["examples"], [config.eval_split])[config.eval_split]
        model_paths = {
            key: path_utils.serving_model_path(artifact_utils.get_single_uri(input_dict[key]))
            for key in STAGE_INPUTS + ("baseline_model",) if input_dict.get(key)
        }
        stage_keys = [k for k in STAGE_INPUTS if k in model_paths]
        evaluation_artifact = artifact_utils.get_single_instance(output_dict["evaluation"])
        dead = artifact_utils.get_single_instance(output_dict["dead_letters"])

        pipeline = self._make_beam_pipeline()
        parsed = (
            record_io.read_split(pipeline, uri, config.eval_split)
            | "Parse" >> beam.ParDo(record_io.ParseOrDivert(NAMESPACE, _ROW_FIELDS[:-1])).with_outputs(
                record_io.DEAD_LETTER_TAG, main="examples")
        )
        record_io.write_dead_letters(parsed[record_io.DEAD_LETTER_TAG], dead.uri, config.eval_split)
        _ = (
            parsed.examples
            | "Batch" >> beam.BatchElements(min_batch_size=config.batch_size, max_batch_size=config.batch_size)
            | "Score" >> beam.ParDo(_ScoreBatch(model_paths, {key: config.score_output(key) for key in model_paths}))
            | "WriteScored" >> beam.io.WriteToTFRecord(os.path.join(evaluation_artifact.uri, SCORED_ROWS_PREFIX),
                                                       file_name_suffix=".gz", coder=beam.coders.BytesCoder())
        )
        counters = record_io.run_and_count(pipeline, NAMESPACE)
        record_io.check_bad_fraction(counters, config.max_bad_fraction, "CascadeEvaluator")

        rows = read_scored_rows(evaluation_artifact.uri, list(model_paths))
        metrics = evaluation.evaluate(rows, "model", stage_keys, config,
                                      baseline_key="baseline_model" if "baseline_model" in model_paths else None)
        metrics["counters"] = counters
        blessed, reasons = evaluation.bless(metrics, config)
        metrics["blessed"], metrics["blessing_reasons"] = blessed, reasons
        io_utils.write_string_file(os.path.join(evaluation_artifact.uri, record_io.METRICS_FILE),
                                   json.dumps(metrics, indent=2, sort_keys=True, default=float))
        evaluation.write_plots(metrics, evaluation_artifact.uri)

        blessing = artifact_utils.get_single_instance(output_dict["blessing"])
        model = input_dict["model"][0]
        blessing.set_string_custom_property(constants.ARTIFACT_PROPERTY_CURRENT_MODEL_URI_KEY, model.uri)
        blessing.set_int_custom_property(constants.ARTIFACT_PROPERTY_CURRENT_MODEL_ID_KEY, model.id)
        if input_dict.get("baseline_model"):
            baseline = input_dict["baseline_model"][0]
            blessing.set_string_custom_property(constants.ARTIFACT_PROPERTY_BASELINE_MODEL_URI_KEY, baseline.uri)
            blessing.set_int_custom_property(constants.ARTIFACT_PROPERTY_BASELINE_MODEL_ID_KEY, baseline.id)
        blessing.set_string_custom_property(constants.ARTIFACT_PROPERTY_BLESSING_MESSAGE_KEY,
                                            "blessed" if blessed else "; ".join(reasons))
        name = constants.BLESSED_FILE_NAME if blessed else constants.NOT_BLESSED_FILE_NAME
        io_utils.write_string_file(os.path.join(blessing.uri, name), "")
        blessing.set_int_custom_property(constants.ARTIFACT_PROPERTY_BLESSED_KEY,
                                         constants.BLESSED_VALUE if blessed else constants.NOT_BLESSED_VALUE)


class CascadeEvaluator(base_beam_component.BaseBeamComponent):
    """Metrics of DESIGN §8 for the cascade's models, and a ModelBlessing for the final one."""

    SPEC_CLASS = CascadeEvaluatorSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)

    def __init__(self, examples: types.BaseChannel, model: types.BaseChannel,
                 preranking_model: types.BaseChannel = None, retrieval_model: types.BaseChannel = None,
                 baseline_model: types.BaseChannel = None, config: EvaluatorConfig = EvaluatorConfig()):
        spec = CascadeEvaluatorSpec(
            examples=examples, model=model, preranking_model=preranking_model, retrieval_model=retrieval_model,
            baseline_model=baseline_model, config=config.to_json(),
            evaluation=types.Channel(type=standard_artifacts.ModelEvaluation),
            blessing=types.Channel(type=standard_artifacts.ModelBlessing),
            dead_letters=types.Channel(type=record_io.DeadLetters),
        )
        super().__init__(spec=spec)


def tfma_eval_config(config: EvaluatorConfig = EvaluatorConfig(), auc_threshold: float = None) -> tfma.EvalConfig:
    """A TFMA EvalConfig for the standard TFX Evaluator over candidate rows: AUC, calibration and
    example counts, overall and sliced by ui_position, ui_format and stage tier."""
    threshold = None
    if auc_threshold is not None:
        threshold = tfma.MetricThreshold(value_threshold=tfma.GenericValueThreshold(lower_bound={"value": auc_threshold}))
    return tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(signature_name="serving_default", label_key=F.LABEL_KEY,
                                    prediction_key="ctr", preprocessing_function_names=[])],
        slicing_specs=[tfma.SlicingSpec(), tfma.SlicingSpec(feature_keys=["ui_position"]),
                       tfma.SlicingSpec(feature_keys=["ui_format"]), tfma.SlicingSpec(feature_keys=["stage"])],
        metrics_specs=[tfma.MetricsSpec(metrics=[
            tfma.MetricConfig(class_name="ExampleCount"),
            tfma.MetricConfig(class_name="AUC", threshold=threshold),
            tfma.MetricConfig(class_name="Calibration"),
            tfma.MetricConfig(class_name="BinaryCrossentropy"),
        ])],
    )
