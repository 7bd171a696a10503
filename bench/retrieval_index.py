"""ScaNN against BruteForce, the two retrieval indexes of `retrieval.index` (models/scann_index.py).

Corpus (synthetic, new for every seed): --items embeddings of dimension --dim drawn from a mixture
of --clusters isotropic Gaussians, v = c + σ·ε with the centre c drawn uniformly from C centres
c ~ N(0, I_d) and ε ~ N(0, I_d), σ = --sigma (default 1: a cluster's spread equals the spread of
the centres, so the data has structure without being separable; pure N(0, I) noise, the hardest
case for any partition, is `--clusters 1`). The --queries queries are drawn the same way. Item ids
are 0..N−1.

Each index is built by the package's `scann_index.build_index` with its defaults (what
`retrieval.index: brute_force` / `scann` export, k = 100), wrapped in a tf.Module whose one
signature maps query embeddings [B, d] to the top-100 (ids, scores), saved with
`scann_index.save_options` and loaded back with `scann_index.load_saved_model`: the served path,
without the query tower. Per seed it reports:
  build s           `build_index` (BruteForce: copying the table into a variable; ScaNN: k-means
                    partition, anisotropic quantization training, the searcher's serialization)
  saved MB          the SavedModel's size on disk
  latency ms        median of the loaded signature's wall time, per call of 1 query (--single-calls
                    calls) and of 100 queries (all --queries, 100 at a time, --passes times); the
                    two indexes are called alternately, call by call, so both share the noise of a
                    shared CPU
  recall@100        ScaNN: |top-100 of ScaNN ∩ top-100 of BruteForce| / 100, averaged over the
                    queries; BruteForce: the same against numpy's exact top-100 (float32) of the
                    first 100 queries, a check that the reference is exact
and, as ratios measured in the same run, the speed-up BruteForce ms / ScaNN ms per batch size (the
median over the pairs of calls made back to back, each pair sharing the machine's load of the
moment) and the build time ScaNN / BruteForce. Every "±" is the sample standard deviation (ddof 1) over seeds.
--json PATH writes the per-seed figures and their mean ± std.

    python bench/retrieval_index.py [--items 1000000] [--dim 32] [--queries 1000] [--seeds 3]
                                    [--clusters 1000] [--sigma 1.0] [--single-calls 200] [--passes 3]
                                    [--json PATH]
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from cascade_ranking.models import scann_index

K = 100
BATCH = 100


def corpus(items: int, dim: int, queries: int, clusters: int, sigma: float, seed: int):
    """(items [N, d], queries [Q, d]) float32 from the Gaussian mixture of the module docstring."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)

    def draw(n):
        return centres[rng.integers(clusters, size=n)] + sigma * rng.standard_normal((n, dim), dtype=np.float32)

    return draw(items), draw(queries)


class Served(tf.Module):
    """One signature: query embeddings [B, d] → {"item_ids": [B, k], "scores": [B, k]}."""

    def __init__(self, index, dim: int):
        super().__init__()
        self.index = index
        self.search = tf.function(lambda q: dict(zip(("scores", "item_ids"), self.index(q))),
                                  input_signature=[tf.TensorSpec([None, dim], tf.float32)], autograph=False)


def served_index(kind: str, items: np.ndarray, directory: str):
    """(loaded signature, build seconds, saved MB) of the package's `kind` index over `items`."""
    start = time.perf_counter()
    index = scann_index.build_index(None, items, tf.range(items.shape[0], dtype=tf.int64), K,
                                    scann_index.IndexConfig(index=kind))
    build = time.perf_counter() - start
    module = Served(index, items.shape[1])
    module.search(tf.constant(items[:2]))  # traced before saving
    tf.saved_model.save(module, directory, signatures={"serving_default": module.search},
                        options=scann_index.save_options(index))
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)
    loaded = scann_index.load_saved_model(directory)
    return loaded, loaded.signatures["serving_default"], build, size / 1e6


def timed(function, queries: np.ndarray):
    start = time.perf_counter()
    out = function(tf.constant(queries))
    ids = out["item_ids"].numpy()
    return (time.perf_counter() - start) * 1000, ids


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of |a_i ∩ b_i| / k."""
    return float(np.mean([len(np.intersect1d(x, y)) / a.shape[1] for x, y in zip(a, b)]))


def run_seed(args, seed: int, tmp: str) -> dict:
    items, queries = corpus(args.items, args.dim, args.queries, args.clusters, args.sigma, seed)
    result, functions, keep = {}, {}, []
    for kind in scann_index.INDEXES:
        loaded, function, build, size = served_index(kind, items, os.path.join(tmp, f"{kind}-{seed}"))
        keep.append(loaded)
        for _ in range(3):
            function(tf.constant(queries[:BATCH]))  # warm-up
        functions[kind] = function
        result[kind] = {"build_s": build, "saved_mb": size}
        if kind == "scann":
            result[kind]["parameters"] = {**scann_index.IndexConfig(index="scann").scann_parameters(args.items, K),
                                          "avq_threshold": scann_index.IndexConfig().avq_threshold(items)}
    single = {kind: [] for kind in functions}
    for i in range(args.single_calls):
        for kind, function in functions.items():
            single[kind].append(timed(function, queries[i % args.queries:i % args.queries + 1])[0])
    batched = {kind: [] for kind in functions}
    answers = {kind: [] for kind in functions}
    for passed in range(args.passes):
        for start in range(0, args.queries, BATCH):
            for kind, function in functions.items():
                ms, ids = timed(function, queries[start:start + BATCH])
                batched[kind].append(ms)
                if passed == 0:
                    answers[kind].append(ids)
    answers = {kind: np.concatenate(parts) for kind, parts in answers.items()}
    first = queries[:BATCH] @ items.T
    exact = np.argpartition(-first, K - 1, axis=1)[:, :K]
    for kind in functions:
        result[kind]["ms_1_query"] = statistics.median(single[kind])
        result[kind][f"ms_{BATCH}_queries"] = statistics.median(batched[kind])
    result["brute_force"]["recall_at_100_vs_numpy"] = overlap(answers["brute_force"][:BATCH], exact)
    result["scann"]["recall_at_100"] = overlap(answers["scann"], answers["brute_force"])
    result["ratios"] = {
        "speedup_1_query": statistics.median(np.divide(single["brute_force"], single["scann"])),
        f"speedup_{BATCH}_queries": statistics.median(np.divide(batched["brute_force"], batched["scann"])),
        "build_scann_over_brute_force": result["scann"]["build_s"] / result["brute_force"]["build_s"],
    }
    return result


def mean_std(values):
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000, help="corpus size")
    parser.add_argument("--dim", type=int, default=32, help="embedding dimension")
    parser.add_argument("--queries", type=int, default=1000, help="queries per seed (a multiple of 100)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (a new corpus each)")
    parser.add_argument("--clusters", type=int, default=1000, help="Gaussian centres of the corpus (1: pure noise)")
    parser.add_argument("--sigma", type=float, default=1.0, help="spread of a cluster around its centre")
    parser.add_argument("--single-calls", type=int, default=200, help="timed calls of 1 query per index")
    parser.add_argument("--passes", type=int, default=3, help="timed passes over the queries, 100 at a time")
    parser.add_argument("--json", help="also write every figure here")
    args = parser.parse_args(argv)
    if args.queries < BATCH or args.queries % BATCH:
        parser.error(f"--queries must be a positive multiple of {BATCH}, got {args.queries}")
    if args.items < 10 * K:
        parser.error(f"--items must be at least {10 * K}, got {args.items}")
    scann_index.require_scann()
    print(f"corpus: {args.items:,} items, d = {args.dim}, {args.clusters} Gaussian clusters (σ = {args.sigma}); "
          f"{args.queries} queries; top {K}; seeds {list(range(args.seeds))}")
    print(f"machine: {os.cpu_count()} CPU cores visible; TF {tf.__version__}, TFRS {tfrs.__version__}")
    tmp = tempfile.mkdtemp(prefix="retrieval_index_")
    runs = []
    try:
        for seed in range(args.seeds):
            start = time.perf_counter()
            run = run_seed(args, seed, tmp)
            runs.append({"seed": seed, **run})
            print(f"seed {seed} ({time.perf_counter() - start:.0f} s): ScaNN recall@100 {run['scann']['recall_at_100']:.4f}, "
                  f"1 query {run['brute_force']['ms_1_query']:.2f} → {run['scann']['ms_1_query']:.2f} ms, "
                  f"{BATCH} queries {run['brute_force'][f'ms_{BATCH}_queries']:.1f} → "
                  f"{run['scann'][f'ms_{BATCH}_queries']:.1f} ms", flush=True)
            for kind in scann_index.INDEXES:
                shutil.rmtree(os.path.join(tmp, f"{kind}-{seed}"), ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    metrics = ("build_s", "saved_mb", "ms_1_query", f"ms_{BATCH}_queries")
    summary = {kind: {m: mean_std([r[kind][m] for r in runs]) for m in metrics} for kind in scann_index.INDEXES}
    summary["scann"]["recall_at_100"] = mean_std([r["scann"]["recall_at_100"] for r in runs])
    summary["brute_force"]["recall_at_100_vs_numpy"] = mean_std([r["brute_force"]["recall_at_100_vs_numpy"] for r in runs])
    summary["ratios"] = {m: mean_std([r["ratios"][m] for r in runs]) for m in runs[0]["ratios"]}

    def fmt(stat, digits):
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"

    print()
    print(f"{'index':<12} {'build s':>15} {'saved MB':>13} {'ms, 1 query':>15} {f'ms, {BATCH} queries':>19} {'recall@100':>17}")
    for kind in scann_index.INDEXES:
        s = summary[kind]
        recall = s.get("recall_at_100") or s.get("recall_at_100_vs_numpy")
        print(f"{kind:<12} {fmt(s['build_s'], 2):>15} {fmt(s['saved_mb'], 0):>13} {fmt(s['ms_1_query'], 2):>15} "
              f"{fmt(s[f'ms_{BATCH}_queries'], 1):>19} {fmt(recall, 4):>17}")
    r = summary["ratios"]
    print(f"ScaNN speed-up over BruteForce (same run): 1 query {fmt(r['speedup_1_query'], 1)}×, {BATCH} queries "
          f"{fmt(r[f'speedup_{BATCH}_queries'], 1)}×; build time ScaNN / BruteForce {fmt(r['build_scann_over_brute_force'], 1)}×")
    print("(BruteForce's recall@100 is against numpy's exact top 100 of the first 100 queries; ScaNN's against BruteForce's.)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(["python", "bench/retrieval_index.py"] + (argv if argv is not None else sys.argv[1:])),
                       "args": vars(args), "machine": {"cpus": os.cpu_count(), "tensorflow": tf.__version__,
                                                        "tfrs": tfrs.__version__},
                       "runs": runs, "summary": summary}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
