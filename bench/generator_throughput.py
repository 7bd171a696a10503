"""Throughput of the synthetic cascade-log generator (rows/s), on this machine.

Prints, for one config, measured in the same run:
  simulate          rows/s of the simulation alone (columns, no encoding)
  encode (wire)     rows/s of the vectorised tf.Example writer the generator uses
                    (datasources.example_wire, in chunks of synthetic.ENCODE_CHUNK_REQUESTS)
  encode (python)   rows/s of building tf.train.Example protos in Python (the reference)
  write             rows/s of `cascade generate` end to end (simulate + encode + gzip TFRecord)
and the ratios encode(wire) / encode(python) and write / encode(python).

    python bench/generator_throughput.py [--requests 2000] [--repeats 3]
"""
import argparse
import os
import statistics
import tempfile
import time

from cascade_ranking.datasources import synthetic
from cascade_ranking.datasources.example_io import make_example


def _rows(columns):
    """Per-row dicts of one request's columns (for the Python-proto reference encoder)."""
    n = len(columns["request_id"])
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = synthetic.SyntheticConfig(num_requests=args.requests)
    rows = args.requests * 50
    world = synthetic.World(config)
    chunk = synthetic.ENCODE_CHUNK_REQUESTS
    sims, fast, slow, writes = [], [], [], []
    for _ in range(args.repeats):
        generated = []
        sims.append(_timed(lambda: generated.extend(synthetic.generate_request(world, i) for i in range(args.requests))))
        fast.append(_timed(lambda: [synthetic.encode_requests(generated[i:i + chunk]) for i in range(0, len(generated), chunk)]))
        rows_per_request = [_rows(c) for c in generated]
        slow.append(_timed(lambda: [make_example(r).SerializeToString(deterministic=True) for rs in rows_per_request for r in rs]))
        with tempfile.TemporaryDirectory() as tmp:
            writes.append(_timed(lambda: synthetic.write_dataset(config, os.path.join(tmp, "out"))))

    def rate(times):
        values = [rows / t for t in times]
        return statistics.mean(values), statistics.pstdev(values)

    print(f"synthetic generator, {args.requests} requests = {rows} rows, {args.repeats} repeats, {os.cpu_count()} cores")
    for name, times in (("simulate", sims), ("encode (wire)", fast), ("encode (python, reference)", slow),
                        ("write (cascade generate)", writes)):
        mean, std = rate(times)
        print(f"  {name:28s} {mean:10,.0f} ± {std:,.0f} rows/s")
    print(f"  encode wire / python         {rate(fast)[0] / rate(slow)[0]:.1f}x")
    print(f"  write / encode python        {rate(writes)[0] / rate(slow)[0]:.1f}x")


if __name__ == "__main__":
    main()
