"""Candidate rows/s of the NegativeSampler and TeacherInference executors on Beam's DirectRunner.

Each executor runs on the same synthetic data (--requests × 50 rows) three ways, in one run:
in-process (no Beam args, the reference), and multi-processing with 1 and with 2 workers (the
local pipeline's mode). For each it prints, as means ± std over --repeats runs:
  rows/s      rows / wall time of the whole executor (construction + Do), what a pipeline pays,
              and its ratio to the in-process figure of the same run;
  Do rows/s   rows / wall time of Do alone: TFX builds an ephemeral sdist when constructing a Beam
              executor with non-empty beam_pipeline_args (`init s`), which Do does not include;
  CPU s       CPU seconds of this process plus its finished children (the SDK workers), which
              is less sensitive than wall time to other load on the machine.
A last table gives the floor of each mode: a pipeline that only reads the same records and
counts them (worker start-up, which imports TensorFlow when the DoFns need it, and transport).

    python bench/component_throughput.py [--requests 1000] [--repeats 3] [--only NegativeSampler]
"""
import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import apache_beam as beam  # noqa: E402
from tfx.dsl.components.base import base_beam_executor  # noqa: E402

from cascade_ranking.components import negative_sampler, record_io, teacher_inference  # noqa: E402
from cascade_ranking.components.sampling import SamplerConfig  # noqa: E402
from tests.component_fixtures import examples_artifact, exported_model, synthetic_examples  # noqa: E402

REFERENCE = "in-process (reference)"
MODES = {
    REFERENCE: [],
    "multi_processing, 1 worker": ["--direct_running_mode=multi_processing", "--direct_num_workers=1"],
    "multi_processing, 2 workers": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
}


def _outputs(root):
    out = examples_artifact(os.path.join(root, "out"), splits=())
    dead = record_io.DeadLetters()
    dead.uri = os.path.join(root, "dead")
    return out, dead


def _context(beam_args, root):
    return base_beam_executor.BaseBeamExecutor.Context(beam_pipeline_args=beam_args, tmp_dir=os.path.join(root, "tmp"))


def _timed_run(executor_class, inputs, outputs, exec_properties, beam_args, root):
    """(construction seconds, Do seconds) of one executor run."""
    start = time.perf_counter()
    executor = executor_class(_context(beam_args, root))
    built = time.perf_counter()
    executor.Do(inputs, outputs, exec_properties)
    return built - start, time.perf_counter() - built


def run_sampler(examples, model, beam_args, root):
    """(construction seconds, Do seconds) of one NegativeSampler run."""
    out, dead = _outputs(root)
    shown = examples_artifact(os.path.join(root, "shown_rows"), splits=())
    return _timed_run(
        negative_sampler.Executor, {"examples": [examples]},
        {"request_lists": [out], "shown_rows": [shown], "dead_letters": [dead]},
        {"config": json.dumps(dataclasses.asdict(SamplerConfig(nonclick_keep_rate=0.5))),
         "input_splits": json.dumps(["train", "eval"])}, beam_args, root)


def run_teacher(examples, model, beam_args, root):
    """(construction seconds, Do seconds) of one TeacherInference run."""
    out, dead = _outputs(root)
    return _timed_run(
        teacher_inference.Executor, {"examples": [examples], "model": [model]},
        {"output_examples": [out], "dead_letters": [dead]},
        {"splits": json.dumps(["train", "eval"]), "output_key": "logit", "output_feature": "teacher_logit",
         "max_bad_fraction": 0.01}, beam_args, root)


def run_floor(examples, model, beam_args, root):
    """(0, seconds) of a pipeline that reads every record of both splits and counts them, with a
    DoFn of `components.record_io` (so the workers import TensorFlow, as the components' do)."""
    start = time.perf_counter()
    with beam.Pipeline(argv=beam_args) as p:
        for split in ("train", "eval"):
            _ = (record_io.read_split(p, os.path.join(examples.uri, f"Split-{split}"), split)
                 | f"Parse[{split}]" >> beam.ParDo(record_io.ParseOrDivert("floor"))
                 | f"Count[{split}]" >> beam.combiners.Count.Globally())
    return 0.0, time.perf_counter() - start


def _cpu_seconds():
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _fmt(values, spec):
    mean = statistics.mean(values)
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{mean:{spec}} ± {std:{spec}}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("NegativeSampler", "TeacherInference", "floor"), action="append")
    parser.add_argument("--json", help="also write every figure here")
    args = parser.parse_args()
    figures = {"requests": args.requests, "rows": args.requests * 50, "repeats": args.repeats,
               "cpus": os.cpu_count(), "reference_mode": REFERENCE, "components": {}}
    rows = args.requests * 50
    runs = [("NegativeSampler", run_sampler), ("TeacherInference", run_teacher), ("floor", run_floor)]
    runs = [r for r in runs if not args.only or r[0] in args.only]
    with tempfile.TemporaryDirectory() as tmp:
        examples = synthetic_examples(os.path.join(tmp, "examples"), args.requests)
        model = exported_model(os.path.join(tmp, "examples"), os.path.join(tmp, "model"))
        print(f"synthetic data, {args.requests} requests = {rows} candidate rows, {args.repeats} repeats, "
              f"{os.cpu_count()} cores, DirectRunner; load average before: {os.getloadavg()[0]:.1f}")
        print(f"  {'component':17s} {'mode':28s} {'rows/s':>17s} {'ratio':>6s} {'Do rows/s':>17s} {'init s':>12s} "
              f"{'CPU s':>14s}")
        for name, fn in runs:
            results = {}
            for mode, beam_args in MODES.items():
                init, total, do, cpu = [], [], [], []
                for r in range(args.repeats):
                    root = os.path.join(tmp, f"{name}-{len(results)}-{r}")
                    cpu_start = _cpu_seconds()
                    built, done = fn(examples, model, beam_args, root)
                    cpu.append(_cpu_seconds() - cpu_start)
                    init.append(built)
                    total.append(rows / (built + done))
                    do.append(rows / done)
                results[mode] = (total, do, init, cpu)
            reference = statistics.mean(results[REFERENCE][0])
            figures["components"][name] = {
                mode: {"rows_per_s": total, "do_rows_per_s": do, "init_s": init, "cpu_s": cpu,
                       "ratio_to_reference": statistics.mean(total) / reference}
                for mode, (total, do, init, cpu) in results.items()}
            for mode, (total, do, init, cpu) in results.items():
                label = "(read + count)" if name == "floor" else ""
                print(f"  {name + label:17s} {mode:28s} {_fmt(total, '7,.0f')} ×{statistics.mean(total) / reference:4.2f} "
                      f"{_fmt(do, '7,.0f')} {_fmt(init, '4.1f')} {_fmt(cpu, '5.1f')}", flush=True)
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
