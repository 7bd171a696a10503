"""Reads what a pipeline run produced from its MLMD store and prints it for a person.

The latest ModelRun's `eval_metrics.json` (written by the Trainer) gives the model's and the
oracle's metrics; the latest PushedModel gives the serving path.
"""
import json
import os
from typing import Dict, List, Optional

import ml_metadata as mlmd
from tfx.orchestration import metadata

from models.trainers.common import EVAL_METRICS_FILE
from pipelines.config import PipelineConfig


def _latest_artifact(store: mlmd.MetadataStore, type_name: str, node_context: str):
    """The newest artifact of a type attached to a pipeline node's context (`<pipeline>.<node id>`)."""
    produced = set()
    for context in store.get_contexts_by_type("node"):
        if context.name == node_context:
            produced |= {a.id for a in store.get_artifacts_by_context(context.id)}
    artifacts = [a for a in store.get_artifacts_by_type(type_name) if a.id in produced]
    return max(artifacts, key=lambda a: a.id) if artifacts else None


def collect(config: PipelineConfig, stage: str = "ranking") -> Dict:
    store = mlmd.MetadataStore(metadata.sqlite_metadata_connection_config(os.path.abspath(config.metadata_path)))
    model_run = _latest_artifact(store, "ModelRun", f"{config.pipeline_name}.Trainer.{stage}")
    pushed = _latest_artifact(store, "PushedModel", f"{config.pipeline_name}.Pusher.{stage}")
    result = {"stage": stage}
    if model_run is not None:
        with open(os.path.join(model_run.uri, EVAL_METRICS_FILE)) as f:
            result["metrics"] = json.load(f)
    if pushed is not None:
        result["pushed_model"] = pushed.custom_properties["pushed_destination"].string_value
    return result


def format_table(results: List[Dict]) -> str:
    rows = [("stage", "metric", "model", "oracle (true_ctr)")]
    for r in results:
        m = r.get("metrics", {})
        for key, label in (("auc", "AUC"), ("per_query_auc", "PerQueryAUC"), ("ne", "NE")):
            if key in m:
                oracle = m.get(f"oracle_{key}")
                rows.append((r["stage"], label, f"{m[key]:.4f}", "n/a" if oracle is None else f"{oracle:.4f}"))
        if "examples" in m:
            rows.append((r["stage"], "eval impressions", str(m["examples"]), ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
