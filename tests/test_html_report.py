"""pipelines/html_report.py: the run's report.html, parsed back.

`parse_report` is shared with the tests that check a real run's report (tests/test_run_log.py runs
`cascade run` in its own process; tests/test_pipeline_e2e.py renders the e2e run's)."""
import base64
import html.parser
import os
import shutil
import subprocess
from types import SimpleNamespace

import pytest

from cascade_ranking.pipelines import html_report, report


class _ReportParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.images, self.links, self.sections, self.paragraphs = [], [], [], [], []
        self._row = self._cell = self._text = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append((self.sections[-1] if self.sections else None, []))
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag in ("h2", "p"):
            self._text = ""
        if tag == "h2":
            self.sections.append(attrs.get("id"))
        for name in ("href", "src"):
            if name in attrs and tag != "img":
                self.links.append(attrs[name])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1][1].append(self._row)
            self._row = None
        elif tag == "p" and self._text is not None:
            self.paragraphs.append(self._text.strip())
            self._text = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._text is not None:
            self._text += data


def parse_report(path: str) -> dict:
    """{"sections", "tables": {section id: its first table's rows (header first)}, "images": decoded bytes,
    "links": every other href/src, "paragraphs"} of a report.html."""
    parser = _ReportParser()
    with open(path, encoding="utf-8") as f:
        parser.feed(f.read())
    images = []
    for src in parser.images:
        assert src.startswith("data:image/png;base64,"), src[:60]  # embedded, not linked
        images.append(base64.b64decode(src.split(",", 1)[1]))
    tables = {}
    for section, rows in parser.tables:
        tables.setdefault(section, rows)
    return {"sections": parser.sections, "tables": tables,
            "images": images, "links": parser.links, "paragraphs": parser.paragraphs}


def check_report_of_run(path: str, result: dict, timings, min_bucket_count: int = 100) -> dict:
    """The report at `path` holds this run's table (the values `report.table_rows` gives for its
    evaluation, to 4 decimals), every stage's blessing, both plots as PNG, every component's time
    and the data counts; it links to nothing outside itself."""
    page = parse_report(path)
    assert page["sections"] == ["table", "blessings", "plots", "timings", "counts", "served"]
    metrics = {row[0]: row[1:] for row in page["tables"]["table"][1:]}
    for name, model, oracle in report.table_rows(result["evaluation"], min_bucket_count):
        assert metrics[name][0] == ("n/a" if model is None or model != model else f"{model:.4f}"), name
        assert metrics[name][1] == ("n/a" if oracle is None or oracle != oracle else f"{oracle:.4f}"), name
    blessings = {row[0]: row[1] for row in page["tables"]["blessings"][1:]}
    assert blessings == {stage: "blessed" if b["blessed"] else "NOT blessed"
                         for stage, b in result["evaluation"]["blessings"].items()}
    assert len(page["images"]) == 2 and all(image.startswith(b"\x89PNG\r\n\x1a\n") for image in page["images"])
    assert not page["links"]
    times = {row[0]: float(row[1]) for row in page["tables"]["timings"][1:]}
    assert times == {node: round(seconds, 1) for node, seconds, _ in timings}
    counts = {row[0]: row[1] for row in page["tables"]["counts"][1:]}
    assert counts["rows read"] == f"{result['evaluation']['data_counts']['rows_read']:,}"
    return page


def _evaluation():
    cascade = {"quotas": [40, 30, 20], "stages": ["retrieval_model", "preranking_model", "model"], "e2e_recall": 0.5,
               "recall_at_40/retrieval_model": 0.9, "recall_at_30/preranking_model": 0.8, "recall_at_20/model": 0.7}
    model = {"auc": 0.81, "per_query_auc": 0.71, "ne": 0.75, "mean_prediction": 0.1, "calibration_by_bucket": []}
    return {"cascade": cascade, "oracle_cascade": {}, "model": model, "oracle": None, "click_rate": 0.1,
            "examples": 500, "shown": 100,
            "blessings": {"ranking": {"blessed": False, "reasons": ["AUC < 0.9 <script>"], "notes": []},
                          "retrieval": {"blessed": True, "reasons": [], "baseline_uri": "/b/1", "notes": []}}}


def test_the_report_escapes_text_embeds_plots_and_marks_what_is_missing(tmp_path):
    evaluation_dir = tmp_path / "evaluation"
    evaluation_dir.mkdir()
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(64)
    (evaluation_dir / "calibration.png").write_bytes(png)  # recall_at_k.png missing
    config = SimpleNamespace(pipeline_name="p<1>", source="synthetic", output_dir=str(tmp_path),
                             evaluator=SimpleNamespace(min_bucket_count=100))
    result = {"evaluation": _evaluation(), "evaluation_uri": str(evaluation_dir)}
    timings = [("SyntheticExampleGen", 12.34, False), ("Trainer.teacher", 0.01, True)]
    path = html_report.write(config, result, 42.0, timings, {"ranking": ("/serving/ranking/1", True)})
    assert path == str(tmp_path / "report.html") and not os.path.exists(path + ".incomplete")
    text = open(path, encoding="utf-8").read()
    assert "<script>" not in text and "&lt;script&gt;" in text and "p&lt;1&gt;" in text
    page = parse_report(path)
    assert page["images"] == [png]
    assert any("recall_at_k.png" in p and "not written" in p for p in page["paragraphs"])
    metrics = {row[0]: row[1:] for row in page["tables"]["table"][1:]}
    assert metrics["ranking AUC"] == ["0.8100", "n/a"] and metrics["e2e recall (quotas 40/30/20)"][0] == "0.5000"
    assert metrics["eval candidates / shown"][0] == "500 / 100"
    assert page["tables"]["blessings"][1][:3] == ["ranking", "NOT blessed", "AUC < 0.9 <script>"]
    assert [row[:3] for row in page["tables"]["timings"][1:]] == [["SyntheticExampleGen", "12.3", ""],
                                                                    ["Trainer.teacher", "0.0", "yes"]]
    assert any("did not run" in p for p in page["paragraphs"])  # no NegativeSampler counts


CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome", "headless_shell")
                 if shutil.which(name)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium on this machine (chromium, chromium-browser, "
                                             "google-chrome or headless_shell on PATH)")
def test_headless_chromium_renders_the_report_and_loads_every_image(tmp_path):
    evaluation_dir = tmp_path / "evaluation"
    evaluation_dir.mkdir()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name in ("calibration.png", "recall_at_k.png"):
        plt.figure(figsize=(2, 2)); plt.plot([0, 1]); plt.savefig(evaluation_dir / name); plt.close()
    config = SimpleNamespace(pipeline_name="p", source="synthetic", output_dir=str(tmp_path),
                             evaluator=SimpleNamespace(min_bucket_count=100))
    path = html_report.write(config, {"evaluation": _evaluation(), "evaluation_uri": str(evaluation_dir)}, 1.0, [], {})
    probe = tmp_path / "probe.html"  # the report plus a script that reports images that failed to load
    probe.write_text(open(path).read().replace(
        "</body>", "<script>document.title = 'broken:' + [...document.images].filter("
                   "i => !(i.complete && i.naturalWidth > 0)).length;</script></body>"))
    done = subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--dump-dom", f"file://{probe}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "<title>broken:0</title>" in done.stdout
