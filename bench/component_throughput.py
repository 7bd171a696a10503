"""Candidate rows/s of the NegativeSampler and TeacherInference executors on Beam's DirectRunner.

Each executor runs on the same synthetic data (--requests × 50 rows) three ways, in one run:
in-process (no Beam args, the reference), and multi-processing with 1 and with 2 workers.
Figures are means ± std over --repeats runs and ratios against the in-process reference.

    python bench/component_throughput.py [--requests 1000] [--repeats 3]
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tfx.dsl.components.base import base_beam_executor  # noqa: E402

from components import negative_sampler, record_io, teacher_inference  # noqa: E402
from components.sampling import SamplerConfig  # noqa: E402
from tests.component_fixtures import examples_artifact, exported_model, synthetic_examples  # noqa: E402

MODES = {
    "in-process (reference)": [],
    "multi_processing, 1 worker": ["--direct_running_mode=multi_processing", "--direct_num_workers=1"],
    "multi_processing, 2 workers": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
}


def _outputs(root):
    out = examples_artifact(os.path.join(root, "out"), splits=())
    dead = record_io.DeadLetters()
    dead.uri = os.path.join(root, "dead")
    return out, dead


def run_sampler(examples, model, beam_args, root):
    out, dead = _outputs(root)
    context = base_beam_executor.BaseBeamExecutor.Context(beam_pipeline_args=beam_args, tmp_dir=os.path.join(root, "tmp"))
    negative_sampler.Executor(context).Do(
        {"examples": [examples]}, {"request_lists": [out], "dead_letters": [dead]},
        {"config": json.dumps(dataclasses.asdict(SamplerConfig(nonclick_keep_rate=0.5))),
         "input_splits": json.dumps(["train", "eval"])})


def run_teacher(examples, model, beam_args, root):
    out, dead = _outputs(root)
    context = base_beam_executor.BaseBeamExecutor.Context(beam_pipeline_args=beam_args, tmp_dir=os.path.join(root, "tmp"))
    teacher_inference.Executor(context).Do(
        {"examples": [examples], "model": [model]}, {"output_examples": [out], "dead_letters": [dead]},
        {"splits": json.dumps(["train", "eval"]), "output_key": "logit", "output_feature": "teacher_logit",
         "max_bad_fraction": 0.01})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = args.requests * 50
    with tempfile.TemporaryDirectory() as tmp:
        examples = synthetic_examples(os.path.join(tmp, "examples"), args.requests)
        model = exported_model(os.path.join(tmp, "examples"), os.path.join(tmp, "model"))
        print(f"synthetic data, {args.requests} requests = {rows} candidate rows, {args.repeats} repeats, "
              f"{os.cpu_count()} cores, DirectRunner")
        for name, fn in (("NegativeSampler", run_sampler), ("TeacherInference", run_teacher)):
            rates = {}
            for mode, beam_args in MODES.items():
                values = []
                for r in range(args.repeats):
                    root = os.path.join(tmp, f"{name}-{len(rates)}-{r}")
                    start = time.perf_counter()
                    fn(examples, model, beam_args, root)
                    values.append(rows / (time.perf_counter() - start))
                rates[mode] = values
            reference = statistics.mean(rates["in-process (reference)"])
            for mode, values in rates.items():
                mean, std = statistics.mean(values), statistics.pstdev(values)
                print(f"  {name:17s} {mode:28s} {mean:9,.0f} ± {std:6,.0f} rows/s   ×{mean / reference:.2f}")


if __name__ == "__main__":
    main()
