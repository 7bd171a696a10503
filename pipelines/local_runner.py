"""Local runner: the pipeline on LocalDagRunner, Beam components on DirectRunner (thin on purpose)."""
import os
import time

from tfx import v1 as tfx

from pipelines.config import PipelineConfig
from pipelines.pipeline import create_pipeline


def run(config: PipelineConfig) -> float:
    """Runs the pipeline to completion and returns its wall time in seconds."""
    start = time.time()
    metadata = tfx.orchestration.metadata.sqlite_metadata_connection_config(os.path.abspath(config.metadata_path))
    tfx.orchestration.LocalDagRunner().run(create_pipeline(config, metadata))
    return time.time() - start
