"""Batch size of a stage Trainer, chosen by measurement on a finished run's own artifacts.

Runs the Trainer's `run_fn` (what the pipeline's Trainer component calls) on the request lists of a
`cascade run` output directory, with the run's own custom_config (read from its MLMD store) and
only the batch size and seed changed. Prints, per batch size, mean ± std over the seeds of the
stage's eval metrics, the fit seconds (the sum of the epoch times) and the training rate in
request lists per second, and each rate as a ratio to the first size's (the reference, measured
in the same run).

    python bench/batch_sizes.py --run cascade_output --stage cascade --sizes 16,32,64 --seeds 0,1,2

Dataset: whatever the run trained on (the demo: synthetic, 5,000 requests, seed 0).
"""
import argparse
import glob
import json
import os
import statistics
import tempfile
import time

from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2
from tfx.components.trainer.fn_args_utils import FnArgs

from cascade_ranking.models.trainers import cascade, common, retrieval
from cascade_ranking.models.trainers.epoch_progress import EpochProgress

TRAINERS = {"cascade": (cascade, "cascade", ("e2e_recall", ("ranker", "auc"))),
            "retrieval": (retrieval, "retrieval", ("index_recall@100", "recall_retrieval@40"))}


def _custom_config(run_dir: str, stage: str) -> dict:
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = os.path.join(run_dir, "metadata.sqlite")
    store = metadata_store.MetadataStore(config)
    context = store.get_context_by_type_and_name("node", f"cascade-ranking.Trainer.{stage}")
    execution = store.get_executions_by_context(context.id)[-1]
    props = execution.custom_properties if "custom_config" in execution.custom_properties else execution.properties
    return json.loads(props["custom_config"].string_value)


def _metric(result: dict, key):
    if isinstance(key, tuple):
        for part in key:
            result = result[part]
        return result
    return result[key]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="cascade_output", help="a finished `cascade run` output directory")
    parser.add_argument("--stage", choices=sorted(TRAINERS), default="cascade")
    parser.add_argument("--sizes", default="16,32,64")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    module, key, metrics = TRAINERS[args.stage]
    custom = _custom_config(args.run, args.stage)
    lists = glob.glob(os.path.join(args.run, "pipeline_root", "NegativeSampler", "request_lists", "*"))[-1]
    schema = glob.glob(os.path.join(args.run, "pipeline_root", "ImportSchemaGen", "schema", "*", "schema.pbtxt"))[-1]
    epoch_seconds = []
    original = EpochProgress.on_epoch_end

    def timed(self, epoch, logs=None):
        epoch_seconds.append(time.time() - self._start)
        return original(self, epoch, logs)

    EpochProgress.on_epoch_end = timed
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        per_seed = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            config = {**json.loads(custom.get(key, "{}")), "batch_size": size, "seed": seed}
            with tempfile.TemporaryDirectory() as tmp:
                fn_args = FnArgs(train_files=[f"{lists}/Split-train/*"], eval_files=[f"{lists}/Split-eval/*"],
                                 serving_model_dir=f"{tmp}/serving", model_run_dir=f"{tmp}/run",
                                 custom_config={**custom, key: json.dumps(config)}, schema_path=schema)
                epoch_seconds.clear()
                module.run_fn(fn_args)
                with open(os.path.join(tmp, "run", common.EVAL_METRICS_FILE)) as f:
                    result = json.load(f)
                per_seed.append((sum(epoch_seconds), [_metric(result, m) for m in metrics], result))
        rows.append((size, per_seed))
    train_lists = sum(1 for _ in __import__("tensorflow").data.TFRecordDataset(
        glob.glob(f"{lists}/Split-train/*"), compression_type="GZIP"))
    print(f"{args.stage} Trainer batch sizes on {args.run} ({train_lists:,} train request lists), "
          f"seeds {args.seeds}, {os.cpu_count()} cores")
    reference = None
    for size, per_seed in rows:
        seconds = [s for s, _, _ in per_seed]
        epochs = len(epoch_seconds)
        rate = statistics.mean(epochs * train_lists / s for s in seconds)
        reference = reference or rate
        cells = []
        for i, name in enumerate(metrics):
            values = [m[i] for _, m, _ in per_seed]
            label = name if isinstance(name, str) else "/".join(name)
            cells.append(f"{label} {statistics.mean(values):.4f} ± {statistics.pstdev(values):.4f}")
        print(f"  batch {size:>4}: fit {statistics.mean(seconds):5.1f} ± {statistics.pstdev(seconds):.1f} s, "
              f"{rate:7,.0f} lists/s ({rate / reference:.2f}x); " + "; ".join(cells))


if __name__ == "__main__":
    main()
