"""Distributed training on localhost (BENCHMARKS §9): a finished run's Trainers again, through the
pipeline's own executor (`components.local_cluster_trainer`), in one process and on clusters.

    speed      steps/s of Trainer.<name> (default: teacher and cascade) in one process, on
               MultiWorkerMirrored with 2 workers (chief + 1 worker) and on ParameterServer with 2
               workers + 1 ps, each `--repeats` times, with the eval metrics of each run. The steps/s
               are of the epochs after the first (the first traces the step); the ratios are against
               the one-process run of the same repeat. On 2 cores every task shares the same two
               cores: the figures show the cost of the cluster's communication, not a speed-up.
    capacity   the teacher Trainer with an item_id embedding table doubling from `--start-rows` to
               `--max-rows` rows, in one process and on ParameterServer with 1 worker and `--ps`
               parameter servers: the peak resident memory of every process. The largest table that
               fits a machine of `--cap-gb` GiB is read from them: the one process must hold the
               table, its optimizer slots and its EMA copy; under ParameterServer each server holds
               its shards with their slots, and the chief a copy of the table while it exports.

Both read the inputs of a finished `cascade run` (`--run`, the demo's synthetic data by default):
each trial re-executes that run's Trainer execution (its examples, schema and custom_config from
MLMD) into a fresh directory, with only the cluster (and for capacity the item_id buckets) changed.

    .venv/bin/python bench/distributed_training.py --run cascade_output --part speed --json bench/results/distributed_speed.json
    .venv/bin/python bench/distributed_training.py --run cascade_output --part capacity --json bench/results/distributed_capacity.json
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from ml_metadata.proto import metadata_store_pb2
from tfx.orchestration import metadata
from tfx.orchestration.portable.mlmd import execution_lib
from tfx.types import artifact_utils

import report  # bench/report.py: the tables BENCHMARKS §9 shows
from cascade_ranking.components import local_cluster_trainer
from cascade_ranking.models.trainers import common, distribute
from cascade_ranking.models.trainers.distribute import ClusterConfig

EXEC_PROPERTIES = ("custom_config", "run_fn", "train_args", "eval_args")
EPOCH_LINE = re.compile(r"epoch (\d+)/\d+: (\d+) steps, ([\d.]+)s")


def trainer_execution(run_dir: str, node: str):
    """(inputs, outputs, exec properties) of the newest finished execution of `node` in the run."""
    config = metadata.sqlite_metadata_connection_config(os.path.join(run_dir, "metadata.sqlite"))
    with metadata.Metadata(config) as m:
        executions = [e for e in m.store.get_executions()
                      if e.last_known_state == metadata_store_pb2.Execution.COMPLETE
                      and any(c.name.endswith(f".{node}") for c in m.store.get_contexts_by_execution(e.id))]
        if not executions:
            raise SystemExit(f"{run_dir} has no finished {node}: run `cascade run --output-dir {run_dir}` first")
        execution = executions[-1]
        inputs = execution_lib.get_input_artifacts(m, execution.id)
        outputs = execution_lib.get_output_artifacts(m, execution.id)
    properties = {k: (v.string_value or v.int_value) for k, v in execution.custom_properties.items()
                  if k in EXEC_PROPERTIES}
    return inputs, outputs, properties


def redirect(outputs, root: str):
    for key, artifacts in outputs.items():
        for artifact in artifacts:
            artifact.uri = os.path.join(root, key)
            os.makedirs(artifact.uri, exist_ok=True)
    return outputs


def with_custom_config(properties: dict, **changes) -> dict:
    custom = json.loads(properties["custom_config"])
    custom.update(changes)
    return {**properties, "custom_config": json.dumps(custom)}


def epoch_rates(text: str):
    """steps/s of each epoch line after the first."""
    rates = [int(steps) / float(seconds) for epoch, steps, seconds in EPOCH_LINE.findall(text) if int(epoch) > 1]
    return rates


class Tee:
    """Collects what the executor echoes (the chief's epoch lines) while passing it on."""

    def __init__(self, stream):
        self.stream, self.text = stream, []

    def write(self, s):
        self.text.append(s)
        return self.stream.write(s)

    def flush(self):
        self.stream.flush()


def run_trainer(run_dir: str, node: str, cluster: ClusterConfig, root: str) -> dict:
    inputs, outputs, properties = trainer_execution(run_dir, node)
    outputs = redirect(outputs, root)
    properties = with_custom_config(properties, **{distribute.CLUSTER_KEY: cluster.to_json()})
    tee, stdout = Tee(sys.stdout), sys.stdout
    sys.stdout = tee
    start = time.monotonic()
    try:
        if cluster.distributed:
            local_cluster_trainer.Executor().Do(inputs, outputs, properties)
        else:  # one process, in a process of its own as the cluster's tasks are (fresh TF state)
            one_process(inputs, outputs, properties, root)
    finally:
        sys.stdout = stdout
    wall = time.monotonic() - start
    model_run = artifact_utils.get_single_uri(outputs["model_run"])
    text = "".join(tee.text)
    chief_log = os.path.join(model_run, "cluster", "chief-0.log")
    if os.path.exists(chief_log):
        text = open(chief_log).read()
    metrics = json.load(open(os.path.join(model_run, common.EVAL_METRICS_FILE)))
    rates = epoch_rates(text)
    return {"wall_s": wall, "steps_per_s": statistics.mean(rates) if rates else None, "metrics": metrics}


def one_process(inputs, outputs, properties, root):
    """TFX's GenericExecutor in one new process (the command a cluster task runs, without TF_CONFIG)."""
    env = {k: v for k, v in os.environ.items() if k != distribute.TF_CONFIG_ENV}
    log = os.path.join(root, "one_process.log")
    with open(log, "w") as f:
        code = subprocess.call(local_cluster_trainer.executor_argv(inputs, outputs, properties), env=env, stdout=f, stderr=subprocess.STDOUT,
)
    text = open(log).read()
    sys.stdout.write("".join(line + "\n" for line in text.splitlines() if " epoch " in line))
    if code:
        reason = [line for line in text.splitlines() if "Error" in line or "bad_alloc" in line or "OOM" in line]
        raise RuntimeError(f"one process failed (exit code {code}): {reason[-1][:300] if reason else text[-300:]}")


CLUSTERS = {
    "one process": ClusterConfig(),
    "MWMS 2 workers": ClusterConfig(workers=2),
    "PS 2 workers + 1 ps": ClusterConfig(workers=2, parameter_servers=1),
}


def speed(args) -> dict:
    results = {}
    for node in args.trainers:
        trainer = node.split(".")[1]
        for repeat in range(args.repeats):
            for name, cluster in CLUSTERS.items():
                cluster = ClusterConfig(**{**cluster.__dict__, "trainers": (trainer,)})
                if not cluster.distributed or cluster.strategy in distribute.supported_strategies(
                        f"cascade_ranking.models.trainers.{trainer}.run_fn"):
                    root = tempfile.mkdtemp(prefix="bench_dist_")
                    print(f"{node}, {name}, repeat {repeat + 1}", flush=True)
                    result = run_trainer(args.run, node, cluster, root)
                    results.setdefault(node, {}).setdefault(name, []).append(result)
                    shutil.rmtree(root, ignore_errors=True)
    return results


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident memory) of a live process, MiB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PeakMemory:
    """Polls the peak resident memory of the processes `pids()` names (task → pid) until stopped."""

    def __init__(self, pids):
        self.pids, self.peaks, self._stop = pids, {}, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _poll(self):
        while not self._stop.is_set():
            for task, pid in (self.pids() or {}).items():
                self.peaks[task] = max(self.peaks.get(task, 0.0), peak_rss_mb(pid))
            time.sleep(0.2)


def capacity(args) -> dict:
    """The teacher Trainer with an item_id table of `rows` rows, doubling, in one process and on a
    ParameterServer cluster of 1 worker and `--ps` parameter servers: the peak resident memory of
    every process (no cap: the machine's 24 GiB bound the sizes tried)."""
    node = "Trainer.teacher"
    _, _, properties = trainer_execution(args.run, node)
    from cascade_ranking.models.ranker_config import RankerConfig

    ranker = json.loads(json.loads(properties["custom_config"])["ranker"])
    embedding_dim = RankerConfig.from_dict({**RankerConfig.teacher().to_dict(), **ranker}).embedding_dim
    results = {"parameter_servers": args.ps, "embedding_dim": embedding_dim, "budget_gb": args.cap_gb, "trials": []}
    for layout in ("one process", f"PS 1 worker + {args.ps} ps"):
        rows = args.start_rows
        while rows <= args.max_rows:
            inputs, outputs, properties = trainer_execution(args.run, node)
            root = tempfile.mkdtemp(prefix="bench_cap_")
            outputs = redirect(outputs, root)
            custom = json.loads(properties["custom_config"])
            features = json.loads(custom["features"])
            features["buckets"] = [["item_id", rows]]
            cluster = ClusterConfig() if layout == "one process" else ClusterConfig(
                workers=1, parameter_servers=args.ps, trainers=("teacher",))
            properties = with_custom_config(properties, features=json.dumps(features),
                                            ranker=json.dumps({**json.loads(custom["ranker"]), "epochs": 1}),
                                            **{distribute.CLUSTER_KEY: cluster.to_json()})
            print(f"capacity: {layout}, item_id table {rows:,} rows", flush=True)
            start = time.monotonic()
            model_run = artifact_utils.get_single_uri(outputs["model_run"])
            tasks_file = os.path.join(model_run, "cluster", "tasks.json")
            holder = {}

            def pids():
                if cluster.distributed:
                    if os.path.exists(tasks_file):
                        try:
                            return {t: v["pid"] for t, v in json.load(open(tasks_file)).items()}
                        except ValueError:
                            return {}
                    return {}
                return holder

            error = None
            with PeakMemory(pids) as memory:
                try:
                    if cluster.distributed:
                        local_cluster_trainer.Executor().Do(inputs, outputs, properties)
                    else:
                        popen = subprocess.Popen(local_cluster_trainer.executor_argv(inputs, outputs, properties),
                                                 env={k: v for k, v in os.environ.items() if k != distribute.TF_CONFIG_ENV},
                                                 stdout=subprocess.DEVNULL, stderr=open(os.path.join(root, "log"), "w"))
                        holder["one process"] = popen.pid
                        if popen.wait():
                            raise RuntimeError(f"one process failed (exit code {popen.returncode})")
                except RuntimeError as e:
                    error = str(e).splitlines()[0]
            ok = error is None and os.path.isdir(os.path.join(artifact_utils.get_single_uri(outputs["model"]), "Format-Serving"))
            peaks = {task: round(mb) for task, mb in memory.peaks.items()}
            results["trials"].append({"layout": layout, "rows": rows, "ok": ok, "seconds": time.monotonic() - start,
                                      "peak_rss_mb": peaks, "error": error})
            print(f"  {'trained and exported' if ok else 'failed: ' + str(error)} ({time.monotonic() - start:.0f} s); "
                  f"peak resident MiB {peaks}", flush=True)
            shutil.rmtree(root, ignore_errors=True)
            if not ok:
                break
            rows *= 2
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="cascade_output", help="a finished `cascade run` output directory")
    parser.add_argument("--part", choices=("speed", "capacity"), default="speed")
    parser.add_argument("--trainers", nargs="+", default=["Trainer.teacher", "Trainer.cascade"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cap-gb", type=float, default=4.0, help="the per-machine memory budget of the capacity table")
    parser.add_argument("--ps", type=int, default=2)
    parser.add_argument("--start-rows", type=int, default=1 << 20)
    parser.add_argument("--max-rows", type=int, default=1 << 24)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.part == "speed":
        results = speed(args)
        print("\n" + report.distributed_speed_table(results))
    else:
        results = capacity(args)
        print("\n" + report.distributed_capacity_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
