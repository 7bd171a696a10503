"""Ranking ablations (the analogue of Factory Floor's Table 1) and seed-to-seed reproducibility (PD).

Every variant is the Factory Floor ranker (`models.ranker.FactoryFloorRanker`) with a `RankerConfig`
that differs from the baseline in the switches its name gives, trained on the same train split with
training seeds 0..k−1 (initialisation and request order; the data are fixed) and scored on the same
eval split's shown candidates:

    baseline      RankerConfig.plain(): embeddings → DNN (256-128, ReLU) → logit, logistic loss only
    +DCN          cross_layers=2 (DCNv2 low-rank cross, ReZero ramp)
    +rank MO      rank_loss="multi_objective" (RankNet on the same logit, weight α)
    +rank MT      rank_loss="multi_task" (RankNet on its own head over the shared body)
    +distill      distill_weight=0.5 against a teacher (RankerConfig.teacher(): wider and deeper,
                  trained once, seed 0, on the same train split; its logits are written into the
                  student's batches in memory, as the pipeline's TeacherInference writes them)
    +SmeLU        activation="smelu"
    +bias         bias_constraints=True (duals per predicted-CTR bucket and ui_position)
    +SmeLU+bias   both (for the reproducibility table)
    +LSPR         lspr=True
    all           every switch above on (rank MO, which is the package default)
Q·U (qu_dim=16, ctr = τ(q·u)) is an axis: `--qu off,on` runs every variant without and with it
(on synthetic the default is `off` plus the variants `+Q·U` and `all`, which has Q·U).

Metrics (DESIGN §8): AUC; PerQueryAUC (mean over requests with both classes); NE; the variance of
the calibration bias Σ(y−ŷ)/Σy across predicted-CTR buckets that hold ≥ 500 examples and a click
(`ranking_quality.bucket_bias`); train examples/s as a ratio to the baseline's, measured after
the quality runs by timing every variant on the same cached batches, interleaved (median of
per-round ratios; `interleaved_train_speed`). The bootstrap std of the baseline's AUC over the
eval rows is printed too: the eval set's own noise, against which AUC differences must be read. Reproducibility: PD = mean |p1−p2| / ((p1+p2)/2) between the
eval predictions of every pair of seeds of one variant, mean ± std over the pairs.

Datasets:
  synthetic  `datasources.synthetic` default world, 5,000 requests (data seed 0); oracle = true_ctr.
  obd        Open Bandit Dataset small sample, campaign `all`, converted with split="policy": train
             on the Bernoulli-Thompson-Sampling log (10,000 impressions), evaluate on the uniform
             random log (10,000). It keeps no request ids, so every impression is its own request:
             PerQueryAUC is undefined and RankNet has no pairs (the rank variants can only differ
             from the baseline by their curriculum/extra head). Batches hold 100 requests (100
             rows, about the rows of a synthetic batch of 10 requests). Skipped, with a message,
             when ../shared/data/open-bandit-small is absent.

    python bench/ranking_ablations.py [--datasets synthetic,obd] [--seeds 3] [--json out.json]
    python bench/ranking_ablations.py --update-speed out.json   # re-time the variants of a results file
"""
import argparse
import itertools
import json
import os
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ranking_quality as RQ  # noqa: E402  (bench/ is not a package)
import ranking_speed as RS  # noqa: E402
from report import mean_std  # noqa: E402  (sample std over seeds, as in BENCHMARKS.md)

from cascade_ranking.datasources import shared_data, synthetic  # noqa: E402
from cascade_ranking.datasources.open_bandit import convert_open_bandit  # noqa: E402
from cascade_ranking.models import metrics, ranker  # noqa: E402
from cascade_ranking.models.ranker_config import RankerConfig  # noqa: E402
from cascade_ranking.schema import features as F  # noqa: E402

TECHNIQUES = {  # variant name -> the switches it turns on over the baseline
    "+DCN": dict(cross_layers=2),
    "+rank MO": dict(rank_loss="multi_objective"),
    "+rank MT": dict(rank_loss="multi_task"),
    "+distill": dict(distill_weight=0.5),
    "+SmeLU": dict(activation="smelu"),
    "+bias": dict(bias_constraints=True),
    "+SmeLU+bias": dict(activation="smelu", bias_constraints=True),
    "+LSPR": dict(lspr=True),
}
ALL = dict(cross_layers=2, rank_loss="multi_objective", distill_weight=0.5, activation="smelu",
           bias_constraints=True, lspr=True)
QU_DIM = RankerConfig().qu_dim
REQUESTS_PER_BATCH = {"synthetic": RankerConfig().requests_per_batch, "obd": 100}


def variant_configs(dataset, qu_axis, smelu="smelu"):
    """{(variant, qu): RankerConfig}, every config differing from its baseline in named switches only.
    `smelu` is the activation string of the SmeLU variants ("smelu" = β 1, "smelu:0.25", ...)."""
    configs = {}
    for qu in qu_axis:
        base = RankerConfig.plain(qu_dim=QU_DIM if qu == "on" else 0,
                                  requests_per_batch=REQUESTS_PER_BATCH[dataset])
        configs[("baseline", qu)] = base
        for name, switches in TECHNIQUES.items():
            configs[(name, qu)] = base.replace(**with_smelu(switches, smelu))
        configs[("all", qu)] = base.replace(**with_smelu(ALL, smelu))
    if dataset == "synthetic" and qu_axis == ("off",):
        base = configs[("baseline", "off")]
        configs[("+Q·U", "off")] = base.replace(qu_dim=QU_DIM)
        configs[("all (with Q·U)", "off")] = base.replace(qu_dim=QU_DIM, **with_smelu(ALL, smelu))
    return configs


def with_smelu(switches, smelu):
    return {k: (smelu if k == "activation" else v) for k, v in switches.items()}


def prepare(dataset, work_dir, requests):
    """The Examples directory of `dataset`, or None (with a message) when its source is absent."""
    out = os.path.join(work_dir, dataset)
    if dataset == "synthetic":
        synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=requests, seed=0), out)
        return out
    src = shared_data.shared_data_dir("open-bandit-small")
    if src is None:
        print(f"SKIPPED obd: open-bandit-small not found at {shared_data.shared_data_path('open-bandit-small')} "
              f"(set ${shared_data.ENV_VAR})", flush=True)
        return None
    convert_open_bandit(src, out, campaign="all", split="policy")
    return out


def shown_train_rows(data_dir):
    return int(sum(int(tf.size(b[F.LABEL_KEY])) for b in ranker.request_batches(
        [os.path.join(data_dir, "Split-train")], 1000, exposed_only=True, with_list_layout=False)))


def train(data_dir, seed, config, teacher=None):
    """(model, fit seconds): build, adapt, fit; `teacher` logits are written into the batches."""
    tf.keras.utils.set_random_seed(seed)
    batches = ranker.request_batches([os.path.join(data_dir, "Split-train")], config.requests_per_batch,
                                     shuffle_seed=seed, exposed_only=True)
    if teacher is not None:
        batches = batches.map(
            lambda b: {**b, F.TEACHER_LOGIT_KEY: teacher.forward(b, training=False).logit[:, None]})
    start = time.perf_counter()
    model = ranker.build_and_train(config, batches, epochs=config.epochs)
    return model, time.perf_counter() - start


def train_teacher(dataset, data_dir, configs):
    """The teacher (RankerConfig.teacher(), seed 0) when a config distills, else None."""
    if not any(c.distill_weight > 0 for c in configs.values()):
        return None
    return train(data_dir, 0, RankerConfig.teacher(requests_per_batch=REQUESTS_PER_BATCH[dataset]))[0]


def add_speed(result, data_dir, configs, teacher, steps, rounds):
    """Writes each variant's interleaved train speed (and ratio to its baseline) into `result`."""
    if ("baseline", "off") not in configs and ("baseline", "on") not in configs:
        return
    for (name, qu), (rate, ratio) in interleaved_train_speed(data_dir, configs, teacher, steps, rounds).items():
        result["variants"][f"{name} | Q·U {qu}"].update(train_examples_per_s=rate, train_speed_ratio=ratio)


def update_speed(path, steps, rounds):
    """Re-measures only the train speed of every variant in an existing results file, in place."""
    with open(path) as f:
        data = json.load(f)
    work_dir = tempfile.mkdtemp(prefix="ranking-ablations-")
    for dataset, result in data["results"].items():
        data_dir = prepare(dataset, work_dir, data["synthetic_requests"])
        configs = {(v["variant"], v["qu"]): RankerConfig.from_dict(v["config"]) for v in result["variants"].values()}
        add_speed(result, data_dir, configs, train_teacher(dataset, data_dir, configs), steps, rounds)
        print(table(dataset, result), flush=True)
    tf.io.gfile.rmtree(work_dir)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2)
    os.replace(path + ".tmp", path)


def interleaved_train_speed(data_dir, configs, teacher, steps, rounds):
    """{config key: (median examples/s, median per-round ratio to the baseline of its Q·U value)}.

    Every variant's model is built and compiled, then timed on the same cached batches (teacher
    logits already in them, so +distill pays for its loss but not for the teacher's forward pass),
    `steps` train steps at a time, in an order rotated every round so that all share the machine's
    noise. Input parsing is excluded."""
    requests_per_batch = next(iter(configs.values())).requests_per_batch
    batches = list(ranker.request_batches([os.path.join(data_dir, "Split-train")], requests_per_batch,
                                          shuffle_seed=0, exposed_only=True).take(steps))
    if teacher is not None:
        batches = [{**b, F.TEACHER_LOGIT_KEY: teacher.forward(b, training=False).logit[:, None]} for b in batches]
    ds = RS.cached_dataset(batches)
    rows = sum(int(tf.size(b[F.LABEL_KEY])) for b in batches)
    fns, iterators = {}, {}
    for key, config in configs.items():
        tf.keras.utils.set_random_seed(0)
        model = ranker.FactoryFloorRanker(config)
        model.adapt(ds, 10)
        model.compile()
        fns[key], iterators[key] = model.make_train_function(), iter(ds.repeat())
        for _ in range(5):  # trace and warm up
            fns[key](iterators[key])
    rates = {key: [] for key in configs}
    keys = list(configs)
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            start = time.perf_counter()
            for _ in range(steps):
                fns[key](iterators[key])
            rates[key].append(rows / (time.perf_counter() - start))
    return {key: (float(np.median(v)), float(np.median([a / b for a, b in zip(v, rates[("baseline", key[1])])])))
            for key, v in rates.items()}


def eval_auc_bootstrap_std(ev, p, draws=200, seed=0):
    """The std of AUC over bootstrap resamples of the eval rows: the eval set's own sampling noise."""
    rng = np.random.default_rng(seed)
    n = ev["y"].size
    values = []
    for _ in range(draws):
        pick = rng.integers(0, n, n)
        values.append(metrics.auc(ev["y"][pick], p[pick]))
    return float(np.nanstd(values))


def pairwise_pd(preds):
    """PD of every pair of seeds' eval predictions."""
    return [metrics.prediction_difference(a, b) for a, b in itertools.combinations(preds, 2)]


def run_dataset(dataset, data_dir, qu_axis, seeds, only=None, speed_steps=20, speed_rounds=10, smelu="smelu"):
    ev = RQ.load_eval(data_dir)
    oracle = metrics.auc(ev["y"], ev["o"]) if (ev["o"] >= 0).all() else float("nan")
    print(f"dataset {dataset}: eval shown rows {ev['y'].size}, clicks {int(ev['y'].sum())}, "
          f"oracle AUC {oracle:.4f}", flush=True)
    configs = {k: c for k, c in variant_configs(dataset, qu_axis, smelu).items() if only is None or k[0] in only}
    rows = shown_train_rows(data_dir)
    teacher = train_teacher(dataset, data_dir, configs)
    if teacher is not None:
        teacher_scores = RQ.scores(ev, lambda b: teacher.predict_ctr(b).numpy())
        print(f"  teacher: AUC {teacher_scores['auc']:.4f} NE {teacher_scores['ne']:.4f}", flush=True)
    out = {"oracle_auc": oracle, "eval_rows": int(ev["y"].size), "eval_clicks": int(ev["y"].sum()),
           "teacher": teacher_scores if teacher is not None else None, "variants": {}}
    for (name, qu), config in configs.items():
        runs, preds = [], []
        for seed in range(seeds):
            model, seconds = train(data_dir, seed, config, teacher if config.distill_weight > 0 else None)
            p = RQ.predictions(ev, lambda b: model.predict_ctr(b).numpy())
            figures = RQ.scores_of(ev, p)
            figures.update(train_rows=rows, fit_seconds=seconds,
                           train_examples_per_s=rows * config.epochs / seconds)
            runs.append(figures)
            preds.append(p)
            print(f"  {name:<15} Q·U {qu:<3} seed {seed}: AUC {figures['auc']:.4f} NE {figures['ne']:.4f} "
                  f"({seconds:.0f} s)", flush=True)
        out["variants"][f"{name} | Q·U {qu}"] = {"variant": name, "qu": qu, "config": config.to_dict(),
                                                  "runs": runs, "pd_pairs": pairwise_pd(preds)}
        if name == "baseline" and "auc_bootstrap_std" not in out:
            out["auc_bootstrap_std"] = eval_auc_bootstrap_std(ev, preds[0])
    add_speed(out, data_dir, configs, teacher, speed_steps, speed_rounds)
    return out


def table(dataset, result):
    """The ablation table and the PD column of one dataset, as text."""
    lines = [f"dataset {dataset} (eval: {result['eval_rows']} shown rows, {result['eval_clicks']} clicks; "
             f"oracle AUC {result['oracle_auc']:.4f}; bootstrap std of the baseline's AUC over eval rows "
             f"{result.get('auc_bootstrap_std', float('nan')):.4f})",
             f"{'variant':<16}{'Q·U':<5}{'AUC':>18}{'PerQueryAUC':>18}{'NE':>18}{'var(bucket bias)':>20}"
             f"{'train ex/s ÷ base':>19}{'PD (seed pairs)':>18}"]
    for v in result["variants"].values():
        runs = v["runs"]
        speed = v.get("train_speed_ratio", float("nan"))
        lines.append(f"{v['variant']:<16}{v['qu']:<5}{mean_std([r['auc'] for r in runs]):>18}"
                     f"{mean_std([r['per_query_auc'] for r in runs]):>18}{mean_std([r['ne'] for r in runs]):>18}"
                     f"{mean_std([r['bucket_bias_variance'] for r in runs]):>20}{speed:>19.2f}"
                     f"{mean_std(v['pd_pairs']):>18}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="synthetic,obd")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per variant (>= 3 for the report)")
    parser.add_argument("--requests", type=int, default=5_000, help="synthetic requests")
    parser.add_argument("--qu", default=None,
                        help="Q·U axis, e.g. off,on (default: off on synthetic with +Q·U rows; off,on on obd)")
    parser.add_argument("--only", default=None, help="comma-separated variant names to run (default: all)")
    parser.add_argument("--smelu", default="smelu", help='activation of the SmeLU variants ("smelu" = β 1, "smelu:0.25")')
    parser.add_argument("--speed-steps", type=int, default=20, help="train steps per interleaved timing")
    parser.add_argument("--speed-rounds", type=int, default=10, help="interleaved timing rounds")
    parser.add_argument("--json", help="write every run's figures here")
    parser.add_argument("--update-speed", metavar="JSON",
                        help="only re-measure the train speed of the variants in this results file (in place)")
    args = parser.parse_args(argv)
    if args.update_speed:
        update_speed(args.update_speed, args.speed_steps, args.speed_rounds)
        return 0
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 (PD needs a pair)")
    work_dir = tempfile.mkdtemp(prefix="ranking-ablations-")
    results = {}
    for dataset in args.datasets.split(","):
        if dataset not in REQUESTS_PER_BATCH:
            parser.error(f"unknown dataset {dataset!r}; choose from {sorted(REQUESTS_PER_BATCH)}")
        data_dir = prepare(dataset, work_dir, args.requests)
        if data_dir is None:
            continue
        qu_axis = tuple(args.qu.split(",")) if args.qu else (("off",) if dataset == "synthetic" else ("off", "on"))
        only = set(args.only.split(",")) if args.only else None
        results[dataset] = run_dataset(dataset, data_dir, qu_axis, args.seeds, only, args.speed_steps, args.speed_rounds,
                                       args.smelu)
        print(table(dataset, results[dataset]), flush=True)
    tf.io.gfile.rmtree(work_dir)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"seeds": args.seeds, "synthetic_requests": args.requests, "smelu": args.smelu,
                       "results": results}, f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
