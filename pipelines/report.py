"""Reads what a pipeline run produced from its MLMD store and prints it for a person.

From the newest artifacts of the run's nodes:
  * the CascadeEvaluator's ModelEvaluation (`metrics.json`): the cascade metrics, the ranker's CTR
    metrics on the shown eval rows, and each stage's blessing with its baseline;
  * the standard Evaluator's (TFMA) ModelEvaluation of the ranker: its overall metrics on the
    shown eval rows and whether its thresholds passed;
  * the joint cascade Trainer's and the retrieval Trainer's ModelRun (`eval_metrics.json`): the
    training data the ranker read and each served stage's FLOPs per candidate;
  * the newest PushedModel of each `Pusher.<stage>`: where each stage is served.
The table sets each metric of the served cascade beside the oracle's, i.e. the same metric computed
with the synthetic data's `true_ctr` as every stage's score (n/a on data without it).
"""
import json
import os
from typing import Dict, List, Optional, Tuple

import ml_metadata as mlmd
import numpy as np
from tfx.orchestration import metadata

from cascade_ranking.components import record_io
from cascade_ranking.components.evaluation import STAGE_INPUTS
from cascade_ranking.models import stages as stage_registry
from cascade_ranking.models.trainers.common import EVAL_METRICS_FILE
from cascade_ranking.pipelines.config import PipelineConfig
from cascade_ranking.pipelines.pipeline import EVALUATOR_ID, STAGES, TFMA_EVALUATOR_ID

# Each stage's CascadeEvaluator input (the evaluator's own map), and the label of its rows.
STAGE_KEYS = STAGE_INPUTS
STAGE_LABELS = {s.model_input: s.label for s in stage_registry.registered()}


def _store(config: PipelineConfig) -> mlmd.MetadataStore:
    return mlmd.MetadataStore(metadata.sqlite_metadata_connection_config(os.path.abspath(config.metadata_path)))


def node_artifacts(store: mlmd.MetadataStore, type_name: str, node_context: str) -> list:
    """The artifacts of a type attached to a pipeline node's context (`<pipeline>.<node id>`), oldest
    first (by MLMD id)."""
    produced = set()
    for context in store.get_contexts_by_type("node"):
        if context.name == node_context:
            produced |= {a.id for a in store.get_artifacts_by_context(context.id)}
    return sorted((a for a in store.get_artifacts_by_type(type_name) if a.id in produced), key=lambda a: a.id)


def latest_artifact(store: mlmd.MetadataStore, type_name: str, node_context: str):
    """The newest artifact of a type attached to a pipeline node's context (`<pipeline>.<node id>`)."""
    artifacts = node_artifacts(store, type_name, node_context)
    return artifacts[-1] if artifacts else None


def served_models(config: PipelineConfig) -> Dict[str, Tuple[str, bool]]:
    """{stage: (the served SavedModel directory, whether the newest run of its Pusher pushed it)}:
    the served version is the newest push; a Pusher whose blessing said no pushes nothing."""
    store, out = _store(config), {}
    for stage in STAGES:
        node = f"{config.pipeline_name}.Pusher.{stage}"
        contexts = [c for c in store.get_contexts_by_type("node") if c.name == node]
        artifacts = sorted((a for c in contexts for a in store.get_artifacts_by_context(c.id)
                            if a.type_id == store.get_artifact_type("PushedModel").id), key=lambda a: a.id)
        pushed = [a for a in artifacts if a.custom_properties["pushed"].int_value == 1]
        if pushed:
            out[stage] = (pushed[-1].custom_properties["pushed_destination"].string_value, artifacts[-1].id == pushed[-1].id)
    return out


def latest_output(store: mlmd.MetadataStore, node_context: str, output_key: str):
    """The newest artifact a pipeline node output under `output_key` (a node may output several
    artifacts of one type, e.g. the NegativeSampler's `request_lists` and `shown_rows` Examples)."""
    contexts = [c for c in store.get_contexts_by_type("node") if c.name == node_context]
    executions = [e for c in contexts for e in store.get_executions_by_context(c.id)]
    events = store.get_events_by_execution_ids([e.id for e in executions]) if executions else []
    ids = [e.artifact_id for e in events if e.type == mlmd.proto.Event.OUTPUT and e.path.steps
           and e.path.steps[0].key == output_key]
    return store.get_artifacts_by_id([max(ids)])[0] if ids else None


def pushed_models(config: PipelineConfig) -> Dict[str, str]:
    """{stage: the served SavedModel directory}: each stage's newest pushed version."""
    return {stage: path for stage, (path, _) in served_models(config).items()}


def tfma_summary(uri: str) -> Dict:
    """The TFMA Evaluator's overall metrics of the candidate ranker and whether it validated."""
    import tensorflow_model_analysis as tfma

    out: Dict = {"uri": uri}
    result = tfma.load_eval_result(uri)
    for slice_key, metrics in result.slicing_metrics:
        if slice_key == ():
            for metric_sets in metrics.values():  # {output name: {sub key: {metric: value}}}
                for values in metric_sets.values():
                    for name, value in values.items():
                        if "doubleValue" in value:
                            out[name] = value["doubleValue"]
    validation = tfma.load_validation_result(uri)
    out["validation_ok"] = bool(validation.validation_ok)
    out["failures"] = sorted({f"{f.metric_key.name} = {f.metric_value.double_value.value:.4f}"
                              + (" (vs baseline)" if f.metric_key.is_diff else "")
                              for failure in validation.metric_validations_per_slice for f in failure.failures})
    return out


def _run_metrics(store: mlmd.MetadataStore, node_context: str) -> Optional[Dict]:
    run = latest_artifact(store, "ModelRun", node_context)
    path = os.path.join(run.uri, EVAL_METRICS_FILE) if run is not None else None
    if path is None or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


SPAN_METRICS = ("e2e_recall", "auc", "per_query_auc", "ne", "calibration")


def span_metrics(evaluation: Dict) -> Dict[str, Dict[str, Optional[float]]]:
    """{"model": …, "baseline": …} of SPAN_METRICS from a CascadeEvaluator's metrics.json; the
    baseline's are those of the ranking stage's baseline (None when the stage had none), and the e2e
    recall of the baselines' cascade (None unless every stage had a baseline)."""
    click_rate = evaluation["click_rate"]

    def of(section: Optional[Dict], e2e: Optional[float]) -> Dict[str, Optional[float]]:
        if section is None:
            return dict.fromkeys(SPAN_METRICS)
        return {"e2e_recall": e2e, "auc": section["auc"], "per_query_auc": section["per_query_auc"],
                "ne": section["ne"], "calibration": section["mean_prediction"] / click_rate}

    return {"model": of(evaluation["model"], evaluation["cascade"]["e2e_recall"]),
            "baseline": of(evaluation.get("baseline"), evaluation.get("baseline_cascade", {}).get("e2e_recall"))}


def span_history(config: PipelineConfig) -> List[Dict]:
    """Every span this output directory's CascadeEvaluator evaluated, oldest first, from the
    evaluation artifacts in MLMD (the newest evaluation of each span): {"span", "baseline_span",
    "model": …, "baseline": …} (`span_metrics`). Empty when no evaluation recorded a span (data
    without spans)."""
    newest: Dict[int, Dict] = {}
    for artifact in node_artifacts(_store(config), "ModelEvaluation", f"{config.pipeline_name}.{EVALUATOR_ID}"):
        path = os.path.join(artifact.uri, record_io.METRICS_FILE)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            evaluation = json.load(f)
        if evaluation.get("span") is not None:
            newest[evaluation["span"]] = {"span": evaluation["span"], "baseline_span": evaluation.get("baseline_span"),
                                          **span_metrics(evaluation)}
    return [newest[span] for span in sorted(newest)]


def collect(config: PipelineConfig) -> Dict:
    """{"evaluation": the CascadeEvaluator's metrics, "evaluation_uri", "tfma": the TFMA summary,
    "<trainer>_trainer" (e.g. "cascade_trainer", "retrieval_trainer"): each stage Trainer's eval
    metrics, "pushed": {stage: path}, and on spans "spans": `span_history`}."""
    store = _store(config)
    name = config.pipeline_name
    result = {"pushed": pushed_models(config)}
    evaluation = latest_artifact(store, "ModelEvaluation", f"{name}.{EVALUATOR_ID}")
    if evaluation is not None:
        with open(os.path.join(evaluation.uri, record_io.METRICS_FILE)) as f:
            result["evaluation"] = json.load(f)
        result["evaluation_uri"] = evaluation.uri
        if result["evaluation"].get("span") is not None:  # on spans: every span evaluated so far
            result["spans"] = span_history(config)
    tfma_evaluation = latest_artifact(store, "ModelEvaluation", f"{name}.{TFMA_EVALUATOR_ID}")
    if tfma_evaluation is not None:
        result["tfma"] = tfma_summary(tfma_evaluation.uri)
    lists = latest_output(store, f"{name}.NegativeSampler", "request_lists")
    if lists is not None and os.path.exists(os.path.join(lists.uri, record_io.METRICS_FILE)):
        with open(os.path.join(lists.uri, record_io.METRICS_FILE)) as f:
            result["sampler"] = json.load(f)
    for trainer in stage_registry.trainers(stage_registry.names()):  # "cascade_trainer", "retrieval_trainer", …
        key, node = f"{trainer.name}_trainer", f"Trainer.{trainer.name}"
        metrics = _run_metrics(store, f"{name}.{node}")
        if metrics is not None:
            result[key] = metrics
    return result


def _max_bucket_bias(section: Dict, min_count: int) -> Optional[float]:
    biases = [abs(b["bias"]) for b in section["calibration_by_bucket"]
              if b["count"] >= min_count and b["bias"] is not None and np.isfinite(b["bias"])]
    return max(biases) if biases else None


def ranking_vs_preranking_at(evaluation: Dict) -> Tuple[int, float, float]:
    """(k, the ranker's Recall@|GT|@k, the pre-ranker's) at the ranking stage's quota k, each stage
    alone over the whole request (from `recall_at_k`)."""
    cascade = evaluation["cascade"]
    k = int(cascade["quotas"][-1])
    curves = cascade["recall_at_k"]

    def at_k(curve):  # a curve ends at the longest request: beyond it every candidate is kept
        return curve[min(k, len(curve)) - 1]

    return k, at_k(curves["model"]), at_k(curves["preranking_model"])


def table_rows(evaluation: Dict, min_bucket_count: int = 100) -> List[Tuple[str, Optional[float], Optional[float]]]:
    """(metric, model, oracle) rows of the run's table; None where a value does not exist."""
    cascade, oracle_cascade = evaluation["cascade"], evaluation.get("oracle_cascade", {})
    quotas = "/".join(str(q) for q in cascade["quotas"])
    rows = [(f"e2e recall (quotas {quotas})", cascade["e2e_recall"], oracle_cascade.get("e2e_recall"))]
    for key, quota in zip(cascade["stages"], cascade["quotas"]):
        name = f"recall_at_{quota}/{key}"
        rows.append((f"{STAGE_LABELS.get(key, key)} Recall@|GT|@{quota}", cascade[name], oracle_cascade.get(name)))
    if "preranking_model" in cascade.get("recall_at_k", {}) and "model" in cascade["recall_at_k"]:
        k, _, preranking = ranking_vs_preranking_at(evaluation)
        rows.append((f"pre-ranking Recall@|GT|@{k}", preranking, None))
    model, oracle = evaluation["model"], evaluation.get("oracle")
    for key, label in (("auc", "ranking AUC"), ("per_query_auc", "ranking PerQueryAUC"), ("ne", "ranking NE")):
        rows.append((label, model[key], oracle[key] if oracle else None))
    click_rate = evaluation["click_rate"]
    rows.append(("calibration Σŷ/Σy", model["mean_prediction"] / click_rate,
                 oracle["mean_prediction"] / click_rate if oracle else None))
    rows.append((f"max |bias| of CTR buckets ≥{min_bucket_count}", _max_bucket_bias(model, min_bucket_count),
                 _max_bucket_bias(oracle, min_bucket_count) if oracle else None))
    if "pd_vs_baseline" in evaluation:
        rows.append(("PD vs the baseline ranker", evaluation["pd_vs_baseline"], None))
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


def blessing_lines(evaluation: Dict) -> List[str]:
    """One line per stage: blessed or not (with the reasons), and its baseline or why it has none."""
    lines = []
    for stage in STAGES:
        b = evaluation.get("blessings", {}).get(stage)
        if b is None:
            continue
        verdict = "blessed" if b["blessed"] else "NOT blessed: " + "; ".join(b["reasons"])
        baseline = f"baseline {b['baseline_uri']}" if b.get("baseline_uri") else "no baseline"
        notes = f" ({'; '.join(b['notes'])})" if b.get("notes") else ""
        lines.append(f"  {stage:<11} {verdict}; {baseline}{notes}")
    return lines


def tfma_line(tfma: Dict) -> str:
    keys = (("example_count", "rows", "{:.0f}"), ("auc", "AUC", "{:.4f}"), ("calibration", "calibration", "{:.4f}"),
            ("binary_crossentropy", "log loss", "{:.4f}"))
    parts = [f"{label} {fmt.format(tfma[key])}" for key, label, fmt in keys if key in tfma]
    verdict = "thresholds passed" if tfma["validation_ok"] else "thresholds FAILED: " + "; ".join(tfma["failures"])
    return f"Evaluator.ranking (TFMA, the ranker's CTR on the shown eval rows): {', '.join(parts)}; {verdict}"


def flops_line(result: Dict) -> Optional[str]:
    parts = []
    retrieval = result.get("retrieval_trainer", {}).get("flops")
    if retrieval:
        parts.append(f"retrieval {retrieval['per_candidate']:,} (query tower {retrieval['per_request']:,} per request)")
    cascade = result.get("cascade_trainer", {}).get("flops", {})
    if "preranking" in cascade:
        p = cascade["preranking"]
        parts.append(f"pre-ranking {p['per_candidate']:,} (query tower {p['per_request']:,} per request)")
    if "ranking" in cascade:
        r = cascade["ranking"]
        extra = f"; U tower {r['per_ui_treatment']:,} per UI treatment, cached" if "per_ui_treatment" in r else ""
        parts.append(f"ranking {r['per_candidate']:,} (cascade score {r['cascade_per_candidate']:,}, "
                     f"CTR {r['ctr_per_candidate']:,}{extra})")
    return "FLOPs per candidate of the served stages: " + "; ".join(parts) if parts else None


def data_counts(result: Dict) -> Optional[Dict]:
    """The run's data counts: the CascadeEvaluator's (in its evaluation), else the NegativeSampler's."""
    from cascade_ranking.components.negative_sampler import data_counts as from_counters

    if "data_counts" in result.get("evaluation", {}):
        return result["evaluation"]["data_counts"]
    return from_counters(result["sampler"]) if result.get("sampler") else None


def count_rows(result: Dict) -> Optional[List[Tuple[str, str]]]:
    """(label, value) of each data count every run reports (issue "No silent loss"): rows read, used
    and diverted by reason, requests without ground truth, NaN values read as 0, ids folded into the
    buckets, and for vocabulary features the eval ids out of vocabulary (the cascade Trainer's
    count); None when the run has no counts. `counts_block` prints them; report.html tabulates them."""
    from cascade_ranking.components.negative_sampler import DIVERTED_LABELS

    counts = data_counts(result)
    if counts is None:
        return None
    diverted = counts["rows_diverted"]
    no_gt = counts["requests_without_ground_truth"]
    splits = ", ".join(f"{split} {n:,}" for split, n in no_gt.items() if split != "total")
    nan = {name: n for name, n in counts["nan_values_read_as_0"].items() if n}
    folded = {name: v for name, v in counts["ids_folded"].items() if v["ids"]}
    rows = [
        ("rows read", f"{counts['rows_read']:,}"),
        ("rows used in the request lists", f"{counts['rows_used']:,}"),
        ("rows diverted (dead letters)", f"{sum(diverted.values()):,}: " + ", ".join(
            f"{label} {diverted.get(name, 0):,}" for name, label in DIVERTED_LABELS.items())),
        ("requests without ground truth", f"{no_gt['total']:,} of {counts['requests']:,}"
         + (f" ({splits})" if splits else "") + ": no rerank_pos candidate, left out of the recall metrics"),
        ("NaN values read as 0", ", ".join(f"{name} {n:,}" for name, n in nan.items()) or "none"),
        ("ids folded into the buckets", ", ".join(f"{name} {v['ids']:,} (outside [0, {v['buckets']:,}))"
                                                  for name, v in folded.items()) or "none"),
    ]
    oov = result.get("cascade_trainer", {}).get("eval_ids_out_of_vocabulary")
    if oov:  # vocabulary features: eval ids the train split never had share the OOV rows
        rows.append(("eval ids out of vocabulary (OOV rows)", ", ".join(
            f"{name} {v['ids']:,} of {v['of']:,} (vocabulary {v['vocabulary_size']:,})" for name, v in oov.items())))
    return rows


def counts_block(result: Dict) -> Optional[str]:
    """The block every run prints at its end: `count_rows`, one aligned line each."""
    rows = count_rows(result)
    if rows is None:
        return None
    where = f" (also in {result['evaluation_uri']}/metrics.json, \"data_counts\")" if "evaluation_uri" in result else ""
    width = max(len(label) for label, _ in rows)
    return "\n".join([f"Data counts{where}:"] + [f"  {label:<{width}}  {value}" for label, value in rows])


def data_warning_line(result: Dict) -> Optional[str]:
    """The run's last line: what it diverted or changed in the data, or that it did neither."""
    from cascade_ranking.components.negative_sampler import data_warnings

    counts = data_counts(result)
    if counts is None:
        return None
    warnings = data_warnings(counts)
    if not warnings:
        return "Data: every row read was used, none changed."
    return "Data warning: " + "; ".join(warnings) + " (see the counts above and the NegativeSampler's dead letters)"


def training_data_line(result: Dict) -> Optional[str]:
    data = result.get("cascade_trainer", {}).get("train_data")
    if not data:
        return None
    return (f"Ranker training data (the NegativeSampler's train lists): {data['lists']:,} requests, "
            f"{data['candidate_rows']:,} candidate rows read; {data['shown_rows']:,} shown rows kept for the CTR "
            f"losses ({data['reweighted_rows']:,} reweighted, {data['sampled_out_rows']:,} sampled out), "
            f"Σ sample_weight {data['shown_weight_sum']:,.1f}, "
            f"weighted click mean {data['weighted_click_mean']:.4f}")
