"""create_pipeline: the TFX graph of the cascade (DESIGN §6), independent of the orchestrator.

    example source ─► StatisticsGen ─► ExampleValidator ─► AnomalyGate   (anomalies stop the run)
         │            ImportSchemaGen(schema/) ──┘  (the Schema artifact every Trainer, the sampler
         │                                            and the evaluator read)
         ├─► Trainer.teacher (candidate rows) ─► TeacherInference (teacher_logit on every row)
         │                                              │
         │                          NegativeSampler ◄───┘  request lists (train/eval) with the
         │                          │      │               Factory Floor sampling weights, and
         │                          │      │               the shown eval rows
         │         Trainer.retrieval◄┘      └►Trainer.cascade: pre-ranking + the Factory Floor
         │               │                         │   ranker trained as one network (LCRON)
         │               │              StageModel.preranking (the light pre-ranker alone)
         │   LatestBlessed.<stage> (Resolver, BaselineBeforeCandidateStrategy): each stage's baseline
         │               │                         │
         │               │     Evaluator.ranking (TFMA on the shown eval rows: the ranker's CTR,
         │               │                         │   value + change thresholds) ─┐
         └── eval rows ─► CascadeEvaluator (cascade metrics on whole requests; one blessing per
                          stage: value thresholds, change thresholds against the stage's
                          baseline, and the TFMA blessing for the ranker)
                               └─► Pusher.<stage>, each gated by its own stage's blessing,
                                   into <serving_dir>/<stage>/<version>/

On an examples_dir of spans (`datasources.spans`): ImportExampleGen reads the run's span, and each
Trainer gets as `base_model` the newest model it trained on an older span (`WarmStart.<trainer>`
Resolvers, `pipelines.warm_start_strategy`; `config.warm_start`), which it continues from
(`models.trainers.warm_start`). With `span_window: N > 1`, a `SpanWindow.examples` Resolver (TFX
`SpanRangeStrategy`) and the `SpanWindow` component (`components.span_window`) stand between
ImportExampleGen and everything else: the train split of spans k−N+1 … k, the eval split of span k.

Only when some feature of the registry has `lookup: vocabulary`: a standard TFX Transform on the
example source's train split (`schema.vocabulary`: one `tft.vocabulary` per such feature, nothing
materialized) whose transform_graph every Trainer reads its vocabulary files from.

The stage nodes (Trainers, StageModels, LatestBlessed Resolvers, the CascadeEvaluator's channels,
Pushers) are derived from the stage registry, `models.stages`, one folder per stage; the config's
`stages` picks which of them a run trains.

Every per-request loss or metric reads request-grouped data: the Trainers read the
NegativeSampler's request lists (one list per request), the CascadeEvaluator groups rows by
request_id explicitly. Each Trainer runs a module of `models.trainers` with its configuration as
JSON in custom_config. Nothing here depends on where the pipeline runs: LocalDagRunner,
BeamDagRunner and Kubeflow V2 compile the same `tfx.dsl.Pipeline` (`tfx.orchestration.pipeline.Pipeline`).
"""
import hashlib
import json
import os
from typing import Optional

# tfx.v1 is not imported: it imports kfp (about 3 s), which only the Kubeflow compile needs.
from tfx import components
from tfx.components.schema_gen.import_schema_gen.component import ImportSchemaGen
from tfx.dsl.components.base import executor_spec
from tfx.dsl.components.common.resolver import Resolver
from tfx.dsl.input_resolution.strategies.latest_blessed_model_strategy import LatestBlessedModelStrategy
from tfx.dsl.input_resolution.strategies.span_range_strategy import SpanRangeStrategy
from tfx.orchestration.pipeline import Pipeline
from tfx.proto import pusher_pb2, transform_pb2
from tfx.types import standard_artifacts
from tfx.types.channel import Channel
from tfx.proto import example_gen_pb2

from cascade_ranking.components.anomaly_gate import AnomalyGate
from cascade_ranking.components.cascade_evaluator import BLESSING_OUTPUTS, CascadeEvaluator, tfma_eval_config
from cascade_ranking.components import local_cluster_trainer
from cascade_ranking.components.key_mapper import KeyMapper
from cascade_ranking.components.negative_sampler import NegativeSampler
from cascade_ranking.components.span_window import SpanWindow
from cascade_ranking.components.stage_model import StageModel
from cascade_ranking.components.synthetic_example_gen import SyntheticExampleGen
from cascade_ranking.components.teacher_inference import TeacherInference
from cascade_ranking.datasources import spans
from cascade_ranking.models import stages as stage_registry
from cascade_ranking.models.trainers.common import FEATURES_KEY, STAGE_OPTIONS_KEY
from cascade_ranking.models.trainers import distribute, warm_start
from cascade_ranking.pipelines.baseline_strategy import BaselineBeforeCandidateStrategy
from cascade_ranking.pipelines.warm_start_strategy import WarmStartStrategy
from cascade_ranking.pipelines.config import TEACHER_RUN_FN, ConfigError, PipelineConfig, to_json
from cascade_ranking.schema import features as F
from cascade_ranking.schema import vocabulary

STAGES = stage_registry.names()  # the served stages of the registry (`models.stages`), cascade order
EVALUATOR_ID = "CascadeEvaluator"
TFMA_EVALUATOR_ID = f"Evaluator.{stage_registry.ctr_stage().name}"
# The CascadeEvaluator's blessing output of each stage (the component's own map), and (node id,
# output key) of each stage's served Model: both from the stage declarations.
BLESSING_KEYS = BLESSING_OUTPUTS
MODEL_SOURCES = {s.name: s.model_source for s in stage_registry.registered()}


def _absolute(path: str) -> str:
    """Local paths become absolute; URIs such as gs://… are left as they are."""
    return path if "://" in path else os.path.abspath(path)


def example_source(config: PipelineConfig):
    if config.source == "synthetic":
        return SyntheticExampleGen(config=config.synthetic)
    span = config.read_span()  # the span pinned when the run starts: the one check_inputs read
    return components.ImportExampleGen(
        input_base=_absolute(config.examples_dir),
        input_config=example_gen_pb2.Input(splits=[
            example_gen_pb2.Input.Split(name=split, pattern=spans.split_pattern(split, spanned=span is not None))
            for split in ("train", "eval")]),
        range_config=spans.range_config(span),
    )


EXAMPLE_GEN_ID = "ImportExampleGen"


def span_window(example_gen, config: PipelineConfig, span: int) -> tuple:
    """(the `SpanWindow.examples` Resolver, the SpanWindow) of a run on `span` that trains on
    `config.span_window` spans: TFX's `SpanRangeStrategy` with the static range [span−N+1, span]
    over every Examples artifact ImportExampleGen wrote into this pipeline's MLMD
    (`components.span_window`). The Resolver runs after this run's ImportExampleGen, so the run's
    own span is among them."""
    first = max(1, span - config.span_window + 1)
    resolver = Resolver(
        strategy_class=SpanRangeStrategy,
        config={"range_config": spans.window_range_config(first, span)},
        window_examples=Channel(type=standard_artifacts.Examples, producer_component_id=EXAMPLE_GEN_ID,
                                output_key="examples"),
    ).with_id("SpanWindow.examples")
    resolver.add_upstream_node(example_gen)
    window = SpanWindow(examples=example_gen.outputs["examples"],
                        window_examples=resolver.outputs["window_examples"], span=span, window=config.span_window)
    return resolver, window


def schema_source(config: PipelineConfig) -> str:
    """The schema file ImportSchemaGen imports: a local schema is copied to
    `<output_dir>/schemas/<sha256 of its bytes>/schema.pbtxt`, so an edited schema at the same path is
    a new execution property and the cache cannot answer with the old one (ImportSchemaGen caches on
    the path, not the content). A remote path (gs://, a Kubeflow image's path) is used as it is."""
    path = _absolute(config.schema_file or F.SCHEMA_PATH)
    if "://" in path or "://" in config.output_dir or not os.path.isfile(path):
        return path
    with open(path, "rb") as f:
        content = f.read()
    digest = hashlib.sha256(content).hexdigest()[:16]
    target_dir = os.path.join(_absolute(config.output_dir), "schemas", digest)
    target = os.path.join(target_dir, "schema.pbtxt")
    if not os.path.exists(target):
        os.makedirs(target_dir, exist_ok=True)
        tmp = f"{target}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(content)
        os.replace(tmp, target)
    return target


def vocabulary_transform(examples, schema, features: F.FeatureConfig) -> Optional[components.Transform]:
    """The standard TFX Transform that computes the vocabularies of the registry's `lookup:
    vocabulary` features (`schema.vocabulary.preprocessing_fn`: `tft.vocabulary` per feature) on the
    train split, materializing nothing; None when every id feature is hashed (no extra node)."""
    if not features.vocabulary_features():
        return None
    return components.Transform(
        examples=examples, schema=schema, preprocessing_fn=vocabulary.PREPROCESSING_FN,
        splits_config=transform_pb2.SplitsConfig(analyze=["train"]), materialize=False, disable_statistics=True,
        custom_config={vocabulary.FEATURES_KEY: to_json(features)},
    )


def warm_start_model(trainer: str, span: int) -> Resolver:
    """`WarmStart.<trainer>`: the newest model of `Trainer.<trainer>` trained on a span below `span`
    (`pipelines.warm_start_strategy`; empty on the first span). The model channel names its
    producer, so the query adds no edge to the graph."""
    return Resolver(strategy_class=WarmStartStrategy, config={"span": span},
                    model=Channel(type=standard_artifacts.Model, producer_component_id=f"Trainer.{trainer}",
                                  output_key="model")).with_id(f"WarmStart.{trainer}")


def _trainer(name: str, run_fn: str, examples, schema, custom_config: dict, after, config: PipelineConfig,
             span: Optional[int] = None, transform_graph=None, warm_starts: Optional[dict] = None,
             kubeflow: bool = False) -> components.Trainer:
    """`Trainer.<name>` running `run_fn`; every one gets the run's FeatureConfig under custom_config
    "features", and the Transform output (vocabularies) when some feature has lookup vocabulary.
    On spans (`span`: the run's `config.read_span()`), custom_config "warm_start" carries it (the
    Trainer records it in its warm-start checkpoint) and, when `warm_starts` is a dict (the run warm-starts), the Trainer's
    base_model is `warm_start_model`'s, whose node is added to `warm_starts` under `name`.
    A Trainer of `config.training_cluster.trainers` gets the cluster under custom_config "cluster" and
    trains on it: on localhost (`components.local_cluster_trainer`) or, compiled for Kubeflow, as
    a Vertex AI job (`pipelines.vertex_training`)."""
    custom_config = {**custom_config, FEATURES_KEY: to_json(config.features)}
    base_model = None
    if span is not None:
        custom_config[warm_start.WARM_START_KEY] = json.dumps({"span": span, "epochs": config.warm_start_epochs})
        if warm_starts is not None:
            warm_starts[name] = warm_start_model(name, span)
            base_model = warm_starts[name].outputs["model"]
    cluster = config.training_cluster
    if cluster.runs(name):
        custom_config[distribute.CLUSTER_KEY] = cluster.to_json()
    if cluster.runs(name) and kubeflow:
        from cascade_ranking.pipelines import vertex_training  # TFX's Vertex extension: imported for a compile only

        trainer = vertex_training.trainer(run_fn=run_fn, examples=examples, schema=schema, custom_config=custom_config,
                                          transform_graph=transform_graph, base_model=base_model, cluster=cluster)
    else:
        executor = {} if not cluster.runs(name) else dict(
            custom_executor_spec=executor_spec.ExecutorClassSpec(local_cluster_trainer.Executor))
        trainer = components.Trainer(
            run_fn=run_fn, examples=examples, schema=schema, custom_config=custom_config,
            transform_graph=transform_graph, base_model=base_model, **executor,
        )
    trainer = trainer.with_id(f"Trainer.{name}")
    trainer.add_upstream_node(after)
    return trainer


def stage_trainer_config(trainer: stage_registry.StageTrainer, config: PipelineConfig) -> dict:
    """custom_config of a stage's Trainer: the PipelineConfig fields it names, each as JSON under its
    own name, and the `stage_options` of its stages under "options" (when the config gives some)."""
    custom_config = {field: to_json(getattr(config, field)) for field in trainer.config_fields}
    options = {s.name: config.stage_options[s.name] for s in stage_registry.registered()
               if s.trainer.name == trainer.name and s.name in config.stage_options}
    if options:
        custom_config[STAGE_OPTIONS_KEY] = json.dumps(options, sort_keys=True)
    return custom_config


def latest_blessed(stage: str, candidate=None) -> Resolver:
    """The stage's baseline: with `candidate` (the channel of the model this run evaluates), the
    latest blessed model of `stage` trained before the candidate
    (`pipelines.baseline_strategy.BaselineBeforeCandidateStrategy`: a rerun whose Trainer is cached
    keeps its first baseline, so the evaluators are cached too); without it, the latest blessed
    model (TFX `LatestBlessedModelStrategy`, the one Kubeflow V2 compiles). The model and blessing
    channels name their producers, so each stage resolves its own models and blessings only (these
    queries add no edge to the graph); on the first run the baseline is empty."""
    node, output = MODEL_SOURCES[stage]
    channels = dict(
        model=Channel(type=standard_artifacts.Model, producer_component_id=node, output_key=output),
        model_blessing=Channel(type=standard_artifacts.ModelBlessing,
                                       producer_component_id=EVALUATOR_ID, output_key=BLESSING_KEYS[stage]))
    if candidate is None:
        return Resolver(strategy_class=LatestBlessedModelStrategy,
                                **channels).with_id(f"LatestBlessed.{stage}")
    return Resolver(strategy_class=BaselineBeforeCandidateStrategy, model=candidate,
                            model_blessing=channels["model_blessing"]).with_id(f"LatestBlessed.{stage}")


def _pusher(stage: str, model, blessing, config: PipelineConfig) -> components.Pusher:
    return components.Pusher(
        model=model,
        model_blessing=blessing,
        push_destination=pusher_pb2.PushDestination(
            filesystem=pusher_pb2.PushDestination.Filesystem(
                base_directory=os.path.join(_absolute(config.serving_dir), stage))),
    ).with_id(f"Pusher.{stage}")


def create_pipeline(config: PipelineConfig, metadata_connection_config=None,
                    kubeflow: bool = False) -> Pipeline:
    """The pipeline; the orchestrator's runner supplies the MLMD connection (none on Kubeflow).
    `kubeflow`: compile each stage's baseline with the stock strategy (`latest_blessed`)."""
    config.validate()
    example_gen = example_source(config)
    rows = example_gen.outputs["examples"]
    span = config.read_span()
    window_nodes = ()
    if span is not None and config.span_window > 1:
        if kubeflow:
            raise ConfigError("span_window > 1 runs on the local runners only: its Resolver's SpanRangeStrategy is "
                              "not among the strategies Kubeflow V2 compiles")
        window_nodes = span_window(example_gen, config, span)
        rows = window_nodes[1].outputs["output_examples"]
    key_mapper = None
    if config.keys.mapped:  # the log names its keys otherwise: add request_id, click, request_time
        key_mapper = KeyMapper(examples=rows, keys=config.keys, max_bad_fraction=config.sampler.max_bad_fraction)
        rows = key_mapper.outputs["output_examples"]
    statistics_gen = components.StatisticsGen(examples=rows)
    schema_gen = ImportSchemaGen(schema_file=schema_source(config))
    schema = schema_gen.outputs["schema"]
    example_validator = components.ExampleValidator(statistics=statistics_gen.outputs["statistics"], schema=schema)
    anomaly_gate = AnomalyGate(anomalies=example_validator.outputs["anomalies"])

    # Each Trainer's WarmStart Resolver, when the run reads a span and warm-starts (not on Kubeflow:
    # its compiler takes TFX's stock strategies only).
    warm_starts = {} if config.warm_start and not kubeflow and span is not None else None
    transform = vocabulary_transform(rows, schema, config.features)
    graph = transform.outputs["transform_graph"] if transform else None
    teacher = _trainer("teacher", TEACHER_RUN_FN, rows, schema, {"ranker": config.teacher.to_json()},
                       after=anomaly_gate, config=config, span=span, transform_graph=graph, warm_starts=warm_starts,
                       kubeflow=kubeflow)
    teacher_inference = TeacherInference(examples=rows, model=teacher.outputs["model"])
    scored_rows = teacher_inference.outputs["output_examples"]
    sampler = NegativeSampler(examples=scored_rows, schema=schema, config=config.sampler, features=config.features)
    request_lists = sampler.outputs["request_lists"]

    # The stages the config trains (a subsequence of the registry's: 3, or 2 without retrieval),
    # their Trainers on the request lists, and a StageModel for each stage served out of another's.
    stages = [s for s in stage_registry.registered() if s.name in config.stages]
    trainers = {t.name: _trainer(t.name, t.run_fn, request_lists, schema, stage_trainer_config(t, config),
                                 after=anomaly_gate, config=config, span=span, transform_graph=graph, warm_starts=warm_starts,
                                 kubeflow=kubeflow)
                for t in stage_registry.trainers(config.stages)}
    stage_models = {s.name: StageModel(model=trainers[s.trainer.name].outputs["model"], stage=s.name).with_id(
        s.model_source[0]) for s in stages if s.extracted}
    models = {s.name: (stage_models[s.name].outputs["stage_model"] if s.extracted
                       else trainers[s.trainer.name].outputs["model"]) for s in stages}
    baselines = {s.name: latest_blessed(s.name, None if kubeflow else models[s.name]) for s in stages}

    ctr = stage_registry.ctr_stage().name
    tfma_evaluator = components.Evaluator(
        examples=sampler.outputs["shown_rows"], model=models[ctr],
        baseline_model=baselines[ctr].outputs["model"], eval_config=tfma_eval_config(config.evaluator, config.features),
        example_splits=["eval"],
    ).with_id(TFMA_EVALUATOR_ID)
    evaluator = CascadeEvaluator(
        examples=scored_rows, model=models[ctr], schema=schema, ctr_blessing=tfma_evaluator.outputs["blessing"],
        request_lists=request_lists, config=config.evaluator_config(),
        **{s.model_input: models[s.name] for s in stages if s.name != ctr},
        **{s.baseline_input: baselines[s.name].outputs["model"] for s in stages},
    ).with_id(EVALUATOR_ID)
    pushers = [_pusher(s.name, models[s.name], evaluator.outputs[s.blessing_output], config) for s in stages]
    return Pipeline(
        pipeline_name=config.pipeline_name,
        pipeline_root=_absolute(config.pipeline_root),
        components=[example_gen, *window_nodes, *([key_mapper] if key_mapper else []), statistics_gen, schema_gen, example_validator, anomaly_gate,
                    *([transform] if transform else []), *(warm_starts or {}).values(), teacher,
                    teacher_inference, sampler, *trainers.values(), *stage_models.values(),
                    *baselines.values(), tfma_evaluator,
                    evaluator, *pushers],
        enable_cache=config.enable_cache,
        metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=config.beam_pipeline_args(),
    )
