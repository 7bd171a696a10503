"""Ranking quality on the synthetic dataset: the baseline DNN against the Factory Floor ranker.

For every variant and seed (same train/eval split for all), on the eval split's shown candidates
(ui_position > 0):
  AUC and its gap to the oracle AUC of true_ctr     goal: gap <= 0.02
  PerQueryAUC, NE (DESIGN §8)
  calibration bias Σ(y − ŷ)/Σy per predicted-CTR bucket with >= 500 examples; the max |bias|
  over those buckets                                goal: <= 10%
  and, to tell miscalibration from click-sampling noise, the share of click draws y* ~ Bernoulli(ŷ)
  in which a perfectly calibrated model with the same predictions meets that goal (and the same
  for true_ctr itself, bucketed by true_ctr)
Figures are mean ± std over the seeds (model initialisation and data order; the data are fixed).
Also printed, for synthetic data generated here: the AUC of a plug-in CTR that knows the
generator's feature projections and token embeddings but not the id noise (the residual that
only user_id/item_id can reveal), a rough ceiling for a model that cannot learn the ids.

    python bench/ranking_quality.py [--data DIR] [--requests 5000] [--seeds 3] [--ablations]

Variants:
  baseline   models.baseline_ranker.BaselineRanker with TrainerConfig defaults (Adam 2e-3,
             batch 512 shuffled rows, 1 epoch: a second epoch overfits it)
  ranker     models.ranker.FactoryFloorRanker with RankerConfig defaults (all its switches at
             their defaults, request batches, `epochs` passes)
  --ablations adds the ranker with one switch off each (no_qu, no_cross, no_rank, no_bias) and
             with LSPR on.
  --distill  adds a student (ranker defaults, distill_weight 0.5) trained on the logits of one
             teacher (RankerConfig.teacher(), seed 0) written into its batches.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

from cascade_ranking.datasources import synthetic
from cascade_ranking.models import inputs, metrics, ranker
from cascade_ranking.models.baseline_ranker import BaselineRanker
from cascade_ranking.models.config import TrainerConfig
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.schema import features as F

BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.4)
MIN_BUCKET = 500
AUC_GAP_GOAL = 0.02
BIAS_GOAL = 0.10


def load_eval(data_dir, split="eval"):
    """Shown rows of a split: labels y, true CTRs o (−1 when unknown), request ids q, parsed batches."""
    cols = {"y": [], "o": [], "q": [], "batches": []}
    for b in inputs.parsed_batches([os.path.join(data_dir, f"Split-{split}")], 4096, exposed_only=True):
        cols["batches"].append(b)
        cols["y"].append(b[F.LABEL_KEY].numpy().ravel())
        cols["o"].append(b[F.TRUE_CTR_KEY].numpy().ravel())
        cols["q"].append(b[F.REQUEST_ID_KEY].numpy().ravel())
    return {k: (np.concatenate(v) if k != "batches" else v) for k, v in cols.items()}


def bucket_bias(y, p):
    """{bucket: (bias, count, noise)} for buckets with >= MIN_BUCKET examples.

    noise = sqrt(Σ ŷ(1−ŷ)) / Σ ŷ: the standard deviation the bias would have from click sampling
    alone if the predictions were the true CTRs (the floor under which a bias is not measurable).
    """
    bucket = np.searchsorted(np.asarray(BUCKETS), p, side="right")
    out = {}
    for k in range(len(BUCKETS) + 1):
        member = bucket == k
        if member.sum() >= MIN_BUCKET and y[member].sum() > 0:
            pk = p[member].astype(np.float64)
            out[k] = (float((y[member] - pk).sum() / y[member].sum()), int(member.sum()),
                      float(np.sqrt((pk * (1 - pk)).sum()) / pk.sum()))
    return out


def calibrated_draws(p, draws=200, seed=0):
    """max |bucket bias| of a perfectly calibrated model with predictions p, over `draws` click draws.

    Clicks y* ~ Bernoulli(p) are redrawn; buckets (and which have >= MIN_BUCKET examples) depend on p
    only. The bias Σ(y*−p)/Σy* is then pure click-sampling noise: the fraction of draws with
    max |bias| <= BIAS_GOAL is the chance that even a perfectly calibrated model meets the goal on
    this eval set.
    """
    rng = np.random.default_rng(seed)
    p = np.asarray(p, np.float64)
    bucket = np.searchsorted(np.asarray(BUCKETS), p, side="right")
    worst = np.zeros(draws)
    for k in range(len(BUCKETS) + 1):
        member = bucket == k
        if member.sum() < MIN_BUCKET:
            continue
        pk = p[member]
        clicks = (rng.random((draws, pk.size)) < pk).sum(axis=1)
        bias = np.where(clicks > 0, (clicks - pk.sum()) / np.maximum(clicks, 1), 0.0)
        worst = np.maximum(worst, np.abs(bias))
    return worst


def predictions(ev, predict):
    """The predicted CTRs of `predict` on every eval batch, in eval order."""
    return np.concatenate([predict(b) for b in ev["batches"]])


def scores(ev, predict):
    return scores_of(ev, predictions(ev, predict))


def scores_of(ev, p):
    """Every quality figure of predicted CTRs `p` (aligned with the eval rows)."""
    y, q = ev["y"], ev["q"]
    biases = bucket_bias(y, p)
    return {
        "auc": metrics.auc(y, p),
        "per_query_auc": metrics.per_query_auc(y, p, q),
        "ne": metrics.normalized_entropy(y, p),
        "mean_pred_over_mean_label": float(p.mean() / y.mean()),
        "bucket_bias": {str(k): v[0] for k, v in biases.items()},
        "bucket_count": {str(k): v[1] for k, v in biases.items()},
        "bucket_noise": {str(k): v[2] for k, v in biases.items()},
        "max_abs_bucket_bias": max(abs(v[0]) for v in biases.values()) if biases else float("nan"),
        # DESIGN §8: the variance of the calibration bias across buckets (population variance)
        "bucket_bias_variance": float(np.var([v[0] for v in biases.values()])) if len(biases) >= 2 else float("nan"),
        "calibrated_pass_rate": float(np.mean(calibrated_draws(p) <= BIAS_GOAL)),
    }


def train_baseline(data_dir, seed):
    config = TrainerConfig(shuffle_seed=seed)
    tf.keras.utils.set_random_seed(seed)
    train = inputs.parsed_batches([os.path.join(data_dir, "Split-train")], config.batch_size,
                                  shuffle_seed=seed, exposed_only=True)
    model = BaselineRanker(config)
    model.embedding.adapt(train)
    model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate),
                  loss=tf.keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(train.map(inputs.to_model_io), epochs=config.epochs, verbose=0)
    return lambda b: tf.sigmoid(model({k: b[k] for k in F.MODEL_INPUTS}, training=False)).numpy().ravel()


def train_ranker(data_dir, seed, config: RankerConfig, teacher=None, return_model=False):
    """Trains on whole-request batches; with `teacher`, its logits are added as `teacher_logit`."""
    tf.keras.utils.set_random_seed(seed)
    train = ranker.request_batches([os.path.join(data_dir, "Split-train")], config.requests_per_batch,
                                   shuffle_seed=seed, exposed_only=True)
    if teacher is not None:  # the teacher pass, in memory (the pipeline's TeacherInference writes it)
        train = train.map(lambda b: {**b, F.TEACHER_LOGIT_KEY: teacher.forward(b, training=False).logit[:, None]})
    model = ranker.build_and_train(config, train, epochs=config.epochs)
    if return_model:
        return model
    return lambda b: model.predict_ctr(b).numpy()


def feature_only_ceiling(data_dir, ev):
    """AUC of σ(ρ without id noise)·exam·fmt, with the generator's world (synthetic data only)."""
    with open(os.path.join(data_dir, "report.json")) as f:
        report = json.load(f)
    if report.get("source") != "synthetic":
        return None
    config = synthetic.SyntheticConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in report["config"].items()})
    world = synthetic.World(config)
    # The latent vectors are linear in the dense features plus id noise: recover the linear part.
    item_obs = world.item_dense @ np.linalg.lstsq(world.item_dense, world.item_latent, rcond=None)[0]
    user_obs = world.user_dense @ np.linalg.lstsq(world.user_dense, world.user_latent, rcond=None)[0]
    preds = []
    for b in ev["batches"]:
        items, users = b["item_id"].numpy()[:, 0], b["user_id"].numpy()[:, 0]
        context = np.stack([user_obs[u] + world.token_embedding[t].mean(0)
                            for u, t in zip(users, b["query_tokens"].to_list())])
        rel = (config.relevance_scale * (item_obs[items] * context).sum(1) / np.sqrt(config.latent_dim)
               + config.popularity_weight * world.pop_z[items] + config.relevance_bias)
        pos, fmt = b["ui_position"].numpy()[:, 0], b["ui_format"].numpy()[:, 0]
        preds.append(1 / (1 + np.exp(-rel)) * synthetic.exam_probability(pos, config.position_decay)
                     * np.asarray(config.format_effect)[fmt])
    return metrics.auc(ev["y"], np.concatenate(preds))


def fmt(values, digits=4):
    values = np.asarray(values, dtype=np.float64)
    return f"{np.nanmean(values):.{digits}f} ± {np.nanstd(values):.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="Examples dir with Split-train/Split-eval (default: generate synthetic)")
    parser.add_argument("--requests", type=int, default=5_000, help="requests to generate (without --data)")
    parser.add_argument("--data-seed", type=int, default=0, help="generator seed (without --data)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per variant (>= 3 for the report)")
    parser.add_argument("--ablations", action="store_true", help="also run one-switch-off variants of the ranker")
    parser.add_argument("--distill", action="store_true",
                        help="also train a teacher (RankerConfig.teacher()) and a student distilled from it")
    parser.add_argument("--json", help="write all figures to this JSON file")
    args = parser.parse_args(argv)

    tmp = None
    data_dir = args.data
    if data_dir is None:
        tmp = tempfile.mkdtemp(prefix="ranking-quality-")
        data_dir = os.path.join(tmp, "synthetic")
        start = time.time()
        synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=args.requests, seed=args.data_seed), data_dir)
        print(f"generated synthetic data: {args.requests} requests, seed {args.data_seed} ({time.time() - start:.0f} s)")
    dataset = "synthetic"
    report_path = os.path.join(data_dir, "report.json")
    if os.path.exists(report_path):
        with open(report_path) as f:
            dataset = json.load(f).get("source", dataset)
    ev = load_eval(data_dir)
    oracle = metrics.auc(ev["y"], ev["o"]) if (ev["o"] >= 0).all() else float("nan")
    ceiling = feature_only_ceiling(data_dir, ev) if dataset == "synthetic" else None

    default = RankerConfig()
    variants = {"baseline": lambda seed: train_baseline(data_dir, seed),
                "ranker": lambda seed: train_ranker(data_dir, seed, default)}
    if args.ablations:
        for name, change in {"ranker_no_qu": dict(qu_dim=0), "ranker_no_cross": dict(cross_layers=0),
                             "ranker_no_rank": dict(rank_loss="none"), "ranker_no_bias": dict(bias_constraints=False),
                             "ranker_lspr": dict(lspr=True)}.items():
            variants[name] = lambda seed, c=default.replace(**change): train_ranker(data_dir, seed, c)

    if args.distill:
        teacher_config = RankerConfig.teacher()
        holder = {}

        def teacher_model():
            if "model" not in holder:  # one teacher (seed 0) for every student seed
                start = time.time()
                holder["model"] = train_ranker(data_dir, 0, teacher_config, return_model=True)
                holder["scores"] = scores(ev, lambda b: holder["model"].predict_ctr(b).numpy())
                print(f"  teacher: AUC {holder['scores']['auc']:.4f} ({time.time() - start:.0f} s)", flush=True)
            return holder["model"]

        variants["ranker_distilled"] = lambda seed: train_ranker(data_dir, seed, default, teacher=teacher_model())

    results = {}
    for name, train in variants.items():
        results[name] = []
        for seed in range(args.seeds):
            start = time.time()
            figures = scores(ev, train(seed))
            figures["train_seconds"] = time.time() - start
            results[name].append(figures)
            print(f"  {name} seed {seed}: AUC {figures['auc']:.4f}  max|bucket bias| {figures['max_abs_bucket_bias']:.3f}"
                  f"  ({figures['train_seconds']:.0f} s)", flush=True)

    print()
    print(f"dataset: {dataset} ({data_dir}); eval shown candidates: {ev['y'].size}, click rate {ev['y'].mean():.4f}; "
          f"seeds: {args.seeds}")
    print(f"ranker config: {default.to_json()}")
    print(f"oracle AUC (true_ctr): {oracle:.4f}")
    if oracle == oracle:  # the calibration goal applied to the truth itself (buckets of true_ctr)
        oracle_bias = bucket_bias(ev["y"], ev["o"])
        print("oracle calibration bias per true-CTR bucket: " + ", ".join(
            f"{k}: {v[0]:+.3f} (n={v[1]}, sampling s.d. ≈{v[2]:.3f})" for k, v in oracle_bias.items())
            + f"; max |bias| {max(abs(v[0]) for v in oracle_bias.values()):.3f}; true_ctr meets the "
            f"<= {BIAS_GOAL} goal in {np.mean(calibrated_draws(ev['o']) <= BIAS_GOAL):.0%} of click draws")
    if ceiling is not None:
        print(f"feature-only plug-in AUC (generator's projections, no id noise): {ceiling:.4f}")
    if args.distill:
        print(f"teacher ({RankerConfig.teacher().to_json()}), seed 0: AUC {holder['scores']['auc']:.4f}, "
              f"NE {holder['scores']['ne']:.4f}")
    header = f"{'variant':<18}{'AUC':>18}{'oracle − AUC':>18}{'PerQueryAUC':>18}{'NE':>18}{'max|bucket bias|':>20}{'Σŷ/Σy':>16}"
    print(header)
    for name, runs in results.items():
        gap = [oracle - r["auc"] for r in runs]
        print(f"{name:<18}{fmt([r['auc'] for r in runs]):>18}{fmt(gap):>18}{fmt([r['per_query_auc'] for r in runs]):>18}"
              f"{fmt([r['ne'] for r in runs]):>18}{fmt([r['max_abs_bucket_bias'] for r in runs], 3):>20}"
              f"{fmt([r['mean_pred_over_mean_label'] for r in runs], 3):>16}")
    print()
    edges = (0.0,) + BUCKETS + (1.0,)
    print(f"calibration bias Σ(y−ŷ)/Σy per predicted-CTR bucket (mean ± std over seeds; buckets with >= {MIN_BUCKET} "
          "examples in a run; sampling s.d. = the spread click sampling alone gives a perfectly calibrated model)")
    for name, runs in results.items():
        cells = []
        for k in range(len(BUCKETS) + 1):
            values = [r["bucket_bias"][str(k)] for r in runs if str(k) in r["bucket_bias"]]
            counts = [r["bucket_count"][str(k)] for r in runs if str(k) in r["bucket_count"]]
            noise = [r["bucket_noise"][str(k)] for r in runs if str(k) in r["bucket_noise"]]
            if values:
                cells.append(f"[{edges[k]:.2f},{edges[k + 1]:.2f}) {fmt(values, 3)} (n≈{int(np.mean(counts))}, "
                             f"sampling s.d. ≈{np.mean(noise):.3f}, {len(values)} runs)")
        print(f"  {name}: " + "; ".join(cells))
    print()
    for name, runs in results.items():
        gap = np.mean([oracle - r["auc"] for r in runs])
        bias = np.nanmean([r["max_abs_bucket_bias"] for r in runs]) if any(
            not np.isnan(r["max_abs_bucket_bias"]) for r in runs) else float("nan")
        bias_check = ("n/a: no bucket has enough examples" if np.isnan(bias)
                      else f"{bias:.3f} ({'meets' if bias <= BIAS_GOAL else 'misses'} <= {BIAS_GOAL})")
        pass_rate = np.mean([r["calibrated_pass_rate"] for r in runs])
        print(f"goal check {name}: AUC gap {gap:.4f} ({'meets' if gap <= AUC_GAP_GOAL else 'misses'} <= {AUC_GAP_GOAL}); "
              f"max |bucket bias| {bias_check}; a perfectly calibrated model with these predictions would meet "
              f"the bias goal in {pass_rate:.0%} of click draws")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dataset": dataset, "oracle_auc": oracle, "feature_only_auc": ceiling, "seeds": args.seeds,
                       "teacher": holder.get("scores") if args.distill else None,
                       "ranker_config": default.to_dict(), "results": results}, f, indent=2)
    if tmp:
        tf.io.gfile.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
