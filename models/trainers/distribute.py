"""Distributed training of the Trainers: the `tf.distribute` strategy a Trainer builds from
`TF_CONFIG`, and what only the chief does.

A Trainer's run_fn runs in every task of a training cluster, as TFX runs it on Vertex AI (each
replica runs `tfx.scripts.run_executor` with the Trainer's GenericExecutor and its own TF_CONFIG)
and as `components.local_cluster_trainer` runs it on localhost. From TF_CONFIG:

- no TF_CONFIG, or a cluster of one task: no strategy; the Trainer runs as it always did;
- a cluster of "chief" (+ "worker") tasks: `MultiWorkerMirroredStrategy`, synchronous data
  parallelism. Every task trains on its shard of each global batch; the gradients are summed over
  the replicas (all-reduce), so `models.tasks.StageModel` scales the loss by 1/replicas to keep the
  single-process step;
- a cluster with "ps" tasks: `ParameterServerStrategy`. The chief is the coordinator and runs
  run_fn; the workers and parameter servers only serve (`serve_if_not_coordinator` blocks in
  `tf.distribute.Server.join`). Variables live on the parameter servers; a `MinSizePartitioner`
  (`variable_partitioner`) splits every variable of at least `min_shard_bytes` into up to one
  shard per parameter server, so an embedding table larger than one task's memory is split
  across them. Training is asynchronous: each worker steps the shared variables on its own
  batches (Keras `Model.fit` with a dataset function and `steps_per_epoch`).

The strategies themselves are TF-Ranking's factory (`tfr.keras.strategy_utils.get_strategy`); what
is written here is the TF_CONFIG parsing, the refusals, and the chief-only rules:

- only the chief evaluates and exports (TFX's Estimator executor rule, `_is_chief`). Under
  MultiWorkerMirroredStrategy every task must still write the SavedModel and the warm-start
  checkpoint, since saving reads the replicas' metric variables with an all-reduce: a worker
  writes into a temporary directory of its own, removes it, then waits until the chief's export
  exists, because TFX's GenericExecutor checks `serving_model_dir` in every task after run_fn
  (`chief_outputs`; the temporary-directory rule is TF-Ranking's `get_output_filepath`);
- a Trainer names the strategies it supports; another one fails with one line naming the Trainer
  and the strategy (e.g. the teacher under ParameterServerStrategy).
"""
import collections
import contextlib
import copy
import dataclasses
import importlib
import json
import os
import time
from typing import Optional, Tuple

import tensorflow as tf
from absl import logging

from cascade_ranking.models.config import check_positive
from cascade_ranking.models.trainers import common

TF_CONFIG_ENV = "TF_CONFIG"
MIRRORED = "multi_worker_mirrored"
PARAMETER_SERVER = "parameter_server"
STRATEGIES = (MIRRORED, PARAMETER_SERVER)
CLUSTER_KEY = "cluster"  # custom_config key of a Trainer's ClusterConfig JSON (the executor reads it)
CHIEF_EXPORT_TIMEOUT_S = 3600.0  # how long a MultiWorkerMirrored worker waits for the chief's export


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """The training cluster of the Trainers named in `trainers` (config key `training_cluster`).

    `workers`: the tasks that compute. 0 or 1: one process, as before. With
    `parameter_servers` 0, N workers are a MultiWorkerMirrored cluster of a chief and N−1 workers;
    with `parameter_servers` > 0 they are N workers behind a coordinator (the chief) and that many
    parameter servers (ParameterServerStrategy).
    Local runs start these tasks as processes on localhost (`components.local_cluster_trainer`);
    `cascade compile-kubeflow` turns them into the Vertex AI worker pools of each Trainer's
    training job (chief, workers, parameter servers) on the machine types below.
    """

    workers: int = 0
    parameter_servers: int = 0
    # The Trainers (by node name: teacher, retrieval, cascade) that train on the cluster; the other
    # Trainers run in one process.
    trainers: Tuple[str, ...] = ("cascade",)
    # ParameterServerStrategy's variable_partitioner: variables of at least this many bytes are split
    # into shards of at least this size, at most one per parameter server.
    min_shard_bytes: int = 256 << 10
    # Vertex AI worker pools (compile-kubeflow only): machine types, and the project, region and
    # container image of the training jobs (compile-kubeflow fills them from its --project, --region
    # and --image when they are None).
    machine_type: str = "n1-standard-8"
    parameter_server_machine_type: str = "n1-highmem-8"
    vertex_project: Optional[str] = None
    vertex_region: Optional[str] = None
    image: Optional[str] = None

    def __post_init__(self):
        check_positive(self, "min_shard_bytes")
        if self.workers < 0 or self.parameter_servers < 0:
            raise ValueError(f"training_cluster.workers and parameter_servers must be >= 0, got "
                             f"{self.workers} and {self.parameter_servers}")
        if self.parameter_servers and self.workers < 1:
            raise ValueError("training_cluster.parameter_servers needs at least one worker "
                             f"(workers: {self.workers})")

    @property
    def distributed(self) -> bool:
        return self.workers > 1 or self.parameter_servers > 0

    @property
    def strategy(self) -> Optional[str]:
        if not self.distributed:
            return None
        return PARAMETER_SERVER if self.parameter_servers else MIRRORED

    def runs(self, trainer: str) -> bool:
        """Whether the Trainer `trainer` trains on this cluster."""
        return self.distributed and trainer in self.trainers

    def task_counts(self) -> dict:
        """TF_CONFIG job name → number of tasks (the chief first)."""
        if not self.distributed:
            return {}
        if self.parameter_servers:
            return {"chief": 1, "worker": self.workers, "ps": self.parameter_servers}
        return {"chief": 1, **({"worker": self.workers - 1} if self.workers > 1 else {})}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


# ---------------------------------------------------------------------------------------------
# TF_CONFIG.
# ---------------------------------------------------------------------------------------------
def tf_config() -> dict:
    """The parsed TF_CONFIG ({} when unset); a malformed one is a one-line error."""
    text = os.environ.get(TF_CONFIG_ENV, "")
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not JSON ({e})") from None
    if not isinstance(value, dict) or not isinstance(value.get("cluster", {}), dict):
        raise ValueError("TF_CONFIG must be a JSON object with a 'cluster' mapping")
    return value


def cluster_strategy(config: Optional[dict] = None) -> Optional[str]:
    """MIRRORED, PARAMETER_SERVER or None (one task) for a TF_CONFIG."""
    config = tf_config() if config is None else config
    cluster = config.get("cluster", {})
    if cluster.get("ps"):
        return PARAMETER_SERVER
    if sum(len(tasks) for tasks in cluster.values()) > 1:
        return MIRRORED
    return None


def task(config: Optional[dict] = None) -> Tuple[Optional[str], int]:
    """(task type, index) of this process; (None, 0) without TF_CONFIG."""
    config = tf_config() if config is None else config
    spec = config.get("task", {})
    return spec.get("type"), int(spec.get("index", 0))


def is_chief(config: Optional[dict] = None) -> bool:
    """The task that evaluates and exports: the chief (or master); worker 0 of a cluster without
    one; the only process when there is no TF_CONFIG."""
    config = tf_config() if config is None else config
    task_type, index = task(config)
    if task_type is None:
        return True
    if task_type in ("chief", "master"):
        return True
    cluster = config.get("cluster", {})
    return task_type == "worker" and index == 0 and not (cluster.get("chief") or cluster.get("master"))


# ---------------------------------------------------------------------------------------------
# The strategy of a Trainer.
# ---------------------------------------------------------------------------------------------
def strategy_for(trainer: str, supported: Tuple[str, ...], min_shard_bytes: int = 256 << 10
                 ) -> Optional[tf.distribute.Strategy]:
    """The strategy `trainer` trains under (None without a cluster). A strategy that is not in
    `supported` is refused with one line. Under ParameterServerStrategy a worker or parameter-server
    task never returns (`serve_if_not_coordinator`)."""
    kind = cluster_strategy()
    if kind is None:
        return None
    if kind not in supported:
        raise ValueError(f"Trainer.{trainer} does not train under {kind} (it supports "
                         f"{', '.join(supported) or 'one process only'}); remove it from training_cluster.trainers")
    from tensorflow_ranking.python.keras import strategy_utils  # TF-Ranking's strategy factory

    if kind == MIRRORED:
        strategy = strategy_utils.get_strategy(strategy_utils.MWMS_STRATEGY)
    else:
        serve_if_not_coordinator()
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
            min_shard_bytes=min_shard_bytes, max_shards=resolver.cluster_spec().num_tasks("ps"))
        strategy = strategy_utils.get_strategy(strategy_utils.PS_STRATEGY, resolver, partitioner)
    task_type, index = task()
    logging.info("Trainer.%s: %s, task %s %d of %s", trainer, kind, task_type, index, tf_config().get("cluster"))
    return strategy


def serve_if_not_coordinator() -> None:
    """Under ParameterServerStrategy, a worker or ps task serves the coordinator's requests until it
    is stopped (the chief's exit ends a Vertex job; the local cluster executor stops its tasks)."""
    task_type, index = task()
    if task_type in ("worker", "ps"):
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        logging.info("Serving as %s %d of a ParameterServerStrategy cluster", task_type, index)
        server = tf.distribute.Server(resolver.cluster_spec(), job_name=task_type, task_index=index,
                                      protocol=resolver.rpc_layer or "grpc", start=True)
        server.join()


def scope(strategy: Optional[tf.distribute.Strategy]):
    """strategy.scope(), or the default strategy's scope without one."""
    return (strategy or tf.distribute.get_strategy()).scope()


def is_parameter_server(strategy: Optional[tf.distribute.Strategy]) -> bool:
    return isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy)


@contextlib.contextmanager
def chief_outputs(fn_args):
    """Yields the fn_args a task exports with: the chief's own; on another task a copy whose
    `serving_model_dir` is a temporary directory in the ModelRun, removed on leaving, after which
    the task waits for the chief's export (see the module docstring)."""
    if is_chief():
        yield fn_args
        return
    task_type, index = task()
    temp_root = os.path.join(fn_args.model_run_dir, f"workertemp-{task_type}-{index}")
    worker_args = copy.copy(fn_args)
    worker_args.serving_model_dir = os.path.join(temp_root, os.path.basename(fn_args.serving_model_dir.rstrip("/")))
    yield worker_args
    if tf.io.gfile.exists(temp_root):
        tf.io.gfile.rmtree(temp_root)
    wait_for_chief_export(fn_args.serving_model_dir)


def wait_for_chief_export(serving_model_dir: str, timeout_s: float = CHIEF_EXPORT_TIMEOUT_S) -> None:
    """A non-chief task: wait until the chief's export exists (TFX's GenericExecutor requires
    `serving_model_dir` in every task after run_fn; the chief writes it atomically)."""
    deadline = time.monotonic() + timeout_s
    while not tf.io.gfile.exists(serving_model_dir):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the chief did not export to {serving_model_dir} within {timeout_s:.0f} s")
        time.sleep(1.0)


def cluster_config(fn_args) -> ClusterConfig:
    """The Trainer's ClusterConfig (custom_config "cluster"; one process when absent)."""
    return common.config_from(fn_args, CLUSTER_KEY, ClusterConfig)


def supported_strategies(run_fn: str) -> Tuple[str, ...]:
    """The strategies the Trainer module of `run_fn` ("<module>.run_fn") trains under: its
    `DISTRIBUTE_STRATEGIES` (none: one process only)."""
    module = importlib.import_module(run_fn.rsplit(".", 1)[0])
    return tuple(getattr(module, "DISTRIBUTE_STRATEGIES", ()))


def sharded_variables(model: tf.keras.Model) -> dict:
    """variable name → number of shards, for each variable the partitioner split (its shards are
    named `<name>/part_<i>`)."""
    shards = collections.Counter(v.name.split("/part_")[0] for v in model.variables if "/part_" in v.name)
    return dict(sorted(shards.items()))


def fit(model: tf.keras.Model, make_dataset, strategy: Optional[tf.distribute.Strategy], epochs: int,
        callbacks, steps_per_epoch: Optional[int] = None):
    """`model.fit` on the batches of `make_dataset()` (a function returning a tf.data.Dataset of
    one pass) under `strategy`:

    - one process or MultiWorkerMirrored: `fit(make_dataset())`. The dataset is auto-sharded by
      data: every worker reads the files, and each global batch is split between the replicas
      (a split file set would need at least as many files as workers);
    - ParameterServerStrategy: `fit(DatasetCreator(...), steps_per_epoch=...)`, each worker reading
      its own shard of the batches, repeated; an epoch is the number of batches of one pass
      (`steps_per_epoch`, or counted with one pass over `make_dataset()`). Keras's
      BackupAndRestore does not support this strategy: the coordinator re-runs a failed worker's
      steps on the other workers instead (TF's ClusterCoordinator), so the callback is left out.
    """
    if not is_parameter_server(strategy):
        dataset = make_dataset()
        if strategy is not None:
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
            dataset = dataset.with_options(options)
        return model.fit(dataset, epochs=epochs, verbose=0, callbacks=callbacks)
    if steps_per_epoch is None:
        steps_per_epoch = int(make_dataset().reduce(0, lambda count, _: count + 1).numpy())
    logging.info("ParameterServerStrategy: %d steps an epoch", steps_per_epoch)
    split = sharded_variables(model)
    if split:
        print("  variables split across the parameter servers: "
              + ", ".join(f"{name} ({shards} shards)" for name, shards in split.items()), flush=True)

    def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        return make_dataset().shard(input_context.num_input_pipelines, input_context.input_pipeline_id).repeat()

    callbacks = [c for c in callbacks if not isinstance(c, tf.keras.callbacks.BackupAndRestore)]
    return model.fit(tf.keras.utils.experimental.DatasetCreator(dataset_fn), epochs=epochs, verbose=0,
                     steps_per_epoch=steps_per_epoch, callbacks=callbacks)
