"""What CascadeEvaluator computes from scored candidate rows: metrics, plots and the blessing.

Scored rows are columns over the eval split's candidates: request_id, click, ui_position, stage,
true_ctr, and one score array per evaluated model. The metric definitions are `models.metrics`
(DESIGN §8):
  - ranking metrics (AUC, PerQueryAUC, NE, calibration bias per predicted-CTR bucket and per
    ui_position, its variance across buckets) over the shown candidates (ui_position > 0),
    for the final-stage model, the baseline, and the oracle `true_ctr` when it is known;
  - PD between the model and the baseline;
  - cascade metrics over the whole request: e2e recall through the stage models with the
    quotas, and Recall@|GT|@m of each stage, GT = the `rerank_pos` tier.
"""
import dataclasses
import json
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from models import metrics
from schema import features as F

GT_TIER = F.GROUND_TRUTH_TIER


@dataclasses.dataclass(frozen=True)
class EvaluatorConfig:
    """Switches of the CascadeEvaluator, with their defaults."""

    eval_split: str = "eval"
    quotas: Tuple[int, ...] = (40, 30, 20)  # per stage, earliest first (the last len(stages) are used)
    calibration_boundaries: Tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
    min_bucket_count: int = 100  # buckets with fewer shown candidates are left out of the variance
    # Blessing. thresholds: metric → {"min": x} or {"max": y}; with a baseline model, also
    # "not worse than baseline" on `baseline_metric` by more than `baseline_tolerance`.
    thresholds: Tuple[Tuple[str, str, float], ...] = ()
    compare_to_baseline: bool = True
    baseline_metric: str = "auc"
    baseline_tolerance: float = 0.0
    recall_k_max: int = 50
    batch_size: int = 1024
    max_bad_fraction: float = 0.01
    # How a model input is scored: (input name, signature, output key). A model input not named
    # here is scored by its `serving_default` and the first of its outputs `ctr`, `score`,
    # `scores`, `logit`. E.g. ("retrieval_model", "score", "score") for the two-tower model, whose
    # serving_default returns the top-K of the corpus rather than a score per candidate.
    score_outputs: Tuple[Tuple[str, str, str], ...] = ()

    def score_output(self, input_name: str) -> Tuple[str, Optional[str]]:
        """(signature, output key or None = the first known score output) of a model input."""
        for name, signature, key in self.score_outputs:
            if name == input_name:
                return signature, key
        return "serving_default", None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EvaluatorConfig":
        values = json.loads(text)
        values["quotas"] = tuple(values["quotas"])
        values["calibration_boundaries"] = tuple(values["calibration_boundaries"])
        values["thresholds"] = tuple(tuple(t) for t in values["thresholds"])
        values["score_outputs"] = tuple(tuple(t) for t in values.get("score_outputs", ()))
        return cls(**values)


def request_lists(request_ids: np.ndarray, columns: Mapping[str, np.ndarray], pad) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """Groups candidate rows by request into [R, L] arrays (L = longest request) and a mask."""
    order = np.argsort(request_ids, kind="stable")
    ids = request_ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    lengths = np.diff(np.r_[starts, ids.size])
    slot = np.arange(ids.size) - np.repeat(starts, lengths)
    row = np.repeat(np.arange(starts.size), lengths)
    mask = np.zeros((starts.size, lengths.max()), dtype=bool)
    mask[row, slot] = True
    out = {}
    for name, values in columns.items():
        grid = np.full(mask.shape, pad, dtype=np.asarray(values).dtype)
        grid[row, slot] = np.asarray(values)[order]
        out[name] = grid
    return out, mask


def ranking_metrics(y, p, request_ids, positions, config: EvaluatorConfig) -> Dict[str, object]:
    bias = metrics.calibration_bias(y, p, config.calibration_boundaries)
    usable = [b["bias"] for b in bias if b["count"] >= config.min_bucket_count and np.isfinite(b["bias"])]
    by_position = metrics.calibration_bias_by_slice(y, p, positions)
    return {
        "auc": metrics.auc(y, p),
        "per_query_auc": metrics.per_query_auc(y, p, request_ids),
        "ne": metrics.normalized_entropy(y, p),
        "mean_prediction": float(np.mean(p)),
        "calibration_by_bucket": bias,
        "calibration_by_position": by_position,
        "calibration_bias_variance": float(np.var(usable)) if usable else float("nan"),
    }


def cascade_metrics(rows: Mapping[str, np.ndarray], stage_keys: Sequence[str], config: EvaluatorConfig) -> Dict[str, object]:
    lists, mask = request_lists(rows["request_id"], {k: rows[k] for k in stage_keys} | {"gt": rows["stage"] == GT_TIER}, pad=0)
    gt = lists["gt"] & mask
    quotas = tuple(config.quotas[-len(stage_keys):])
    stage_scores = [np.where(mask, lists[k].astype(np.float64), -np.inf) for k in stage_keys]
    out = {
        "e2e_recall": metrics.e2e_recall(stage_scores, gt, quotas=quotas, mask=mask),
        "quotas": list(quotas),
        "stages": list(stage_keys),
    }
    for key, quota in zip(stage_keys, quotas):
        out[f"recall_at_{quota}/{key}"] = metrics.stage_recall(np.where(mask, lists[key], -np.inf), gt, quota, mask=mask)
    out["recall_at_k"] = {
        key: [metrics.stage_recall(np.where(mask, lists[key], -np.inf), gt, k, mask=mask)
              for k in range(1, min(config.recall_k_max, mask.shape[1]) + 1)]
        for key in stage_keys
    }
    return out


def evaluate(rows: Mapping[str, np.ndarray], model_key: str, stage_keys: Sequence[str], config: EvaluatorConfig,
             baseline_key: Optional[str] = None) -> Dict[str, object]:
    """All metrics of one evaluation, as a JSON-able dict."""
    shown = rows["ui_position"] > 0
    y = rows["click"][shown]
    req = rows["request_id"][shown]
    pos = rows["ui_position"][shown]
    result: Dict[str, object] = {"examples": int(rows["click"].size), "shown": int(shown.sum()), "click_rate": float(y.mean())}
    result["model"] = ranking_metrics(y, rows[model_key][shown], req, pos, config)
    if baseline_key:
        result["baseline"] = ranking_metrics(y, rows[baseline_key][shown], req, pos, config)
        result["pd_vs_baseline"] = metrics.prediction_difference(rows[model_key][shown], rows[baseline_key][shown])
    oracle = rows["true_ctr"][shown]
    if oracle.size and np.all(oracle >= 0):
        result["oracle"] = ranking_metrics(y, oracle, req, pos, config)
    result["cascade"] = cascade_metrics(rows, stage_keys, config)
    if np.all(rows["true_ctr"] >= 0):
        # The same cascade with every stage ordering by the true CTR: what ideal scorers recover.
        oracle_rows = dict(rows, **{key: rows["true_ctr"] for key in stage_keys})
        oracle_cascade = cascade_metrics(oracle_rows, stage_keys, config)
        oracle_cascade.pop("recall_at_k")
        result["oracle_cascade"] = oracle_cascade
    return result


def metric_value(result: Mapping, name: str, section: str = "model") -> float:
    """A named metric: ranking metrics from `section`, cascade ones from `cascade`."""
    if name in result.get(section, {}):
        return float(result[section][name])
    return float(result["cascade"][name])


def bless(result: Mapping, config: EvaluatorConfig) -> Tuple[bool, List[str]]:
    """(blessed, reasons): thresholds, then "not worse than the baseline"."""
    reasons = []
    for name, bound, value in config.thresholds:
        got = metric_value(result, name)
        if (bound == "min" and not got >= value) or (bound == "max" and not got <= value):
            reasons.append(f"{name} = {got:.4f} fails {bound} {value}")
    if config.compare_to_baseline and "baseline" in result:
        got = metric_value(result, config.baseline_metric)
        base = metric_value(result, config.baseline_metric, "baseline")
        worse = got < base - config.baseline_tolerance if config.baseline_metric != "ne" else got > base + config.baseline_tolerance
        if worse:
            reasons.append(f"{config.baseline_metric} = {got:.4f} is worse than the baseline's {base:.4f}")
    return not reasons, reasons


def write_plots(result: Mapping, out_dir: str) -> List[str]:
    """calibration.png (per-bucket bias, model vs baseline/oracle) and recall_at_k.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for section in ("model", "baseline", "oracle"):
        if section in result:
            buckets = [b for b in result[section]["calibration_by_bucket"] if b["count"] > 0]
            ax.plot([b["mean_prediction"] for b in buckets], [b["mean_label"] for b in buckets], marker="o", label=section)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    paths.append(_save(plt, fig, ax, "mean predicted CTR (bucket)", "observed CTR",
                       "Calibration by predicted-CTR bucket", os.path.join(out_dir, "calibration.png")))

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, values in result["cascade"]["recall_at_k"].items():
        ax.plot(range(1, len(values) + 1), values, label=key)
    ax.set_ylim(0, 1)
    paths.append(_save(plt, fig, ax, "k", "Recall@k of the ground truth", "Recall@k by stage model",
                       os.path.join(out_dir, "recall_at_k.png")))
    return paths


def _save(plt, fig, ax, xlabel: str, ylabel: str, title: str, path: str) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
