"""CascadeEvaluator: scores the eval split with every stage model and its baseline, and blesses each
stage on its own.

Inputs, one model and one baseline channel per stage of the registry (`models.stages`): `examples`
(candidate rows); `model` (the ranking stage, the one that predicts the CTR), optional
`preranking_model` and `retrieval_model` (the earlier stages); optional `baseline_model`,
`baseline_preranking_model`, `baseline_retrieval_model`: each stage's latest blessed model (a
`Resolver` with `LatestBlessedModelStrategy`; an empty list, as on the first run, is no
baseline); optional `ctr_blessing`, the standard TFX Evaluator's ModelBlessing of the ranker's CTR
(`tfma_eval_config`), which the ranking stage's blessing requires; optional `schema`, whose
required features (presence.min_fraction = 1) a row must carry to be scored.

Scoring (Beam): the eval split's rows are read and parsed; a record that does not parse or misses
a required feature goes to the `dead_letters` output instead of failing a scoring batch. The rows
are batched and every model input scores every row, each SavedModel loaded once per worker in
`setup` and each signature called once per batch. A stage scores by its cascade score,
`config.score_output(input)` (default: `serving_default` and the first of its outputs `score`,
`ctr`, `scores`, `logit`), and a baseline by its stage's; the ranking model and its baseline also
by their CTR, `config.ctr_output`, into the column `<input>/ctr`. The signatures are checked
before the pipeline runs (from `saved_model.pb`, without loading the model): a stage model without
its output fails the run; a baseline without it (an older architecture), or whose signatures are not
those of the stage's model (another stage's model: on KFP v2 `LatestBlessedModelStrategy` resolves
blessings without their producer), is dropped with a note.

The scored rows are written to the ModelEvaluation artifact (`scored_rows-*.gz`, tf.Examples); the
executor then computes the metrics and the per-stage verdicts of `components.evaluation` and writes
`metrics.json` (with `blessings`: stage → blessed, reasons, notes, model and baseline URIs),
`calibration.png` and `recall_at_k.png`. Each stage's ModelBlessing (its declared `blessing_output`:
`retrieval_blessing`, `preranking_blessing`, and `blessing` for the ranking stage) is written the TFX
way, as `tfx/components/evaluator/executor.py` does, for that stage's Pusher: a `BLESSED`/`NOT_BLESSED`
file, the int custom property `blessed`, `current_model`/`current_model_id` of the stage's model,
`baseline_model`/`baseline_model_id` when its baseline was compared, and `blessing_message`.

`tfma_eval_config()` configures the standard TFX Evaluator on the shown eval rows: the ranker's
CTR against its baseline, sliced by UI treatment.
"""
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import tensorflow as tf
import tensorflow_model_analysis as tfma
from tensorflow_metadata.proto.v0 import schema_pb2
from tensorflow.python.saved_model import loader_impl  # as TFMA and TFX read signatures
from tfx import types
from tfx.components.evaluator import constants
from tfx.dsl.components.base import base_beam_component, base_beam_executor, executor_spec
from tfx.dsl.io import fileio
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter
from tfx.utils import io_utils, path_utils

from cascade_ranking.components import evaluation, record_io
from cascade_ranking.datasources import example_wire
from cascade_ranking.components.negative_sampler import FEATURES_PROPERTY, data_counts
from cascade_ranking.models.config import config_from_dict
from cascade_ranking.components.evaluation import (BASELINE_INPUTS, CTR_STAGE, RANKING_INPUT, STAGE_INPUTS, STAGES,
                                                   EvaluatorConfig)
from cascade_ranking.models import scann_index, stages as stage_registry
from cascade_ranking.models.trainers import warm_start
from cascade_ranking.schema import features as F

NAMESPACE = "cascade_evaluator"
SCORED_ROWS_DIR = "scored_rows"  # in the evaluation artifact: one gzipped TFRecord file per block
SCORE_OUTPUT_KEYS = ("score", "ctr", "scores", "logit")
# The component output with each stage's ModelBlessing (`models.stages`).
BLESSING_OUTPUTS = {s.name: s.blessing_output for s in stage_registry.registered()}
_ROW_FIELDS = ("request_id", "click", "ui_position", "stage", "true_ctr")  # the metrics' keys, whatever the registry
_REQUIRED_ROW_FIELDS = (F.REQUEST_ID_KEY, F.LABEL_KEY)  # stage, ui_position and true_ctr are optional

# (scored column, signature, output key): what one model input contributes to a scored row.
ScoreColumn = Tuple[str, str, str]


class MissingOutputError(ValueError):
    """A SavedModel lacks the signature or output a model input is scored by."""


def _row_spec(shape) -> Dict[str, tf.io.FixedLenFeature]:
    """Parse spec of the row fields (true_ctr −1 when the data does not know it; logs without tiers
    have no stage, "" here, and may have no ui_position: `F.SHOWN_WITHOUT_POSITION`)."""
    dtypes = {"stage": tf.string, "true_ctr": tf.float32}
    spec = {name: tf.io.FixedLenFeature(shape, dtypes.get(name, tf.int64)) for name in _ROW_FIELDS}
    spec["true_ctr"] = tf.io.FixedLenFeature(shape, tf.float32, default_value=np.full(shape, -1.0).tolist())
    spec["stage"] = tf.io.FixedLenFeature(shape, tf.string, default_value=np.full(shape, "", dtype=object).tolist())
    spec[F.SHOWN_KEY] = tf.io.FixedLenFeature(shape, tf.int64, default_value=np.full(
        shape, F.SHOWN_WITHOUT_POSITION, dtype=np.int64).tolist())
    return spec


def signature_outputs(model_path: str) -> Dict[str, List[str]]:
    """Signature name → output keys of a SavedModel, read from its `saved_model.pb`."""
    meta_graph = loader_impl.parse_saved_model(model_path).meta_graphs[0]
    return {name: sorted(signature.outputs) for name, signature in meta_graph.signature_def.items()}


def resolve_output(outputs: Dict[str, List[str]], signature: str, key: Optional[str], what: str) -> Tuple[str, str]:
    """(signature, output key) that exist in `outputs`; key None = the first of SCORE_OUTPUT_KEYS."""
    if signature not in outputs:
        raise MissingOutputError(f"{what} has no signature {signature!r} (it has {sorted(outputs)})")
    if key is None:
        key = next((k for k in SCORE_OUTPUT_KEYS if k in outputs[signature]), None)
        if key is None:
            raise MissingOutputError(f"{what}: signature {signature!r} has none of the score outputs "
                                     f"{SCORE_OUTPUT_KEYS} (it returns {outputs[signature]})")
    elif key not in outputs[signature]:
        raise MissingOutputError(f"{what}: signature {signature!r} has no output {key!r} "
                                 f"(it returns {outputs[signature]})")
    return signature, key


def score_columns(input_name: str, stage_input: str, model_path: str, config: EvaluatorConfig) -> List[ScoreColumn]:
    """The columns a model input (a stage's, or a baseline scored as `stage_input`) is scored into."""
    outputs = signature_outputs(model_path)
    what = f"{input_name} ({model_path})"
    columns = [(input_name, *resolve_output(outputs, *config.score_output(stage_input), what))]
    if stage_input == RANKING_INPUT:
        columns.append((evaluation.ctr_column(input_name), *resolve_output(outputs, *config.ctr_output, what)))
    return columns


def _present(input_dict: Dict[str, List[types.Artifact]], key: str) -> Optional[types.Artifact]:
    """The single artifact of an optional input; None when it is absent or resolved to []."""
    artifacts = input_dict.get(key) or []
    return artifact_utils.get_single_instance(artifacts) if artifacts else None


ROWS_PER_BLOCK = 16384  # eval records per Beam element and per scored-rows file


class _ScoreBlock(beam.DoFn):
    """A block of serialized eval tf.Examples → its scored rows (the row fields and every score
    column), written as one file `<evaluation>/scored_rows/<block>.gz`; records that do not parse
    or lack a `required` feature go to the dead letters. The records are checked, scored (one call
    per signature and `batch_size` records) and written in blocks, and the scored rows serialized
    in one vectorised pass (`datasources.example_wire`): with one Beam element per record, the
    component took 7.6 s in the demo pipeline (50,900 eval rows), 4.1 s this way."""

    def __init__(self, models: Dict[str, Tuple[str, Sequence[ScoreColumn]]], batch_size: int,
                 required: Sequence[str], dtypes: Dict[str, tf.DType], out_dir: str):
        self._models = models  # input name → (SavedModel path, its score columns)
        self._batch_size, self._required, self._dtypes, self._out_dir = batch_size, tuple(required), dtypes, out_dir
        self._calls = None
        self._parsed = beam.metrics.Metrics.counter(NAMESPACE, "records_parsed")
        self._bad = beam.metrics.Metrics.counter(NAMESPACE, "records_bad")
        self._scored = beam.metrics.Metrics.counter(NAMESPACE, "records_scored")

    def setup(self):
        self._calls = []  # (signature function, [(column, output key)]): one call per signature and batch
        for path, columns in self._models.values():
            signatures = scann_index.load_saved_model(path).signatures  # a ScaNN retrieval index needs its ops
            for signature_name in sorted({signature for _, signature, _ in columns}):
                self._calls.append((signatures[signature_name],
                                    [(column, key) for column, signature, key in columns if signature == signature_name]))

    def process(self, element):
        name, records = element
        good, bad = record_io.partition_usable(records, self._required, self._dtypes)
        for dead in bad:
            yield beam.pvalue.TaggedOutput(record_io.DEAD_LETTER_TAG, dead)
        self._bad.inc(len(bad))
        self._parsed.inc(len(good))
        if not good:
            return
        parts = [self._score(good[i:i + self._batch_size]) for i in range(0, len(good), self._batch_size)]
        columns = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
        stage = columns["stage"]
        untiered = stage == b""  # a log without tiers: the ground truth is the click
        if untiered.any():
            stage = stage.copy()
            stage[untiered] = [F.tier_without_stage(int(c)).encode() for c in columns["click"][untiered]]
            columns["stage"] = stage
        rows = example_wire.serialize_columns(
            {k: example_wire.dense_column(v.astype(object) if k == "stage" else v) for k, v in columns.items()})
        record_io.write_records_atomically(os.path.join(self._out_dir, f"{name}.gz"), rows)
        self._scored.inc(len(rows))

    def _score(self, batch: List[bytes]) -> Dict[str, np.ndarray]:
        serialized = tf.constant(batch)
        out = {k: v.numpy().reshape(-1) for k, v in tf.io.parse_example(serialized, _row_spec([1])).items()
               if k in _ROW_FIELDS}
        for signature, columns in self._calls:
            outputs = signature(examples=serialized)
            out.update({f"score/{column}": tf.reshape(outputs[key], [-1]).numpy().astype(np.float32)
                        for column, key in columns})
        return out


def read_scored_rows(uri: str, score_columns: List[str]) -> Dict[str, np.ndarray]:
    files = sorted(fileio.glob(os.path.join(uri, SCORED_ROWS_DIR, "*.gz")))
    spec = _row_spec([])
    spec.update({f"score/{k}": tf.io.FixedLenFeature([], tf.float32) for k in score_columns})
    columns: Dict[str, List[np.ndarray]] = {k: [] for k in spec}
    for batch in tf.data.TFRecordDataset(files, compression_type="GZIP").batch(8192):
        parsed = tf.io.parse_example(batch, spec)
        for k in spec:
            columns[k].append(parsed[k].numpy())
    rows = {k.removeprefix("score/"): np.concatenate(v) if v else np.array([]) for k, v in columns.items()}
    rows["stage"] = rows["stage"].astype(str)
    return rows


_SCHEMA_DTYPES = {schema_pb2.INT: tf.int64, schema_pb2.FLOAT: tf.float32, schema_pb2.BYTES: tf.string}


def required_features(schema_artifacts: List[types.Artifact]) -> Tuple[Tuple[str, ...], Dict[str, tf.DType]]:
    """(the features a row must carry, their types): the row fields (int64), plus the schema's
    required features (presence.min_fraction = 1) when a Schema artifact is given."""
    if not schema_artifacts:
        return _REQUIRED_ROW_FIELDS, {}
    path = io_utils.get_only_uri_in_dir(artifact_utils.get_single_uri(schema_artifacts))
    schema_required = [f for f in F.load_schema(path).feature if f.presence.min_fraction == 1.0]
    names = _REQUIRED_ROW_FIELDS + tuple(f.name for f in schema_required if f.name not in _REQUIRED_ROW_FIELDS)
    return names, {f.name: _SCHEMA_DTYPES[f.type] for f in schema_required if f.type in _SCHEMA_DTYPES}


def ctr_verdict(ctr_blessing: Optional[types.Artifact], model: types.Artifact) -> Tuple[Optional[bool], str]:
    """(blessed, message) of the TFMA Evaluator's blessing of the ranker; (None, "") without one.
    A blessing of another model than `model` does not count."""
    if ctr_blessing is None:
        return None, ""
    if not ctr_blessing.has_custom_property(constants.ARTIFACT_PROPERTY_BLESSED_KEY):
        return False, f"its blessing {ctr_blessing.uri} has no 'blessed' property (an Evaluator without thresholds)"
    blessed_id = ctr_blessing.get_int_custom_property(constants.ARTIFACT_PROPERTY_CURRENT_MODEL_ID_KEY)
    if blessed_id and model.id and blessed_id != model.id:
        return False, f"its blessing {ctr_blessing.uri} is of model id {blessed_id}, not of this model ({model.id})"
    if ctr_blessing.get_int_custom_property(constants.ARTIFACT_PROPERTY_BLESSED_KEY) != constants.BLESSED_VALUE:
        return False, f"its CTR thresholds failed (blessing {ctr_blessing.uri})"
    return True, ""


def write_blessing(blessing: types.Artifact, verdict: Dict[str, Any], model: Optional[types.Artifact],
                   baseline: Optional[types.Artifact]) -> None:
    """One stage's ModelBlessing, as TFX's Evaluator writes it."""
    if model is not None:
        blessing.set_string_custom_property(constants.ARTIFACT_PROPERTY_CURRENT_MODEL_URI_KEY, model.uri)
        blessing.set_int_custom_property(constants.ARTIFACT_PROPERTY_CURRENT_MODEL_ID_KEY, model.id)
    if baseline is not None:
        blessing.set_string_custom_property(constants.ARTIFACT_PROPERTY_BASELINE_MODEL_URI_KEY, baseline.uri)
        blessing.set_int_custom_property(constants.ARTIFACT_PROPERTY_BASELINE_MODEL_ID_KEY, baseline.id)
    message = "blessed" if verdict["blessed"] else "not blessed: " + "; ".join(verdict["reasons"])
    if verdict["notes"]:
        message += " (" + "; ".join(verdict["notes"]) + ")"
    blessing.set_string_custom_property(constants.ARTIFACT_PROPERTY_BLESSING_MESSAGE_KEY, message)
    name = constants.BLESSED_FILE_NAME if verdict["blessed"] else constants.NOT_BLESSED_FILE_NAME
    io_utils.write_string_file(os.path.join(blessing.uri, name), "")
    blessing.set_int_custom_property(constants.ARTIFACT_PROPERTY_BLESSED_KEY,
                                     constants.BLESSED_VALUE if verdict["blessed"] else constants.NOT_BLESSED_VALUE)


class CascadeEvaluatorSpec(ComponentSpec):
    """Its model, baseline and blessing channels are those of the stage registry (`models.stages`):
    the CTR stage's model (`model`) is required, every other stage's is optional."""

    PARAMETERS = {"config": ExecutionParameter(type=str)}
    INPUTS = {
        "examples": ChannelParameter(type=standard_artifacts.Examples),
        **{key: ChannelParameter(type=standard_artifacts.Model, optional=key != RANKING_INPUT)
           for key in STAGE_INPUTS.values()},
        **{key: ChannelParameter(type=standard_artifacts.Model, optional=True) for key in BASELINE_INPUTS.values()},
        "ctr_blessing": ChannelParameter(type=standard_artifacts.ModelBlessing, optional=True),
        "schema": ChannelParameter(type=standard_artifacts.Schema, optional=True),
        # The NegativeSampler's request lists: their counters become the evaluation's data_counts.
        "request_lists": ChannelParameter(type=standard_artifacts.Examples, optional=True),
    }
    OUTPUTS = {
        "evaluation": ChannelParameter(type=standard_artifacts.ModelEvaluation),
        **{key: ChannelParameter(type=standard_artifacts.ModelBlessing) for key in BLESSING_OUTPUTS.values()},
        "dead_letters": ChannelParameter(type=record_io.DeadLetters),
    }


class Executor(base_beam_executor.BaseBeamExecutor):
    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        self._log_startup(input_dict, output_dict, exec_properties)
        config = EvaluatorConfig.from_json(exec_properties["config"])
        uri = record_io.required_split_uris(input_dict["examples"], [config.eval_split])[config.eval_split]
        stage_models = {stage: _present(input_dict, STAGE_INPUTS[stage]) for stage in STAGES}
        baselines = {stage: _present(input_dict, BASELINE_INPUTS[stage]) for stage in STAGES}
        models: Dict[str, Tuple[str, List[ScoreColumn]]] = {}  # input name → (path, score columns)
        notes: Dict[str, List[str]] = {stage: [] for stage in STAGES}
        for stage in STAGES:
            model, baseline = stage_models[stage], baselines[stage]
            if model is None:
                baselines[stage] = None
                continue
            path = path_utils.serving_model_path(model.uri)
            models[STAGE_INPUTS[stage]] = (path, score_columns(STAGE_INPUTS[stage], STAGE_INPUTS[stage], path, config))
            if baseline is not None:
                baseline_path = path_utils.serving_model_path(baseline.uri)
                mine, theirs = sorted(signature_outputs(path)), sorted(signature_outputs(baseline_path))
                if mine != theirs:  # e.g. another stage's model (KFP v2 resolves blessings unscoped)
                    notes[stage].append(f"baseline dropped, its signatures {theirs} are not this stage's {mine}")
                    baselines[stage] = None
                    continue
                path = baseline_path
                try:
                    models[BASELINE_INPUTS[stage]] = (path, score_columns(BASELINE_INPUTS[stage], STAGE_INPUTS[stage],
                                                                          path, config))
                except MissingOutputError as e:
                    notes[stage].append(f"baseline dropped, it cannot be scored as this stage: {e}")
                    baselines[stage] = None
        stage_keys = [STAGE_INPUTS[stage] for stage in STAGES if stage_models[stage] is not None]
        evaluation_artifact = artifact_utils.get_single_instance(output_dict["evaluation"])
        dead = artifact_utils.get_single_instance(output_dict["dead_letters"])

        required, dtypes = required_features(input_dict.get("schema"))
        scored_dir = os.path.join(evaluation_artifact.uri, SCORED_ROWS_DIR)
        pipeline = self._make_beam_pipeline()
        scored = (
            pipeline
            | "Files" >> beam.Create(record_io.file_parts(record_io.split_files(uri),
                                                          record_io.beam_parallelism(self._beam_pipeline_args)))
            | "ReadBlocks" >> beam.FlatMap(  # no Reshuffle of the blocks: `record_io.file_parts`
                lambda e: record_io.named_file_blocks(e[1], e[0], ROWS_PER_BLOCK, e[2], e[3]))
            | "ScoreAndWrite" >> beam.ParDo(_ScoreBlock(models, config.batch_size, required, dtypes, scored_dir))
            .with_outputs(record_io.DEAD_LETTER_TAG, main="scored")
        )
        record_io.write_dead_letters(scored[record_io.DEAD_LETTER_TAG], dead.uri, config.eval_split)
        counters = record_io.run_and_count(pipeline, NAMESPACE)
        record_io.finish_atomic_writes(evaluation_artifact.uri, [])
        record_io.check_bad_fraction(counters, config.max_bad_fraction, "CascadeEvaluator")

        rows = read_scored_rows(evaluation_artifact.uri, [column for _, columns in models.values() for column, _, _ in columns])
        metrics = evaluation.evaluate(rows, stage_keys, config, baselines={
            STAGE_INPUTS[stage]: BASELINE_INPUTS[stage] for stage in STAGES if baselines[stage] is not None})
        metrics["counters"] = counters
        lists = _present(input_dict, "request_lists")
        if lists is not None:
            registry = (config_from_dict(F.FeatureConfig, json.loads(lists.get_string_custom_property(FEATURES_PROPERTY)))
                        if lists.has_custom_property(FEATURES_PROPERTY) else F.DEFAULT)
            metrics["data_counts"] = data_counts(record_io.read_metrics(lists.uri), registry)
        ctr_blessed, ctr_message = ctr_verdict(_present(input_dict, "ctr_blessing"), stage_models[CTR_STAGE])
        verdicts = evaluation.bless_stages(metrics, config, ctr_blessed, ctr_message, notes)
        for stage, verdict in verdicts.items():
            verdict["model_uri"] = stage_models[stage].uri if stage_models[stage] is not None else None
            verdict["baseline_uri"] = baselines[stage].uri if baselines[stage] is not None else None
            write_blessing(artifact_utils.get_single_instance(output_dict[BLESSING_OUTPUTS[stage]]), verdict,
                           stage_models[stage], baselines[stage])
        metrics["blessings"] = verdicts
        # On spans (issue 17): the span the ranking model was trained on, and its baseline's (the
        # latest blessed model: span t−1's when that one was blessed). The baseline's metrics on this
        # span's eval rows are the progressive validation of the span.
        for key, model in (("span", stage_models[CTR_STAGE]), ("baseline_span", baselines[CTR_STAGE])):
            metrics[key] = warm_start.trained_span(model.uri) if model is not None else None
        if metrics["span"] is not None:
            evaluation_artifact.set_int_custom_property("span", metrics["span"])
        metrics["blessed"], metrics["blessing_reasons"] = verdicts[CTR_STAGE]["blessed"], verdicts[CTR_STAGE]["reasons"]
        io_utils.write_string_file(os.path.join(evaluation_artifact.uri, record_io.METRICS_FILE),
                                   json.dumps(metrics, indent=2, sort_keys=True, default=float))
        evaluation.write_plots(metrics, evaluation_artifact.uri)


class CascadeEvaluator(base_beam_component.BaseBeamComponent):
    """Metrics of DESIGN §8 for the cascade's models, and a ModelBlessing for each stage."""

    SPEC_CLASS = CascadeEvaluatorSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)

    def __init__(self, examples: types.BaseChannel, model: types.BaseChannel,
                 ctr_blessing: Optional[types.BaseChannel] = None, schema: Optional[types.BaseChannel] = None,
                 request_lists: Optional[types.BaseChannel] = None, config: EvaluatorConfig = EvaluatorConfig(),
                 **stage_models: Optional[types.BaseChannel]):
        """`model`: the CTR stage's model; `stage_models`: the other stages' models and every
        stage's baseline, by their input names (`preranking_model`, `baseline_model`, …)."""
        known = (set(STAGE_INPUTS.values()) | set(BASELINE_INPUTS.values())) - {RANKING_INPUT}
        unknown = sorted(set(stage_models) - known)
        if unknown:
            raise TypeError(f"CascadeEvaluator: unknown model input(s) {', '.join(unknown)}; "
                            f"the stage registry's are {', '.join(sorted(known))}")
        spec = CascadeEvaluatorSpec(
            examples=examples, model=model, ctr_blessing=ctr_blessing, schema=schema,
            request_lists=request_lists, config=config.to_json(),
            **{key: stage_models.get(key) for key in sorted(known)},
            evaluation=types.Channel(type=standard_artifacts.ModelEvaluation),
            **{key: types.Channel(type=standard_artifacts.ModelBlessing) for key in BLESSING_OUTPUTS.values()},
            dead_letters=types.Channel(type=record_io.DeadLetters),
        )
        super().__init__(spec=spec)


def tfma_eval_config(config: EvaluatorConfig = EvaluatorConfig(), features: F.FeatureConfig = F.DEFAULT) -> tfma.EvalConfig:
    """The standard TFX Evaluator's EvalConfig for the ranker's CTR on the shown eval rows.

    Model specs `candidate` and `baseline` (is_baseline), both scored by `config.ctr_output`
    (`serving_default` → `ctr`), label `click`; slices: overall, then one per feature of
    `config.tfma_slice_features` (none by default; each must be a univalent UI id of the feature
    registry, else ValueError naming it and the ones there are); metrics ExampleCount, AUC,
    Calibration (Σŷ / Σy), BinaryCrossentropy, MeanLabel, MeanPrediction. Thresholds: AUC ≥
    `config.tfma_min_auc` and no more than `config.tfma_auc_tolerance` below the baseline's,
    Calibration within `config.tfma_calibration_range`, all on the overall slice (the other slices are
reported, not gated). Without a baseline model TFX's Evaluator
    drops the baseline spec and the change threshold itself (rubber stamp).
    """
    low, high = config.tfma_calibration_range
    auc = tfma.MetricThreshold(
        value_threshold=tfma.GenericValueThreshold(lower_bound={"value": config.tfma_min_auc}),
        change_threshold=tfma.GenericChangeThreshold(direction=tfma.MetricDirection.HIGHER_IS_BETTER,
                                                     absolute={"value": -config.tfma_auc_tolerance}))
    calibration = tfma.MetricThreshold(
        value_threshold=tfma.GenericValueThreshold(lower_bound={"value": low}, upper_bound={"value": high}))
    def overall(threshold: tfma.MetricThreshold) -> tfma.PerSliceMetricThreshold:
        """Thresholds gate the overall slice; a `MetricConfig.threshold` would gate every slice,
        and a position or format slice of a few hundred rows is click noise."""
        return tfma.PerSliceMetricThreshold(slicing_specs=[tfma.SlicingSpec()], threshold=threshold)

    ui_ids = [f.name for f in features.of_role("ui") if f.kind == "id"]
    unknown = [name for name in config.tfma_slice_features if name not in ui_ids]
    if unknown:
        raise ValueError(f"evaluator.tfma_slice_features: {', '.join(map(repr, unknown))} is not a univalent UI id "
                         f"feature of the registry; those are {ui_ids}")
    signature, prediction_key = config.ctr_output
    spec = dict(signature_name=signature, label_key=F.LABEL_KEY, prediction_key=prediction_key,
                preprocessing_function_names=[])
    return tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(name="candidate", **spec), tfma.ModelSpec(name="baseline", is_baseline=True, **spec)],
        # Slices: overall, and the UI ids asked for. No tier slice: the rows are the shown ones,
        # which are all of the ground-truth tier (or of none, in a log without tiers), so it
        # repeated the overall slice at a quarter of the Evaluator's per-row cost.
        slicing_specs=[tfma.SlicingSpec()] + [tfma.SlicingSpec(feature_keys=[name]) for name in config.tfma_slice_features],
        metrics_specs=[tfma.MetricsSpec(metrics=[
            tfma.MetricConfig(class_name="ExampleCount"),
            tfma.MetricConfig(class_name="AUC", per_slice_thresholds=[overall(auc)]),
            tfma.MetricConfig(class_name="Calibration", per_slice_thresholds=[overall(calibration)]),
            tfma.MetricConfig(class_name="BinaryCrossentropy"),
            tfma.MetricConfig(class_name="MeanLabel"),
            tfma.MetricConfig(class_name="MeanPrediction"),
        ])],
    )
