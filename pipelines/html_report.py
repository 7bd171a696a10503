"""`report.html`: one self-contained page per run, written beside its artifacts.

It holds what the console prints at the end of `cascade run`, in a form to open later, attach to
a Kubeflow run or send to a colleague:

- the final table, the model beside the oracle (`report.table_rows`);
- each stage's blessing with its reasons and its baseline, and the TFMA Evaluator's verdict;
- the CascadeEvaluator's calibration and recall@k plots, embedded as base64 PNG (no file links);
- the wall time of every component, and whether the MLMD cache answered it;
- the data counts: rows read, used, diverted by reason, requests without ground truth, NaN values
  read as 0, ids folded, eval ids out of vocabulary (`report.count_rows`);
- the served SavedModels, with the result of `cascade run --serve-check` when it ran;
- on spans: the run's span, training window and warm start, and every span evaluated in this output
  directory with its progressive validation (`report.span_history`), as a table and `spans.png`.

Written by hand with the standard library (`html.escape`, `base64`): no template engine or
plotting library is needed for a static page. The file is written under a temporary name and
renamed, so a reader never sees half a report.
"""
import base64
import datetime
import html
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from cascade_ranking.pipelines import report

REPORT_FILE = "report.html"
SPANS_PLOT = "spans.png"  # written by `write` into the output directory on spans (`stream.plot`)
PLOTS = (("calibration.png", "Calibration: mean prediction against click rate per CTR bucket"),
         ("recall_at_k.png", "Recall@k of the ranking and pre-ranking stages"))

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 70em;
       color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.cached td { color: #888; }
.bad { color: #b00; font-weight: bold; } .good { color: #070; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _cell(value, numeric: bool = False) -> str:
    if value is None:
        text = "n/a"
    elif isinstance(value, float):
        text = "n/a" if value != value else f"{value:.4f}"  # NaN
    else:
        text = str(value)
    return f"<td{' class=num' if numeric else ''}>{html.escape(text)}</td>"


def _table(header: Sequence[str], rows: Iterable[Sequence], numeric_from: int = 1,
           row_classes: Optional[Sequence[str]] = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for index, row in enumerate(rows):
        css = f" class={row_classes[index]}" if row_classes and row_classes[index] else ""
        body.append(f"<tr{css}>" + "".join(_cell(v, i >= numeric_from) for i, v in enumerate(row)) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _image(path: str, caption: str) -> str:
    if not os.path.exists(path):
        return f"<p>{html.escape(caption)}: not written by this run ({html.escape(os.path.basename(path))}).</p>"
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return (f"<figure><img alt=\"{html.escape(caption)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _blessings(evaluation: Dict) -> str:
    rows, classes = [], []
    for stage, b in evaluation.get("blessings", {}).items():
        rows.append((stage, "blessed" if b["blessed"] else "NOT blessed",
                     "; ".join(b.get("reasons", [])) or "-", b.get("baseline_uri") or "none",
                     "; ".join(b.get("notes", [])) or "-"))
        classes.append("" if b["blessed"] else "bad")
    if not rows:
        return "<p>No stage was evaluated.</p>"
    return _table(("stage", "verdict", "reasons", "baseline", "notes"), rows, numeric_from=99, row_classes=classes)


def _spans(config, result: Dict) -> str:
    history = result["spans"]
    evaluation = result["evaluation"]
    window = (f"spans {max(1, evaluation['span'] - config.span_window + 1)}–{evaluation['span']}"
              if config.span_window > 1 else "this span alone")
    warm = (f"on: each Trainer continues from its model of the latest older span, {config.warm_start_epochs} "
            f"epoch(s)" if config.warm_start else "off: every span trains afresh")
    parts = [f"<p>This run: span {evaluation['span']}; trained on {window}; warm start {warm}. The baseline of a "
             f"span is the latest blessed ranker (span t−1's when it was blessed), scored on the span's eval rows "
             f"before the span's model replaces it: the progressive validation.</p>"]
    keys = report.SPAN_METRICS
    parts.append(_table(("span", "e2e recall", "AUC", "PerQueryAUC", "NE", "calibration", "baseline of span",
                         "baseline e2e", "baseline AUC", "baseline PQAUC", "baseline NE", "baseline calibration"),
                        [(r["span"], *(r["model"][k] for k in keys), r["baseline_span"] or "none",
                          *(r["baseline"][k] for k in keys)) for r in history]))
    parts.append(_image(os.path.join(config.output_dir, SPANS_PLOT), "AUC and NE over spans"))
    return "".join(parts)


def _counts(result: Dict) -> str:
    rows = report.count_rows(result)
    if rows is None:
        return "<p>No data counts (the NegativeSampler did not run).</p>"
    warning = report.data_warning_line(result)
    css = "good" if warning and warning.startswith("Data: every") else "bad"
    return _table(("count", "value"), rows, numeric_from=99) + (f"<p class={css}>{html.escape(warning)}</p>" if warning else "")


def _serve_check_cell(check, failure: Optional[str] = None) -> str:
    if failure is not None:
        return f"FAILED: {failure}"
    if check is None:
        return "not run"
    when = "passed before, unchanged" if check.cached else "passed"
    return f"{when}: warmup {check.warmup_requests} replayed; {check.summary()}"


def render(config, result: Dict, seconds: float, timings: Sequence[Tuple[str, float, bool]],
           served: Dict[str, Tuple[str, bool]], checks=None, serve_failure: Optional[str] = None) -> str:
    """The page as a string (see the module docstring). `serve_failure`: the one-line error of a
    serve-check that failed (shown for every served model: the check stops at its first error,
    whose message names the model)."""
    evaluation = result.get("evaluation")
    parts: List[str] = [
        "<!DOCTYPE html>", "<html lang=en><head><meta charset=utf-8>",
        f"<title>{html.escape(config.pipeline_name)}: run report</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(config.pipeline_name)}: run report</h1>",
        f"<p>{html.escape(config.source)} data; pipeline finished in {seconds:.1f}s; written "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; output <code>"
        f"{html.escape(os.path.abspath(config.output_dir))}</code>.</p>",
        "<h2 id=table>Metrics</h2>",
    ]
    if evaluation is None:
        parts.append("<p>The CascadeEvaluator did not run: no metrics.</p>")
    else:
        rows = [(name, model, oracle) for name, model, oracle in
                report.table_rows(evaluation, config.evaluator.min_bucket_count)]
        rows.append(("eval candidates / shown", f"{evaluation['examples']} / {evaluation['shown']}", ""))
        parts.append(_table(("metric", "model", "oracle (true_ctr)"), rows))
        for line in filter(None, (report.training_data_line(result), report.flops_line(result))):
            parts.append(f"<p>{html.escape(line)}</p>")
        parts.append("<h2 id=blessings>Blessings</h2><p>Each stage against the latest blessed model of that stage.</p>")
        parts.append(_blessings(evaluation))
    if "tfma" in result:
        parts.append(f"<p>{html.escape(report.tfma_line(result['tfma']))}</p>")
    if result.get("spans"):
        parts.append("<h2 id=spans>Spans</h2>")
        parts.append(_spans(config, result))
    if evaluation is not None:
        parts.append("<h2 id=plots>Plots</h2>")
        parts.extend(_image(os.path.join(result["evaluation_uri"], name), caption) for name, caption in PLOTS)
    parts.append("<h2 id=timings>Component timings</h2>")
    parts.append(_table(("component", "seconds", "cached"),
                        [(node, f"{s:.1f}", "yes" if cached else "") for node, s, cached in timings],
                        row_classes=["cached" if cached else "" for _, _, cached in timings]))
    parts.append("<h2 id=counts>Data counts</h2>")
    parts.append(_counts(result))
    parts.append("<h2 id=served>Served SavedModels</h2>")
    checked = {check.stage: check for check in checks or ()}
    parts.append(_table(("stage", "path", "pushed by this run", "serve-check"),
                        [(stage, path, "yes" if now else "no (not blessed)",
                          _serve_check_cell(checked.get(stage), serve_failure))
                         for stage, (path, now) in served.items()],
                        numeric_from=99) if served else "<p>none</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write(config, result: Dict, seconds: float, timings, served, checks=None, serve_failure: Optional[str] = None) -> str:
    """Writes `<output_dir>/report.html` (temporary name, then renamed), and on spans first
    `<output_dir>/spans.png`; returns the report's path."""
    if result.get("spans"):
        from cascade_ranking.pipelines import stream

        stream.plot(result["spans"], os.path.join(config.output_dir, SPANS_PLOT))
    path = os.path.abspath(os.path.join(config.output_dir, REPORT_FILE))
    temp = path + ".incomplete"
    with open(temp, "w", encoding="utf-8") as f:
        f.write(render(config, result, seconds, timings, served, checks, serve_failure))
    os.replace(temp, path)
    return path
