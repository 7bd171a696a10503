"""Wall time and peak memory of one component run alone on given data: the NegativeSampler executor,
or the retrieval or cascade Trainer's `run_fn`.

Peak memory is the resident memory (RSS) of this process and its children (the SDK workers of
multi_processing mode), sampled every 0.1 s. It prints one JSON line: seconds, peak MB and what
identifies the output, so two versions of the code can be compared on the same data by running
this script at each commit:
  negative_sampler  sha256 (first 12 hex digits) and count of the sorted request-list records and
                    of the shown rows, and the counters
  retrieval, cascade  the eval metrics the Trainer wrote (eval_metrics.json, without its train-data
                    report and FLOPs)

    python bench/component_memory.py negative_sampler --data DIR [--beam-mode in_process|multi_processing]
    python bench/component_memory.py retrieval --data LISTS_DIR
    python bench/component_memory.py cascade --data LISTS_DIR

DIR holds candidate rows (Split-train/, Split-eval/: `cascade generate --out DIR --requests N`, or
a TeacherInference output); LISTS_DIR holds request lists (a NegativeSampler output, e.g. the
`out` directory the first command writes under --work-dir).
"""
import argparse
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402


class PeakMemory:
    """The peak RSS of this process and its children while the `with` block runs."""

    def __enter__(self):
        self.peak, self._stop = 0, False
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        me = psutil.Process()
        while not self._stop:
            total = 0
            for process in [me] + me.children(recursive=True):
                try:
                    total += process.memory_info().rss
                except psutil.Error:  # a worker that just ended
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.1)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def _digest(directory: str):
    import tensorflow as tf

    records = []
    for path in sorted(glob.glob(os.path.join(directory, "**", "*.gz"), recursive=True)):
        records += list(tf.data.TFRecordDataset(path, compression_type="GZIP").as_numpy_iterator())
    return len(records), hashlib.sha256(b"".join(sorted(records))).hexdigest()[:12]


def run_negative_sampler(data: str, work: str, beam_mode: str):
    from tfx.dsl.components.base import base_beam_executor

    from cascade_ranking.components import negative_sampler, record_io
    from cascade_ranking.components.sampling import SamplerConfig
    from tests.component_fixtures import examples_artifact

    args = [] if beam_mode == "in_process" else ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    out = examples_artifact(os.path.join(work, "out"), splits=())
    shown = examples_artifact(os.path.join(work, "shown"), splits=())
    dead = record_io.DeadLetters()
    dead.uri = os.path.join(work, "dead")
    context = base_beam_executor.BaseBeamExecutor.Context(beam_pipeline_args=args, tmp_dir=os.path.join(work, "tmp"))
    negative_sampler.Executor(context).Do(
        {"examples": [examples_artifact(data)]}, {"request_lists": [out], "shown_rows": [shown], "dead_letters": [dead]},
        {"config": json.dumps(dataclasses.asdict(SamplerConfig())), "input_splits": json.dumps(["train", "eval"])})
    return lambda: {"lists": _digest(out.uri), "shown_rows": _digest(shown.uri),
                    "counters": record_io.read_metrics(out.uri)}


def run_trainer(module_name: str):
    def run(data: str, work: str, beam_mode: str):
        import importlib

        from tfx.components.trainer.fn_args_utils import FnArgs

        module = importlib.import_module(f"cascade_ranking.models.trainers.{module_name}")
        run_dir = os.path.join(work, "run")
        module.run_fn(FnArgs(train_files=[os.path.join(data, "Split-train", "*")],
                             eval_files=[os.path.join(data, "Split-eval", "*")],
                             serving_model_dir=os.path.join(work, "serving"), model_run_dir=run_dir, custom_config={}))

        def result():
            metrics = json.load(open(os.path.join(run_dir, "eval_metrics.json")))
            return {k: v for k, v in metrics.items() if k not in ("train_data", "flops")}
        return result
    return run


COMPONENTS = {"negative_sampler": run_negative_sampler, "retrieval": run_trainer("retrieval"),
              "cascade": run_trainer("cascade")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("component", choices=sorted(COMPONENTS))
    parser.add_argument("--data", required=True)
    parser.add_argument("--beam-mode", choices=("in_process", "multi_processing"), default="in_process")
    parser.add_argument("--work-dir", help="where the outputs go (default: a temporary directory, removed)")
    args = parser.parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="component-memory-")
    if args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    with PeakMemory() as memory:
        start = time.perf_counter()
        result = COMPONENTS[args.component](args.data, work, args.beam_mode)
        seconds = time.perf_counter() - start
    print(json.dumps({"component": args.component, "beam_mode": args.beam_mode, "seconds": round(seconds, 1),
                      "peak_mb": memory.peak >> 20, "output": result()}, sort_keys=True, default=str))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
