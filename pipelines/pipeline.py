"""create_pipeline: the TFX graph of the cascade (DESIGN §6), independent of the orchestrator.

    example source ─► StatisticsGen ─► ExampleValidator ─► AnomalyGate   (anomalies stop the run)
         │            ImportSchemaGen(schema/) ──┘
         ├─► Trainer.teacher ─► TeacherInference (teacher_logit on every candidate row)
         │                            │
         │          ┌─────────────────┼───────────────────────────┐
         │          ▼                 ▼                           ▼
         │   NegativeSampler    Trainer.ranking (distilled)  CascadeEvaluator (eval rows)
         │   (request lists)          │                           ▲
         │     ├─► Trainer.retrieval ─┼───────────────────────────┤
         │     └─► Trainer.preranking (LCRON joint cascade, or HAP)┘
         └── every stage model ─► Pusher.<stage> (blessed by the CascadeEvaluator)
                                  into <serving_dir>/<stage>/<version>/

Every Trainer runs a module of `models.trainers` with its stage config as JSON in custom_config.
Nothing here depends on where the pipeline runs: LocalDagRunner, BeamDagRunner and Kubeflow V2
compile the same `tfx.dsl.Pipeline`.
"""
import os

from tfx import v1 as tfx
from tfx.proto import example_gen_pb2

from components.anomaly_gate import AnomalyGate
from components.cascade_evaluator import CascadeEvaluator
from components.negative_sampler import NegativeSampler
from components.synthetic_example_gen import SyntheticExampleGen
from components.teacher_inference import TeacherInference
from pipelines.config import PipelineConfig, to_json
from schema import features as F

TRAINER_MODULES = {
    "teacher": "models.trainers.teacher.run_fn",
    "ranking": "models.trainers.ranking.run_fn",
    "retrieval": "models.trainers.retrieval.run_fn",
    "cascade": "models.trainers.cascade.run_fn",
    "hap": "models.trainers.preranking.run_fn",
}
STAGES = ("retrieval", "preranking", "ranking")  # the pushed stages, cascade order


def _absolute(path: str) -> str:
    """Local paths become absolute; URIs such as gs://… are left as they are."""
    return path if "://" in path else os.path.abspath(path)


def example_source(config: PipelineConfig):
    if config.source == "synthetic":
        return SyntheticExampleGen(config=config.synthetic)
    return tfx.components.ImportExampleGen(
        input_base=_absolute(config.examples_dir),
        input_config=example_gen_pb2.Input(
            splits=[
                example_gen_pb2.Input.Split(name="train", pattern="Split-train/*"),
                example_gen_pb2.Input.Split(name="eval", pattern="Split-eval/*"),
            ]
        ),
    )


def _trainer(stage: str, examples, schema, custom_config: dict, after) -> tfx.components.Trainer:
    trainer = tfx.components.Trainer(
        run_fn=TRAINER_MODULES[stage], examples=examples, schema=schema, custom_config=custom_config,
    ).with_id(f"Trainer.{stage}")
    trainer.add_upstream_node(after)
    return trainer


def _pusher(stage: str, model, blessing, config: PipelineConfig) -> tfx.components.Pusher:
    return tfx.components.Pusher(
        model=model,
        model_blessing=blessing,
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(
                base_directory=os.path.join(_absolute(config.serving_dir), stage))),
    ).with_id(f"Pusher.{stage}")


def create_pipeline(config: PipelineConfig, metadata_connection_config=None) -> tfx.dsl.Pipeline:
    """The pipeline; the orchestrator's runner supplies the MLMD connection (none on Kubeflow)."""
    config.validate()
    example_gen = example_source(config)
    rows = example_gen.outputs["examples"]
    statistics_gen = tfx.components.StatisticsGen(examples=rows)
    schema_gen = tfx.components.ImportSchemaGen(schema_file=_absolute(config.schema_file or F.SCHEMA_PATH))
    schema = schema_gen.outputs["schema"]
    example_validator = tfx.components.ExampleValidator(statistics=statistics_gen.outputs["statistics"], schema=schema)
    anomaly_gate = AnomalyGate(anomalies=example_validator.outputs["anomalies"])

    teacher = _trainer("teacher", rows, schema, {"ranker": config.teacher.to_json()}, after=anomaly_gate)
    teacher_inference = TeacherInference(examples=rows, model=teacher.outputs["model"])
    scored_rows = teacher_inference.outputs["output_examples"]
    sampler = NegativeSampler(examples=scored_rows, config=config.sampler)
    request_lists = sampler.outputs["request_lists"]

    ranking = _trainer("ranking", scored_rows, schema, {"ranker": config.ranker.to_json()}, after=anomaly_gate)
    retrieval = _trainer("retrieval", request_lists, schema, {"retrieval": to_json(config.retrieval)},
                         after=anomaly_gate)
    if config.preranking_trainer == "cascade":
        preranking = _trainer("cascade", request_lists, schema, {"cascade": to_json(config.cascade)},
                              after=anomaly_gate)
    else:
        preranking = _trainer("hap", request_lists, schema, {"preranking": to_json(config.hap)}, after=anomaly_gate)

    evaluator = CascadeEvaluator(
        examples=scored_rows, model=ranking.outputs["model"], preranking_model=preranking.outputs["model"],
        retrieval_model=retrieval.outputs["model"], config=config.evaluator_config(),
    )
    blessing = evaluator.outputs["blessing"]
    pushers = [
        _pusher(stage, trainer.outputs["model"], blessing, config)
        for stage, trainer in zip(STAGES, (retrieval, preranking, ranking))
    ]
    return tfx.dsl.Pipeline(
        pipeline_name=config.pipeline_name,
        pipeline_root=_absolute(config.pipeline_root),
        components=[example_gen, statistics_gen, schema_gen, example_validator, anomaly_gate, teacher,
                    teacher_inference, sampler, ranking, retrieval, preranking, evaluator, *pushers],
        enable_cache=config.enable_cache,
        metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=config.beam_pipeline_args(),
    )
