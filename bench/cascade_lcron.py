"""Benchmark: LCRON against independent per-stage BCE on a three-stage cascade (DESIGN §9).

    /tmp/venvtest/bin/python bench/cascade_lcron.py [--datasets synthetic,movielens] [--seeds 0,1,2]

Cascade (models.cascade_model.default_stages): retrieval two-tower → pre-ranking light model
(two towers + MLP) → ranking DCN. Label: the GT tier `rerank_pos`. Every method trains the same
stages on the same lists with the same optimiser (Adam 2e-3, batch 64 lists), for up to
--max_epochs epochs, keeping the epoch with the best e2e recall on a validation part of the train
split, held out the way eval is (synthetic: 10 % of the requests by a hash of request_id;
MovieLens: each user's latest train window). The same for every method and seed.
Figures are measured on the eval split, identical for every method and seed, and printed as
mean ± std (sample std, ddof = 1) over the seeds.

Datasets:
* synthetic — `datasources.synthetic.write_dataset(SyntheticConfig())` (default config, seed 0:
  5,000 requests, 50 candidates each, 10 GT). Quotas 40 → 30 → 20 (DESIGN §8).
* movielens — `datasources.movielens.convert_movielens` on ml-latest-small. Lists have 31..40
  candidates (≤ 10 rated + 30 sampled) and 0..10 GT (ratings ≥ 4). Quotas scaled by 40/50:
  32 → 24 → 16 (a stage with fewer survivors than its quota keeps them all). The converter writes
  the rated items first, so candidates are shuffled within each list (seed 0) so that list
  position carries nothing.
LCRON trains with q = 10 on every stage and τ = 50 (the reference settings, DESIGN §5) unless
--lcron_quota / --tau say otherwise.
"""
import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from datasources import shared_data, synthetic  # noqa: E402
from datasources.movielens import convert_movielens  # noqa: E402
from models import cascade_model as CM  # noqa: E402
from models import list_inputs as LI  # noqa: E402

QUOTAS = {"synthetic": (40, 30, 20), "movielens": (32, 24, 16)}


def _validation_rows(lists, dataset, fraction=0.1):
    """Validation requests, held out of train the way the eval split is held out of the data.

    synthetic: requests are i.i.d. and split by a hash of request_id, so 10 % by another hash.
    movielens: eval is each user's latest ratings, so validation is each user's latest train window
    (request ids grow with time within a user).
    """
    ids = np.asarray(lists["request_id"]).reshape(-1)
    if dataset == "movielens":
        users = np.asarray(lists["user_id"]).reshape(-1)
        last = {}
        for u, i in zip(users, ids):
            last[u] = max(i, last.get(u, -1))
        return np.array([last[u] == i for u, i in zip(users, ids)])
    bucket = np.array([int(hashlib.sha256(f"valid-{i}".encode()).hexdigest(), 16) % 1000 for i in ids])
    return bucket < int(fraction * 1000)


def load(dataset: str, work_dir: str, num_requests: int):
    if dataset == "synthetic":
        out = os.path.join(work_dir, f"synthetic_{num_requests}")
        if not os.path.exists(os.path.join(out, "report.json")):
            synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=num_requests), out, overwrite=True)
        shuffle = None  # the generator already writes each request's candidates in random order
    elif dataset == "movielens":
        src = shared_data.shared_data_dir("ml-latest-small") or "/work/shared/data/ml-latest-small"
        if not os.path.exists(src):
            raise SystemExit(f"MovieLens not found at {src}")
        out = os.path.join(work_dir, "movielens")
        if not os.path.exists(os.path.join(out, "report.json")):
            convert_movielens(src, out, overwrite=True)
        shuffle = 0
    else:
        raise SystemExit(f"unknown dataset {dataset}")
    train = LI.request_lists_from_candidates(os.path.join(out, "Split-train"), shuffle_seed=shuffle)
    test = LI.request_lists_from_candidates(os.path.join(out, "Split-eval"), list_size=LI.list_size_of(train),
                                            shuffle_seed=shuffle)
    valid_rows = _validation_rows(train, dataset)
    return LI.take_lists(train, ~valid_rows), LI.take_lists(train, valid_rows), test


def run_one(method, seed, train, valid, test, quotas, args):
    start = time.time()
    model = CM.train_cascade(train, method, seed=seed, epochs=args.max_epochs, batch_size=args.batch_size,
                             learning_rate=args.learning_rate, quota=args.lcron_quota, tau=args.tau,
                             valid_lists=valid, valid_quotas=quotas)
    seconds = time.time() - start
    scores = model.predict_stage_scores(test)
    metrics = CM.evaluate_cascade(scores, test, quotas, model.stage_names)
    metrics["best_epoch"] = int(np.argmax(model.history_)) + 1
    metrics["train_seconds"] = seconds
    if model.weighting is not None:
        metrics["w"] = [float(w) for w in model.weighting.w.numpy()]
    metrics["valid_curve"] = [round(float(x), 4) for x in model.history_]
    tf.keras.backend.clear_session()
    return metrics


def print_stage_flops():
    """FLOPs per candidate of the default stages (analytic, models.preranking conventions)."""
    stages = CM.default_stages()
    retrieval = stages["retrieval"]
    figures = {
        "retrieval (two-tower, u·v)": {"per_candidate": retrieval.item_tower.flops() + 2 * retrieval.item_tower.units[-1],
                                       "per_request": retrieval.query_tower.flops()},
        "prerank (HAP light: two towers + MLP)": stages["prerank"].flops(),
        "rank (HAP strong: DCNv2 + MLP)": stages["rank"].flops(),
    }
    print("FLOPs of the stage models (from the concatenated embeddings up):")
    for name, f in figures.items():
        print(f"  {name:40s} {f['per_candidate']:>8,d} per candidate  {f['per_request']:>8,d} per request")
    tf.keras.backend.clear_session()


def summarise(results):
    lines = []
    for dataset, by_method in results.items():
        keys = [k for k in next(iter(by_method.values()))[0] if k.startswith(("e2e", "recall", "ndcg"))]
        lines.append(f"\n== {dataset} (mean ± std over {len(next(iter(by_method.values())))} seeds, eval split) ==")
        lines.append(f"{'method':8s} " + " ".join(f"{k:>22s}" for k in keys) + f" {'epochs':>8s}")
        for method, runs in by_method.items():
            cells = []
            for k in keys:
                v = np.array([r[k] for r in runs])
                cells.append(f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.4f}".rjust(22))
            epochs = ",".join(str(r["best_epoch"]) for r in runs)
            lines.append(f"{method:8s} " + " ".join(cells) + f" {epochs:>8s}")
        methods = list(by_method)
        if "lcron" in methods and "bce" in methods:
            a = np.array([r["e2e_recall"] for r in by_method["lcron"]])
            b = np.array([r["e2e_recall"] for r in by_method["bce"]])
            diff = a - b
            std = max(a.std(ddof=1), b.std(ddof=1)) if len(a) > 1 else 0.0
            lines.append(f"LCRON − BCE e2e recall: {diff.mean():+.4f} (per seed {', '.join(f'{d:+.4f}' for d in diff)});"
                         f" larger seed std {std:.4f}; beats BCE by more than the std: {bool(diff.mean() > std)}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="synthetic,movielens")
    parser.add_argument("--methods", default="lcron,bce")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max_epochs", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--lcron_quota", default="10", help="LCRON training quota q: one int, or one per stage (30,24,16)")
    parser.add_argument("--tau", type=float, default=50.0)
    parser.add_argument("--num_requests", type=int, default=synthetic.SyntheticConfig().num_requests)
    parser.add_argument("--work_dir", default="/tmp/cascade_lcron_bench")
    parser.add_argument("--json", default=None, help="also write every run's figures here")
    args = parser.parse_args(argv)
    quota = [int(q) for q in str(args.lcron_quota).split(",")]
    args.lcron_quota = quota[0] if len(quota) == 1 else quota
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    print_stage_flops()
    results = {}
    for dataset in args.datasets.split(","):
        train, valid, test = load(dataset, args.work_dir, args.num_requests)
        quotas = QUOTAS[dataset]
        print(f"{dataset}: {LI.num_lists(train)} train / {LI.num_lists(valid)} valid / {LI.num_lists(test)} eval lists "
              f"of {LI.list_size_of(train)}; quotas {quotas}", flush=True)
        results[dataset] = {m: [] for m in methods}
        for seed in seeds:
            for method in methods:
                metrics = run_one(method, seed, train, valid, test, quotas, args)
                results[dataset][method].append(metrics)
                print(f"  {method:6s} seed {seed}: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                                                   for k, v in metrics.items()}), flush=True)
    print(summarise(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
