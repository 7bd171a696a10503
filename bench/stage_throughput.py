"""Training and input-pipeline throughput of every stage of the cascade, each as a ratio to a
reference measured in the same run on this machine.

(a) Train examples/s per stage, on in-memory, already-parsed batches (input parsing excluded):
    retrieval   `models.retrieval.RetrievalModel` as `cascade_ranking.models.trainers.retrieval` builds and trains
                it: batches of 256 (request, GT item) pairs + 256 uniform corpus negatives, Adagrad.
                Examples = the (request, GT item) pairs of a batch (each one GT candidate row).
    prerank_hap `cascade_ranking.models.trainers.preranking.build_model` (HAP light + strong), Adam, batches of 32
                request lists (`models.list_inputs.request_list_dataset`, list size 60).
    cascade_lcron `cascade_ranking.models.trainers.cascade.build_model` (retrieval → prerank → rank, LCRON), Adam,
                batches of 64 request lists of size 60.
                For both list models, examples = lists × list length counting only the real
                (mask = 1) candidates: 50 of the 60 slots here (see the caveat below).
    ranker      `models.ranker.FactoryFloorRanker(RankerConfig())`, row batches of
                `ranker.request_batches(train, 10 requests, shuffle_seed=0)` (shown rows only,
                ≈ 100 rows a batch) as `cascade_ranking.models.trainers.ranking` trains it.
    teacher     the same with `RankerConfig.teacher()` on the same batches.
    plain_dcn   the reference: `PlainDCN` of bench/ranking_speed.py (plain TFRS DCN ranking model
                of the ranker's width, the ranker's optimizer) on the same row batches as the ranker.
                Examples = the rows of a batch.
    Each model gets the first (up to) 30 batches of its trainer's input, cached in memory
    (`Dataset.cache`, filled before timing) and repeated; it is compiled as its trainer compiles it
    and driven through Keras' `make_train_function` (one step a call). Warm-up: one full cycle of
    its batches (every trace done). Then --rounds rounds; in each, every model runs 3 untimed steps
    (so that it does not pay for the previous model's cold caches) and then --steps train steps,
    timed; the order of the models is reversed every other round (ABBA...), so all share
    the noise of a CPU shared with other work. Examples of a timing are counted exactly (the
    batches it consumed). Reported: the median examples/s of each model over the rounds and
    ratio_to_plain_dcn = the median over the rounds of (its examples/s / plain_dcn's examples/s
    in the same round). Batch sizes differ between stages (each trains at its trainer's batch
    size), and per-step overheads weigh more on small batches: `batch_rows` is reported with each.

(b) Input-pipeline examples/s: a full pass over the train split's files per timing, of
    parsed_batches   `models.inputs.parsed_batches` with the baseline trainer's settings
                     (`TrainerConfig()`: batch 512, shuffle_seed 0, shown rows only);
    request_batches  `models.ranker.request_batches(..., 10, shuffle_seed=0)` (the ranker trainer's);
    request_lists    `models.list_inputs.request_list_dataset(..., 64, 60, shuffle_seed=0)` (the
                     cascade trainer's) over request-list TFRecords written from the same rows;
    each consumed in-graph (`Dataset.reduce`, no Python per batch) and compared with the read floor
    of the same files: `tf.data.TFRecordDataset(files, compression_type="GZIP")` counting records,
    in batches of 1024 serialized records (one record at a time, tf.data's per-element overhead
    makes the count ~20× slower than the read); read_floor for the candidate-row files,
    read_floor_lists for the request-list file.
    Examples = candidate rows in the files (records; for the request-list file, real candidates),
    the same count for a pipeline and its floor, so ratio_to_read_floor = floor time / pipeline
    time (median of the per-round ratios; rounds interleaved as in (a)). The pipelines that keep
    shown rows only output ~1/5 of the rows they read (`output_rows_per_s` in the JSON).

Data: `datasources.synthetic.write_dataset(SyntheticConfig(num_requests=--requests, seed=0))` in a
temporary directory (≈ 80 % of the requests in Split-train, by a hash; 50 candidate rows each);
the request lists are built from the train split's rows by
`models.list_inputs.request_lists_from_candidates` (what bench/cascade_lcron.py `load()` uses),
padded to the trainers' list size 60, and written as gzipped request-list TFRecords
(`write_request_lists`, the NegativeSampler's output format).
Caveat: the NegativeSampler would fill up to 10 of the 60 slots with random negatives; these lists
have 50 real candidates and 10 padded slots, which cost the same compute but are not counted.

    .venv/bin/python bench/stage_throughput.py [--requests 2000] [--steps 20] [--rounds 10]
                                                       [--json PATH]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH_DIR))
sys.path.insert(0, BENCH_DIR)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")  # the normalisers' adapt calls retrace (harmless, noisy)

from cascade_ranking.datasources import synthetic  # noqa: E402
from cascade_ranking.models import inputs, ranker  # noqa: E402
from cascade_ranking.models import list_inputs as LI  # noqa: E402
from cascade_ranking.models import retrieval as R  # noqa: E402
from cascade_ranking.models.config import TrainerConfig  # noqa: E402
from cascade_ranking.models.ranker_config import RankerConfig  # noqa: E402
from cascade_ranking.models.trainers import cascade as cascade_trainer  # noqa: E402
from cascade_ranking.models.trainers import preranking as preranking_trainer  # noqa: E402
from cascade_ranking.models.trainers import retrieval as retrieval_trainer  # noqa: E402
from ranking_speed import PlainDCN  # noqa: E402
from cascade_ranking.schema import features as F  # noqa: E402
from cascade_ranking.schema import request_list as RL  # noqa: E402

REFERENCE = "plain_dcn"
FLOOR, FLOOR_LISTS = "read_floor", "read_floor_lists"
MAX_BATCHES = 30  # cached batches per model
PRE_STEPS = 3  # untimed train steps of a model right before each of its timings
FLOOR_BATCH = 1024  # serialized records per batch when the read floor counts them

ROW_DEFINITION = "shown candidate rows of the batch (request_batches keeps ui_position > 0 only)"
LIST_DEFINITION = ("real candidates of the batch's request lists: lists × list length counting only mask = 1 "
                   "(50 real of 60 slots per list here)")
PAIR_DEFINITION = ("(request, GT item) training pairs of the batch, i.e. GT candidate rows; each is scored "
                   "against the batch's {pairs} positives + {negatives} sampled negatives")


# ---------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------
def make_data(requests: int, root: str):
    """(train row dir, request-list file, train request lists in numpy, row count, real candidates)."""
    data_dir = os.path.join(root, "synthetic")
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=requests, seed=0), data_dir)
    train_dir = os.path.join(data_dir, "Split-train")
    list_size = RL.LIST_SIZE  # the NegativeSampler's default
    lists = LI.request_lists_from_candidates(train_dir, list_size=list_size)
    list_file = LI.write_request_lists(lists, os.path.join(root, "request_lists", "train.tfrecord.gz"))
    real = int(np.asarray(lists["mask"]).sum())
    return train_dir, list_file, lists, real


def cache_batches(ds: tf.data.Dataset, count_fn, max_batches: int = MAX_BATCHES):
    """(the first batches of `ds`, cached in memory and filled now, examples of each batch)."""
    cached = ds.take(max_batches).cache()
    counts = [int(count_fn(b)) for b in cached]  # one full pass fills the cache
    if not counts:
        raise ValueError("no training batch")
    return cached, counts


def rows_of(batch):
    return tf.shape(batch[F.LABEL_KEY])[0]


def real_candidates_of(batch):
    return tf.reduce_sum(tf.cast(batch["mask"] > 0, tf.int64))


def pairs_of(batch):
    return tf.shape(batch["sampling_probability"])[0]


# ---------------------------------------------------------------------------------------------
# (a) Models, each as its trainer builds it.
# ---------------------------------------------------------------------------------------------
def build_models(train_dir, list_file, lists):
    """{name: (model, cached batches, examples per batch, definition, slots per batch)}."""
    tf.keras.utils.set_random_seed(0)
    out = {}

    cfg = retrieval_trainer.RetrievalTrainerConfig()
    model, batch_size, negatives = retrieval_trainer.build_model(cfg, retrieval_trainer.train_split_of(lists))
    pairs = R.retrieval_pairs(lists, batch_size)  # in memory here: the steps are timed on cached batches
    ds, counts = cache_batches(R.retrieval_dataset(pairs, batch_size, negatives, shuffle_seed=cfg.seed), pairs_of)
    out["retrieval"] = (model, ds, counts, PAIR_DEFINITION.format(pairs=batch_size, negatives=cfg.num_negatives),
                        f"{batch_size} pairs + {cfg.num_negatives} negatives")

    cfg = preranking_trainer.PrerankingTrainerConfig()
    model = preranking_trainer.build_model(cfg)
    R.adapt_towers(model.light.towers() + [model.strong], lists)
    model.compile(optimizer=tf.keras.optimizers.Adam(cfg.learning_rate))
    ds, counts = cache_batches(LI.request_list_dataset(list_file, cfg.batch_size, RL.LIST_SIZE, shuffle_seed=cfg.seed),
                               real_candidates_of)
    out["prerank_hap"] = (model, ds, counts, LIST_DEFINITION, f"{cfg.batch_size} lists × {RL.LIST_SIZE} slots")

    cfg = cascade_trainer.CascadeTrainerConfig()
    model, _ = cascade_trainer.build_model(cfg)
    model.adapt(lists)
    model.compile(optimizer=tf.keras.optimizers.Adam(cfg.learning_rate))
    ds, counts = cache_batches(LI.request_list_dataset(list_file, cfg.batch_size, RL.LIST_SIZE, shuffle_seed=cfg.seed),
                               real_candidates_of)
    out["cascade_lcron"] = (model, ds, counts, LIST_DEFINITION, f"{cfg.batch_size} lists × {RL.LIST_SIZE} slots")

    config = RankerConfig()
    rows, counts = cache_batches(ranker.request_batches([train_dir], config.requests_per_batch, shuffle_seed=0),
                                 rows_of)
    slots = f"{config.requests_per_batch} requests (shown rows)"
    for name, variant in (("ranker", config), ("teacher", RankerConfig.teacher())):
        if variant.requests_per_batch != config.requests_per_batch:
            raise ValueError("the teacher is timed on the ranker's batches")
        model = ranker.FactoryFloorRanker(variant)
        model.adapt(rows)
        model.compile()
        out[name] = (model, rows, counts, ROW_DEFINITION, slots)
    model = PlainDCN(config)  # as bench/ranking_speed.py sets it up
    model.embedding.adapt(rows, 10)
    model.compile(optimizer=ranker.make_optimizer(config))
    out[REFERENCE] = (model, rows, counts, ROW_DEFINITION, slots)
    return out


def interleaved(names, rounds):
    """The order of every round: `names`, reversed every other round (ABBA...)."""
    return [list(names) if r % 2 == 0 else list(names)[::-1] for r in range(rounds)]


def train_throughput(models, steps, rounds):
    """{name: [examples/s per round]}."""
    runners = {}
    for name, (model, ds, counts, _, _) in models.items():
        fn = model.make_train_function()
        iterator = iter(ds.repeat().prefetch(2))
        for _ in range(max(len(counts), 10)):  # warm-up: every batch once (traces), caches
            fn(iterator)
        runners[name] = {"fn": fn, "iterator": iterator, "counts": counts, "position": max(len(counts), 10)}
    rates = {name: [] for name in models}
    for order in interleaved(models, rounds):
        for name in order:
            run = runners[name]
            fn, iterator = run["fn"], run["iterator"]
            for _ in range(PRE_STEPS):  # untimed: the previous model's cold caches and parked threads
                fn(iterator)
            run["position"] += PRE_STEPS
            start = time.perf_counter()
            for _ in range(steps):
                fn(iterator)
            seconds = time.perf_counter() - start
            counts = run["counts"]
            examples = sum(counts[(run["position"] + i) % len(counts)] for i in range(steps))
            run["position"] += steps
            rates[name].append(examples / seconds)
    return rates


# ---------------------------------------------------------------------------------------------
# (b) Input pipelines.
# ---------------------------------------------------------------------------------------------
def count_in_graph(ds: tf.data.Dataset, count_fn) -> int:
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, b: n + tf.cast(count_fn(b), tf.int64)))


def read_floor(files) -> int:
    """Records of gzipped TFRecord files, read and counted (in batches of 1024 serialized records:
    counting one record at a time costs ~20× more in tf.data's per-element overhead)."""
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(FLOOR_BATCH)
    return count_in_graph(ds, lambda records: tf.shape(records)[0])


def input_pipelines(train_dir, list_file):
    """{name: (function doing one full pass -> output rows, which floor it is compared with)}."""
    files = inputs.list_files([train_dir])
    trainer = TrainerConfig()
    list_cfg = cascade_trainer.CascadeTrainerConfig()
    return {
        FLOOR: (lambda: read_floor(files), FLOOR),
        "parsed_batches": (lambda: count_in_graph(inputs.parsed_batches(
            files, trainer.batch_size, shuffle_seed=trainer.shuffle_seed, num_epochs=1,
            exposed_only=trainer.exposed_only), rows_of), FLOOR),
        "request_batches": (lambda: count_in_graph(ranker.request_batches(
            files, RankerConfig().requests_per_batch, shuffle_seed=0), rows_of), FLOOR),
        FLOOR_LISTS: (lambda: read_floor([list_file]), FLOOR_LISTS),
        "request_lists": (lambda: count_in_graph(LI.request_list_dataset(
            list_file, list_cfg.batch_size, RL.LIST_SIZE, shuffle_seed=list_cfg.seed), real_candidates_of),
            FLOOR_LISTS),
    }


def input_throughput(pipelines, examples, rounds):
    """({name: [examples/s per round]}, {name: output rows of a pass})."""
    outputs = {name: fn() for name, (fn, _) in pipelines.items()}  # warm-up pass (and the counts)
    rates = {name: [] for name in pipelines}
    for order in interleaved(pipelines, rounds):
        for name in order:
            start = time.perf_counter()
            pipelines[name][0]()
            rates[name].append(examples[pipelines[name][1]] / (time.perf_counter() - start))
    return rates, outputs


# ---------------------------------------------------------------------------------------------
def paired_ratio(rates, name, reference):
    return statistics.median(a / b for a, b in zip(rates[name], rates[reference]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2_000, help="synthetic requests to generate (80%% train)")
    parser.add_argument("--steps", type=int, default=20, help="train steps per model per timing round")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (train and input)")
    parser.add_argument("--json", help="also write every figure here")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    tmp = tempfile.mkdtemp(prefix="stage-throughput-")
    try:
        train_dir, list_file, lists, real = make_data(args.requests, tmp)
        num_rows = read_floor(inputs.list_files([train_dir]))
        print(f"machine: {os.cpu_count()} CPU cores visible; TF {tf.__version__}")
        print(f"data: synthetic, {args.requests} requests, train split {num_rows} candidate rows, "
              f"{LI.num_lists(lists)} request lists of {LI.list_size_of(lists)} slots ({real} real candidates)",
              flush=True)

        models = build_models(train_dir, list_file, lists)
        rates = train_throughput(models, args.steps, args.rounds)
        train = {}
        for name, (_, _, counts, definition, slots) in models.items():
            train[name] = {
                "examples_per_s": statistics.median(rates[name]),
                "ratio_to_plain_dcn": paired_ratio(rates, name, REFERENCE),
                "batch_rows": statistics.mean(counts),
                "batch": slots,
                "definition": definition,
                "rates": rates[name],
            }
        print(f"\n(a) train examples/s, {args.steps} steps × {args.rounds} interleaved rounds, median "
              f"(ratio: median of per-round ratios to {REFERENCE})")
        print(f"{'stage':<15}{'examples/s':>12}{'ratio':>8}{'rows/batch':>12}  batch")
        for name, r in train.items():
            print(f"{name:<15}{r['examples_per_s']:>12.0f}{r['ratio_to_plain_dcn']:>8.2f}{r['batch_rows']:>12.1f}"
                  f"  {r['batch']}")
        for definition in dict.fromkeys(r["definition"] for r in train.values()):
            print(f"  examples of {', '.join(n for n, r in train.items() if r['definition'] == definition)}: "
                  f"{definition}")

        examples = {FLOOR: num_rows, FLOOR_LISTS: real}
        pipelines = input_pipelines(train_dir, list_file)
        in_rates, outputs = input_throughput(pipelines, examples, args.rounds)
        inputs_out = {}
        for name, (_, floor) in pipelines.items():
            seconds = examples[floor] / statistics.median(in_rates[name])
            inputs_out[name] = {
                "examples_per_s": statistics.median(in_rates[name]),
                "ratio_to_read_floor": paired_ratio(in_rates, name, floor),
                "floor": floor,
                "examples_per_pass": examples[floor],
                "output_rows_per_pass": outputs[name],
                "output_rows_per_s": outputs[name] / seconds,
                "rates": in_rates[name],
            }
        print(f"\n(b) input pipeline examples/s (candidate rows read; full pass over the train split), "
              f"{args.rounds} interleaved rounds, median (ratio: median of per-round ratios to its floor)")
        print(f"{'input':<17}{'examples/s':>12}{'ratio':>8}{'out rows/s':>12}  floor")
        for name, r in inputs_out.items():
            print(f"{name:<17}{r['examples_per_s']:>12.0f}{r['ratio_to_read_floor']:>8.2f}"
                  f"{r['output_rows_per_s']:>12.0f}  {r['floor']} ({r['examples_per_pass']} examples a pass, "
                  f"{r['output_rows_per_pass']} output)")
        seconds = time.perf_counter() - started
        print(f"\ntotal {seconds:.0f} s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": {"cpus": os.cpu_count()}, "tf": tf.__version__, "args": vars(args),
                           "data": {"requests": args.requests, "train_rows": num_rows, "lists": LI.num_lists(lists),
                                    "list_size": LI.list_size_of(lists), "real_candidates": real},
                           "train": train, "input": inputs_out, "seconds": seconds}, f, indent=2)
    finally:
        tf.io.gfile.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
