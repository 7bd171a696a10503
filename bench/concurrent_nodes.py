"""Lab bench: would running the pipeline's independent nodes side by side shorten the demo?

    .venv/bin/python bench/concurrent_nodes.py [--rounds 1] [--teacher-before-gate] [--json out.json]

A lab result: `cascade run` does not take this path. TFX's LocalDagRunner runs one node at a time,
in topological order. `ConcurrentDagRunner` below (written here: TFX 1.15 has no concurrent local
runner) launches each node as soon as its upstream nodes are done, up to `--workers` at a time, in
threads of the one process, never two Trainers at once (two Trainers would race on TF's global
random seed). In the demo's DAG that overlaps Trainer.retrieval with StageModel.preranking,
Evaluator.ranking and the Resolvers after Trainer.cascade. With `--teacher-before-gate`, the
teacher Trainer also waits for the example source only, not for the AnomalyGate (whose wait moves
to TeacherInference), so StatisticsGen runs beside Trainer.teacher.

Each round runs the demo's pipeline (`PipelineConfig()` defaults: synthetic, 5,000 requests, seed 0)
cold in a fresh output directory twice, one after the other: on LocalDagRunner (the reference) and
on the concurrent runner. Printed per round: both pipelines' wall times, their ratio, each
component's seconds, and the wall time of the overlapped section (from the end of
Trainer.cascade to the start of CascadeEvaluator, and with `--teacher-before-gate` from the end of
SyntheticExampleGen to the start of TeacherInference) in both runs. Both runs must print the same
e2e recall and AUC: the overlap changes when nodes run, not what they compute.
"""
import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from concurrent import futures

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfx.dsl.compiler import constants  # noqa: E402
from tfx.orchestration import metadata  # noqa: E402
from tfx.orchestration.local import runner_utils  # noqa: E402
from tfx.orchestration.local.local_dag_runner import LocalDagRunner  # noqa: E402
from tfx.orchestration.portable import launcher, runtime_parameter_utils  # noqa: E402

from cascade_ranking.pipelines import local_runner  # noqa: E402
from cascade_ranking.pipelines import pipeline as pipeline_lib  # noqa: E402
from cascade_ranking.pipelines import report as run_report  # noqa: E402
from cascade_ranking.pipelines.config import PipelineConfig  # noqa: E402


class ConcurrentDagRunner(LocalDagRunner):
    """LocalDagRunner's node launch, with independent nodes in a thread pool (see the docstring)."""

    def __init__(self, workers: int = 2):
        super().__init__()
        self.workers = workers
        self.spans = {}  # node id → (start, end) in seconds since the epoch

    def run_with_ir(self, pipeline, run_options=None):
        runtime_parameter_utils.substitute_runtime_parameter(
            pipeline, {constants.PIPELINE_RUN_ID_PARAMETER_NAME: datetime.datetime.now().isoformat()})
        deployment = runner_utils.extract_local_deployment_config(pipeline)
        connection = getattr(deployment.metadata_connection_config,
                             deployment.metadata_connection_config.WhichOneof("connection_config"))
        nodes = [node.pipeline_node for node in pipeline.nodes]
        by_id = {node.node_info.id: node for node in nodes}
        order = list(by_id)
        specs = {i: runner_utils.extract_executor_spec(deployment, i) for i in order}
        is_trainer = {i: "trainer" in getattr(specs[i], "class_path", "").lower() for i in order}

        def launch(node_id):
            start = time.time()
            launcher.Launcher(pipeline_node=by_id[node_id], mlmd_connection=metadata.Metadata(connection),
                              pipeline_info=pipeline.pipeline_info, pipeline_runtime_spec=pipeline.runtime_spec,
                              executor_spec=specs[node_id],
                              custom_driver_spec=runner_utils.extract_custom_driver_spec(deployment, node_id)).launch()
            self.spans[node_id] = (start, time.time())

        done, running = set(), {}
        with futures.ThreadPoolExecutor(self.workers) as pool:
            while len(done) < len(order):
                for node_id in order:
                    if node_id in done or node_id in running.values() or len(running) >= self.workers:
                        continue
                    if not all(up in done for up in by_id[node_id].upstream_nodes):
                        continue
                    if is_trainer[node_id] and any(is_trainer[r] for r in running.values()):
                        continue
                    running[pool.submit(launch, node_id)] = node_id
                finished, _ = futures.wait(list(running), return_when=futures.FIRST_COMPLETED)
                for future in finished:
                    node_id = running.pop(future)
                    future.result()  # a failed node stops the run with its own error
                    done.add(node_id)


def teacher_before_gate(create_pipeline):
    """`create_pipeline` with Trainer.teacher waiting for its inputs only, and TeacherInference for the
    AnomalyGate instead (nothing downstream of the teacher runs on data with anomalies)."""

    def create(config, metadata_connection_config=None, kubeflow=False):
        built = create_pipeline(config, metadata_connection_config, kubeflow)
        nodes = {node.id: node for node in built.components}
        nodes["Trainer.teacher"].remove_upstream_node(nodes["AnomalyGate"])
        nodes["TeacherInference"].add_upstream_node(nodes["AnomalyGate"])
        return built

    return create


def sequential_spans(start: float, timings) -> dict:
    """(start, end) of each node of a LocalDagRunner run from the progress printer's (node, seconds)
    in finishing order: its nodes run one after another from `start` (the gaps between them, under
    0.1 s each, are not counted)."""
    spans, clock = {}, start
    for node, seconds, _ in timings:
        spans[node] = (clock, clock + seconds)
        clock += seconds
    return spans


def section(spans: dict, after: str, before: str) -> float:
    return spans[before][0] - spans[after][1]


def one_run(concurrent: bool, workers: int, gate: bool, tmp: str) -> dict:
    config = PipelineConfig(output_dir=os.path.join(tmp, "concurrent" if concurrent else "sequential"))
    runner = ConcurrentDagRunner(workers) if concurrent else None
    saved_runner, saved_create = local_runner._dag_runner, local_runner.create_pipeline
    if concurrent:
        local_runner._dag_runner = lambda orchestrator: runner
        if gate:
            local_runner.create_pipeline = teacher_before_gate(pipeline_lib.create_pipeline)
    try:
        start = time.time()
        seconds, timings = local_runner.run_with_timings(config, show_progress=False)
    finally:
        local_runner._dag_runner, local_runner.create_pipeline = saved_runner, saved_create
    spans = runner.spans if concurrent else sequential_spans(start, timings)
    evaluation = run_report.collect(config)["evaluation"]
    figures = {name: value for name, value, _ in run_report.table_rows(evaluation) if value is not None}
    out = {"seconds": seconds, "components": {n: s for n, s, _ in timings},
           "after_cascade": section(spans, "Trainer.cascade", "CascadeEvaluator"),
           "e2e": figures["e2e recall (quotas 40/30/20)"], "auc": figures["ranking AUC"]}
    if gate:
        out["before_teacher_inference"] = section(spans, "SyntheticExampleGen", "TeacherInference")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--teacher-before-gate", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rounds = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="concurrent-nodes-") as tmp:
            sequential = one_run(False, args.workers, args.teacher_before_gate, tmp)
            concurrent = one_run(True, args.workers, args.teacher_before_gate, tmp)
        rounds.append({"sequential": sequential, "concurrent": concurrent})
        print(f"round {r + 1}: pipeline {sequential['seconds']:.1f} s on LocalDagRunner, {concurrent['seconds']:.1f} s "
              f"with {args.workers} nodes at a time (× {concurrent['seconds'] / sequential['seconds']:.2f}); "
              f"Trainer.cascade's end → CascadeEvaluator's start {sequential['after_cascade']:.1f} → "
              f"{concurrent['after_cascade']:.1f} s"
              + (f"; SyntheticExampleGen's end → TeacherInference's start {sequential['before_teacher_inference']:.1f}"
                 f" → {concurrent['before_teacher_inference']:.1f} s" if args.teacher_before_gate else ""), flush=True)
        print(f"  same results: e2e {sequential['e2e']:.4f} / {concurrent['e2e']:.4f}, "
              f"AUC {sequential['auc']:.4f} / {concurrent['auc']:.4f}")
        for name, seconds in sequential["components"].items():
            if seconds >= 0.5 or concurrent["components"].get(name, 0) >= 0.5:
                print(f"    {name:<28s} {seconds:6.1f} s   {concurrent['components'].get(name, float('nan')):6.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cores": os.cpu_count(), "rounds": rounds}, f, indent=1)


if __name__ == "__main__":
    main()
