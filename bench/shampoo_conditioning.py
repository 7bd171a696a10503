"""Lab check (not the pipeline's path): does the package's Shampoo beat AdaGrad where it should?

A bug-or-data check behind BENCHMARKS §10. Shampoo's preconditioner pays off when the loss is
ill-conditioned across the rows and columns of a weight matrix. Here the problem is made that
way, and the two optimizers are compared at equal steps.

The problem is multinomial logistic regression of K classes on d correlated Gaussian features
x = A·z. A has singular values spread geometrically over `--condition`, so the Hessian of the
kernel W [d, K] is ill-conditioned. Labels come from a true W* through a softmax. Both optimizers
start from W = 0 on the same batches at the same learning rate, for each of `--lrs`:
`models.shampoo.Shampoo` (its default warm-up, root interval and ε, with a block larger than d) and
`tf.keras.optimizers.Adagrad`. Printed per learning rate: the training loss after `--steps` steps
minus the Bayes loss of W*, mean ± std over the seeds, and Shampoo's ÷ AdaGrad's.

    .venv/bin/python bench/shampoo_conditioning.py [--seeds 3] [--condition 1000] [--steps 600] [--lrs 0.1 0.5 2]
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from report import mean_std  # noqa: E402

from cascade_ranking.models.shampoo import Shampoo  # noqa: E402


def problem(seed, d, k, n, condition):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a = q * np.geomspace(1.0, 1.0 / np.sqrt(condition), d)  # columns scaled: Cov(x) = A·Aᵀ, condition `condition`
    x = (rng.normal(size=(n, d)) @ a.T).astype(np.float32)
    w_true = (rng.normal(size=(d, k)) * np.sqrt(condition) / 4).astype(np.float32)
    logits = x @ w_true
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    bayes = float(-np.mean(np.log(p[np.arange(n), y] + 1e-12)))
    return x, y, bayes


def train(optimizer, x, y, steps, batch, seed):
    w = tf.Variable(tf.zeros([x.shape[1], int(y.max()) + 1]))
    rng = np.random.default_rng(seed + 1)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, xb @ w)
        optimizer.apply_gradients([(tape.gradient(loss, w), w)])

    for _ in range(steps):
        idx = rng.integers(0, x.shape[0], size=batch)
        step(x[idx], y[idx])
    return float(loss_fn(y, x @ w))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--condition", type=float, default=1000.0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.5, 2.0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--classes", type=int, default=16)
    args = parser.parse_args(argv)
    print(f"multinomial logistic regression, d = {args.dim}, K = {args.classes}, condition {args.condition:g}, "
          f"{args.steps} steps of 256, {args.seeds} seeds: training loss above the Bayes loss")
    problems = [problem(seed, args.dim, args.classes, 20_000, args.condition) for seed in range(args.seeds)]
    for lr in args.lrs:
        gaps = {"adagrad": [], "shampoo": []}
        for seed, (x, y, bayes) in enumerate(problems):
            for name in gaps:
                optimizer = tf.keras.optimizers.Adagrad(lr) if name == "adagrad" else \
                    Shampoo(lr, block_size=max(128, args.dim))
                gaps[name].append(train(optimizer, x, y, args.steps, 256, seed) - bayes)
        ratios = [s / a for s, a in zip(gaps["shampoo"], gaps["adagrad"])]
        print(f"  lr {lr:<5g} adagrad {mean_std(gaps['adagrad'])}  shampoo {mean_std(gaps['shampoo'])}  "
              f"shampoo ÷ adagrad {mean_std(ratios, 3)}", flush=True)

if __name__ == "__main__":
    main()
