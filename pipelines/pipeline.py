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

TRAINER_RUN_FN = "models.trainer_module.run_fn"


def example_source(config: PipelineConfig):
    if config.source == "synthetic":
        return SyntheticExampleGen(config=config.synthetic)
    return tfx.components.ImportExampleGen(
        input_base=os.path.abspath(config.examples_dir),
        input_config=example_gen_pb2.Input(
            splits=[
                example_gen_pb2.Input.Split(name="train", pattern="Split-train/*"),
                example_gen_pb2.Input.Split(name="eval", pattern="Split-eval/*"),
            ]
        ),
    )


def create_pipeline(config: PipelineConfig) -> tfx.dsl.Pipeline:
    config.validate()
    example_gen = example_source(config)
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = tfx.components.ImportSchemaGen(schema_file=os.path.abspath(F.SCHEMA_PATH))
    example_validator = tfx.components.ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema_gen.outputs["schema"]
    )
    anomaly_gate = AnomalyGate(anomalies=example_validator.outputs["anomalies"])
    trainer = tfx.components.Trainer(
        run_fn=TRAINER_RUN_FN,
        examples=example_gen.outputs["examples"],
        schema=schema_gen.outputs["schema"],
        custom_config={"trainer": config.trainer.to_json()},
    ).with_id("Trainer.ranking")
    trainer.add_upstream_node(anomaly_gate)
    pusher = tfx.components.Pusher(
        model=trainer.outputs["model"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(
                base_directory=os.path.join(os.path.abspath(config.serving_dir), "ranking")
            )
        ),
    ).with_id("Pusher.ranking")
    return tfx.dsl.Pipeline(
        pipeline_name=config.pipeline_name,
        pipeline_root=os.path.abspath(config.pipeline_root),
        components=[example_gen, statistics_gen, schema_gen, example_validator, anomaly_gate, trainer, pusher],
        enable_cache=config.enable_cache,
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            os.path.abspath(config.metadata_path)
        ),
        beam_pipeline_args=config.beam_pipeline_args(),
    )
