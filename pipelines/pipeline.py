"""create_pipeline: the TFX graph of the cascade (DESIGN §6), independent of the orchestrator.

    example source ─► StatisticsGen ─► ExampleValidator ─► AnomalyGate
                  │   ImportSchemaGen(schema/) ──┘                │
                  └──────────────────────────────► Trainer(ranking) ─► Pusher
"""
import os

from tfx import v1 as tfx
from tfx.proto import example_gen_pb2

from components.anomaly_gate import AnomalyGate
from components.synthetic_example_gen import SyntheticExampleGen
from pipelines.config import PipelineConfig
from schema import features as F

RANKING_RUN_FN = "models.trainers.ranking.run_fn"


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


def create_pipeline(config: PipelineConfig, metadata_connection_config=None) -> tfx.dsl.Pipeline:
    """The pipeline; the orchestrator's runner supplies the MLMD connection (none on Kubeflow)."""
    config.validate()
    example_gen = example_source(config)
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = tfx.components.ImportSchemaGen(schema_file=_absolute(config.schema_file or F.SCHEMA_PATH))
    example_validator = tfx.components.ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema_gen.outputs["schema"]
    )
    anomaly_gate = AnomalyGate(anomalies=example_validator.outputs["anomalies"])
    trainer = tfx.components.Trainer(
        run_fn=RANKING_RUN_FN,
        examples=example_gen.outputs["examples"],
        schema=schema_gen.outputs["schema"],
        custom_config={"ranker": config.ranker.to_json()},
    ).with_id("Trainer.ranking")
    trainer.add_upstream_node(anomaly_gate)
    pusher = tfx.components.Pusher(
        model=trainer.outputs["model"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(
                base_directory=os.path.join(_absolute(config.serving_dir), "ranking")
            )
        ),
    ).with_id("Pusher.ranking")
    return tfx.dsl.Pipeline(
        pipeline_name=config.pipeline_name,
        pipeline_root=_absolute(config.pipeline_root),
        components=[example_gen, statistics_gen, schema_gen, example_validator, anomaly_gate, trainer, pusher],
        enable_cache=config.enable_cache,
        metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=config.beam_pipeline_args(),
    )
