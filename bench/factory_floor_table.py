"""Factory Floor's Table 1 and Table 2 analogue on the synthetic `hard` testbed, through the pipeline.

Every figure comes from `cascade run` itself: each (training seed, variant) is one run of the
pipeline (`pipelines.local_runner`, LocalDagRunner, in a subprocess of its own) into the output
directory of its seed, with the variant's `--set` overrides on the hard preset's config. The
upstream components (ExampleGen, the teacher pass, the NegativeSampler, retrieval) are cached
between the variants of a seed, so a variant reruns what its overrides change: the joint cascade
Trainer (the ranking stage is trained there), the evaluators and the Pushers; a sampling variant
also the NegativeSampler. Read back from the run's own artifacts:

    AUC, PerQueryAUC, NE, Σŷ/Σy, e2e recall   the CascadeEvaluator's metrics.json (the ranking stage,
                                              scored by the exported SavedModel on the eval split)
    randomised slice                          the CascadeEvaluator's scored rows of the eval requests
                                              whose positions the logging policy randomised
                                              (`datasources.synthetic.randomized_requests`):
                                              bias = Σ(true_ctr − ŷ)/Σ true_ctr on their shown rows,
                                              and the largest |bias| over the positions 1..10
                                              (true_ctr, the generator's click probability, instead
                                              of the clicks: the same expectation without the
                                              Bernoulli noise of a small slice)
    logged bias                               the same on the other eval requests (positions by relevance)
    training cost                             Trainer.cascade's wall seconds, as a ratio to the baseline's
                                              in the same seed (the same machine, minutes apart)

Variants (the `--set`s of `VARIANTS`): Table 1 switches one technique on over the `baseline`
(every technique off), and `default` is the package's ranker (DCN, rank loss, distillation, bias
constraints, Q·U). Table 2 thins the shown non-clicks of the default's training lists. Shampoo runs
against AdaGrad at equal epochs and at equal wall time (AdaGrad with the epochs its wall time buys).
The searched architectures come from `cascade search --out DIR` on the same data (`--searched DIR`:
one variant per `ranker-<target>.yaml` there, its changed ranker fields as `--set`s). The tables are
`report.factory_floor_tables` (BENCHMARKS §10).

    .venv/bin/cascade search --cost-target 0.85,0.9,0.95 --out SEARCH --requests 10000 --set synthetic.preset=hard
    .venv/bin/python bench/factory_floor_table.py --seeds 0 1 2 --requests 10000 --searched SEARCH --equal-wall \
        --json bench/results/factory_floor_table.json
    .venv/bin/python bench/factory_floor_table.py --only baseline,+DCN --seeds 0   # a subset
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from report import factory_floor_tables  # noqa: E402  (the tables of BENCHMARKS §10)

BASELINE = ["ranker.cross_layers=0", "ranker.qu_dim=0", "ranker.rank_loss=none", "ranker.distill_weight=0",
            "ranker.bias_constraints=false", "ranker.lspr=false"]
DEFAULT = []  # the package's ranker
DEFAULT_EPOCHS = 3  # CascadeTrainerConfig.epochs
# name -> (table, overrides over the hard preset). Table 1 variants are the baseline plus one switch.
VARIANTS = {
    "baseline": ("1", BASELINE),
    "+DCN": ("1", BASELINE + ["ranker.cross_layers=2"]),
    "+rank loss": ("1", BASELINE + ["ranker.rank_loss=multi_objective"]),
    "+distill": ("1", BASELINE + ["ranker.distill_weight=0.5"]),
    "+Q·U": ("1", BASELINE + ["ranker.qu_dim=16"]),
    "+bias": ("1", BASELINE + ["ranker.bias_constraints=true"]),
    "+SmeLU": ("1", BASELINE + ["ranker.activation=smelu"]),
    "+LSPR": ("1", BASELINE + ["ranker.lspr=true"]),
    "+Shampoo": ("1", BASELINE + ["ranker.optimizer=shampoo"]),
    "default": ("1", DEFAULT),
    "default +Shampoo": ("shampoo", ["ranker.optimizer=shampoo"]),
    "default, rebalance 0.5": ("2", ["sampler.nonclick_keep_rate=0.5"]),
    "default, rebalance 0.2": ("2", ["sampler.nonclick_keep_rate=0.2"]),
    "default, teacher-loss 0.2": ("2", ["sampler.low_loss_keep_rate=0.2"]),
}
# What a run without --only measures (+SmeLU, +LSPR and rebalance 0.5 on request: SmeLU is for
# reproducibility, LSPR is not a Factory Floor technique, and 0.2 brackets the sampling's cost).
DEFAULT_RUN = ("baseline", "+DCN", "+rank loss", "+distill", "+Q·U", "+bias", "+Shampoo", "default",
               "default +Shampoo", "default, rebalance 0.2", "default, teacher-loss 0.2")


def hard_base(requests: int, seed: int, data_seed: int) -> list:
    """The overrides every run shares: the hard preset, its size and data seed, every Trainer seeded."""
    return [f"synthetic.preset=hard", f"synthetic.num_requests={requests}", f"synthetic.seed={data_seed}",
            f"teacher.lspr_seed={seed}", f"ranker.lspr_seed={seed}", f"cascade.seed={seed}",
            f"retrieval.seed={seed}"]


def run_one(output_dir: str, overrides: list) -> dict:
    """One pipeline run in this process (the child of `run_in_subprocess`): timings and figures."""
    from cascade_ranking.pipelines import local_runner
    from cascade_ranking.pipelines import report as run_report
    from cascade_ranking.pipelines.config import load_config

    config = load_config(None, overrides + [f"output_dir={output_dir}"])
    seconds, timings = local_runner.run_with_timings(config, show_progress=False)
    result = run_report.collect(config)
    evaluation = result["evaluation"]
    model = evaluation["model"]
    figures = {
        "auc": model["auc"], "per_query_auc": model["per_query_auc"], "ne": model["ne"],
        "calibration": model["mean_prediction"] / evaluation["click_rate"],
        "e2e_recall": evaluation["cascade"]["e2e_recall"],
    }
    figures.update(slice_bias(result["evaluation_uri"], config.synthetic))
    return {"seconds": seconds, "components": {name: s for name, s, _ in timings},
            "trainer_seconds": sum(s for name, s, _ in timings if name.startswith("Trainer.cascade")),
            # A config equal to an earlier run's reuses its Trainer (TFX's cache): its figures are that run's.
            "trainer_cached": any(cached for name, _, cached in timings if name.startswith("Trainer.cascade")),
            "figures": figures}


def slice_bias(evaluation_uri: str, synthetic_config) -> dict:
    """Calibration bias of the ranking stage's CTR on the randomised-position eval requests and on
    the logged ones, from the CascadeEvaluator's scored rows (module docstring)."""
    from cascade_ranking.components.cascade_evaluator import read_scored_rows
    from cascade_ranking.datasources import synthetic

    rows = read_scored_rows(evaluation_uri, ["model/ctr"])
    shown = rows["ui_position"] > 0
    randomised = synthetic.randomized_requests(synthetic_config, rows["request_id"])
    out = {}
    for name, mask in (("random", shown & randomised), ("logged", shown & ~randomised)):
        ctr, truth, position = rows["model/ctr"][mask], rows["true_ctr"][mask], rows["ui_position"][mask]
        out[f"{name}_requests"] = int(np.unique(rows["request_id"][mask]).size)
        out[f"{name}_bias"] = float((truth.sum() - ctr.sum()) / truth.sum()) if mask.any() else float("nan")
        per_position = [abs((truth[position == p].sum() - ctr[position == p].sum()) / truth[position == p].sum())
                        for p in np.unique(position) if truth[position == p].sum() > 0]
        out[f"{name}_max_position_bias"] = float(max(per_position)) if per_position else float("nan")
    return out


def run_in_subprocess(output_dir: str, overrides: list, log_path: str) -> dict:
    """`run_one` in a fresh Python process (a pipeline run leaves TF and Beam state behind)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as out:
        path = out.name
    cmd = [sys.executable, os.path.abspath(__file__), "--one-run", output_dir, "--result", path, "--"] + overrides
    with open(log_path, "a") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"pipeline run failed (exit {code}): {' '.join(overrides)}; log {log_path}")
    with open(path) as f:
        result = json.load(f)
    os.remove(path)
    return result


def searched_variants(directory: str) -> dict:
    """One variant per `cascade search --out DIR` result (its `ranker-<target>.yaml` files): the
    ranker fields the search changed, as `--set`s over the hard preset."""
    import yaml

    from cascade_ranking.pipelines.config import PipelineConfig

    default = PipelineConfig().ranker.to_dict()
    variants = {}
    for path in sorted(glob.glob(os.path.join(directory, "ranker-*.yaml"))):
        with open(path) as f:
            ranker = yaml.safe_load(f)["ranker"]
        target = os.path.basename(path)[len("ranker-"):-len(".yaml")]
        same = lambda a, b: (list(a) == list(b)) if isinstance(a, (list, tuple)) else a == b  # noqa: E731
        changed = {k: v for k, v in ranker.items() if k in default and not same(v, default[k])}
        variants[f"searched @{target}"] = ("search", [f"ranker.{k}={json.dumps(v)}" for k, v in sorted(changed.items())])
    return variants


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--requests", type=int, default=5_000, help="synthetic requests (hard preset)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more config overrides for every run, after the hard preset's (e.g. synthetic.ctr_scale=1)")
    parser.add_argument("--only", help="comma-separated variant names")
    parser.add_argument("--searched", help="a `cascade search --out` directory: its architectures as variants")
    parser.add_argument("--equal-wall", action="store_true",
                        help="also AdaGrad with the epochs Shampoo's wall time buys (needs default +Shampoo)")
    parser.add_argument("--work-dir", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--json", help="write every run's figures here (after each run)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --json and measure the rest")
    parser.add_argument("--one-run", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_run:  # the child process of `run_in_subprocess`
        result = run_one(args.one_run, args.overrides)
        with open(args.result, "w") as f:
            json.dump(result, f)
        return

    variants = dict(VARIANTS)
    if args.searched:
        variants.update(searched_variants(args.searched))
    names = [n.strip() for n in args.only.split(",")] if args.only else \
        list(DEFAULT_RUN) + [n for n in variants if variants[n][0] == "search"]
    unknown = [n for n in names if n not in variants]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(variants)}")
    work = args.work_dir or tempfile.mkdtemp(prefix="factory-floor-")
    os.makedirs(work, exist_ok=True)
    results = {}
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            results = {k: {int(s): r for s, r in v.items()} for k, v in json.load(f)["results"].items()}
    print(f"synthetic hard preset{' with ' + ', '.join(args.set) if args.set else ''}, {args.requests} requests "
          f"(data seed {args.data_seed}); training seeds {args.seeds}; runs in {work}", flush=True)

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("one_run", "result")},
                           "variants": {n: variants[n][1] for n in results if n in variants}, "results": results},
                          f, indent=1)

    def measure(name, overrides, seed):
        if seed in results.get(name, {}):
            return
        start = time.time()
        run = run_in_subprocess(os.path.join(work, f"seed{seed}"),
                                hard_base(args.requests, seed, args.data_seed) + args.set + overrides,
                                os.path.join(work, f"seed{seed}.log"))
        if run.get("trainer_cached"):
            raise RuntimeError(f"{name}: the pipeline reused an earlier run's Trainer.cascade (the same config); "
                               "its figures would be that run's")
        results.setdefault(name, {})[seed] = run
        save()
        f = run["figures"]
        print(f"seed {seed} {name:<28s} AUC {f['auc']:.4f}  PQAUC {f['per_query_auc']:.4f}  NE {f['ne']:.4f}  "
              f"calib {f['calibration']:.3f}  random-slice bias {f['random_bias']:+.3f}  "
              f"Trainer {run['trainer_seconds']:.1f} s  (run {time.time() - start:.0f} s)", flush=True)

    for seed in args.seeds:
        for name in names:
            measure(name, variants[name][1], seed)
        if args.equal_wall and "default +Shampoo" in results and "default" in results:
            ratio = results["default +Shampoo"][seed]["trainer_seconds"] / results["default"][seed]["trainer_seconds"]
            epochs = max(1, int(round(DEFAULT_EPOCHS * ratio)))
            if epochs == DEFAULT_EPOCHS:  # whole epochs: the equal-wall run is the default itself
                print(f"seed {seed}: Shampoo's wall time is ×{ratio:.2f} AdaGrad's: at whole epochs AdaGrad's "
                      f"equal-wall run is the default's {DEFAULT_EPOCHS}", flush=True)
            else:
                name = f"default, AdaGrad at Shampoo's wall ({epochs} epochs)"
                variants[name] = ("shampoo", [f"cascade.epochs={epochs}"])
                measure(name, [f"cascade.epochs={epochs}"], seed)

    print()
    print(factory_floor_tables({"results": results}))

if __name__ == "__main__":
    main()
