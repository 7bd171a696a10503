"""Kubeflow V2 runner: compiles the same pipeline to a KFP v2 JSON spec (thin on purpose).

Beam components run on Dataflow there: `dataflow_beam_args` gives the DataflowRunner flags, with
the pipeline's own container image as the workers' SDK image so our executors import on them.
The image must have this package installed (`pip install -c constraints.txt .`).

The Trainers of `training_cluster.trainers` (a distributed cluster) run as Vertex AI training jobs
whose worker pools are the cluster's chief, workers and parameter servers (`pipelines.
vertex_training`), in the cluster's vertex_project, vertex_region and image, which default to the
compile's project, region and image.
"""
import dataclasses
import os
from typing import List, Optional

from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner

from cascade_ranking.pipelines.config import PipelineConfig
from cascade_ranking.pipelines.pipeline import create_pipeline
from cascade_ranking.pipelines.vertex_training import with_compile_defaults


def dataflow_beam_args(project: str, region: str, temp_location: str, image: str) -> List[str]:
    return [
        "--runner=DataflowRunner",
        f"--project={project}",
        f"--region={region}",
        f"--temp_location={temp_location}",
        f"--sdk_container_image={image}",
        "--experiments=use_runner_v2",
    ]


def compile_pipeline(config: PipelineConfig, output_path: str, image: str, project: str = "my-project",
                     region: str = "us-central1", temp_location: Optional[str] = None) -> str:
    """Writes the KFP v2 pipeline JSON to `output_path` and returns the path. `training_cluster`'s
    vertex_project, vertex_region and image that are None become `project`, `region` and `image`."""
    temp_location = temp_location or os.path.join(config.output_dir, "beam-tmp")
    config = dataclasses.replace(
        config, beam_args_override=tuple(dataflow_beam_args(project, region, temp_location, image)),
        training_cluster=with_compile_defaults(config.training_cluster, project=project, region=region, image=image),
    )
    runner = kubeflow_v2_dag_runner.KubeflowV2DagRunner(
        config=kubeflow_v2_dag_runner.KubeflowV2DagRunnerConfig(default_image=image),
        output_dir=os.path.dirname(os.path.abspath(output_path)),
        output_filename=os.path.basename(output_path),
    )
    runner.run(create_pipeline(config, kubeflow=True))
    return output_path
