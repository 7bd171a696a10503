"""Growth: the demo pipeline at 1×, 4×, 16× the default requests; wall time and peak memory per component.

Each size runs in its own Python process (so one size's memory does not carry into the next):
`pipelines.local_runner.run_with_timings` on the default `PipelineConfig` with
`synthetic.num_requests` = multiple × 5,000, in a fresh output directory. While it runs, a thread
samples every 0.2 s the resident memory (RSS) of that process and all its children (the Beam
workers in multi_processing mode) and charges it to the component running at that moment (from
`ComponentProgress`'s start lines). Prints per component: seconds and peak RSS at each size, and
each size's seconds as a multiple of the 1× seconds (linear growth is the size multiple); then the
rows/s of the components that read every candidate row against two floors measured after the run,
in the same process: the raw read plus parse of those rows, and the teacher's batch inference.

    python bench/growth.py [--multiples 1 4 16] [--beam-mode auto] [--json bench/results/growth.json]
"""
import argparse
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

BASE_REQUESTS = 5_000


def _rss_tree(process) -> int:
    total = 0
    for p in [process] + process.children(recursive=True):
        try:
            total += p.memory_info().rss
        except Exception:  # a worker that just ended
            pass
    return total


class _CurrentComponent(io.TextIOBase):
    """A stream for ComponentProgress that remembers the component that started last."""

    def __init__(self):
        self.current = "(start-up)"

    def write(self, text):
        if "▶ " in text:
            self.current = text.split("▶ ", 1)[1].strip()
        return len(text)


def run_one(multiple: int, beam_mode: str) -> dict:
    import psutil

    from cascade_ranking.datasources.synthetic import SyntheticConfig
    from cascade_ranking.pipelines import local_runner, progress
    from cascade_ranking.pipelines.config import PipelineConfig

    current = _CurrentComponent()
    peaks, stop = {}, threading.Event()
    me = psutil.Process()

    def sample():
        while not stop.is_set():
            rss = _rss_tree(me)
            peaks[current.current] = max(peaks.get(current.current, 0), rss)
            time.sleep(0.2)

    original = progress.ComponentProgress.__init__

    def with_stream(self, stream=None, **kwargs):  # every progress line goes to `current` (the run prints none)
        original(self, stream=current, **kwargs)

    progress.ComponentProgress.__init__ = with_stream
    local_runner.ComponentProgress = progress.ComponentProgress
    thread = threading.Thread(target=sample, daemon=True)
    with tempfile.TemporaryDirectory(prefix="growth-") as tmp:
        config = PipelineConfig(output_dir=os.path.join(tmp, "out"), beam_mode=beam_mode,
                                synthetic=dataclasses.replace(SyntheticConfig(), num_requests=BASE_REQUESTS * multiple))
        thread.start()
        seconds, timings = local_runner.run_with_timings(config, show_progress=True)
        stop.set()
        thread.join()
        mode = config.effective_beam_mode()
        floor = floors(config.pipeline_root)
    return {"multiple": multiple, "requests": BASE_REQUESTS * multiple, "rows": BASE_REQUESTS * multiple * 50,
            "beam_mode": mode, "seconds": seconds, "floors": floor,
            "components": [{"id": n, "seconds": s, "peak_rss_mb": peaks.get(n, 0) / 2 ** 20} for n, s, _ in timings],
            "peak_rss_mb": max(peaks.values()) / 2 ** 20}


def floors(pipeline_root: str, batch: int = 4096) -> dict:
    """Rows/s floors measured after the run on its own artifacts, in the same process: the raw read
    plus parse of every candidate row the ExampleGen wrote (tf.data, batches of `batch`, the
    packaged parse spec) and the teacher SavedModel's `serving_default` on batches of `batch`
    serialized rows (the model's batch inference rate)."""
    import glob

    import tensorflow as tf

    from cascade_ranking.schema import features as F

    files = sorted(glob.glob(os.path.join(pipeline_root, "SyntheticExampleGen", "examples", "*", "Split-*", "*")))
    spec = F.serving_parse_spec()
    start, rows = time.time(), 0
    for records in tf.data.TFRecordDataset(files, compression_type="GZIP").batch(batch):
        parsed = tf.io.parse_example(records, spec)
        rows += int(tf.shape(records)[0])
        del parsed
    read_parse = rows / (time.time() - start)
    model_dir = glob.glob(os.path.join(pipeline_root, "Trainer.teacher", "model", "*", "Format-Serving"))[0]
    serve = tf.saved_model.load(model_dir).signatures["serving_default"]
    blocks = [r for r in tf.data.TFRecordDataset(files[:1], compression_type="GZIP").batch(batch).take(8)]
    serve(examples=blocks[0])  # the first call loads and warms up
    start, scored = time.time(), 0
    for records in blocks:
        serve(examples=records)
        scored += int(tf.shape(records)[0])
    return {"read_parse_rows_per_s": read_parse, "teacher_inference_rows_per_s": scored / (time.time() - start)}


# Components that read every candidate row once: their rows/s is the run's rows over their seconds.
ROW_COMPONENTS = ("SyntheticExampleGen", "StatisticsGen", "TeacherInference", "NegativeSampler")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--beam-mode", default="auto")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size, print its JSON
    args = parser.parse_args(argv)
    if args.one:
        print("GROWTH " + json.dumps(run_one(args.one, args.beam_mode)))
        return 0
    runs = []
    for multiple in args.multiples:
        done = subprocess.run([sys.executable, __file__, "--one", str(multiple), "--beam-mode", args.beam_mode],
                              capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith("GROWTH ")), None)
        if done.returncode != 0 or line is None:
            print(f"{multiple}×: failed (rc {done.returncode})\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        runs.append(json.loads(line[len("GROWTH "):]))
        print(f"{multiple}×: {runs[-1]['seconds']:.1f} s, peak RSS {runs[-1]['peak_rss_mb']:,.0f} MB "
              f"({runs[-1]['beam_mode']})", flush=True)
    base = {c["id"]: c for c in runs[0]["components"]}
    print(f"\ngrowth of the demo pipeline, synthetic {BASE_REQUESTS:,} requests × {args.multiples}, "
          f"beam mode {args.beam_mode}, {os.cpu_count()} cores")
    header = "component".ljust(26) + "".join(f"{r['multiple']:>5}× s  ÷1×   MB  " for r in runs)
    print(header)
    for name in base:
        cells = []
        for r in runs:
            c = next((c for c in r["components"] if c["id"] == name), None)
            if c is None:
                cells.append(" " * 21)
                continue
            ratio = c["seconds"] / base[name]["seconds"] if base[name]["seconds"] >= 0.5 else float("nan")
            cells.append(f"{c['seconds']:7.1f} {ratio:5.1f} {c['peak_rss_mb']:5.0f}  ")
        if any(c["id"] == name and c["seconds"] >= 0.5 for r in runs for c in r["components"]):
            print(name.ljust(26) + "".join(cells))
    print("pipeline".ljust(26) + "".join(f"{r['seconds']:7.1f} {r['seconds'] / runs[0]['seconds']:5.1f} "
                                         f"{r['peak_rss_mb']:5.0f}  " for r in runs))
    print("\nrows/s of the components that read every candidate row, against the floors measured after each run")
    for r in runs:
        f = r["floors"]
        cells = []
        for c in r["components"]:
            if c["id"] in ROW_COMPONENTS:
                rate = r["rows"] / c["seconds"]
                cells.append(f"{c['id']} {rate:,.0f} ({rate / f['read_parse_rows_per_s']:.2f}x)")
        print(f"  {r['multiple']}×: read+parse floor {f['read_parse_rows_per_s']:,.0f} rows/s, teacher inference "
              f"{f['teacher_inference_rows_per_s']:,.0f} rows/s; " + "; ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base_requests": BASE_REQUESTS, "cpus": os.cpu_count(), "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
