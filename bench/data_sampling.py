"""Data sampling against ranker quality (the analogue of Factory Floor Table 2): examples kept vs NE.

The training rows are the train split's shown candidates (ui_position > 0). Every config keeps or
drops each row with the package's own rule, `components.sampling.sampling_decision(row,
SamplerConfig(...))` (hash of (seed 0, purpose, request_id, item_id): the same rows for every
training seed), and multiplies a kept row's `sample_weight` by the returned weight:

    full data              every row kept, weight 1
    class rebalancing r    a shown non-click is kept if h_class < r                     weight × 1/r
    + teacher loss r_low   a shown non-click with ℓ_T = −log(1 − σ(teacher_logit)) < τ
                           must also pass h_low_loss < r_low                           weight × 1/r_low
    (clicked rows are always kept with weight 1)

so E[kept] = clicks + Σ_non-clicks r·(r_low if ℓ_T < τ else 1) and E[Σ w] = the full row count:
importance weights keep the weighted click rate, and so the calibration Σŷ/Σy, unbiased.

The teacher is `RankerConfig.teacher()` trained once (seed 0) on the full train split; its logit on
each train row feeds the ℓ_T < τ test (in-sample: the teacher has seen these rows). The students are
`RankerConfig()` defaults with distill_weight = 0, so that sampling, not distillation, is what is
measured; each is trained (ranking_quality's recipe: whole-request batches, shuffle and init seeded
by the training seed, `config.epochs` passes, here fed as one Keras epoch) on the sampled rows, with
the list layout of the rank loss recomputed after the rows are dropped.

Reported per config, mean ± std over the training seeds (one data split, data seed fixed):
  kept        rows that went into training: counted in one pass over the config's sampled training
              dataset (the same pipeline as training; checked against the lookup's count), and as
              a fraction of the full train split's shown rows; Σw/N = Σ sample_weight / full rows
  NE          mean log loss / H(p̄) on the eval split's shown rows (models.metrics)
  AUC         on the same rows
  Σŷ/Σy       calibration of the predicted CTRs on the same rows
and the data reduction at neutral NE: the largest 1 − kept fraction among sampled configs whose
mean NE <= full-data mean NE + full-data NE std over seeds (population std, as printed).

Teacher-loss sampling is combined with one class rate (`--combine-with`, default 0.5) or with each
(`--combine-with all`, about 1.7× the run time). The defaults (5,000 requests, 3 seeds) train 1
teacher + 6 configs × 3 seeds: about 12 minutes on 2 CPU cores (~30 s per student).

    python bench/data_sampling.py [--requests 5000] [--data-seed 0] [--seeds 3]
        [--nonclick-rates 0.5,0.25,0.1] [--low-loss-rates 0.5,0.25] [--low-loss-threshold 0.05]
        [--combine-with 0.5|all] [--json PATH]
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

from cascade_ranking.components.sampling import SamplerConfig, sampling_decision, teacher_log_loss
from cascade_ranking.datasources import synthetic
from cascade_ranking.models import inputs, metrics, ranker
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.schema import features as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ranking_quality as rq  # noqa: E402  (bench/ is not a package)

RARE_FRACTION = 0.05  # the teacher-loss rule "almost never" applies below this share of non-clicks


def rates(text):
    return [float(v) for v in text.split(",") if v.strip()]


def train_split(data_dir):
    return [os.path.join(data_dir, "Split-train")]


def train_rows(data_dir, teacher):
    """Columns of the train split's shown rows, in file order, with the teacher's logit of each."""
    cols = {k: [] for k in ("request_id", "item_id", "ui_position", "click", "teacher_logit")}
    for b in ranker.request_batches(train_split(data_dir), 50, shuffle_seed=None, exposed_only=True,
                                    with_list_layout=False):
        for k in ("request_id", "item_id", "ui_position", "click"):
            cols[k].append(b[k].numpy().reshape(-1))
        cols["teacher_logit"].append(teacher.forward(b, training=False).logit.numpy().astype(np.float64))
    return {k: np.concatenate(v) for k, v in cols.items()}


def teacher_pass(data_dir, ev):
    """Trains the teacher (RankerConfig.teacher(), seed 0, full train split): (its eval quality,
    `train_rows` with its logits)."""
    teacher = rq.train_ranker(data_dir, 0, RankerConfig.teacher(), return_model=True)
    scores = quality(ev, lambda b: teacher.predict_ctr(b).numpy())
    rows = train_rows(data_dir, teacher)
    tf.keras.backend.clear_session()
    return scores, rows


def row_keys(request_id, item_id):
    """The lookup key of a row ((request_id, item_id) is unique among the shown rows; checked)."""
    return [f"{r}:{i}" for r, i in zip(request_id.tolist(), item_id.tolist())]


def decisions(rows, config: SamplerConfig):
    """(keep [N] bool, weight multiplier [N]) of every row, by `sampling_decision` row by row."""
    keep = np.zeros(rows["click"].size, dtype=bool)
    weight = np.zeros(rows["click"].size)
    for n, (q, i, pos, y, t) in enumerate(zip(rows["request_id"].tolist(), rows["item_id"].tolist(),
                                               rows["ui_position"].tolist(), rows["click"].tolist(),
                                               rows["teacher_logit"].tolist())):
        row = {"ui_position": pos, "click": y, "request_id": q, "item_id": i, "teacher_logit": t}
        keep[n], weight[n], _ = sampling_decision(row, config)
    return keep, weight


def lookup_table(keys, multiplier):
    """key → weight multiplier of a kept row, 0 for a dropped one (−1 = unknown row)."""
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(keys), tf.constant(multiplier, tf.float32)), default_value=-1.0)


def sampled_batches(data_dir, table, requests_per_batch, shuffle_seed, num_epochs=1):
    """`ranker.request_batches` of the train split with the sampling applied: dropped rows removed,
    kept rows' sample_weight × multiplier, then the request-list layout of the remaining rows.
    A batch left with no row (in practice a pass's short last batch) is skipped."""

    def apply(b):
        key = tf.strings.join([tf.strings.as_string(b[F.REQUEST_ID_KEY][:, 0]),
                               tf.strings.as_string(b["item_id"][:, 0])], separator=":")
        multiplier = table.lookup(key)
        check = tf.debugging.assert_non_negative(multiplier, message="a row is missing from the sampling lookup")
        with tf.control_dependencies([check]):
            keep = multiplier > 0
        out = inputs._boolean_mask(b, keep)
        out[F.SAMPLE_WEIGHT_KEY] = out[F.SAMPLE_WEIGHT_KEY] * tf.boolean_mask(multiplier, keep)[:, None]
        return out

    ds = ranker.request_batches(train_split(data_dir), requests_per_batch, shuffle_seed=shuffle_seed,
                                num_epochs=num_epochs, exposed_only=True, with_list_layout=False)
    ds = ds.map(apply).filter(lambda b: tf.size(b[F.LABEL_KEY]) > 0)
    return ds.map(ranker.add_list_layout)


def count_rows(ds):
    """(rows, Σ sample_weight, clicks) in one pass over a dataset of batches."""
    rows = weight = clicks = 0.0
    for b in ds:
        rows += int(tf.size(b[F.LABEL_KEY]))
        weight += float(tf.reduce_sum(b[F.SAMPLE_WEIGHT_KEY]))
        clicks += float(tf.reduce_sum(b[F.LABEL_KEY]))
    return int(rows), weight, int(clicks)


def train_student(data_dir, seed, config: RankerConfig, table):
    tf.keras.utils.set_random_seed(seed)
    # `config.epochs` passes (requests reshuffled each pass) in one Keras epoch: with several Keras
    # epochs, a pass that is one batch short (its last batch emptied by the sampling) makes Keras
    # stop training ("input ran out of data"), dropping the remaining epochs.
    train = sampled_batches(data_dir, table, config.requests_per_batch, seed, num_epochs=config.epochs)
    model = ranker.build_and_train(config, train, epochs=1)
    return lambda b: model.predict_ctr(b).numpy()


def quality(ev, predict):
    p = rq.predictions(ev, predict)
    y = ev["y"]
    return {"ne": metrics.normalized_entropy(y, p), "auc": metrics.auc(y, p),
            "calibration": float(p.sum() / y.sum())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5_000, help="requests to generate")
    parser.add_argument("--data-seed", type=int, default=0, help="generator seed")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per config (>= 3 for the report)")
    parser.add_argument("--nonclick-rates", type=rates, default=[0.5, 0.25, 0.1],
                        help="class rebalancing keep rates r of shown non-clicks (comma-separated)")
    parser.add_argument("--low-loss-rates", type=rates, default=[0.5, 0.25],
                        help="keep rates r_low of low-teacher-loss non-clicks (comma-separated)")
    parser.add_argument("--low-loss-threshold", type=float, default=SamplerConfig().low_loss_threshold,
                        help="τ: teacher log loss below which a non-click is 'easy' (default: SamplerConfig's)")
    parser.add_argument("--combine-with", default="0.5",
                        help="class rate the low-loss rates are combined with, or 'all' (each --nonclick-rates value)")
    parser.add_argument("--json", help="write all figures to this JSON file")
    args = parser.parse_args(argv)
    combine = args.nonclick_rates if args.combine_with == "all" else [float(args.combine_with)]

    configs = {"full": SamplerConfig()}
    for r in args.nonclick_rates:
        configs[f"class r={r:g}"] = SamplerConfig(nonclick_keep_rate=r)
    for r in combine:
        for r_low in args.low_loss_rates:
            configs[f"class r={r:g} + loss r_low={r_low:g}"] = SamplerConfig(
                nonclick_keep_rate=r, low_loss_keep_rate=r_low, low_loss_threshold=args.low_loss_threshold)
    for c in configs.values():
        c.validate()
    total_start = time.time()

    tmp = tempfile.mkdtemp(prefix="data-sampling-")
    data_dir = os.path.join(tmp, "synthetic")
    start = time.time()
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=args.requests, seed=args.data_seed), data_dir)
    print(f"generated synthetic data: {args.requests} requests, seed {args.data_seed} ({time.time() - start:.0f} s)",
          flush=True)
    ev = rq.load_eval(data_dir)

    start = time.time()
    teacher_scores, rows = teacher_pass(data_dir, ev)
    print(f"teacher (seed 0): eval NE {teacher_scores['ne']:.4f}, AUC {teacher_scores['auc']:.4f} "
          f"({time.time() - start:.0f} s)", flush=True)

    keys = row_keys(rows["request_id"], rows["item_id"])
    if len(set(keys)) != len(keys):
        raise ValueError("(request_id, item_id) is not unique among the shown train rows: the lookup needs another key")
    full_rows = rows["click"].size
    nonclick = rows["click"] == 0
    click_rate = float(rows["click"].mean())
    loss = np.array([teacher_log_loss(t, 0) for t in rows["teacher_logit"][nonclick].tolist()])
    easy = np.zeros(full_rows, dtype=bool)
    easy[np.flatnonzero(nonclick)] = loss < args.low_loss_threshold
    easy_fraction = float(easy[nonclick].mean())
    print(f"train split: {full_rows} shown rows, click rate {click_rate:.4f}; teacher log loss of the shown "
          f"non-clicks: median {np.median(loss):.4f}, share < τ = {args.low_loss_threshold:g}: {easy_fraction:.1%}")
    if easy_fraction < RARE_FRACTION:
        print(f"  note: at τ = {args.low_loss_threshold:g} the teacher-loss rule almost never applies "
              f"(< {RARE_FRACTION:.0%} of non-clicks); its configs are then close to class rebalancing alone")
    elif easy_fraction > 1 - RARE_FRACTION:
        print(f"  note: at τ = {args.low_loss_threshold:g} the teacher-loss rule almost always applies "
              f"(> {1 - RARE_FRACTION:.0%} of non-clicks); it then acts as a second uniform class rate")

    student = RankerConfig().replace(distill_weight=0.0)
    results = {}
    for name, sc in configs.items():
        keep, weight = decisions(rows, sc)
        table = lookup_table(keys, np.where(keep, weight, 0.0))
        rate = np.where(nonclick, sc.nonclick_keep_rate * np.where(easy, sc.low_loss_keep_rate, 1.0), 1.0)
        start = time.time()
        kept, weighted, kept_clicks = count_rows(sampled_batches(data_dir, table, student.requests_per_batch, 0))
        if kept != int(keep.sum()) or kept_clicks != int(rows["click"].sum()):
            raise AssertionError(f"{name}: {kept} rows ({kept_clicks} clicks) went through the sampled dataset, "
                                 f"the lookup keeps {int(keep.sum())} ({int(rows['click'].sum())} clicks)")
        info = {"nonclick_keep_rate": sc.nonclick_keep_rate, "low_loss_keep_rate": sc.low_loss_keep_rate,
                "low_loss_threshold": sc.low_loss_threshold if sc.low_loss_keep_rate < 1.0 else None,
                "expected_kept_fraction": float(rate.mean()), "weighted_rows_fraction": weighted / full_rows,
                "runs": []}
        print(f"{name}: kept {kept}/{full_rows} = {kept / full_rows:.4f} (expected {rate.mean():.4f}), "
              f"Σw/N {weighted / full_rows:.4f} (count pass {time.time() - start:.0f} s)", flush=True)
        for seed in range(args.seeds):
            start = time.time()
            figures = quality(ev, train_student(data_dir, seed, student, table))
            figures = {"kept": kept, "kept_fraction": kept / full_rows, **figures,
                       "train_seconds": time.time() - start}
            info["runs"].append(figures)
            tf.keras.backend.clear_session()
            print(f"  seed {seed}: NE {figures['ne']:.4f}  AUC {figures['auc']:.4f}  Σŷ/Σy {figures['calibration']:.3f}"
                  f"  ({figures['train_seconds']:.0f} s)", flush=True)
        results[name] = info

    def mean(name, key):
        return float(np.mean([r[key] for r in results[name]["runs"]]))

    full_ne = mean("full", "ne")
    full_std = float(np.std([r["ne"] for r in results["full"]["runs"]]))
    bound = full_ne + full_std
    rule = (f"mean NE <= full-data mean NE + full-data NE std over {args.seeds} seeds (population std) "
            f"= {full_ne:.4f} + {full_std:.4f} = {bound:.4f}")
    neutral = {name: 1.0 - mean(name, "kept_fraction") for name in results
               if name != "full" and mean(name, "ne") <= bound}
    best = max(neutral, key=neutral.get) if neutral else None

    print()
    print(f"dataset: synthetic, {args.requests} requests (data seed {args.data_seed}); train shown rows {full_rows} "
          f"(click rate {click_rate:.4f}); eval shown rows {ev['y'].size} (click rate {ev['y'].mean():.4f}); "
          f"seeds {args.seeds}")
    print(f"student: RankerConfig defaults with distill_weight 0; teacher: RankerConfig.teacher(), seed 0, eval NE "
          f"{teacher_scores['ne']:.4f}, AUC {teacher_scores['auc']:.4f}; τ = {args.low_loss_threshold:g} "
          f"({easy_fraction:.1%} of train non-clicks are below it)")
    header = (f"{'config':<30}{'kept':>8}{'kept frac':>11}{'expected':>10}{'Σw/N':>8}{'NE':>18}{'AUC':>18}"
              f"{'Σŷ/Σy':>16}{'neutral':>9}")
    print(header)
    for name, info in results.items():
        runs = info["runs"]
        flag = "-" if name == "full" else ("yes" if name in neutral else "no")
        print(f"{name:<30}{runs[0]['kept']:>8}{runs[0]['kept_fraction']:>11.4f}{info['expected_kept_fraction']:>10.4f}"
              f"{info['weighted_rows_fraction']:>8.3f}{rq.fmt([r['ne'] for r in runs]):>18}"
              f"{rq.fmt([r['auc'] for r in runs]):>18}{rq.fmt([r['calibration'] for r in runs], 3):>16}{flag:>9}")
    print(f"(kept: the same rows for every seed, std 0; neutral rule: {rule})")
    if best is None:
        reduction = None
        print("data reduction at neutral NE: none: no sampled config is NE-neutral under this rule")
    else:
        reduction = neutral[best]
        print(f"data reduction at neutral NE: {reduction:.1%} ({best}: NE {rq.fmt([r['ne'] for r in results[best]['runs']])}"
              f" vs full {full_ne:.4f} ± {full_std:.4f})")
    print(f"total time {time.time() - total_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dataset": "synthetic", "requests": args.requests, "data_seed": args.data_seed,
                       "seeds": args.seeds, "configs": results, "full_train_shown_rows": full_rows,
                       "train_click_rate": click_rate, "low_loss_fraction_of_nonclicks": easy_fraction,
                       "teacher": teacher_scores, "student_config": student.to_dict(),
                       "neutral_rule": rule, "neutral_config": best,
                       "reduction_at_neutral_ne": None if reduction is None or math.isnan(reduction) else reduction},
                      f, indent=2)
    tf.io.gfile.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
