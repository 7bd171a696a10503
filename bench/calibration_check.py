"""Is a ranker's calibration bias per predicted-CTR bucket a model error or click noise?

On synthetic data every row carries its true CTR o (`true_ctr`), so a bucket's bias
Σ(y − ŷ)/Σy (DESIGN §8) splits exactly into two parts measured on the same rows:

    Σ(y − ŷ)/Σy  =  Σ(y − o)/Σy          +  Σ(o − ŷ)/Σy
    measured        click noise of the       the model's own error
                    bucket's rows            (no model can remove the first part)

and the model's error against the truth alone is reported as Σ(o − ŷ)/Σo ("truth bias", free of
click noise). For the ranker without and with bias constraints (Factory Floor §7) and for the
package's default ranker, 3 training seeds each, on the train and the eval split's shown rows, this
prints every bucket's count, measured bias, click-noise part and truth bias, and the duals λ the
constraints learned (CTR buckets, then ui_position values). It answers whether the constraints fail
to calibrate (a bug: truth bias unchanged on train) or calibrate and the measured eval bias is
click noise (a property of the data).

    python bench/calibration_check.py [--requests 5000] [--seeds 3] [--bias-alpha 0.01 ...] [--only-extra]
                                      [--json out.json]
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ranking_ablations as RA  # noqa: E402
import ranking_quality as RQ  # noqa: E402

from cascade_ranking.datasources import synthetic  # noqa: E402
from cascade_ranking.models.ranker_config import RankerConfig  # noqa: E402

VARIANTS = {
    "baseline (no constraints)": RankerConfig.plain(),
    "+bias constraints": RankerConfig.plain(bias_constraints=True),
    "default ranker (all defaults, no teacher)": RankerConfig(distill_weight=0.0),
}


def bucket_parts(y, o, p, boundaries=RQ.BUCKETS, min_count=RQ.MIN_BUCKET):
    """{bucket: {count, measured, click_noise, model_part, truth_bias}} for buckets of p with >= min_count rows."""
    bucket = np.searchsorted(np.asarray(boundaries), p, side="right")
    out = {}
    for k in range(len(boundaries) + 1):
        m = bucket == k
        if m.sum() < min_count or y[m].sum() == 0:
            continue
        clicks, truth, pred = y[m].sum(), o[m].astype(np.float64).sum(), p[m].astype(np.float64).sum()
        out[str(k)] = {"count": int(m.sum()), "measured": float((clicks - pred) / clicks),
                       "click_noise": float((clicks - truth) / clicks), "model_part": float((truth - pred) / clicks),
                       "truth_bias": float((truth - pred) / truth)}
    return out


def worst(buckets, field):
    return max((abs(v[field]) for v in buckets.values()), default=float("nan"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--bias-alpha", type=float, nargs="*", default=[],
                        help="also run +bias constraints with each of these α (the default config has α = "
                             f"{RankerConfig().bias_alpha}; a smaller α is a tighter constraint)")
    parser.add_argument("--only-extra", action="store_true", help="run only the --bias-alpha variants")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    variants = {} if args.only_extra else dict(VARIANTS)
    variants.update({f"+bias constraints α={a:g}": RankerConfig.plain(bias_constraints=True, bias_alpha=a)
                     for a in args.bias_alpha})
    work = tempfile.mkdtemp(prefix="calibration-check-")
    data_dir = os.path.join(work, "synthetic")
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=args.requests, seed=0), data_dir)
    splits = {s: RQ.load_eval(data_dir, s) for s in ("train", "eval")}
    edges = (0.0,) + RQ.BUCKETS + (1.0,)
    results = {}
    for name, config in variants.items():
        results[name] = []
        for seed in range(args.seeds):
            model, _ = RA.train(data_dir, seed, config)
            run = {s: bucket_parts(ev["y"], ev["o"], RQ.predictions(ev, lambda b: model.predict_ctr(b).numpy()))
                   for s, ev in splits.items()}
            if model.bias_constraints is not None:
                run["duals"] = model.bias_constraints.duals.numpy().round(4).tolist()
            results[name].append(run)
            print(f"{name} seed {seed}: " + "; ".join(
                f"{s}: max |truth bias| {worst(run[s], 'truth_bias'):.3f}, max |measured| {worst(run[s], 'measured'):.3f}"
                for s in splits)
                  + (f"; duals {run['duals']}" if "duals" in run else ""), flush=True)
    print(f"\nsynthetic {args.requests} requests, {args.seeds} seeds; per bucket of predicted CTR (>= {RQ.MIN_BUCKET} rows): "
          "measured Σ(y−ŷ)/Σy = click noise Σ(y−o)/Σy + model part Σ(o−ŷ)/Σy; truth bias Σ(o−ŷ)/Σo (mean ± std over seeds)")
    for split in splits:
        for name, runs in results.items():
            print(f"  [{split}] {name}")
            for k in sorted({k for r in runs for k in r[split]}, key=int):
                cells = [r[split][k] for r in runs if k in r[split]]
                f = {f: RQ.fmt([c[f] for c in cells], 3) for f in ("measured", "click_noise", "model_part", "truth_bias")}
                print(f"    [{edges[int(k)]:.2f},{edges[int(k) + 1]:.2f}) n≈{int(np.mean([c['count'] for c in cells]))}: "
                      f"measured {f['measured']} = noise {f['click_noise']} + model {f['model_part']}; "
                      f"truth bias {f['truth_bias']}")
    tf.io.gfile.rmtree(work)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"requests": args.requests, "seeds": args.seeds, "buckets": list(edges), "results": results}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
