"""Benchmark: what `make demo` serves, from the pipeline's own artifacts, over several clean runs.

    .venv/bin/python bench/pipeline_runs.py [--runs 3] [--requests 5000] [--json out.json]
    .venv/bin/python bench/pipeline_runs.py --training-seeds 0 1 2 [--json out.json]
    .venv/bin/python bench/pipeline_runs.py --config my_start/cascade.yaml [--set K=V ...] [--runs 3]

Each run is the demo's pipeline (`PipelineConfig()` defaults: built-in synthetic data, 5,000
requests, seed 0; LocalDagRunner, Beam DirectRunner in the mode `beam_mode: auto` picks) in a
fresh output directory, so every run trains from scratch on the same data. The runs differ only by
the nondeterminism of multi-threaded training, or, with `--training-seeds`, by the seed of every
Trainer: run r sets the teacher's `lspr_seed`, the joint cascade's `seed` and its ranker's
`lspr_seed`, and the retrieval Trainer's `seed` to the r-th seed (the data and the sampler's seed
stay the demo's). Since the demo gives the same table run after run, this spread is the "one seed
std" its table is judged against.

After each run the figures are read back from the run's MLMD store and artifacts by
`pipelines.report.collect` — the CascadeEvaluator's metrics, the TFMA Evaluator's overall
metrics, the joint Trainer's training data and FLOPs, the blessings — exactly what the run prints.
Printed: every run's figures and their mean ± sample std (min–max for the spread), and each run's
wall time with the per-component times. Dataset: synthetic (`SyntheticConfig()`),
or the config file's (`--config`, as `cascade run --config` reads it, e.g. a `cascade init` starter
on converted MovieLens or Open Bandit data; its output_dir is replaced by a fresh one per run).
"""
import argparse
import dataclasses
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from report import mean_std  # noqa: E402  (sample std over runs, as in BENCHMARKS.md)

from cascade_ranking.datasources.synthetic import SyntheticConfig  # noqa: E402
from cascade_ranking.pipelines import local_runner  # noqa: E402
from cascade_ranking.pipelines import report as run_report  # noqa: E402
from cascade_ranking.pipelines.config import PipelineConfig, load_config  # noqa: E402


def figures(result) -> dict:
    """The run's headline figures, from `pipelines.report.collect`."""
    evaluation = result["evaluation"]
    out = {name: value for name, value, _ in run_report.table_rows(evaluation) if value is not None}
    k, ranking, preranking = run_report.ranking_vs_preranking_at(evaluation)
    out[f"ranking − pre-ranking Recall@|GT|@{k}"] = ranking - preranking
    out["TFMA AUC (shown eval rows)"] = result["tfma"].get("auc")
    out["TFMA calibration"] = result["tfma"].get("calibration")
    flops = result["cascade_trainer"]["flops"]
    out["FLOPs/candidate pre-ranking"] = flops["preranking"]["per_candidate"]
    out["FLOPs/candidate ranking"] = flops["ranking"]["per_candidate"]
    if result.get("retrieval_trainer"):  # a 2-stage cascade has none
        out["FLOPs/candidate retrieval"] = result["retrieval_trainer"]["flops"]["per_candidate"]
    for stage, verdict in evaluation["blessings"].items():
        out[f"blessed {stage}"] = float(verdict["blessed"])
    return out


def with_training_seed(config: PipelineConfig, seed: int) -> PipelineConfig:
    """`config` with every Trainer's seed set to `seed` (the teacher's, the joint cascade's and its
    ranker's LSPR seed, the retrieval Trainer's); the data and the NegativeSampler keep theirs."""
    return config.replace(teacher=dataclasses.replace(config.teacher, lspr_seed=seed),
                          ranker=dataclasses.replace(config.ranker, lspr_seed=seed),
                          cascade=dataclasses.replace(config.cascade, seed=seed),
                          retrieval=dataclasses.replace(config.retrieval, seed=seed))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=SyntheticConfig().num_requests)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--config", help="a cascade run config file (default: the demo's synthetic config)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--training-seeds", type=int, nargs="+", metavar="SEED",
                        help="one run per seed, each with every Trainer seeded with it (overrides --runs)")
    args = parser.parse_args(argv)
    if args.training_seeds:
        args.runs = len(args.training_seeds)
    base = load_config(args.config, args.set) if args.config or args.set else None
    dataset = (f"{base.examples_dir} ({args.config})" if base is not None and base.source == "examples"
               else f"synthetic {args.requests} requests")
    runs = []
    for r in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="pipeline-run-") as tmp:
            if base is not None:
                config = base.replace(output_dir=os.path.join(tmp, "out"))
            else:
                config = PipelineConfig(output_dir=os.path.join(tmp, "out"),
                                        synthetic=dataclasses.replace(SyntheticConfig(), num_requests=args.requests))
            if args.training_seeds:
                config = with_training_seed(config, args.training_seeds[r])
            config.validate()
            config.check_inputs()
            seconds, timings = local_runner.run_with_timings(config, show_progress=False)
            run = {"seconds": seconds, "components": [[n, s] for n, s, _ in timings],
                   "figures": figures(run_report.collect(config))}
        runs.append(run)
        seed = f" (training seed {args.training_seeds[r]})" if args.training_seeds else ""
        print(f"run {r + 1}{seed}: {seconds:.1f} s; " + json.dumps({k: round(v, 4) for k, v in run["figures"].items()}),
              flush=True)
    seeds = f", training seeds {' '.join(map(str, args.training_seeds))}" if args.training_seeds else ""
    print(f"\npipeline on {dataset}, {args.runs} runs from clean output dirs{seeds}, {os.cpu_count()} cores")
    for name in runs[0]["figures"]:
        values = [run["figures"][name] for run in runs if run["figures"].get(name) is not None]
        if not values:
            continue
        print(f"  {name:<40s} {mean_std(values):>18s}   (min {min(values):.4f}, max {max(values):.4f}, "
              f"spread {max(values) - min(values):.4f})")
    walls = [run["seconds"] for run in runs]
    print(f"  {'pipeline wall time (s)':<40s} {mean_std(walls, 1):>18s}")
    for name in dict(runs[0]["components"]):
        print(f"    {name:<36s} {np.mean([dict(run['components'])[name] for run in runs]):6.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
