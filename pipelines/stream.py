"""`cascade stream`: the pipeline run span after span into one output directory, the way a team
runs it as logs arrive (issue 17: Factory Floor §2.1's online training in TFX terms).

    cascade stream --spans 3 [--drift 0.3] [--requests N] [--output-dir DIR]      synthetic spans
    cascade stream --source examples --examples-dir MY_LOGS [--config F]          your own span-<k>/ dirs
    … [--window N] [--set warm_start=false]        train each span on the last N spans (from scratch)

With synthetic data it first writes `--spans` spans with drift into `<output dir>/spans`
(`datasources.synthetic.write_spans`; kept, so a second stream reuses them). Then, for each span in
order, one `cascade run` of that span into `<output dir>/run` (`local_runner.run_with_timings`):
each Trainer warm-starts from its model of the span before (`models.trainers.warm_start`), and
each stage is evaluated against its latest blessed model on the new span's eval rows. That
baseline, the model of an earlier span scored on data it has not seen, is the progressive
validation of the span. Printed: one row per span with the model's e2e recall, AUC, PerQueryAUC,
NE and calibration, and the same of the baselines (the ranker's where one was blessed, with the
span it was trained on: span t−1's, or an older one when span t−1's was not blessed; the e2e
recall where every stage had one); written:
`<output dir>/stream.json` and `stream.png` (AUC and NE over spans).
"""
import dataclasses
import json
import os
from typing import Dict, List, Optional

from cascade_ranking.datasources import spans as spans_lib
from cascade_ranking.datasources import synthetic
from cascade_ranking.models.config import config_from_dict
from cascade_ranking.pipelines import html_report, local_runner
from cascade_ranking.pipelines import report as run_report
from cascade_ranking.pipelines.config import PipelineConfig

SPANS_DIR, RUN_DIR = "spans", "run"
DEFAULT_DRIFT = 0.3  # a stale model costs about 0.03 of the oracle's AUC two spans later (tests/test_synthetic.py)
STREAM_JSON, STREAM_PNG = "stream.json", "stream.png"
METRICS = run_report.SPAN_METRICS


def _made_config(values):
    """A report's generator config as `dataclasses.asdict` gives it today: a report written before
    the generator gained a field (its testbed knobs) reads with that field at its default."""
    try:
        config = config_from_dict(synthetic.SyntheticConfig, values)
    except (ValueError, TypeError):
        return values
    return json.loads(json.dumps(dataclasses.asdict(config)))


def write_synthetic_spans(config: PipelineConfig, count: int, drift: float) -> str:
    """`<output dir>/spans` of `count` spans of the config's synthetic data with `drift`; an existing
    one made with the same settings is reused, another is an error naming the difference."""
    directory = os.path.join(config.output_dir, SPANS_DIR)
    report_path = os.path.join(directory, "report.json")
    if os.path.exists(report_path):
        with open(report_path) as f:
            made = json.load(f)
        wanted = json.loads(json.dumps({"spans": count, "drift": drift,
                                        "config": dataclasses.asdict(config.synthetic)}))
        have = {"spans": len(made.get("spans", {})), "drift": made.get("drift"),
                "config": _made_config(made.get("config"))}
        if have != wanted:
            raise ValueError(f"{directory} holds spans made with other settings ({len(made.get('spans', {}))} spans, "
                             f"drift {made.get('drift')}); use another --output-dir")
        return directory
    synthetic.write_spans(config.synthetic, directory, count, drift=drift)
    return directory


def run_stream(base: PipelineConfig, span_numbers: List[int], show_progress: bool = True,
               report=print) -> List[Dict]:
    """Runs `base` (source examples, its examples_dir of spans) on each span in order into
    `<output dir>/run`, writing its `report.html` after each; returns one record per span (span,
    seconds, warm-started trainers, metrics)."""
    records = []
    for span in span_numbers:
        config = base.replace(span=span, output_dir=os.path.join(base.output_dir, RUN_DIR))
        config.validate()
        report(f"— span {span} of {span_numbers[-1]} —")
        seconds, timings = local_runner.run_with_timings(config, show_progress=show_progress)
        result = run_report.collect(config)
        evaluation = result["evaluation"]
        # The run's report.html (and spans.png): the newest span's, with every span so far.
        html_report.write(config, result, seconds, timings, run_report.served_models(config))
        records.append({"span": span, "seconds": round(seconds, 1), **run_report.span_metrics(evaluation),
                        "baseline_span": evaluation.get("baseline_span"),
                        "warm_started": sorted({name.split(".", 1)[1] for name, _, _ in timings
                                                if name.startswith("WarmStart.")} if span != span_numbers[0] else [])})
    return records


def format_records(records: List[Dict]) -> str:
    def cell(value):
        return "–" if value is None else f"{value:.4f}"

    header = ["span", "s", "e2e", "AUC", "PQAUC", "NE", "calib", "│", "prev of span", "prev e2e", "prev AUC", "prev PQAUC", "prev NE",
              "prev calib"]
    rows = [header]
    for r in records:
        m, b = r["model"], r["baseline"]
        rows.append([str(r["span"]), f"{r['seconds']:.0f}", *(cell(m[k]) for k in METRICS),
                     "│", "–" if r.get("baseline_span") is None else str(r["baseline_span"]),
                     *(cell(b[k]) for k in METRICS)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def plot(records: List[Dict], path: str) -> None:
    """AUC and NE over spans, of each span's model and of its baseline (the earlier span's model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    spans = [r["span"] for r in records]
    for ax, key, label in ((axes[0], "auc", "ranking AUC"), (axes[1], "ne", "ranking NE (lower is better)")):
        ax.plot(spans, [r["model"][key] for r in records], "o-", label="the span's model")
        prev = [(r["span"], r["baseline"][key]) for r in records if r["baseline"][key] is not None]
        if prev:
            ax.plot(*zip(*prev), "s--", label="the earlier model, on this span (progressive)")
        ax.set_xlabel("span")
        ax.set_title(label)
        ax.set_xticks(spans)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def save(records: List[Dict], output_dir: str) -> Dict[str, str]:
    paths = {"json": os.path.join(output_dir, STREAM_JSON), "png": os.path.join(output_dir, STREAM_PNG)}
    tmp = f"{paths['json']}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, paths["json"])
    plot(records, paths["png"])
    return paths


def span_numbers(config: PipelineConfig, limit: Optional[int] = None) -> List[int]:
    """The spans of the config's examples_dir, oldest first (the first `limit` of them)."""
    found = list(spans_lib.find_spans(config.examples_dir))
    if not found:
        raise ValueError(f"{config.examples_dir} has no span-<number>/ directories to stream")
    return found[:limit] if limit else found
