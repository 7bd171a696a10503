"""Wall time of the demo pipeline (what `make demo` runs), cold and then fully cached, in one run.

Runs `pipelines.local_runner.run_with_timings` on the default `PipelineConfig` (built-in synthetic
data, 5,000 requests; LocalDagRunner; Beam DirectRunner in multi_processing mode) in a fresh output
directory, then reruns it on the same MLMD store, where every component is a cache hit. Prints the
cold wall time, each component's time, and the cached rerun as a ratio of the cold run (the
reference measured in the same run). Imports and `cascade serve-check` are not included (they are
in `make demo`'s wall time: about 30 s more on this machine).

    python bench/demo_wall.py [--requests 5000] [--beam-mode multi_processing|in_process] [--json out.json]
"""
import argparse
import dataclasses
import json
import os
import sys
import tempfile

from cascade_ranking.datasources.synthetic import SyntheticConfig
from cascade_ranking.pipelines.config import PipelineConfig
from cascade_ranking.pipelines.local_runner import run_with_timings


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=SyntheticConfig().num_requests)
    parser.add_argument("--beam-mode", default=PipelineConfig().beam_mode, choices=("auto", "multi_processing", "in_process"))
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="demo-wall-") as tmp:
        config = PipelineConfig(output_dir=os.path.join(tmp, "out"), beam_mode=args.beam_mode,
                                synthetic=dataclasses.replace(SyntheticConfig(), num_requests=args.requests))
        cold, components = run_with_timings(config, show_progress=False)
        cached, cached_components = run_with_timings(config, show_progress=False)
    print(f"demo pipeline, synthetic {args.requests} requests, beam mode {args.beam_mode}, {os.cpu_count()} cores")
    for name, seconds, hit in components:
        print(f"  {name:<28}{seconds:8.1f} s{'  (cached)' if hit else ''}")
    print(f"cold: {cold:.1f} s; cached rerun: {cached:.1f} s (×{cached / cold:.3f} of cold); "
          f"cache hits on rerun: {sum(hit for _, _, hit in cached_components)} of {len(cached_components)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"requests": args.requests, "beam_mode": args.beam_mode, "cpus": os.cpu_count(),
                       "cold_s": cold, "cached_s": cached, "cached_over_cold": cached / cold,
                       "components": [{"id": n, "seconds": s, "cached": h} for n, s, h in components],
                       "cached_hits": sum(h for _, _, h in cached_components),
                       "cached_components": len(cached_components)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
