"""`cascade`: the command line of cascade-ranking (thin: it parses flags and calls the library).

    cascade generate --out DIR --requests N --seed S      synthetic candidate rows
    cascade convert {movielens,obd} --src DIR --out DIR [--layout package|native|clicks]
                                                          real data as candidate rows
    cascade run [--config FILE] [--set K=V] [flags]       the cascade TFX pipeline, run locally
    cascade config [--config FILE] [--set K=V] [flags]    the effective PipelineConfig, as YAML
    cascade init --examples-dir DIR --out DIR [--lookup vocabulary]   a starter schema and config from your data
    cascade serve-check DIR                               load and call every pushed SavedModel
    cascade compile-kubeflow --out pipeline.json          the same pipeline as a KFP v2 spec
    cascade search --cost-target 0.85,0.9 --out DIR       the ranker's widths for FLOPs targets (a config each)

`run`, `config`, `compile-kubeflow` and `search` build one PipelineConfig the same way: its defaults, then a
YAML or JSON `--config` file, then each `--set a.b=value`, then the flags given (`pipeline_config`).

Bad arguments exit with code 2 and one line that names the problem.
"""
import argparse
import dataclasses
import importlib
import logging
import os
import sys
import time
import warnings
from typing import List, Optional

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump) and exit 2."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _cmd_generate(args) -> int:
    from cascade_ranking.datasources import synthetic

    config = synthetic.SyntheticConfig(num_requests=args.requests, seed=args.seed, preset=args.preset)
    if args.drift and args.spans is None:
        raise ValueError("--drift changes the world between spans: give --spans K too")
    start = time.time()
    if args.spans is None:
        report = synthetic.write_dataset(config, args.out, overwrite=args.overwrite)
        rows = sum(report["rows"].values())
        print(f"wrote {rows} candidate rows of {config.num_requests} requests to {args.out} "
              f"({report['rows']}) in {time.time() - start:.1f}s")
        return 0
    report = synthetic.write_spans(config, args.out, args.spans, drift=args.drift, overwrite=args.overwrite)
    rows = sum(sum(span["rows"].values()) for span in report["spans"].values())
    print(f"wrote {args.spans} spans of {config.num_requests} requests ({rows} candidate rows, drift {args.drift:g}) "
          f"to {args.out}/span-1 … span-{args.spans} in {time.time() - start:.1f}s")
    return 0


def _cmd_convert(args) -> int:
    from cascade_ranking.datasources.example_io import InputError

    start = time.time()
    if args.dataset == "movielens":
        from cascade_ranking.datasources.movielens import convert_movielens

        report = convert_movielens(args.src, args.out, seed=args.seed, overwrite=args.overwrite, layout=args.layout)
    else:
        if args.layout == "clicks":
            raise InputError("--layout clicks is only for movielens (the OBD is a log of shown rows: use native)")
        from cascade_ranking.datasources.open_bandit import convert_open_bandit

        report = convert_open_bandit(args.src, args.out, campaign=args.campaign, split=args.split,
                                     overwrite=args.overwrite, layout=args.layout)
    print(f"converted {args.dataset} ({args.layout} layout) from {args.src} to {args.out} in "
          f"{time.time() - start:.1f}s: rows {report.get('rows')}, requests {report.get('requests')}, "
          f"rejected {report.get('rejected', {})}")
    return 0


def pipeline_config(args, **where):
    """The PipelineConfig of `--config FILE` and `--set KEY=VALUE` (`pipelines.config.load_config`),
    then of the data and technique flags the user gave (`_add_pipeline_flags`), the same for
    `cascade run`, `cascade compile-kubeflow` and `cascade config`; `where` sets the runner's own
    fields (output_dir, beam_mode, ...) that are not None. Precedence: defaults < file < --set <
    flags."""
    from cascade_ranking.models.activations import get_activation
    from cascade_ranking.pipelines.config import load_config

    config = load_config(args.config, args.set or ())
    changes = {"source": args.source, "examples_dir": args.examples_dir, "span": args.span,
               "span_window": args.window}
    synthetic = config.synthetic
    if args.seed is not None:
        synthetic = dataclasses.replace(synthetic, seed=args.seed)
    if args.requests is not None:
        synthetic = dataclasses.replace(synthetic, num_requests=args.requests)
    ranker = config.ranker
    if args.activation is not None:
        get_activation(args.activation)  # an unknown name fails here, in one line, not in the Trainer
        ranker = ranker.replace(activation=args.activation)
    if args.rank_loss is not None:
        ranker = ranker.replace(rank_loss=args.rank_loss)
    if args.lspr:
        ranker = ranker.replace(lspr=True)
    if getattr(args, "optimizer", None) is not None:
        ranker = ranker.replace(optimizer=args.optimizer)
    if args.no_bias_constraints:
        ranker = ranker.replace(bias_constraints=False)
    if args.no_distill:
        ranker = ranker.replace(distill_weight=0.0)
    sampler, evaluator, cascade = config.sampler, config.evaluator, config.cascade
    for name in ("nonclick_keep_rate", "low_loss_keep_rate", "max_bad_fraction"):
        if getattr(args, name) is not None:
            sampler = dataclasses.replace(sampler, **{name: getattr(args, name)})
    if args.max_bad_fraction is not None:
        evaluator = dataclasses.replace(evaluator, max_bad_fraction=args.max_bad_fraction)
    if args.cascade_method is not None:
        cascade = dataclasses.replace(cascade, method=args.cascade_method)
    if args.epochs is not None:
        cascade = dataclasses.replace(cascade, epochs=args.epochs)
    changes.update(where)
    return config.replace(synthetic=synthetic, ranker=ranker, sampler=sampler, cascade=cascade, evaluator=evaluator,
                          **{name: value for name, value in changes.items() if value is not None})


def run_config(args):
    """The PipelineConfig of `cascade run`'s flags (and of `cascade config`'s, the same)."""
    return pipeline_config(args, output_dir=args.output_dir, beam_mode=args.beam_mode, beam_workers=args.workers,
                           enable_cache=False if args.no_cache else None, schema_file=args.schema_file)


def _cmd_run(args) -> int:
    from cascade_ranking.pipelines import local_runner, report, run_log

    config = run_config(args)
    config.validate()
    config.check_inputs()
    run_log.check_writable(config.output_dir)
    with run_log.RunLog(config.output_dir, startup=args.startup_output, verbose=args.verbose) as log:
        print(f"Running pipeline {config.pipeline_name} ({config.source} data, orchestrator {args.orchestrator}, "
              f"Beam {config.beam_mode_label()}) into {os.path.abspath(config.output_dir)}; library log: {log.path}")
        try:
            seconds, timings = local_runner.run_with_timings(config, orchestrator=args.orchestrator, check_inputs=False)
            result, served, checks, serve_failure, report_path = collect_and_report(config, seconds, timings,
                                                                                    args.serve_check)
        except Exception as error:
            raise run_log.explain_failure(error, config, log.path) from error
    print()
    print(f"Pipeline {config.pipeline_name} finished in {seconds:.1f}s.")
    if "evaluation" in result:
        evaluation = result["evaluation"]
        print(report.format_table(evaluation, config.evaluator.min_bucket_count))
        print(f"Plots: {result['evaluation_uri']}/calibration.png, recall_at_k.png")
        for line in filter(None, (report.training_data_line(result), report.flops_line(result))):
            print(line)
        if "tfma" in result:
            print(report.tfma_line(result["tfma"]))
        print("Blessings (each stage against the latest blessed model of that stage):")
        for line in report.blessing_lines(evaluation):
            print(line)
    print("Served SavedModels:" if served else "Served SavedModels: none")
    for stage, (path, pushed_now) in served.items():
        print(f"  {stage:<11} {path}" + ("" if pushed_now else "  (this run's model was not blessed: not pushed)"))
    for block in filter(None, (report.counts_block(result), report.data_warning_line(result))):
        print(block)
    if checks is not None:
        _print_serve_checks(checks)
    elif args.serve_check and serve_failure is None:
        print("serve-check: no model was pushed, nothing to check")
    print(f"Report: {report_path}")
    if serve_failure is not None:
        raise run_log.RunFailed(f"serve-check failed: {serve_failure}", EXIT_BAD_INPUT)
    return 0


STREAM_OUTPUT_DIR = "cascade_stream"


def _cmd_stream(args) -> int:
    from cascade_ranking.datasources import synthetic
    from cascade_ranking.pipelines import html_report, run_log, stream

    args.drift_given = args.drift is not None
    args.drift = stream.DEFAULT_DRIFT if args.drift is None else args.drift
    if args.output_dir is None:
        args.output_dir = STREAM_OUTPUT_DIR
    config = run_config(args)
    if config.span is not None:
        raise ValueError("cascade stream runs every span in order: --span picks one, for cascade run")
    numbers = None
    window = config.span_window  # a window of synthetic spans is checked once they are spans
    if config.source == "synthetic":
        config.replace(span_window=1).validate()
        synthetic.check_drift(args.drift)
    else:
        if args.drift_given:
            raise ValueError("--drift shapes synthetic spans: your own spans drift as they do")
        config.validate()
        numbers = stream.span_numbers(config, args.spans)
    run_log.check_writable(config.output_dir)
    with run_log.RunLog(config.output_dir, startup=args.startup_output, verbose=args.verbose) as log:
        if numbers is None:
            count = args.spans or 3
            print(f"writing {count} synthetic spans of {config.synthetic.num_requests} requests, drift {args.drift:g}, "
                  f"into {os.path.join(config.output_dir, stream.SPANS_DIR)}")
            spans_dir = stream.write_synthetic_spans(config, count, args.drift)
            config = config.replace(source="examples", examples_dir=spans_dir, span_window=window)
            numbers = stream.span_numbers(config)
        print(f"Streaming spans {', '.join(map(str, numbers))} of {config.examples_dir} into "
              f"{os.path.join(os.path.abspath(config.output_dir), stream.RUN_DIR)} (warm start: "
              f"{'on' if config.warm_start else 'off'}, training window: {config.span_window} span"
              f"{'s' if config.span_window > 1 else ''}); library log: {log.path}")
        try:
            records = stream.run_stream(config, numbers)
        except Exception as error:
            raise run_log.explain_failure(error, config, log.path) from error
        paths = stream.save(records, config.output_dir)
    print()
    print("Per span: the span's model on its eval rows, and the latest blessed ranker before it (trained on span "
          "'prev of span') on the same rows (progressive validation: a model scored on a span it has not trained on)")
    print(stream.format_records(records))
    print(f"Written: {paths['json']}, {paths['png']}")
    print(f"Report: {os.path.abspath(os.path.join(config.output_dir, stream.RUN_DIR, html_report.REPORT_FILE))}")
    return 0


def collect_and_report(config, seconds: float, timings, serve_check_wanted: bool):
    """After the pipeline: its results (`report.collect`), the served models, the serve-check of
    them when wanted, and report.html. A failed serve-check does not stop the report: it is
    written with the failure, and returned as its one-line message (`serve_failure`) for the
    caller to exit on once the table is printed.
    Returns (result, served, checks or None, serve_failure or None, report path)."""
    from cascade_ranking.pipelines import html_report, report

    result = report.collect(config)
    served = report.served_models(config)
    checks, serve_failure = None, None
    if serve_check_wanted and served:
        from cascade_ranking.pipelines import serve_check

        try:
            checks = serve_check.serve_check(config.output_dir,
                                             cache_file=os.path.join(config.output_dir, serve_check.CACHE_FILE))
        except serve_check.ServeCheckError as error:
            serve_failure = str(error).splitlines()[0] if str(error) else type(error).__name__
    report_path = html_report.write(config, result, seconds, timings, served, checks, serve_failure)
    return result, served, checks, serve_failure, report_path


def _print_serve_checks(checks) -> None:
    for check in checks:
        print(f"ok  {check.stage:<11} {check.path}" + ("  (unchanged since it passed this check)" if check.cached else ""))
        print(f"    warmup: {check.warmup_requests} PredictionLog replayed; signatures: {check.summary()}")
    print(f"serve-check passed: {len(checks)} models")


def _cmd_serve_check(args) -> int:
    from cascade_ranking.pipelines.serve_check import serve_check

    _print_serve_checks(serve_check(args.dir, args.examples, args.count))
    return 0


def compile_config(args):
    """The PipelineConfig of `cascade compile-kubeflow`'s flags: the same data and technique flags as
    `cascade run`, with the Kubeflow pipeline root and the schema path inside the image."""
    return pipeline_config(args, output_dir=args.pipeline_root, schema_file=args.schema_file)


def _cmd_compile_kubeflow(args) -> int:
    from cascade_ranking.pipelines import kubeflow_v2_runner

    config = compile_config(args)
    config.validate()
    path = kubeflow_v2_runner.compile_pipeline(config, args.out, image=args.image, project=args.project,
                                               region=args.region, temp_location=args.temp_location)
    print(f"wrote Kubeflow V2 pipeline spec to {path}")
    return 0


def _cost_targets(text: str):
    from cascade_ranking.pipelines.search import parse_cost_targets

    try:
        return parse_cost_targets(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _cmd_search(args) -> int:
    """`cascade search`: the ranking stage's width search per cost target (`pipelines.search`)."""
    from cascade_ranking.models.width_search import SearchConfig
    from cascade_ranking.pipelines import run_log, search

    config = pipeline_config(args)
    config.validate()
    config.check_inputs()
    overrides = {"steps": args.steps, "warmup_steps": args.warmup_steps, "gamma": args.gamma, "seed": args.search_seed}
    if args.steps is not None and args.warmup_steps is None:  # the default's share of warm-up
        overrides["warmup_steps"] = args.steps * SearchConfig.warmup_steps // SearchConfig.steps
    search_config = SearchConfig(**{k: v for k, v in overrides.items() if v is not None})
    run_log.check_writable(args.out)
    targets = ", ".join(search.target_name(t) for t in args.cost_target)
    with run_log.RunLog(args.out, startup=args.startup_output, verbose=args.verbose) as log:
        print(f"Searching the ranker's widths (Factory Floor §3.2) for cost targets {targets} on {config.source} data "
              f"into {os.path.abspath(args.out)}; library log: {log.path}", flush=True)
        try:
            results = search.run(config, args.cost_target, search_config, progress=lambda line: print(line, flush=True))
            paths = search.write_results(config, results, args.out)
        except Exception as error:
            raise run_log.explain_failure(error, config, log.path) from error
    print()
    print(search.format_table(results))
    print("Train one with: " + "; ".join(f"cascade run --config {paths[name]}" for name in paths if name.endswith(".yaml")))
    print(f"Summary: {paths[search.SUMMARY_FILE]}")
    return 0


def _keep_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a keep rate in (0, 1], got {text!r}")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a keep rate in (0, 1], got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {value}")
    return value


def _add_pipeline_flags(parser: argparse.ArgumentParser) -> None:
    """The data and technique flags of the pipeline: one set for `run` and `compile-kubeflow`, so
    the compiled pipeline is the one a user tried locally (`pipeline_config`)."""
    files = parser.add_argument_group("config (defaults < --config < --set < the flags below)")
    files.add_argument("--config", help="YAML or JSON file with any PipelineConfig fields (`cascade config --show` "
                                        "prints them all)")
    files.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override one field, e.g. --set ranker.epochs=2 --set sampler.list_size=80 (repeatable)")
    data = parser.add_argument_group("data")
    data.add_argument("--source", choices=("synthetic", "examples"),
                      help="built-in synthetic data (default), or an Examples dir of candidate rows (cascade generate/convert)")
    data.add_argument("--examples-dir", help="Examples directory for --source examples")
    data.add_argument("--span", type=_non_negative_int,
                      help="the span to read of an --examples-dir of spans (span-1/, span-2/, …; default: the newest)")
    data.add_argument("--window", type=_positive_int,
                      help="train on a rolling window of this many spans, ending at the run's span (default 1: the "
                           "span alone; the eval is the run's span's)")
    data.add_argument("--requests", type=_positive_int, help="synthetic requests (default: SyntheticConfig.num_requests)")
    data.add_argument("--seed", type=_non_negative_int, help="synthetic data seed (default 0)")
    data.add_argument("--max-bad-fraction", type=_fraction, default=None,
                      help="the run fails when more than this fraction of the rows is diverted to the dead letters "
                           "(bad records, rows of requests spanning splits, rows cut from over-long requests; "
                           "default: SamplerConfig.max_bad_fraction, 0.01)")
    techniques = parser.add_argument_group("techniques")
    techniques.add_argument("--epochs", type=_positive_int,
                            help="epochs of the joint pre-ranking + ranking training (default: CascadeTrainerConfig.epochs)")
    techniques.add_argument("--cascade-method", choices=("lcron", "bce", "icc", "hap"),
                            help="cascade loss of the joint pre-ranking + ranking training (LCRON, the independent-BCE / "
                                 "ICC baselines, or HAP's group-wise losses: light model on all groups, ranker on the hard ones)")
    techniques.add_argument("--rank-loss", choices=("multi_objective", "multi_task", "none"),
                            help="RankNet loss of the ranker (default multi_objective)")
    techniques.add_argument("--activation", help="ranker activation: relu (default), smelu, smelu:<beta>, gelu")
    techniques.add_argument("--no-distill", action="store_true", help="no distillation from the teacher")
    techniques.add_argument("--no-bias-constraints", action="store_true", help="no calibration duals in the ranker")
    techniques.add_argument("--lspr", action="store_true", help="LSPR perturbed copies in the ranker")
    from cascade_ranking.models.ranker_config import OPTIMIZERS  # light: no TensorFlow

    techniques.add_argument("--optimizer", choices=OPTIMIZERS,
                            help="the ranker's optimizer (ranker.optimizer; default adagrad): shampoo steps its dense "
                                 "weights with Shampoo grafted onto AdaGrad, its embedding tables with Adagrad")
    techniques.add_argument("--nonclick-keep-rate", type=_keep_rate,
                            help="class rebalancing: keep shown non-clicks at this rate, weight 1/rate (default 1)")
    techniques.add_argument("--low-loss-keep-rate", type=_keep_rate,
                            help="teacher-loss sampling: keep easy non-clicks at this rate, weight 1/rate (default 1)")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The local run's own flags (`run_config`); each defaults to the config's value."""
    run = parser.add_argument_group("local run")
    run.add_argument("--output-dir", help="pipeline root, MLMD store and serving dir (default cascade_output)")
    run.add_argument("--beam-mode", choices=("auto", "multi_processing", "in_process", "in_memory"),
                     help="DirectRunner mode of the Beam components (default auto: in_process up to "
                          "300,000 input rows, multi_processing above)")
    run.add_argument("--workers", type=_non_negative_int, help="DirectRunner workers (default 0: one per core)")
    run.add_argument("--no-cache", action="store_true", help="rerun every component")
    run.add_argument("--serve-check", action="store_true",
                     help="after the run, `cascade serve-check` its pushed models (a model that passed before is not loaded again)")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="show the libraries' log (TensorFlow, TFX, Beam workers) on the console too; it always "
                          "goes to <output dir>/logs/")
    run.add_argument("--schema-file", help="your schema.pbtxt (default: the packaged schema/schema.pbtxt); e.g. one "
                                           "without disallow_nan on a feature whose NaN may be read as 0")


def _cmd_init(args) -> int:
    from cascade_ranking.datasources import spans
    from cascade_ranking.pipelines.init_config import CONFIG_FILE, SCHEMA_FILE, check_inputs_and_outputs, infer
    from cascade_ranking.pipelines.run_log import RunLog

    check_inputs_and_outputs(args.examples_dir, args.out, args.overwrite)
    with RunLog(args.out, startup=args.startup_output) as log:  # TFDV's and Beam's output
        root = spans.split_root(args.examples_dir, None)
        print(f"computing TFDV statistics of {root}/Split-train (library log: {log.path})")
        report = infer(args.examples_dir, args.out, overwrite=args.overwrite, request_key=args.request_key,
                       label=args.label, request_time=args.request_time, lookup=args.lookup)
    for line in report.lines():
        print(line)
    print(f"wrote {os.path.join(args.out, SCHEMA_FILE)} and {os.path.join(args.out, CONFIG_FILE)}; "
          f"run: cascade run --config {os.path.join(args.out, CONFIG_FILE)}")
    return 0


def _cmd_config(args) -> int:
    from cascade_ranking.pipelines.config import dump_config

    config = run_config(args)
    config.validate()
    print(dump_config(config), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cascade", description="Cascade ranking models for TFX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="write synthetic candidate rows (train/eval splits)")
    gen.add_argument("--out", required=True, help="output directory (Split-train/, Split-eval/)")
    gen.add_argument("--requests", type=_positive_int, default=5_000, help="number of requests (50 rows each)")
    gen.add_argument("--seed", type=_non_negative_int, default=0, help="random seed")
    gen.add_argument("--preset", choices=("default", "hard"), default="default",
                     help="the generator's testbed knobs (datasources/synthetic.py): default, or hard (feature "
                          "crosses, positions confounded with relevance and a randomised eval slice, rare clicks, "
                          "long-tail ids)")
    gen.add_argument("--spans", type=_positive_int, default=None,
                     help="write K spans of --requests each, span-1/ … span-K/ (TFX's span convention), later ones "
                          "newer; without it, one Examples directory")
    gen.add_argument("--drift", type=float, default=0.0,
                     help="how much item popularity, user tastes and the position effect change from one span to "
                          "the next (0: none; 0.3 makes an older span's model stale)")
    gen.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    gen.set_defaults(func=_cmd_generate)

    conv = sub.add_parser("convert", help="convert a real dataset into candidate rows")
    conv.add_argument("dataset", choices=("movielens", "obd"))
    conv.add_argument("--src", required=True, help="source directory (e.g. ../shared/data/ml-latest-small)")
    conv.add_argument("--out", required=True, help="output directory")
    conv.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the sampled negatives (movielens)")
    conv.add_argument("--campaign", choices=("all", "men", "women"), default="all", help="OBD campaign")
    conv.add_argument("--split", choices=("time", "policy"), default="time",
                      help="OBD split: last 20%% by time, or train=bts / eval=random")
    conv.add_argument("--layout", choices=("package", "native", "clicks"), default="package",
                      help="package: the package's own 13 features (default); native: the dataset's own features "
                           "(then `cascade init` for a schema and config); clicks: movielens native features as a "
                           "clicks-only log (rated movies, no stage, no ui_position)")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    conv.set_defaults(func=_cmd_convert)

    run = sub.add_parser("run", help="run the cascade TFX pipeline locally")
    _add_pipeline_flags(run)
    _add_run_flags(run)
    run.add_argument("--orchestrator", choices=("local", "beam"), default="local",
                     help="TFX LocalDagRunner, or BeamDagRunner (the whole pipeline as a Beam pipeline)")
    run.set_defaults(func=_cmd_run)

    stream_parser = sub.add_parser("stream", help="run the pipeline span after span (warm starts, progressive "
                                                  "validation) and print the per-span table")
    _add_pipeline_flags(stream_parser)
    _add_run_flags(stream_parser)
    stream_parser.add_argument("--spans", type=_positive_int,
                               help="synthetic: how many spans to write and stream (default 3); your --examples-dir "
                                    "of spans: stream its first K (default all)")
    stream_parser.add_argument("--drift", type=float, default=None,
                               help="synthetic spans: how much the world changes from one span to the next (default 0.3)")
    stream_parser.set_defaults(func=_cmd_stream)

    init = sub.add_parser("init", help="infer a starter schema and config from your own Examples dir (TFDV)")
    init.add_argument("--examples-dir", required=True, help="Examples directory (Split-train/, Split-eval/)")
    init.add_argument("--out", required=True, help="where to write schema.pbtxt and cascade.yaml")
    init.add_argument("--overwrite", action="store_true", help="replace existing files")
    init.add_argument("--request-key", default="", help="your request key column (default: request_id, session_id, ...)")
    init.add_argument("--label", default="", help="your click label column (default: click, clicked, is_click, ...)")
    init.add_argument("--request-time", default="", help="your request time column (default: request_time, timestamp, ...)")
    init.add_argument("--lookup", choices=("hash", "vocabulary"), default="hash",
                      help="how id features become embedding rows: hash (buckets; the default) or vocabulary "
                           "(one row per id of the train split + OOV, computed by a TFX Transform step)")
    init.set_defaults(func=_cmd_init)

    show = sub.add_parser("config", help="print the effective PipelineConfig of a run's --config, --set and flags")
    _add_pipeline_flags(show)
    _add_run_flags(show)
    show.add_argument("--show", action="store_true", help="print it as YAML (the default action)")
    show.set_defaults(func=_cmd_config)

    check = sub.add_parser("serve-check", help="load each pushed SavedModel and call every signature")
    check.add_argument("dir", help="pipeline output dir (with serving/ and metadata.sqlite) or a serving dir")
    check.add_argument("--examples", help="eval tf.Example files (glob); default: the run's eval split")
    check.add_argument("--count", type=_positive_int, default=16, help="eval examples per call")
    check.set_defaults(func=_cmd_serve_check)

    kfp = sub.add_parser("compile-kubeflow", help="compile the pipeline to a Kubeflow V2 (KFP) JSON spec")
    _add_pipeline_flags(kfp)
    kfp.add_argument("--out", required=True, help="output JSON path")
    kfp.add_argument("--image", default="gcr.io/my-project/cascade-ranking:latest",
                     help="container image with this package installed (also the Vertex AI "
                          "training jobs' image unless training_cluster.image is set)")
    kfp.add_argument("--pipeline-root", default="gs://my-bucket/cascade-ranking", help="pipeline root (gs://...)")
    kfp.add_argument("--schema-file", default="/pipeline/schema/schema.pbtxt", help="schema.pbtxt path inside the image")
    kfp.add_argument("--project", default="my-project",
                     help="GCP project for Dataflow and the Vertex AI training jobs (unless training_cluster.vertex_project is set)")
    kfp.add_argument("--region", default="us-central1",
                     help="Dataflow and Vertex AI training region (unless training_cluster.vertex_region is set)")
    kfp.add_argument("--temp-location", help="Dataflow temp location (default: <pipeline root>/beam-tmp)")
    kfp.set_defaults(func=_cmd_compile_kubeflow)

    width = sub.add_parser("search", help="search the ranker's layer widths and embedding dimension for FLOPs "
                                          "targets (weight-sharing AutoML, Factory Floor §3.2)")
    width.add_argument("--cost-target", required=True, type=_cost_targets,
                       help="comma-separated FLOPs targets as fractions of the default ranker's, e.g. 0.85,0.9,0.95")
    width.add_argument("--out", required=True, help="output directory (ranker-T.yaml, search-T.json, summary.json, logs/)")
    _add_pipeline_flags(width)
    search_flags = width.add_argument_group("search (defaults: models.width_search.SearchConfig)")
    search_flags.add_argument("--steps", type=_positive_int, help="super-network steps per target (default 1000)")
    search_flags.add_argument("--warmup-steps", type=_non_negative_int,
                              help="first steps on uniformly sampled widths, the controller idle (default 30%% of the steps)")
    search_flags.add_argument("--gamma", type=float, help="weight γ < 0 of |cost/target - 1| in the reward (default -1)")
    search_flags.add_argument("--search-seed", type=_non_negative_int, help="seed of the search (default 0)")
    search_flags.add_argument("-v", "--verbose", action="store_true",
                              help="show the libraries' log on the console too; it always goes to <out>/logs/")
    width.set_defaults(func=_cmd_search)
    return parser


class _DropMessages(logging.Filter):
    """Drops log records whose message contains one of `fragments` (known library noise)."""

    def __init__(self, *fragments: str):
        super().__init__()
        self._fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self._fragments)


def _quiet_libraries() -> None:
    """Keeps TensorFlow's C++ start-up chatter, Google client deprecation notices and TFX's
    per-resolution notice about its own Resolver queries off the console."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("absl").addFilter(_DropMessages("ArtifactQuery.property_predicate is not supported"))


def main(argv: Optional[List[str]] = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    from cascade_ranking.pipelines.run_log import RunFailed, StartupOutput

    with StartupOutput() as startup:  # TensorFlow's C++ start-up lines: into the run log, not the console
        importlib.import_module("tensorflow")
        from cascade_ranking.datasources.example_io import InputError
        from cascade_ranking.pipelines.run_lock import OutputDirInUse
    args.startup_output = startup.text

    try:
        return args.func(args)
    except RunFailed as e:  # `cascade run`: explained in one line, the traceback is in the run log
        print(f"cascade {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except (InputError, FileNotFoundError, ValueError, OutputDirInUse) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"cascade {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
