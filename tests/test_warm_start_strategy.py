"""`pipelines.warm_start_strategy` and the pipeline's warm start on spans, checked on a run's own
artifacts: span 2's Trainers read span 1's models as `base_model`, continue their step counters,
record their span, and a rerun of span 2 is answered by the cache."""
import json
import os

import ml_metadata as mlmd
import numpy as np
import pytest
import tensorflow as tf
from tfx.orchestration import metadata
from tfx.types import standard_artifacts

from cascade_ranking.components.evaluation import EvaluatorConfig
from cascade_ranking.datasources import example_io, synthetic
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.models.trainers.cascade import CascadeTrainerConfig
from cascade_ranking.models.trainers.retrieval import RetrievalTrainerConfig
from cascade_ranking.models.config import to_dict
from cascade_ranking.pipelines import cli, html_report, local_runner, stream
from cascade_ranking.pipelines import report as run_report
from cascade_ranking.pipelines.config import PipelineConfig
from cascade_ranking.pipelines.warm_start_strategy import INFO_PATH, WarmStartStrategy, model_span
from tests.test_html_report import parse_report

TRAINERS = ("teacher", "cascade", "retrieval")


def pairwise_auc(labels, scores):
    """P(a clicked row outscores an unclicked one), ties counting a half: every pair compared."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])))


def _model(tmp_path, artifact_id, span):
    model = standard_artifacts.Model()
    model.id = artifact_id
    model.uri = str(tmp_path / f"model{artifact_id}")
    if span is not None:
        os.makedirs(os.path.join(model.uri, os.path.dirname(INFO_PATH)))
        with open(os.path.join(model.uri, INFO_PATH), "w") as f:
            json.dump({"span": span, "fingerprint": "x"}, f)
    return model


def test_the_base_is_the_newest_model_of_the_latest_older_span(tmp_path):
    models = [_model(tmp_path, 3, 1), _model(tmp_path, 7, 1), _model(tmp_path, 5, 2), _model(tmp_path, 9, None),
              _model(tmp_path, 11, 3)]
    assert [model_span(m) for m in models] == [1, 1, 2, None, 3]

    def base(span):
        return [m.id for m in WarmStartStrategy(span).resolve_artifacts(None, {"model": models})["model"]]

    assert base(1) == []  # nothing older: trained afresh
    assert base(2) == [7]  # span 1's newest (a rerun of span 1 made model 7)
    assert base(3) == [5]  # span 2's, though span 1 has newer ids
    assert base(4) == [11]
    assert WarmStartStrategy(2).resolve_artifacts(None, {})["model"] == []


# ---- the pipeline on two spans -----------------------------------------------------------------
REQUESTS = 150


def _config(examples_dir, output_dir, span):
    return PipelineConfig(
        source="examples", examples_dir=examples_dir, span=span, output_dir=output_dir,
        teacher=RankerConfig.teacher(epochs=3, hidden_units=(32,), cross_layers=1),
        ranker=RankerConfig.cascade_stage(hidden_units=(64,), cascade_head_units=(32,)),
        retrieval=RetrievalTrainerConfig(epochs=3, batch_size=64),
        cascade=CascadeTrainerConfig(epochs=3, batch_size=8),
        evaluator=EvaluatorConfig(thresholds=(), change_thresholds=(), tfma_min_auc=0.0, tfma_auc_tolerance=1.0,
                                  tfma_calibration_range=(0.0, 1e9)),
        beam_mode="in_process")


def _trainer_io(config, trainer):
    """(base_model ids read, model ids written) of each execution of `Trainer.<trainer>`, oldest first."""
    store = mlmd.MetadataStore(metadata.sqlite_metadata_connection_config(os.path.abspath(config.metadata_path)))
    context = store.get_context_by_type_and_name("node", f"{config.pipeline_name}.Trainer.{trainer}")
    runs = []
    for execution in sorted(store.get_executions_by_context(context.id), key=lambda e: e.id):
        events = store.get_events_by_execution_ids([execution.id])
        read = [e.artifact_id for e in events if e.type == mlmd.proto.Event.INPUT and e.path.steps[0].key == "base_model"]
        written = [e.artifact_id for e in events if e.type == mlmd.proto.Event.OUTPUT and e.path.steps[0].key == "model"]
        runs.append((read, written, store.get_artifacts_by_id(written)))
    return runs


@pytest.mark.slow
def test_span_2_warm_starts_from_span_1_and_its_rerun_is_cached(tmp_path, capsys):
    """`cascade stream` over a user's two spans with a config file, as the README shows it, then
    span 2 once more."""
    spans_dir, out = str(tmp_path / "log"), str(tmp_path / "stream")
    synthetic.write_spans(synthetic.SyntheticConfig(num_requests=REQUESTS, seed=3), spans_dir, spans=2, drift=0.3)
    config_file = str(tmp_path / "config.json")
    with open(config_file, "w") as f:
        json.dump({k: v for k, v in to_dict(_config(spans_dir, out, None)).items()
                   if k not in ("source", "examples_dir", "span", "output_dir")}, f)
    assert cli.main(["stream", "--config", config_file, "--source", "examples", "--examples-dir", spans_dir,
                     "--output-dir", out]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, stream.STREAM_JSON)) as f:
        records = json.load(f)
    config = _config(spans_dir, os.path.join(out, stream.RUN_DIR), 2)
    _, rerun = local_runner.run_with_timings(config, show_progress=False)
    table = printed[printed.index("Per span:"):].splitlines()[1:4]
    assert table[0].split()[:3] == ["span", "s", "e2e"] and [row.split()[0] for row in table[1:]] == ["1", "2"]
    assert f"{records[1]['model']['auc']:.4f}" in table[2] and f"{records[1]['baseline']['auc']:.4f}" in table[2]
    for trainer in TRAINERS:
        (read1, written1, [model1]), (read2, written2, [model2]), (read3, written3, _) = _trainer_io(config, trainer)
        assert read1 == [] and read2 == written1  # span 1 trained afresh, span 2 from span 1's model
        assert (read3, written3) == (read2, written2)  # the rerun of span 2: the same base, the cached model
        info1, info2 = (json.load(open(os.path.join(m.uri, INFO_PATH))) for m in (model1, model2))
        assert (info1["span"], info2["span"]) == (1, 2)
        # The step counter went on: span 2's one pass added about a third of span 1's three epochs.
        added = info2["optimizer_steps"] - info1["optimizer_steps"]
        assert 0 < added < info1["optimizer_steps"] / 2, (trainer, info1, info2)
        assert f"Trainer.{trainer}: warm start from {model1.uri} (span 1)" in printed
    cached = {node: hit for node, _, hit in rerun}
    assert all(cached[f"Trainer.{t}"] for t in TRAINERS)
    assert [r["span"] for r in records] == [1, 2]
    assert records[0]["warm_started"] == [] and records[1]["warm_started"] == sorted(TRAINERS)
    assert (records[0]["baseline_span"], records[1]["baseline_span"]) == (None, 1)

    # Progressive validation of span 2: span 1's ranker (the blessed baseline) on span 2's shown eval
    # rows, against an independent scoring of those rows with span 1's served model.
    assert records[0]["baseline"]["auc"] is None
    (_, _, [ranker1]), _, _ = _trainer_io(config, "cascade")
    serve = tf.saved_model.load(os.path.join(ranker1.uri, "Format-Serving")).signatures["serving_default"]
    shown = [ex for ex in example_io.read_examples(os.path.join(spans_dir, "span-2", "Split-eval"))
             if ex.features.feature["ui_position"].int64_list.value[0] > 0]
    ctr = serve(tf.constant([ex.SerializeToString() for ex in shown]))["ctr"].numpy().reshape(-1)
    clicks = np.array([ex.features.feature["click"].int64_list.value[0] for ex in shown])
    assert records[1]["baseline"]["auc"] == pytest.approx(pairwise_auc(clicks, ctr), abs=1e-4)
    assert records[1]["baseline"]["calibration"] == pytest.approx(ctr.sum() / clicks.sum(), rel=1e-3)
    assert records[1]["model"]["auc"] != pytest.approx(records[1]["baseline"]["auc"], abs=1e-4)

    # The evaluation artifact records the spans; the report's history of spans is read back from MLMD
    # and is what the stream printed; report.html shows it with the plot.
    result = run_report.collect(config)
    assert (result["evaluation"]["span"], result["evaluation"]["baseline_span"]) == (2, 1)
    history = result["spans"]
    assert [(h["span"], h["baseline_span"]) for h in history] == [(1, None), (2, 1)]
    assert [h["model"] for h in history] == [r["model"] for r in records]
    assert history[1]["baseline"] == records[1]["baseline"]
    report_path = os.path.join(out, stream.RUN_DIR, html_report.REPORT_FILE)  # written by the stream
    assert f"Report: {os.path.abspath(report_path)}" in printed
    page = parse_report(report_path)
    assert "spans" in page["sections"]
    rows = page["tables"]["spans"]
    assert [row[0] for row in rows[1:]] == ["1", "2"] and rows[2][6] == "1"
    assert rows[2][2] == f"{records[1]['model']['auc']:.4f}" and rows[2][8] == f"{records[1]['baseline']['auc']:.4f}"
    assert any(image.startswith(b"\x89PNG") for image in page["images"])

    paths = stream.save(records, out)
    assert json.load(open(paths["json"]))[1]["baseline"]["auc"] == records[1]["baseline"]["auc"]
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = stream.format_records(records).splitlines()
    assert len(table) == 3 and table[2].split()[0] == "2" and "–" not in table[2]
