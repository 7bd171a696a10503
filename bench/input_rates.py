"""Each list- or row-trained Trainer of a finished pipeline run: its input pipeline's rate against
the rate its training consumed that input (issue 16's goal: the input at ≥ 2× the Trainer's rate).

Both sides are the pipeline's own, read from a finished `cascade run` (default: `cascade_output`):

- **Trainer rate**: from the Trainer's TensorBoard log in its ModelRun (`logs/train/events*`), the
  shortest wall time between the summaries of two consecutive epochs is an epoch's duration (the
  fastest epoch: the highest training rate, so the ratio is the least flattering); the epoch
  consumed the Trainer's whole train input (the teacher's shown rows, the cascade's request lists),
  counted here by a pass over that input. This is the rate of `Model.fit` with the input pipeline
  running beside it (prefetched), as in the run. The teacher's later epochs read its cache.
- **Input rate**: the same input function the Trainer calls, on the same files, with the same
  batch size, consumed in-graph (`Dataset.reduce`), best of `--repeats` passes:
    teacher   `models.inputs.shown_row_batches(train rows, 256, the schema's parse spec, shuffle_seed=0)`
              read from the files (its first epoch, and every epoch of a split over cache_train_mb),
              and the same from memory once cached (`cache=True`: its later epochs);
    cascade   `models.list_inputs.request_list_dataset(train lists, 16, list size)`;
    retrieval `models.retrieval.streamed_pair_dataset(train lists, list size, 256, the split's
              positive counts, its uniform negatives, shuffle_seed=0)`: the pairs streamed from the
              lists with the sampled negatives of each batch. Its one read of the lists before
              training (`read_train_split`: counts, corpus, normaliser sample) is timed beside it.

    python bench/input_rates.py [--output-dir cascade_output] [--repeats 3] [--json FILE]

Lab figures on the pipeline's artifacts; the training side is the run's own.
"""
import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def latest_artifact(pattern: str) -> str:
    """The artifact directory matching `pattern` with the highest numeric name (TFX's execution id);
    also used by `bench/tfma_slices.py`."""
    paths = sorted((p for p in glob.glob(pattern) if os.path.basename(p.rstrip("/")).isdigit()),
                   key=lambda p: int(os.path.basename(p.rstrip("/"))))
    if not paths:
        raise SystemExit(f"nothing matches {pattern}: run the pipeline first (make demo, or cascade run --output-dir DIR)")
    return paths[-1]


def fastest_epoch_seconds(model_run_dir: str) -> float:
    """The shortest wall time between consecutive epoch summaries of a Keras TensorBoard log."""
    import tensorflow as tf

    times = {}
    for path in glob.glob(os.path.join(model_run_dir, "logs", "train", "events*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            if any(v.tag == "epoch_loss" for v in event.summary.value):
                times[event.step] = event.wall_time
    if len(times) < 2:
        raise SystemExit(f"input_rates: {model_run_dir} logs fewer than two epochs")
    steps = sorted(times)
    return min(times[b] - times[a] for a, b in zip(steps, steps[1:]))


def timed_pass(dataset_fn, count_fn, repeats: int):
    """(best seconds, examples) of full passes of `dataset_fn()` reduced in-graph."""
    import tensorflow as tf

    best, examples = float("inf"), None
    for _ in range(repeats):
        dataset = dataset_fn()
        start = time.perf_counter()
        total = dataset.reduce(tf.constant(0, tf.int64), lambda n, batch: n + count_fn(batch))
        examples = int(total.numpy())
        best = min(best, time.perf_counter() - start)
    return best, examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="cascade_output")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()

    import tensorflow as tf

    from cascade_ranking.models import inputs
    from cascade_ranking.models import list_inputs as LI
    from cascade_ranking.models import retrieval as R
    from cascade_ranking.models.ranker_config import RankerConfig
    from cascade_ranking.models.trainers import retrieval as retrieval_trainer
    from cascade_ranking.schema import features as F

    root = os.path.join(args.output_dir, "pipeline_root")
    rows = os.path.join(latest_artifact(os.path.join(root, "SyntheticExampleGen", "examples", "*")), "Split-train", "*")
    lists_dir = latest_artifact(os.path.join(root, "NegativeSampler", "request_lists", "*"))
    train_lists = [os.path.join(lists_dir, "Split-train", "*")]
    schema = F.load_schema(os.path.join(latest_artifact(os.path.join(root, "ImportSchemaGen", "schema", "*")), "schema.pbtxt"))
    list_size = LI.list_size_in(train_lists)
    out = {"output_dir": os.path.abspath(args.output_dir), "stages": {}}

    spec = F.training_parse_spec(schema)
    count_rows = lambda b: tf.cast(tf.shape(b[F.LABEL_KEY])[0], tf.int64)  # noqa: E731
    seconds, count = timed_pass(lambda: inputs.shown_row_batches([rows], 256, parse_spec=spec, shuffle_seed=0),
                                count_rows, args.repeats)
    epoch = fastest_epoch_seconds(latest_artifact(os.path.join(root, "Trainer.teacher", "model_run", "*")))
    cached = inputs.shown_row_batches([rows], 256, parse_spec=spec, shuffle_seed=0, cache=True)
    timed_pass(lambda: cached, count_rows, 1)  # the first pass fills the cache
    cached_seconds, _ = timed_pass(lambda: cached, count_rows, args.repeats)
    out["stages"]["teacher"] = {"examples": "shown candidate rows", "per_epoch": count, "input_seconds": seconds,
                                "input_per_s": count / seconds, "epoch_seconds": epoch, "trainer_per_s": count / epoch,
                                "cached_input_seconds": cached_seconds, "cached_input_per_s": count / cached_seconds}

    seconds, count = timed_pass(lambda: LI.request_list_dataset(train_lists, 16, list_size),
                                lambda b: tf.cast(tf.shape(b["mask"])[0], tf.int64), args.repeats)
    epoch = fastest_epoch_seconds(latest_artifact(os.path.join(root, "Trainer.cascade", "model_run", "*")))
    out["stages"]["cascade"] = {"examples": "request lists", "per_epoch": count, "input_seconds": seconds,
                                "input_per_s": count / seconds, "epoch_seconds": epoch, "trainer_per_s": count / epoch}

    start = time.perf_counter()
    split = retrieval_trainer.read_train_split(train_lists, list_size)
    read = time.perf_counter() - start
    config = retrieval_trainer.RetrievalTrainerConfig()
    batch_size = min(config.batch_size, split.positives.total)
    negatives = R.UniformNegatives(split.corpus, config.num_negatives, config.seed) if config.num_negatives else None
    seconds, count = timed_pass(
        lambda: R.streamed_pair_dataset(train_lists, list_size, batch_size, split.positives, negatives, shuffle_seed=0),
        lambda b: tf.cast(tf.shape(b["sampling_probability"])[0], tf.int64), args.repeats)
    epoch = fastest_epoch_seconds(latest_artifact(os.path.join(root, "Trainer.retrieval", "model_run", "*")))
    out["stages"]["retrieval"] = {"examples": "(request, GT item) pairs", "per_epoch": count, "input_seconds": seconds,
                                  "input_per_s": count / seconds, "epoch_seconds": epoch, "trainer_per_s": count / epoch,
                                  "read_seconds": read}

    print(f"input pipelines against their Trainers' consumption, run {out['output_dir']}")
    print(f"{'trainer':<10} {'examples':<22} {'per epoch':>10} {'input /s':>10} {'trainer /s':>11} {'ratio':>6}")
    for name in ("teacher", "cascade", "retrieval"):
        s = out["stages"][name]
        s["ratio"] = s["input_per_s"] / s["trainer_per_s"]
        print(f"{name:<10} {s['examples']:<22} {s['per_epoch']:>10,} {s['input_per_s']:>10,.0f} "
              f"{s['trainer_per_s']:>11,.0f} {s['ratio']:>6.1f}")
    t = out["stages"]["teacher"]
    fits = inputs.cache_fits([rows], RankerConfig.teacher().cache_train_mb)
    print(f"teacher    from memory ({'its later epochs' if fits else 'not used: the split is over cache_train_mb'}): "
          f"{t['cached_input_per_s']:,.0f}/s, {t['cached_input_per_s'] / t['trainer_per_s']:.1f}x")
    r = out["stages"]["retrieval"]
    print(f"retrieval  read once before training (counts, corpus, normaliser sample): {r['read_seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
