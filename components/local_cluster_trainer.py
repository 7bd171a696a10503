"""The Trainer's executor for a training cluster on this machine: it runs the Trainer as every task
of a `tf.distribute` cluster, each a process on localhost with its own TF_CONFIG.

This is what TFX's Vertex AI Trainer does on Google Cloud (`tfx.extensions.google_cloud_ai_platform`:
each replica of the training job runs `python -m tfx.scripts.run_executor` with the Trainer's
GenericExecutor, its inputs, outputs and exec properties), with processes in place of the job's
worker pools, so the same run_fn trains in both and a localhost cluster tests the cloud one:

- the cluster comes from the Trainer's custom_config "cluster" (`models.trainers.distribute.
  ClusterConfig`): a chief and workers (MultiWorkerMirroredStrategy), or a chief that coordinates
  workers and parameter servers (ParameterServerStrategy); each task gets a free localhost port;
- every task runs the GenericExecutor in a new Python process (`sys.executable -m
  tfx.scripts.run_executor`), its output in `<model_run>/cluster/<task>.log`; the chief's console
  lines (its epochs) are echoed here;
- the run ends when the chief ends. A ParameterServer cluster's workers and parameter servers
  serve until then, and are stopped. A task that fails first stops the cluster: under
  MultiWorkerMirroredStrategy the others would wait for it in their next all-reduce; under
  ParameterServerStrategy a worker that dies is left to the coordinator, which runs its steps on
  the other workers (TF's ClusterCoordinator), so only the chief's or a parameter server's end
  stops the run;
- a failure is one line naming the task, its exit code and its log, and the log's last lines.

Without a distributed cluster it is TFX's GenericExecutor, unchanged.
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List

from absl import logging
from tfx.components.trainer import executor as trainer_executor
from tfx.types import artifact_utils

from cascade_ranking.models.config import config_from_dict
from cascade_ranking.models.trainers import distribute

GENERIC_EXECUTOR = "tfx.components.trainer.executor.GenericExecutor"
POLL_S = 0.5
STOP_GRACE_S = 10.0


def free_ports(count: int) -> List[int]:
    """`count` distinct free TCP ports on localhost (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("localhost", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def executor_argv(input_dict, output_dict, exec_properties) -> List[str]:
    """The command every task runs: TFX's GenericExecutor on the Trainer's inputs, outputs and exec
    properties (`tfx.scripts.run_executor`, as in a Vertex AI replica)."""
    return [sys.executable, "-m", "tfx.scripts.run_executor", "--executor_class_path", GENERIC_EXECUTOR,
            "--inputs", artifact_utils.jsonify_artifact_dict(input_dict),
            "--outputs", artifact_utils.jsonify_artifact_dict(output_dict),
            "--exec-properties", json.dumps(exec_properties)]


def cluster_spec(counts: Dict[str, int]) -> Dict[str, List[str]]:
    """TF_CONFIG's "cluster": job name → localhost addresses."""
    ports = iter(free_ports(sum(counts.values())))
    return {job: [f"localhost:{next(ports)}" for _ in range(n)] for job, n in counts.items()}


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


class ClusterTask:
    """One task's process; its stdout (progress lines) is echoed for the chief, and every line of
    stdout and stderr goes to its log."""

    def __init__(self, job: str, index: int, spec: Dict[str, List[str]], argv: List[str], log_dir: str):
        self.job, self.index = job, index
        self.name = f"{job}-{index}"
        self.log_path = os.path.join(log_dir, f"{self.name}.log")
        env = dict(os.environ)
        env[distribute.TF_CONFIG_ENV] = json.dumps({"cluster": spec, "task": {"type": job, "index": index}})
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "w")
        echo = job == "chief"
        self.process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE if echo else self._log,
                                        stderr=self._log, text=True)
        self._echo = threading.Thread(target=self._copy_stdout, daemon=True) if echo else None
        if self._echo:
            self._echo.start()

    def _copy_stdout(self) -> None:
        for line in self.process.stdout:
            self._log.write(line)
            self._log.flush()
            sys.stdout.write(line)
            sys.stdout.flush()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def close(self) -> None:
        if self._echo:
            self._echo.join(timeout=STOP_GRACE_S)
        self._log.close()


class Executor(trainer_executor.GenericExecutor):
    """GenericExecutor on a localhost cluster (see the module docstring)."""

    def Do(self, input_dict: Dict[str, List], output_dict: Dict[str, List], exec_properties: Dict[str, Any]) -> None:
        custom_config = exec_properties.get("custom_config") or {}
        if isinstance(custom_config, str):
            custom_config = json.loads(custom_config or "{}")
        cluster = config_from_dict(distribute.ClusterConfig, json.loads(custom_config.get(distribute.CLUSTER_KEY, "{}")))
        if not cluster.distributed:
            return super().Do(input_dict, output_dict, exec_properties)
        model_run = artifact_utils.get_single_uri(output_dict["model_run"])
        log_dir = os.path.join(model_run, "cluster")
        os.makedirs(log_dir, exist_ok=True)
        argv = executor_argv(input_dict, output_dict, exec_properties)
        spec = cluster_spec(cluster.task_counts())
        print(f"  training cluster: {cluster.strategy}, "
              + ", ".join(f"{len(v)} {k}" for k, v in spec.items()) + f" on localhost (logs: {log_dir})", flush=True)
        tasks = [ClusterTask(job, i, spec, argv, log_dir) for job, addresses in spec.items() for i in range(len(addresses))]
        with open(os.path.join(log_dir, "tasks.json"), "w") as f:
            json.dump({t.name: {"pid": t.process.pid, "log": t.log_path} for t in tasks}, f, indent=1)
        try:
            self._wait(tasks, cluster)
        finally:
            for t in tasks:
                t.stop()
            for t in tasks:
                t.close()

    @staticmethod
    def _wait(tasks: List[ClusterTask], cluster: distribute.ClusterConfig) -> None:
        chief = tasks[0]
        parameter_server = cluster.strategy == distribute.PARAMETER_SERVER
        gone = set()
        while True:
            code = chief.process.poll()
            if code is not None:
                if code:
                    raise RuntimeError(f"the training cluster's chief failed (exit code {code}; log {chief.log_path}):\n"
                                       + tail(chief.log_path))
                break
            for t in tasks[1:]:
                code = t.process.poll()
                if code is None or (code == 0 and not parameter_server) or t.name in gone:
                    continue
                if parameter_server and t.job == "worker":
                    gone.add(t.name)
                    logging.warning("training cluster: %s exited (code %s); the coordinator goes on without it",
                                    t.name, code)
                    continue
                raise RuntimeError(f"the training cluster's {t.name} failed (exit code {code}; log {t.log_path}):\n"
                                   + tail(t.log_path))
            time.sleep(POLL_S)
        if not parameter_server:  # MultiWorkerMirrored workers end after the chief's export
            for t in tasks[1:]:
                code = t.process.wait()
                if code:
                    raise RuntimeError(f"the training cluster's {t.name} failed (exit code {code}; log {t.log_path}):\n"
                                       + tail(t.log_path))
