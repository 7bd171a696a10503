"""Reads what a pipeline run produced from its MLMD store and prints it for a person.

The newest ModelEvaluation of the CascadeEvaluator gives the metrics (its `metrics.json`) and the
newest PushedModel of each `Pusher.<stage>` the serving paths. The table sets each metric of the
served cascade beside the oracle's, i.e. the same metric computed with the synthetic data's
`true_ctr` as every stage's score (n/a on data without it).
"""
import json
import os
from typing import Dict, List, Optional, Tuple

import ml_metadata as mlmd
import numpy as np
from tfx.orchestration import metadata

from components import record_io
from pipelines.config import PipelineConfig
from pipelines.pipeline import STAGES

EVALUATOR_NODE = "CascadeEvaluator"


def _store(config: PipelineConfig) -> mlmd.MetadataStore:
    return mlmd.MetadataStore(metadata.sqlite_metadata_connection_config(os.path.abspath(config.metadata_path)))


def latest_artifact(store: mlmd.MetadataStore, type_name: str, node_context: str):
    """The newest artifact of a type attached to a pipeline node's context (`<pipeline>.<node id>`)."""
    produced = set()
    for context in store.get_contexts_by_type("node"):
        if context.name == node_context:
            produced |= {a.id for a in store.get_artifacts_by_context(context.id)}
    artifacts = [a for a in store.get_artifacts_by_type(type_name) if a.id in produced]
    return max(artifacts, key=lambda a: a.id) if artifacts else None


def pushed_models(config: PipelineConfig) -> Dict[str, str]:
    """{stage: pushed SavedModel directory} of the newest push of each stage."""
    store, out = _store(config), {}
    for stage in STAGES:
        pushed = latest_artifact(store, "PushedModel", f"{config.pipeline_name}.Pusher.{stage}")
        if pushed is not None and pushed.custom_properties["pushed"].int_value == 1:
            out[stage] = pushed.custom_properties["pushed_destination"].string_value
    return out


def collect(config: PipelineConfig) -> Dict:
    """{"evaluation": the CascadeEvaluator's metrics, "evaluation_uri", "pushed": {stage: path}}."""
    store = _store(config)
    evaluation = latest_artifact(store, "ModelEvaluation", f"{config.pipeline_name}.{EVALUATOR_NODE}")
    result = {"pushed": pushed_models(config)}
    if evaluation is not None:
        with open(os.path.join(evaluation.uri, record_io.METRICS_FILE)) as f:
            result["evaluation"] = json.load(f)
        result["evaluation_uri"] = evaluation.uri
    return result


def _max_bucket_bias(section: Dict, min_count: int) -> Optional[float]:
    biases = [abs(b["bias"]) for b in section["calibration_by_bucket"]
              if b["count"] >= min_count and b["bias"] is not None and np.isfinite(b["bias"])]
    return max(biases) if biases else None


def table_rows(evaluation: Dict, min_bucket_count: int = 100) -> List[Tuple[str, Optional[float], Optional[float]]]:
    """(metric, model, oracle) rows of the run's table; None where a value does not exist."""
    cascade, oracle_cascade = evaluation["cascade"], evaluation.get("oracle_cascade", {})
    quotas = "/".join(str(q) for q in cascade["quotas"])
    rows = [(f"e2e recall (quotas {quotas})", cascade["e2e_recall"], oracle_cascade.get("e2e_recall"))]
    stage_labels = {"retrieval_model": "retrieval", "preranking_model": "pre-ranking", "model": "ranking"}
    for key, quota in zip(cascade["stages"], cascade["quotas"]):
        name = f"recall_at_{quota}/{key}"
        rows.append((f"{stage_labels.get(key, key)} Recall@|GT|@{quota}", cascade[name], oracle_cascade.get(name)))
    model, oracle = evaluation["model"], evaluation.get("oracle")
    for key, label in (("auc", "ranking AUC"), ("per_query_auc", "ranking PerQueryAUC"), ("ne", "ranking NE")):
        rows.append((label, model[key], oracle[key] if oracle else None))
    click_rate = evaluation["click_rate"]
    rows.append(("calibration Σŷ/Σy", model["mean_prediction"] / click_rate,
                 oracle["mean_prediction"] / click_rate if oracle else None))
    rows.append((f"max |bias| of CTR buckets ≥{min_bucket_count}", _max_bucket_bias(model, min_bucket_count),
                 _max_bucket_bias(oracle, min_bucket_count) if oracle else None))
    return rows


def format_table(evaluation: Dict, min_bucket_count: int = 100) -> str:
    def cell(value):
        return "n/a" if value is None or not np.isfinite(value) else f"{value:.4f}"

    rows = [("metric", "model", "oracle (true_ctr)")]
    rows += [(name, cell(m), cell(o)) for name, m, o in table_rows(evaluation, min_bucket_count)]
    rows.append(("eval candidates / shown", f"{evaluation['examples']} / {evaluation['shown']}", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
