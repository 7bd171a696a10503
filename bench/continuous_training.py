"""Benchmark: continuous training on drifting spans (issue 17), through `cascade stream`'s runner.

    .venv/bin/python bench/continuous_training.py [--seeds 0 1 2] [--spans 3] [--drift 0.3]
        [--variants warm1 warm2 window2] [--json out.json] [--work DIR]

Dataset: synthetic spans (`SyntheticConfig()`: 5,000 requests a span, data seed 0) with drift 0.3
(`synthetic.write_spans`, what `cascade stream` writes), the same spans for every seed. For each
training seed (every Trainer seeded with it, `pipeline_runs.with_training_seed`):

1. span 1 is run once from scratch (the config's epochs: 3 span-epochs for every Trainer);
2. each variant then runs spans 2 … K on a copy of that output directory (its MLMD and span-1
   models; `stream.run_stream`, the pipeline `cascade stream` runs), so every variant starts from
   the same span-1 model:
   - `warm1`: warm start, one pass over the new span (the default; 1 span-epoch a span);
   - `warm2`: warm start, two passes (2 span-epochs a span);
   - `window2`: no warm start, retrained from scratch on a rolling window of 2 spans for 1 epoch
     (`span_window: 2`; 2 span-epochs a span: the same compute as `warm2`);
   - `window2x3`: the same window at the config's 3 epochs (6 span-epochs a span: a full retrain);
3. `frozen`: span 1's ranker, never retrained, scored on each later span's shown eval rows with the
   CascadeEvaluator's own metric function (`components.evaluation.ranking_metrics`). This is the
   one figure computed outside the pipeline: a lab figure of a model the pipeline would replace.

Printed per variant and span: the ranker's AUC, PerQueryAUC, NE, calibration and the cascade's e2e
recall on the span's eval rows, as mean ± std over the seeds; the wall time of each span's run and
its ratio to `warm1`'s in the same seed; and the progressive-validation check: the AUC of span t−1's
model on span t (the CascadeEvaluator's baseline, when span t−1's ranker was blessed) against the
same model's held-out AUC on span t−1's eval rows.
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline_runs import with_training_seed  # noqa: E402
from report import mean_std  # noqa: E402

from cascade_ranking.datasources import synthetic  # noqa: E402
from cascade_ranking.pipelines import run_log, stream  # noqa: E402
from cascade_ranking.pipelines.config import PipelineConfig  # noqa: E402

METRICS = stream.METRICS
VARIANTS = {
    "warm1": dict(warm_start=True, warm_start_epochs=1),
    "warm2": dict(warm_start=True, warm_start_epochs=2),
    "window2": dict(warm_start=False, span_window=2, epochs=1),
    "window2x3": dict(warm_start=False, span_window=2),
}
SPAN_EPOCHS = {"warm1": 1, "warm2": 2, "window2": 2, "window2x3": 6}  # per span after the first


def variant_config(config: PipelineConfig, settings: dict) -> PipelineConfig:
    settings = dict(settings)
    epochs = settings.pop("epochs", None)
    if epochs is not None:
        config = config.replace(teacher=dataclasses.replace(config.teacher, epochs=epochs),
                                cascade=dataclasses.replace(config.cascade, epochs=epochs),
                                retrieval=dataclasses.replace(config.retrieval, epochs=epochs))
    return config.replace(**settings)


def ranker_model_uri(config: PipelineConfig, span: int) -> str:
    """The Model of Trainer.cascade (the ranker's) trained on `span`, from the run's MLMD."""
    from cascade_ranking.models.trainers import warm_start
    from cascade_ranking.pipelines import report as run_report

    store = run_report._store(config)  # pylint: disable=protected-access
    for artifact in run_report.node_artifacts(store, "Model", f"{config.pipeline_name}.Trainer.cascade"):
        if warm_start.trained_span(artifact.uri) == span:
            return artifact.uri
    raise LookupError(f"no ranker model of span {span} in {config.metadata_path}")


def frozen_metrics(model_uri: str, spans_dir: str, span: int, config: PipelineConfig) -> dict:
    """The span-1 ranker on `span`'s shown eval rows (ui_position > 0), with the CascadeEvaluator's
    metric function."""
    import tensorflow as tf

    from cascade_ranking.components import evaluation
    from cascade_ranking.datasources import example_io

    serve = tf.saved_model.load(os.path.join(model_uri, "Format-Serving")).signatures["serving_default"]
    rows = [ex for ex in example_io.read_examples(os.path.join(spans_dir, f"span-{span}", "Split-eval"))
            if ex.features.feature["ui_position"].int64_list.value[0] > 0]
    ctr = np.concatenate([serve(tf.constant([ex.SerializeToString() for ex in rows[i:i + 4096]]))["ctr"].numpy()
                          .reshape(-1) for i in range(0, len(rows), 4096)])

    def column(name):
        return np.array([ex.features.feature[name].int64_list.value[0] for ex in rows])

    clicks = column("click")
    got = evaluation.ranking_metrics(clicks, ctr, column("request_id"), column("ui_position"), config.evaluator)
    return {"e2e_recall": None, "auc": got["auc"], "per_query_auc": got["per_query_auc"], "ne": got["ne"],
            "calibration": float(ctr.sum() / clicks.sum())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--spans", type=int, default=3)
    parser.add_argument("--drift", type=float, default=stream.DEFAULT_DRIFT)
    parser.add_argument("--requests", type=int, default=synthetic.SyntheticConfig().num_requests)
    parser.add_argument("--variants", nargs="+", default=["warm1", "warm2", "window2"], choices=sorted(VARIANTS))
    parser.add_argument("--work", default="/tmp/continuous_training", help="scratch directory (replaced)")
    parser.add_argument("--json", help="also write every record here")
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    with run_log.RunLog(args.work) as log:  # the libraries' output: into <work>/logs, not the console
        print(f"library log: {log.path}", flush=True)
        results = run(args)
    report(results, args, list(range(2, args.spans + 1)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": {str(k): v for k, v in results.items()}}, f, indent=1)


def run(args):
    data = dataclasses.replace(synthetic.SyntheticConfig(), num_requests=args.requests)
    spans_dir = os.path.join(args.work, "spans")
    synthetic.write_spans(data, spans_dir, args.spans, drift=args.drift)
    later = list(range(2, args.spans + 1))
    results = {}  # seed → variant → records (span 1's record first)
    for seed in args.seeds:
        base = with_training_seed(PipelineConfig(source="examples", examples_dir=spans_dir,
                                                 output_dir=os.path.join(args.work, f"seed{seed}", "span1")), seed)
        start = time.time()
        [first] = stream.run_stream(base, [1], show_progress=False, report=lambda line: None)
        print(f"seed {seed}: span 1 from scratch in {time.time() - start:.0f} s: "
              + json.dumps({k: round(v, 4) for k, v in first["model"].items() if v is not None}), flush=True)
        span1_config = base.replace(output_dir=os.path.join(base.output_dir, stream.RUN_DIR))
        frozen_uri = ranker_model_uri(span1_config, 1)
        results[seed] = {"frozen": [first] + [{"span": s, "seconds": 0.0, "model": frozen_metrics(
            frozen_uri, spans_dir, s, base)} for s in later]}
        for name in args.variants:
            out = os.path.join(args.work, f"seed{seed}", name)
            shutil.copytree(base.output_dir, out)
            config = variant_config(base.replace(output_dir=out), VARIANTS[name])
            records = stream.run_stream(config, later, show_progress=False, report=lambda line: None)
            results[seed][name] = [first] + records
            print(f"seed {seed}: {name}: " + "; ".join(
                f"span {r['span']} {r['seconds']:.0f} s AUC {r['model']['auc']:.4f} NE {r['model']['ne']:.4f}"
                for r in records), flush=True)
    return results


def report(results, args, later):
    seeds = list(results)
    variants = ["frozen", *args.variants]
    print(f"\nsynthetic spans: {args.requests} requests a span, drift {args.drift:g}, data seed 0; training seeds "
          f"{' '.join(map(str, seeds))}; {os.cpu_count()} cores. Mean ± std over the seeds; span 1 is the same "
          f"run for every variant")
    for key in METRICS:
        print(f"\n{key}")
        print("  " + f"{'variant':<10s}" + "".join(f"{'span ' + str(s):>20s}" for s in [1, *later]))
        for name in variants:
            cells = []
            for i, span in enumerate([1, *later]):
                values = [results[seed][name][i]["model"][key] for seed in seeds]
                cells.append(mean_std(values) if all(v is not None for v in values) else "–")
            print("  " + f"{name:<10s}" + "".join(f"{c:>20s}" for c in cells))
    print("\nwall time of a span's run (s), and its ratio to warm1's of the same seed")
    for name in args.variants:
        for i, span in enumerate(later, start=1):
            seconds = [results[seed][name][i]["seconds"] for seed in seeds]
            ratio = [results[seed][name][i]["seconds"] / results[seed]["warm1"][i]["seconds"] for seed in seeds
                     if "warm1" in results[seed]]
            print(f"  {name:<10s} span {span}: {mean_std(seconds, 1):>14s} s, ×{mean_std(ratio, 2)} of warm1 "
                  f"({SPAN_EPOCHS[name]} span-epochs)")
    print("\nprogressive validation: span t−1's ranker on span t (the CascadeEvaluator's baseline) against its "
          "held-out AUC on span t−1")
    for name in args.variants:
        for i, span in enumerate(later, start=1):
            # The baseline is the latest blessed ranker: span t−1's when it was blessed (its span is
            # recorded); the pair is that model on span t and on its own span's eval rows.
            pairs = [(r["baseline"]["auc"], results[seed][name][r["baseline_span"] - 1]["model"]["auc"])
                     for seed in seeds for r in [results[seed][name][i]] if r.get("baseline_span") == span - 1]
            if not pairs:
                print(f"  {name:<10s} span {span}: span {span - 1}'s ranker was not blessed in any seed")
                continue
            progressive, held_out = zip(*pairs)
            print(f"  {name:<10s} span {span}: progressive {mean_std(progressive)}, held-out {mean_std(held_out)}, "
                  f"gap {mean_std(np.subtract(progressive, held_out))} ({len(pairs)} of {len(seeds)} seeds blessed span "
                  f"{span - 1}'s ranker)")


if __name__ == "__main__":
    main()
