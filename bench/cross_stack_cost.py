"""Forward + gradient time of the ranker's cross stack against the TFRS cross layers it runs.

Times one `tf.function` step (forward, sum, gradient to the input and the weights) on a
[rows, width] input, `--calls` calls after a warm-up, for:
    rezero_stack      `models.cross.CrossStack` (the ReZero ramp as `Cross(alpha · x0, x)`)
    branch_rezero     the form before session 15, `alpha · (Cross(x0, x) − x) + x` per layer on
                      TFRS layers, with the same alpha schedule (the reference of the change)
    tfrs_layers       the same number of `tfrs.layers.dcn.Cross` layers, no ramp (the floor)
    dense_reference   one Dense(256, relu) on the same input (the ranker's first hidden layer)
The defaults are the full ranker's: 2 layers of rank 32 on its 120-wide quality input, 954 rows
(a batch of 100 requests' shown rows in `bench/ranking_speed.py`). Rounds interleave the three;
medians are printed.

    python bench/cross_stack_cost.py [--rows 954] [--width 120] [--layers 2] [--rank 32] [--calls 300] [--rounds 3]
"""
import argparse
import statistics
import sys
import time

import tensorflow as tf
import tensorflow_recommenders as tfrs

from cascade_ranking.models.cross import CrossStack, alpha_schedule


def step_fn(forward, variables):
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(forward(x))
        return tape.gradient(y, [x] + variables())
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=954)
    parser.add_argument("--width", type=int, default=120)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    x0 = tf.random.stateless_normal([args.rows, args.width], seed=[0, 1])

    stack = CrossStack(args.layers, args.rank, ramp_steps=200)
    tfrs_layers = [tfrs.layers.dcn.Cross(projection_dim=args.rank) for _ in range(args.layers)]
    branch_layers = [tfrs.layers.dcn.Cross(projection_dim=args.rank) for _ in range(args.layers)]
    branch_step = tf.Variable(0, dtype=tf.int64, trainable=False)
    dense = tf.keras.layers.Dense(256, activation="relu")

    def run_tfrs(x):
        out = x
        for layer in tfrs_layers:
            out = layer(x, out)
        return out

    def run_branch(x):
        step = branch_step.read_value()
        branch_step.assign_add(1)
        out = x
        for layer in branch_layers:
            alpha = tf.cast(alpha_schedule(step, 200), x.dtype)
            out = alpha * (layer(x, out) - out) + out
        return out

    steps = {
        "rezero_stack": step_fn(lambda x: stack(x, training=True), lambda: stack.trainable_variables),
        "branch_rezero": step_fn(run_branch, lambda: [v for layer in branch_layers for v in layer.trainable_variables]),
        "tfrs_layers": step_fn(run_tfrs, lambda: [v for layer in tfrs_layers for v in layer.trainable_variables]),
        "dense_reference": step_fn(dense, lambda: dense.trainable_variables),
    }
    for step in steps.values():
        for _ in range(20):
            step(x0)
    times = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            start = time.perf_counter()
            for _ in range(args.calls):
                steps[name](x0)
            times[name].append((time.perf_counter() - start) / args.calls * 1000)
    print(f"forward + gradient on [{args.rows}, {args.width}], {args.layers} cross layers of rank {args.rank} "
          f"(median of {args.rounds} rounds of {args.calls} calls):")
    for name, values in times.items():
        print(f"  {name:16s} {statistics.median(values):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
