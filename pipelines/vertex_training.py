"""The Trainers of `training_cluster.trainers` as Vertex AI training jobs (`cascade compile-kubeflow`).

`trainer` builds TFX's own Vertex AI Trainer (`tfx.extensions.google_cloud_ai_platform.trainer`)
for a Trainer that trains on the cluster; its executor, run by the pipeline, submits a Vertex AI
CustomJob whose worker pools are the `models.trainers.distribute.ClusterConfig`
(`worker_pool_specs`), one pool per TF_CONFIG task type of `ClusterConfig.task_counts()`:

- pool 0: the chief, 1 replica on `machine_type`;
- pool 1: the workers, on `machine_type` (workers − 1 of them under MultiWorkerMirroredStrategy,
  `workers` of them beside parameter servers);
- pool 2: the parameter servers (`parameter_servers` of them), on `parameter_server_machine_type`;

each pool in the container `image`, in the project `vertex_project` and region `vertex_region`
(compile-kubeflow fills the three from its --image, --project and --region when they are None).

Every replica runs `python -m tfx.scripts.run_executor` with TFX's GenericExecutor and the Trainer's
inputs, outputs and exec properties, the whole custom_config included (our keys "features",
"ranker", "cluster", ... beside the Vertex ones), so it runs the same run_fn as a local run. Vertex
sets each replica's TF_CONFIG (pool 0 → "chief", 1 → "worker", 2 → "ps"), and the run_fn builds its
`tf.distribute` strategy from it (`models.trainers.distribute.strategy_for`); only the chief
evaluates and exports the model (`distribute.chief_outputs`), as on a localhost cluster
(`components.local_cluster_trainer`).
"""
import dataclasses
from typing import List, Optional

from tfx.extensions.google_cloud_ai_platform import constants as vertex_constants
from tfx.extensions.google_cloud_ai_platform.trainer import component as vertex_trainer
from tfx.extensions.google_cloud_ai_platform.trainer import executor as vertex_executor

from cascade_ranking.models.config import ConfigError
from cascade_ranking.models.trainers.distribute import ClusterConfig

# Vertex AI worker pools 0, 1, 2: the TF_CONFIG task type Vertex gives their replicas.
POOL_TASKS = ("chief", "worker", "ps")


def with_compile_defaults(cluster: ClusterConfig, project: Optional[str], region: Optional[str],
                          image: Optional[str]) -> ClusterConfig:
    """`cluster` with its vertex_project, vertex_region and image taken from the compile's
    --project, --region and --image where they are None."""
    return dataclasses.replace(
        cluster,
        vertex_project=cluster.vertex_project if cluster.vertex_project is not None else project,
        vertex_region=cluster.vertex_region if cluster.vertex_region is not None else region,
        image=cluster.image if cluster.image is not None else image,
    )


def worker_pool_specs(cluster: ClusterConfig) -> List[dict]:
    """The Vertex CustomJobSpec worker pools of `cluster`: chief, workers, parameter servers (a pool
    without replicas is left out at the end)."""
    counts = cluster.task_counts()
    pools: List[dict] = []
    for task in POOL_TASKS:
        count = counts.get(task, 0)
        if not count:
            pools.append({})
            continue
        machine_type = cluster.parameter_server_machine_type if task == "ps" else cluster.machine_type
        pools.append({"machine_spec": {"machine_type": machine_type}, "replica_count": count,
                      "container_spec": {"image_uri": cluster.image}})
    while pools and not pools[-1]:
        pools.pop()
    if any(not pool for pool in pools):  # TFX would give an empty pool a container: refuse it here
        raise ConfigError(f"training_cluster: no Vertex AI worker pools for {counts} (every pool before the "
                          f"parameter servers needs replicas)")
    return pools


def vertex_custom_config(cluster: ClusterConfig) -> dict:
    """The custom_config keys of TFX's Vertex AI Trainer for `cluster` (JSON values only)."""
    missing = [key for key in ("vertex_project", "vertex_region", "image") if not getattr(cluster, key)]
    if missing:
        raise ConfigError(f"training_cluster.{', training_cluster.'.join(missing)} not set: a Vertex AI training job "
                          f"needs them (set them, or compile-kubeflow's --project, --region, --image)")
    return {
        vertex_constants.ENABLE_VERTEX_KEY: True,
        vertex_constants.VERTEX_REGION_KEY: cluster.vertex_region,
        # A CustomJob (its job_spec is the CustomJobSpec); TFX pops "project" before submitting it.
        vertex_executor.TRAINING_ARGS_KEY: {
            "project": cluster.vertex_project,
            "job_spec": {"worker_pool_specs": worker_pool_specs(cluster)},
        },
    }


def trainer(run_fn: str, examples, schema, custom_config: dict, transform_graph, base_model,
            cluster: ClusterConfig) -> vertex_trainer.Trainer:
    """TFX's Vertex AI Trainer running `run_fn` on `cluster`'s worker pools; `custom_config` (with
    the cluster's JSON under "cluster") is passed on to every replica with the Vertex keys added.
    The caller gives it its id (`Trainer.<name>`)."""
    if not cluster.distributed:
        raise ConfigError(f"training_cluster (workers {cluster.workers}, parameter_servers "
                          f"{cluster.parameter_servers}) is one process: no Vertex AI training job")
    return vertex_trainer.Trainer(
        run_fn=run_fn, examples=examples, schema=schema, transform_graph=transform_graph, base_model=base_model,
        custom_config={**custom_config, **vertex_custom_config(cluster)},
    )
