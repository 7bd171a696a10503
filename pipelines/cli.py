"""`cascade`: the command line of cascade-ranking (thin: it parses flags and calls the library).

    cascade generate --out DIR --requests N --seed S      synthetic candidate rows
    cascade convert {movielens,obd} --src DIR --out DIR   real data into the same schema
    cascade run [--source synthetic|examples] ...         the local TFX pipeline
    cascade compile-kubeflow --out pipeline.json          the same pipeline as a KFP v2 spec

Bad arguments exit with code 2 and one line that names the problem.
"""
import argparse
import dataclasses
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
    from datasources import synthetic

    config = synthetic.SyntheticConfig(num_requests=args.requests, seed=args.seed)
    start = time.time()
    report = synthetic.write_dataset(config, args.out, overwrite=args.overwrite)
    seconds = time.time() - start
    rows = sum(report["rows"].values())
    print(f"wrote {rows} candidate rows of {config.num_requests} requests to {args.out} "
          f"({report['rows']}) in {seconds:.1f}s")
    return 0


def _cmd_convert(args) -> int:
    if args.dataset == "movielens":
        from datasources.movielens import convert_movielens

        report = convert_movielens(args.src, args.out, seed=args.seed, overwrite=args.overwrite)
    else:
        from datasources.open_bandit import convert_open_bandit

        report = convert_open_bandit(args.src, args.out, campaign=args.campaign, split=args.split, overwrite=args.overwrite)
    print(f"converted {args.dataset} from {args.src} to {args.out}: rows {report.get('rows')}, "
          f"rejected {report.get('rejected', {})}")
    return 0


def _cmd_run(args) -> int:
    from datasources.synthetic import SyntheticConfig
    from models.ranker_config import RankerConfig
    from pipelines import local_runner, report
    from pipelines.config import PipelineConfig

    synthetic_config = SyntheticConfig(seed=args.seed)
    if args.requests is not None:
        synthetic_config = dataclasses.replace(synthetic_config, num_requests=args.requests)
    ranker_config = RankerConfig()
    if args.epochs is not None:
        ranker_config = ranker_config.replace(epochs=args.epochs)
    config = PipelineConfig(
        output_dir=args.output_dir,
        source=args.source,
        examples_dir=args.examples_dir,
        synthetic=synthetic_config,
        ranker=ranker_config,
        beam_mode=args.beam_mode,
        enable_cache=not args.no_cache,
    )
    config.validate()
    seconds = local_runner.run(config)
    result = report.collect(config, "ranking")
    print()
    print(f"Pipeline {config.pipeline_name} finished in {seconds:.1f}s ({args.source} data).")
    print(report.format_table([result]))
    print(f"Pushed SavedModel: {result.get('pushed_model', '(none)')}")
    return 0


def _cmd_compile_kubeflow(args) -> int:
    from pipelines import kubeflow_v2_runner
    from pipelines.config import PipelineConfig

    config = PipelineConfig(output_dir=args.pipeline_root, schema_file=args.schema_file)
    config.validate()
    path = kubeflow_v2_runner.compile_pipeline(config, args.out, image=args.image, project=args.project,
                                               region=args.region, temp_location=args.temp_location)
    print(f"wrote Kubeflow V2 pipeline spec to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cascade", description="Cascade ranking models for TFX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="write synthetic candidate rows (train/eval splits)")
    gen.add_argument("--out", required=True, help="output directory (Split-train/, Split-eval/)")
    gen.add_argument("--requests", type=_positive_int, default=5_000, help="number of requests (50 rows each)")
    gen.add_argument("--seed", type=_non_negative_int, default=0, help="random seed")
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
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    conv.set_defaults(func=_cmd_convert)

    run = sub.add_parser("run", help="run the local TFX pipeline")
    run.add_argument("--source", choices=("synthetic", "examples"), default="synthetic")
    run.add_argument("--examples-dir", help="Examples directory for --source examples")
    run.add_argument("--requests", type=_positive_int, help="synthetic requests (default: SyntheticConfig.num_requests)")
    run.add_argument("--seed", type=_non_negative_int, default=0, help="synthetic data seed")
    run.add_argument("--epochs", type=_positive_int, help="ranker training epochs (default: RankerConfig.epochs)")
    run.add_argument("--output-dir", default="cascade_output", help="pipeline root, MLMD store and serving dir")
    run.add_argument("--beam-mode", choices=("in_process", "in_memory", "multi_processing"), default="in_process")
    run.add_argument("--no-cache", action="store_true", help="rerun every component")
    run.set_defaults(func=_cmd_run)
    kfp = sub.add_parser("compile-kubeflow", help="compile the pipeline to a Kubeflow V2 (KFP) JSON spec")
    kfp.add_argument("--out", required=True, help="output JSON path")
    kfp.add_argument("--image", default="gcr.io/my-project/cascade-ranking:latest",
                     help="container image with this package installed")
    kfp.add_argument("--pipeline-root", default="gs://my-bucket/cascade-ranking", help="pipeline root (gs://...)")
    kfp.add_argument("--schema-file", default="/pipeline/schema/schema.pbtxt", help="schema.pbtxt path inside the image")
    kfp.add_argument("--project", default="my-project", help="GCP project for Dataflow")
    kfp.add_argument("--region", default="us-central1", help="Dataflow region")
    kfp.add_argument("--temp-location", help="Dataflow temp location (default: <pipeline root>/beam-tmp)")
    kfp.set_defaults(func=_cmd_compile_kubeflow)
    return parser


def _quiet_libraries() -> None:
    """Keeps TensorFlow's C++ start-up chatter and Google client deprecation notices off the console."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: Optional[List[str]] = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    from datasources.example_io import InputError

    try:
        return args.func(args)
    except (InputError, FileNotFoundError, ValueError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"cascade {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
