"""What each TFMA slice costs: the pipeline's own Evaluator config run alone on a finished run's
shown eval rows and ranker, once per set of slices, interleaved over `--rounds` rounds.

The EvalConfig is `components.cascade_evaluator.tfma_eval_config` as the pipeline builds it, with
`evaluator.tfma_slice_features` set to each variant below, and without the baseline model (as on
a first run). Each variant runs `tfma.run_model_analysis` (DirectRunner, in one process) on the
NegativeSampler's `shown_rows` eval split and the cascade Trainer's Model of a finished run, and
prints its seconds and its overall AUC, calibration and log loss (which must not depend on the slices):

    overall                       the default since session 15
    overall + ui_format
    overall + ui_position
    overall + ui_position + ui_format   the default before

    python bench/tfma_slices.py [--output-dir cascade_output] [--rounds 2] [--json FILE]

A lab figure on the pipeline's artifacts: TFMA's start-up is in every variant, as in the pipeline.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from input_rates import latest_artifact  # noqa: E402  (bench/ is the script's own directory)

VARIANTS = {
    "overall": (),
    "overall + ui_format": ("ui_format",),
    "overall + ui_position": ("ui_position",),
    "overall + ui_position + ui_format": ("ui_position", "ui_format"),
}


def run_variant(slices, model_dir: str, data_pattern: str):
    import tensorflow_model_analysis as tfma

    from cascade_ranking.components.cascade_evaluator import tfma_eval_config
    from cascade_ranking.components.evaluation import EvaluatorConfig

    config = tfma_eval_config(EvaluatorConfig(tfma_slice_features=slices))
    config = tfma.utils.update_eval_config_with_defaults(config, has_baseline=False, rubber_stamp=True)
    shared = tfma.default_eval_shared_model(eval_saved_model_path=model_dir, eval_config=config)
    out = tempfile.mkdtemp(prefix="tfma-slices-")
    start = time.perf_counter()
    tfma.run_model_analysis(eval_shared_model=shared, eval_config=config, data_location=data_pattern,
                            output_path=out, file_format="tfrecords")
    seconds = time.perf_counter() - start
    result = tfma.load_eval_result(out)
    overall = next(m for key, m in result.slicing_metrics if key == ())[""][""]
    figures = {name: round(float(next(iter(overall[name].values()))), 6)
               for name in ("auc", "calibration", "binary_crossentropy") if name in overall}
    return seconds, figures, len(result.slicing_metrics)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="cascade_output", help="a finished `cascade run`'s output dir")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    root = os.path.join(args.output_dir, "pipeline_root")
    model_dir = os.path.join(latest_artifact(os.path.join(root, "Trainer.cascade", "model", "*")), "Format-Serving")
    rows = os.path.join(latest_artifact(os.path.join(root, "NegativeSampler", "shown_rows", "*")), "Split-eval", "*")
    print(f"model {model_dir}\nrows {rows}", flush=True)
    times = {name: [] for name in VARIANTS}
    figures = {}
    for r in range(args.rounds):
        for name in (list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]):
            seconds, figures[name], slices = run_variant(VARIANTS[name], model_dir, rows)
            times[name].append(seconds)
            print(f"  round {r + 1}: {name}: {seconds:.1f} s, {slices} slice keys, overall {figures[name]}", flush=True)
    print("TFMA seconds per set of slices (median of the rounds):")
    for name in VARIANTS:
        print(f"  {name:36s} {statistics.median(times[name]):6.1f} s")
    if len({json.dumps(f, sort_keys=True) for f in figures.values()}) != 1:
        print("warning: the overall figures differ between variants")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model_dir, "rows": rows, "seconds": times, "overall": figures}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
