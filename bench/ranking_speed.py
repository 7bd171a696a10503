"""Speed of the Factory Floor ranker against a plain TFRS DCN ranking model, measured side by side.

Prints three ratios, each against a reference measured in the same run on this machine:
  1. training examples/s of the full ranker (RankerConfig defaults: Q·U, DCNv2, rank loss,
     bias constraints, ...) / those of a plain TFRS DCN ranking model of the same width
     (same FeatureEmbedding, the same cross layers as `tfrs.layers.dcn.Cross`, the same DNN,
     `tfrs.tasks.Ranking`), same batches, same optimizer.               goal >= 1.0 (issue 16)
     and / those of the baseline DNN of the same width (`RankerConfig.plain()`, §1's
     "baseline"), timed in the same rounds.                             goal >= 0.8 (issue 16)
  2. time of `serving_default` on the 100 × 50 (ad, UI) pair examples / time of `score_ui_grid`
     on 100 ad examples + 50 UI treatments (int64 ui_position, ui_format; Q once per ad, U from
     the exported cache), reloaded SavedModel.                          goal >= 30×
     (also printed at 500 × 50, to show how the ratio grows with the grid)
  3. SavedModel p50 latency of `serving_default` for 1 request × N candidates, ranker / plain
     TFRS DCN SavedModel, for each N of --latency-candidates (default 50 and 500; the first N eval
     rows make the request).                                             goal <= 1.25× at N = 500
Timings interleave the models (in 1. ABC CBA..., in 3. call by call) and report medians (for 1.,
the median of the per-round ratios; in 3. the ratio of the two p50s), so that both share the noise
of a CPU shared with other work; in 2. each timing is a block of 5 consecutive calls of one
signature, so that a small call is not timed right after a big one. 2. also prints where the grid's
time goes (call overhead, parsing the ads, parse + Q). In 3. the candidate counts are measured one
after the other, each with its own warm-up (10 calls of each model) and --calls timed calls of each.
--json PATH also writes every printed figure: [1] train examples/s of both models, rows per batch
and ratio per batch size and variant; [2] per grid size the naive and grid times, the speed-up, the
max |grid − naive| and the time of each part; [3] per candidate count the p50 of both models and
their ratio.

    python bench/ranking_speed.py [--data DIR] [--requests 2000] [--steps 20] [--rounds 20] [--calls 100] [--ablations]
                                  [--sections 1 2 3] [--latency-candidates 50 500] [--json PATH]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from cascade_ranking.datasources import synthetic
from cascade_ranking.models import export, inputs, ranker, ranker_export
from cascade_ranking.models.embedding import FeatureEmbedding
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.schema import features as F


class PlainDCN(tfrs.Model):
    """Reference: embeddings of every input -> tfrs Cross × L -> DNN -> logit, tfrs Ranking task."""

    def __init__(self, config: RankerConfig):
        super().__init__()
        self.embedding = FeatureEmbedding(config.embedding_dim)
        self.crosses = [tfrs.layers.dcn.Cross(projection_dim=config.cross_projection_dim)
                        for _ in range(config.cross_layers)]
        self.hidden = [tf.keras.layers.Dense(u, activation="relu") for u in config.hidden_units]
        self.logit = tf.keras.layers.Dense(1)
        self.task = tfrs.tasks.Ranking(loss=tf.keras.losses.BinaryCrossentropy(from_logits=True))

    def call(self, features, training=None):
        embedded = self.embedding(features, training=training)
        x0 = tf.concat([embedded[n] for n in F.MODEL_INPUTS], axis=-1)
        x = x0
        for cross in self.crosses:
            x = cross(x0, x)
        for layer in self.hidden:
            x = layer(x)
        return self.logit(x)

    def compute_loss(self, features, training=False):
        logit = self(features, training=training)
        return self.task(labels=tf.cast(features[F.LABEL_KEY], tf.float32), predictions=logit,
                         sample_weight=features[F.SAMPLE_WEIGHT_KEY])


BLOCK = 5  # consecutive serving calls per timing block in [2]


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_throughput(config, batches, steps, rounds):
    """Median examples/s over `rounds` interleaved timings of `steps` train steps per model: the
    ranker of `config`, the plain TFRS DCN of its width and the baseline DNN of its width (the
    ranker with every technique off, `RankerConfig.plain()`: the "baseline" of §1's ablations);
    and the medians of the per-round ratios ranker / plain DCN and ranker / baseline DNN."""
    models = {"ranker": ranker.FactoryFloorRanker(config), "plain_dcn": PlainDCN(config),
              "baseline_dnn": ranker.FactoryFloorRanker(RankerConfig.plain(
                  embedding_dim=config.embedding_dim, hidden_units=config.hidden_units, optimizer=config.optimizer,
                  learning_rate=config.learning_rate))}
    fns = {}
    ds = cached_dataset(batches)
    for name, model in models.items():
        model.embedding.adapt(ds, 10)
        if name == "plain_dcn":
            model.compile(optimizer=ranker.make_optimizer(config))
        else:
            model.compile()
        fns[name] = model.make_train_function()
    ds = ds.repeat().prefetch(8)
    rows = sum(int(b[F.LABEL_KEY].shape[0]) for b in batches) / len(batches)
    iterators = {name: iter(ds) for name in models}
    for name in models:  # trace and warm up
        for _ in range(10):
            fns[name](iterators[name])
    rates = {name: [] for name in models}
    for r in range(rounds):
        for name in (models if r % 2 == 0 else list(models)[::-1]):  # ABC CBA order
            seconds = timed(lambda: [fns[name](iterators[name]) for _ in range(steps)])
            rates[name].append(steps * rows / seconds)
    ratios = {reference: statistics.median([a / b for a, b in zip(rates["ranker"], rates[reference])])
              for reference in ("plain_dcn", "baseline_dnn")}
    return {name: statistics.median(v) for name, v in rates.items()}, rows, ratios


def cached_dataset(batches):
    """`batches` as a dataset served from tf.data's in-memory cache (filled here): no Python runs per
    step, so a fixed feeding cost does not pull the ratio of two models towards 1."""
    ds = tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=spec_of(batches[0])).cache()
    for _ in ds:  # one pass fills the cache
        pass
    return ds


def spec_of(batch):
    return {k: tf.RaggedTensorSpec([None, None], v.dtype, ragged_rank=1, row_splits_dtype=v.row_splits.dtype)
            if isinstance(v, tf.RaggedTensor) else tf.TensorSpec([None] + list(v.shape[1:]), v.dtype)
            for k, v in batch.items()}


def p50_ms(fn, calls):
    times = []
    for _ in range(calls):
        times.append(timed(fn) * 1000)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="Examples dir with Split-train/Split-eval (default: generate synthetic)")
    parser.add_argument("--requests", type=int, default=2_000, help="requests to generate (without --data)")
    parser.add_argument("--steps", type=int, default=20, help="train steps per timing round")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds (ratio: median of per-round ratios)")
    parser.add_argument("--calls", type=int, default=100, help="serving calls per timing")
    parser.add_argument("--ablations", action="store_true", help="also time the ranker without rank loss / bias")
    parser.add_argument("--requests-per-batch", type=int, nargs="+", default=[RankerConfig().requests_per_batch, 50])
    parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3], help="which figures to measure")
    parser.add_argument("--latency-candidates", type=int, nargs="+", default=[50, 500],
                        help="candidates per request in [3] (one latency figure per count)")
    parser.add_argument("--json", help="also write every printed figure here")
    args = parser.parse_args(argv)
    if min(args.latency_candidates) < 1:
        parser.error("--latency-candidates must be >= 1")

    tmp = tempfile.mkdtemp(prefix="ranking-speed-")
    data_dir = args.data
    if data_dir is None:
        data_dir = os.path.join(tmp, "synthetic")
        synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=args.requests), data_dir)
    config = RankerConfig()
    print(f"dataset: synthetic ({data_dir}); ranker config: {config.to_json()}")
    print(f"machine: {os.cpu_count()} CPU cores visible; TF {tf.__version__}, TFRS {tfrs.__version__}")
    report = {"machine": {"cpus": os.cpu_count(), "tf": tf.__version__, "tfrs": tfrs.__version__},
              "args": vars(args), "ranker_config": config.to_dict(),
              "train": [], "grid": [], "latency": []}

    def finish():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        tf.io.gfile.rmtree(tmp)
        return 0

    # 1. Training throughput.
    train_dir = os.path.join(data_dir, "Split-train")
    variants = {"full": config}
    if args.ablations:
        variants.update(no_rank=config.replace(rank_loss="none"), no_bias=config.replace(bias_constraints=False),
                        no_rank_no_bias=config.replace(rank_loss="none", bias_constraints=False))
    for rpb in args.requests_per_batch if 1 in args.sections else ():
        batches = list(ranker.request_batches([train_dir], rpb, exposed_only=True).take(50))
        for name, variant in variants.items():
            rates, rows, ratios = train_throughput(variant, batches, args.steps, args.rounds)
            ratio, to_baseline = ratios["plain_dcn"], ratios["baseline_dnn"]
            goal = (f" (goals: >= 1.0x the plain DCN, {'meets' if ratio >= 1.0 else 'misses'}; >= 0.8x the baseline "
                    f"DNN, {'meets' if to_baseline >= 0.8 else 'misses'})") if name == "full" else ""
            print(f"[1] train examples/s, batches of {rpb} requests (~{rows:.0f} shown rows), ranker {name}: "
                  f"{rates['ranker']:.0f}, plain TFRS DCN {rates['plain_dcn']:.0f}, baseline DNN "
                  f"{rates['baseline_dnn']:.0f}; ratio to the DCN {ratio:.2f}, to the DNN {to_baseline:.2f}{goal}",
                  flush=True)
            report["train"].append({"requests_per_batch": rpb, "variant": name, "rows_per_batch": rows,
                                    "ranker_examples_per_s": rates["ranker"],
                                    "plain_dcn_examples_per_s": rates["plain_dcn"],
                                    "baseline_dnn_examples_per_s": rates["baseline_dnn"], "ratio": ratio,
                                    "ratio_to_baseline_dnn": to_baseline})

    # Trained models to serve (a short fit: speed does not depend on the weights).
    train = ranker.request_batches([train_dir], config.requests_per_batch, shuffle_seed=0).take(50)
    model = ranker.build_and_train(config, train, epochs=1)
    dcn = PlainDCN(config)
    dcn.embedding.adapt(train, 10)
    dcn.compile(optimizer=ranker.make_optimizer(config))
    dcn.fit(train, epochs=1, verbose=0)
    needed = max([8] + ([500] if 2 in args.sections else []) + (args.latency_candidates if 3 in args.sections else []))
    eval_rows = [e for e in tf.data.TFRecordDataset(inputs.list_files([os.path.join(data_dir, "Split-eval")]),
                                                    compression_type="GZIP").take(needed).as_numpy_iterator()]
    if len(eval_rows) < needed:
        raise SystemExit(f"the eval split has {len(eval_rows)} rows; [2]/[3] need {needed} (more --requests)")
    ranker_dir, dcn_dir = os.path.join(tmp, "ranker", "1"), os.path.join(tmp, "dcn", "1")
    ranker_export.export_ranker(model, ranker_dir, eval_rows[:8])
    export.export_saved_model(dcn, dcn_dir, eval_rows[:8])
    served, served_dcn = tf.saved_model.load(ranker_dir), tf.saved_model.load(dcn_dir)

    # 2. Grid scoring vs naive pairs, 100 ads × 50 UI treatments (and 500 × 50 for the scaling).
    treatments = [(1 + i % F.MAX_UI_POSITION, (i // F.MAX_UI_POSITION) % F.NUM_UI_FORMATS) for i in range(50)]

    def with_ui(example, position, fmt):
        e = tf.train.Example()
        e.CopyFrom(example)
        e.features.feature["ui_position"].int64_list.value[:] = [position]
        e.features.feature["ui_format"].int64_list.value[:] = [fmt]
        return e.SerializeToString()

    ui_ids = {"ui_position": tf.constant([p for p, _ in treatments], tf.int64),
              "ui_format": tf.constant([f for _, f in treatments], tf.int64)}
    parts_module = tf.Module()
    q_spec = ranker_export.quality_parse_spec(model)
    examples_spec = tf.TensorSpec([None], tf.string, name=export.SERVING_INPUT_KEY)
    tf.saved_model.save(parts_module, os.path.join(tmp, "parts"), signatures={
        "empty": tf.function(lambda examples: {"n": tf.shape(examples)}, input_signature=[examples_spec]),
        "parse": tf.function(lambda examples: {"user_id": export.parse_examples(examples, q_spec)["user_id"]},
                             input_signature=[examples_spec])})
    parts = tf.saved_model.load(os.path.join(tmp, "parts"))
    grid_fn = served.signatures["score_ui_grid"]
    naive_fn = served.signatures["serving_default"]
    for num_ads in (100, 500) if 2 in args.sections else ():
        ads = [tf.train.Example.FromString(e) for e in eval_rows[:num_ads]]
        pairs = tf.constant([with_ui(a, p, f) for a in ads for p, f in treatments])
        ad_examples = tf.constant([a.SerializeToString() for a in ads])
        grid_out = grid_fn(ad_examples=ad_examples, **ui_ids)["ctr"].numpy()
        naive_out = naive_fn(examples=pairs)["ctr"].numpy().reshape(grid_out.shape)
        calls = {"naive": lambda: naive_fn(examples=pairs),
                 "grid": lambda: grid_fn(ad_examples=ad_examples, **ui_ids)}
        if num_ads == 100:  # where the grid's time goes: reloaded signatures doing a part of it each
            calls.update({"call overhead (empty signature)": lambda: parts.signatures["empty"](examples=ad_examples),
                          "parse ads (quality spec, checked)": lambda: parts.signatures["parse"](examples=ad_examples),
                          "parse + Q (`quality` signature)": lambda: served.signatures["quality"](examples=ad_examples)})
        times = {name: [] for name in calls}
        for _ in range(3):  # warm up
            for fn in calls.values():
                fn()
        # Rounds of blocks of BLOCK consecutive calls per function (order reversed every other round):
        # a lone small call right after a big one pays for the big call's cold caches and parked
        # threads, which is not the steady state of either. The per-call time is the median block / BLOCK.
        for r in range(max(args.calls // 5, 10)):
            for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                times[name].append(timed(lambda: [calls[name]() for _ in range(BLOCK)]) / BLOCK)
        naive_times, grid_times = times["naive"], times["grid"]
        speedup = statistics.median(naive_times) / statistics.median(grid_times)
        goal = f" (goal >= 30×: {'meets' if speedup >= 30 else 'misses'})" if num_ads == 100 else " (scaling, no goal)"
        print(f"[2] {num_ads} ads × 50 UIs: naive serving_default on {num_ads * 50} pairs "
              f"{statistics.median(naive_times) * 1000:.1f} ms, score_ui_grid {statistics.median(grid_times) * 1000:.2f} ms, "
              f"speed-up {speedup:.1f}×{goal}; max |grid − naive| {np.abs(grid_out - naive_out).max():.2e}", flush=True)
        grid_figures = {"num_ads": num_ads, "num_uis": len(treatments),
                        "naive_ms": statistics.median(naive_times) * 1000,
                        "grid_ms": statistics.median(grid_times) * 1000, "speedup": speedup,
                        "max_abs_grid_minus_naive": float(np.abs(grid_out - naive_out).max()), "parts": {}}
        for name in list(calls)[2:]:
            ms = statistics.median(times[name]) * 1000
            print(f"    {name}: {ms:.2f} ms = {ms / (statistics.median(grid_times) * 1000):.0%} of the grid call "
                  f"(naive / this {statistics.median(naive_times) * 1000 / ms:.0f}×)")
            grid_figures["parts"][name] = {"ms": ms, "share_of_grid": ms / grid_figures["grid_ms"],
                                           "naive_over_this": grid_figures["naive_ms"] / ms}
        report["grid"].append(grid_figures)

    # 3. p50 latency, 1 request × N candidates for each N of --latency-candidates.
    if 3 not in args.sections:
        return finish()
    ranker_fn, dcn_fn = served.signatures["serving_default"], served_dcn.signatures["serving_default"]
    for count in args.latency_candidates:
        request = tf.constant(eval_rows[:count])
        for _ in range(10):
            ranker_fn(examples=request), dcn_fn(examples=request)
        lat = {"ranker": [], "dcn": []}
        for _ in range(args.calls):
            lat["ranker"].append(timed(lambda: ranker_fn(examples=request)) * 1000)
            lat["dcn"].append(timed(lambda: dcn_fn(examples=request)) * 1000)
        p50 = {k: statistics.median(v) for k, v in lat.items()}
        ratio = p50["ranker"] / p50["dcn"]
        goal = f"goal <= 1.25: {'meets' if ratio <= 1.25 else 'misses'}" if count == 500 else "no goal"
        print(f"[3] SavedModel p50 latency, 1 × {count} candidates: ranker {p50['ranker']:.2f} ms, plain TFRS DCN "
              f"{p50['dcn']:.2f} ms, ratio {ratio:.2f} ({goal})", flush=True)
        report["latency"].append({"candidates": count, "calls": args.calls, "ranker_p50_ms": p50["ranker"],
                                  "plain_dcn_p50_ms": p50["dcn"], "ratio": ratio})
    return finish()


if __name__ == "__main__":
    sys.exit(main())
