"""Why every Open Bandit variant of the ranking ablations has NE > 1: policy shift or under-training?

The ablations train on the Bernoulli-Thompson-Sampling log and evaluate on the uniform-random log
(`bench/ranking_ablations.py`, dataset `obd`). Their predicted CTRs come out well above the eval
click rate (Σŷ/Σy ≈ 1.8), and NE = mean log loss / H(p̄) is then above 1. Two causes are possible:

    policy shift    the random log clicks less than the bts log (a property of the data): a model
                    calibrated on train is then miscalibrated on eval by the ratio of the two rates;
    under-training  the logit starts at 0 (σ = 0.5) and 3 epochs of 100-row batches on ~40 clicks
                    do not bring it down to the base rate (a property of the training budget).

This trains the ablation baseline (`RankerConfig.plain()`, 100 impressions a batch, Q·U off) for
each --epochs value and --seeds training seeds, and prints Σŷ/Σy on the train split (in-sample:
no shift) and on the eval split, the AUC and NE on eval, and the click rates of both splits.
In-sample Σŷ/Σy well above 1 that falls towards 1 with more epochs says under-training; eval
Σŷ/Σy ≈ (train rate / eval rate) once train is calibrated says the rest is policy shift.

    python bench/obd_calibration.py [--epochs 3 10] [--seeds 3] [--json out.json]
"""
import argparse
import json
import os
import sys
import tempfile

import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ranking_ablations as RA  # noqa: E402  (bench/ is not a package)
import ranking_quality as RQ  # noqa: E402
import report  # noqa: E402

from cascade_ranking.models import metrics  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if min(args.epochs) < 1 or args.seeds < 1:
        parser.error("--epochs and --seeds must be >= 1")
    work_dir = tempfile.mkdtemp(prefix="obd-calibration-")
    data_dir = RA.prepare("obd", work_dir, requests=0)
    if data_dir is None:
        return 0
    splits = {s: RQ.load_eval(data_dir, s) for s in ("train", "eval")}
    rates = {s: float(ev["y"].mean()) for s, ev in splits.items()}
    print(f"OBD small sample, campaign all: train (bts) click rate {rates['train']:.4f} "
          f"({int(splits['train']['y'].sum())} clicks), eval (random) {rates['eval']:.4f} "
          f"({int(splits['eval']['y'].sum())} clicks); train/eval rate ratio {rates['train'] / rates['eval']:.3f}")
    base = RA.variant_configs("obd", ("off",))[("baseline", "off")]
    out = {"click_rate": rates, "seeds": args.seeds, "results": {}}
    for epochs in args.epochs:
        runs = []
        for seed in range(args.seeds):
            model, _ = RA.train(data_dir, seed, base.replace(epochs=epochs))
            p = {s: RQ.predictions(ev, lambda b: model.predict_ctr(b).numpy()) for s, ev in splits.items()}
            runs.append({"train_calibration": float(p["train"].sum() / splits["train"]["y"].sum()),
                         "eval_calibration": float(p["eval"].sum() / splits["eval"]["y"].sum()),
                         "eval_auc": metrics.auc(splits["eval"]["y"], p["eval"]),
                         "eval_ne": metrics.normalized_entropy(splits["eval"]["y"], p["eval"])})
        out["results"][str(epochs)] = runs
        cells = {k: report.mean_std([r[k] for r in runs], 3) for k in runs[0]}
        print(f"epochs {epochs:>3}: Σŷ/Σy train {cells['train_calibration']}, eval {cells['eval_calibration']}; "
              f"eval AUC {cells['eval_auc']}, NE {cells['eval_ne']}", flush=True)
    tf.io.gfile.rmtree(work_dir)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(out, f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
