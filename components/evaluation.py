"""What CascadeEvaluator computes from scored candidate rows: metrics, plots and the blessings.

Scored rows are columns over the eval split's candidates: request_id, click, ui_position, stage,
true_ctr, and the score columns of the evaluated models, named by their component input
(`STAGE_INPUTS`, `BASELINE_INPUTS`): `<input>` holds the cascade score (what the stage orders
candidates by), and for the ranking model and its baseline `<input>/ctr` holds the calibrated CTR
at the example's UI treatment. The metric definitions are `models.metrics` (DESIGN §8):
  - CTR metrics (AUC, PerQueryAUC, NE, calibration bias per predicted-CTR bucket and per
    ui_position, its variance across buckets) on the CTR column over the shown candidates
    (ui_position > 0), for the ranking model (`model`), its baseline (`baseline`), and the oracle
    `true_ctr` when it is known; PD between the model's and the baseline's CTR;
  - cascade metrics on the cascade-score columns over all candidates of each request: e2e recall
    through the stage models with the quotas, and for each stage Recall@|GT|@q, the chance
    recall of a random order min(q, n_r)/n_r and the lift (recall − chance)/(1 − chance),
    GT = the `rerank_pos` tier; `baseline_cascade` the same for each stage's baseline alone.

Blessing (`bless_stages`), one verdict per stage, each against that stage's own baseline (the
latest blessed model of the stage):
  - value thresholds `(stage, metric, "min"|"max", value)` on the stage's metrics: "recall"
    (Recall@|GT|@quota), "recall_lift", and for the CTR stage (ranking) also "auc",
    "per_query_auc", "ne" and "calibration" = mean predicted CTR / click rate; a NaN metric fails
    its threshold, except a recall_lift of a stage whose quota keeps every candidate of every
    request (it cuts nothing on this data, e.g. retrieval's 40 on MovieLens lists of ≤ 40): not
    applied, with a note;
  - change thresholds `(stage, metric, tolerance)`: the candidate may be worse than the stage's
    baseline by at most `tolerance` (absolute; "ne" lower is better, the others higher). A stage
    without a baseline is the first of its kind: nothing to compare with, which a note records;
  - the CTR stage (ranking) only: the TFMA Evaluator's blessing (the CTR gate on the shown rows)
    when one is given;
  - a stage whose model is absent is not blessed ("no model").
"""
import dataclasses
import json
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from cascade_ranking.models import metrics
from cascade_ranking.models import stages as stage_registry
from cascade_ranking.models.config import config_from_dict, to_dict
from cascade_ranking.schema import features as F

GT_TIER = F.GROUND_TRUTH_TIER
# The stage registry (`models.stages`), in cascade order, and the component input of each stage's
# model and of its baseline (the stage's latest blessed model).
STAGES = stage_registry.names()
STAGE_INPUTS = {s.name: s.model_input for s in stage_registry.registered()}
BASELINE_INPUTS = {s.name: s.baseline_input for s in stage_registry.registered()}
CTR_STAGE = stage_registry.ctr_stage().name
RANKING_INPUT = STAGE_INPUTS[CTR_STAGE]
CASCADE_STAGE_METRICS = ("recall", "recall_lift")  # every stage, over whole requests
CTR_METRICS = ("auc", "per_query_auc", "ne", "calibration")  # the ranking stage, on shown rows
LOWER_IS_BETTER = ("ne",)
NO_BASELINE_NOTE = "no baseline: the first blessed model of this stage, change thresholds not applied"
NO_CTR_BLESSING_NOTE = "no TFMA blessing given: the CTR is gated by this evaluator's thresholds only"


def ctr_column(input_name: str) -> str:
    """The scored column of a model input's CTR output."""
    return f"{input_name}/ctr"


def stage_metric_names(stage: str) -> Tuple[str, ...]:
    return CASCADE_STAGE_METRICS + (CTR_METRICS if stage == CTR_STAGE else ())


@dataclasses.dataclass(frozen=True)
class EvaluatorConfig:
    """Switches of the CascadeEvaluator, with their defaults."""

    eval_split: str = "eval"
    quotas: Tuple[int, ...] = (40, 30, 20)  # per stage, earliest first (the last len(stages) are used)
    calibration_boundaries: Tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
    min_bucket_count: int = 100  # buckets with fewer shown candidates are left out of the variance
    # Blessing, per stage (see the module docstring). thresholds: (stage, metric, "min"|"max",
    # value); the default is each stage's declaration (`models.stages`): bless no model that orders
    # its stage's candidates no better than chance.
    thresholds: Tuple[Tuple[str, str, str, float], ...] = tuple(
        (s.name, *t) for s in stage_registry.registered() for t in s.thresholds)
    # change_thresholds: (stage, metric, tolerance) against the stage's baseline.
    change_thresholds: Tuple[Tuple[str, str, float], ...] = tuple(
        (s.name, *t) for s in stage_registry.registered() for t in s.change_thresholds)
    recall_k_max: int = 50
    batch_size: int = 1024
    max_bad_fraction: float = 0.01
    # How a model input is scored: (input name, signature, output key); a baseline input is scored
    # as its stage's input. A model input not named here is scored by its `serving_default` and the
    # first of its outputs `score`, `ctr`, `scores`, `logit`. E.g. ("retrieval_model", "score",
    # "score") for the two-tower model, whose serving_default returns the top-K of the corpus
    # rather than a score per candidate.
    score_outputs: Tuple[Tuple[str, str, str], ...] = ()
    # The ranking model's (and its baseline's) calibrated CTR: (signature, output key).
    ctr_output: Tuple[str, str] = ("serving_default", "ctr")
    # The TFMA Evaluator's thresholds on the ranker's CTR (`tfma_eval_config`): AUC lower bound,
    # how much AUC may drop against the baseline, and the range of Calibration (Σŷ / Σy).
    tfma_min_auc: float = 0.55
    tfma_auc_tolerance: float = 0.01
    tfma_calibration_range: Tuple[float, float] = (0.8, 1.25)
    # Features the TFMA Evaluator also slices its metrics by (each UI id of the feature registry,
    # e.g. ("ui_position", "ui_format")); by default it computes the overall slice only, the one
    # it gates and the run's report reads. Each slice costs TFMA's per-row work again: on the
    # demo's 10,180 shown eval rows TFMA alone took 7.9 s overall-only, 9.9 s with ui_format,
    # 10.8 s with ui_position and 13.8 s with both (`bench/tfma_slices.py`). The calibration per
    # ui_position is in this evaluator's metrics.json either way (`calibration_by_position`).
    tfma_slice_features: Tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.tfma_slice_features, str) or not all(
                isinstance(name, str) and name for name in self.tfma_slice_features):
            raise ValueError(f"tfma_slice_features must be a list of feature names, got {self.tfma_slice_features!r}")
        repeated = sorted({name for name in self.tfma_slice_features if self.tfma_slice_features.count(name) > 1})
        if repeated:
            raise ValueError(f"tfma_slice_features names {', '.join(repeated)} more than once")
        for stage, metric, bound, _ in self.thresholds:
            self._check_metric(stage, metric, "thresholds")
            if bound not in ("min", "max"):
                raise ValueError(f"thresholds: bound must be 'min' or 'max', got {bound!r}")
        for stage, metric, _ in self.change_thresholds:
            self._check_metric(stage, metric, "change_thresholds")
            if metric == "calibration":
                raise ValueError("change_thresholds: calibration has no better direction; bound it with a "
                                 "min and a max in thresholds")

    @staticmethod
    def _check_metric(stage: str, metric: str, field: str) -> None:
        if stage not in STAGES:
            raise ValueError(f"{field}: unknown stage {stage!r}; stages are {STAGES}")
        if metric not in stage_metric_names(stage):
            raise ValueError(f"{field}: stage {stage!r} has no metric {metric!r}; it has {stage_metric_names(stage)}")

    def score_output(self, input_name: str) -> Tuple[str, Optional[str]]:
        """(signature, output key or None = the first known score output) of a model input."""
        for name, signature, key in self.score_outputs:
            if name == input_name:
                return signature, key
        return "serving_default", None

    def to_json(self) -> str:
        return json.dumps(to_dict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EvaluatorConfig":
        """The inverse of `to_json` (`models.config.config_from_dict`)."""
        return config_from_dict(cls, json.loads(text))


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


def stage_quotas(stage_keys: Sequence[str], config: EvaluatorConfig) -> Dict[str, int]:
    """The quota of each present stage: the last len(stage_keys) of `config.quotas`, in order."""
    return dict(zip(stage_keys, config.quotas[-len(stage_keys):]))


def _stage_recalls(grid: np.ndarray, gt: np.ndarray, mask: np.ndarray, key: str, quota: int) -> Dict[str, float]:
    """Recall@|GT|@quota of one score grid, its chance level and lift, keyed by `key`."""
    recall = metrics.stage_recall(np.where(mask, grid, -np.inf), gt, quota, mask=mask)
    chance = metrics.chance_recall(gt, quota, mask=mask)
    return {f"recall_at_{quota}/{key}": recall, f"chance_at_{quota}/{key}": chance,
            f"recall_lift_at_{quota}/{key}": metrics.recall_lift(recall, chance)}


def cascade_metrics(rows: Mapping[str, np.ndarray], stage_keys: Sequence[str], config: EvaluatorConfig) -> Dict[str, object]:
    lists, mask = request_lists(rows["request_id"], {k: rows[k] for k in stage_keys} | {"gt": rows["stage"] == GT_TIER}, pad=0)
    gt = lists["gt"] & mask
    quotas = stage_quotas(stage_keys, config)
    stage_scores = [np.where(mask, lists[k].astype(np.float64), -np.inf) for k in stage_keys]
    out = {
        "e2e_recall": metrics.e2e_recall(stage_scores, gt, quotas=tuple(quotas.values()), mask=mask),
        "quotas": list(quotas.values()),
        "stages": list(stage_keys),
    }
    for key, quota in quotas.items():
        out.update(_stage_recalls(lists[key], gt, mask, key, quota))
    out["recall_at_k"] = {
        key: [metrics.stage_recall(np.where(mask, lists[key], -np.inf), gt, k, mask=mask)
              for k in range(1, min(config.recall_k_max, mask.shape[1]) + 1)]
        for key in stage_keys
    }
    return out


def baseline_cascade_metrics(rows: Mapping[str, np.ndarray], stage_keys: Sequence[str], baselines: Mapping[str, str],
                             config: EvaluatorConfig) -> Dict[str, object]:
    """Recall@|GT|@q, chance and lift of each stage's baseline alone, at the stage's quota and keyed
    by the stage's input (like `cascade`), for the stages in `baselines` (stage input → baseline column);
    and when every stage has one, `e2e_recall` of the baselines' cascade (the same `metrics.e2e_recall`
    and quotas as the model's): on spans, the previous models' cascade on the new span, the
    progressive validation of e2e recall."""
    quotas = stage_quotas(stage_keys, config)
    keys = [k for k in stage_keys if k in baselines]
    lists, mask = request_lists(rows["request_id"], {baselines[k]: rows[baselines[k]] for k in keys}
                                | {"gt": rows["stage"] == GT_TIER}, pad=0)
    out: Dict[str, object] = {"stages": keys, "quotas": [quotas[k] for k in keys]}
    for key in keys:
        out.update(_stage_recalls(lists[baselines[key]], lists["gt"] & mask, mask, key, quotas[key]))
    if keys and keys == list(stage_keys):
        stage_scores = [np.where(mask, lists[baselines[k]].astype(np.float64), -np.inf) for k in keys]
        out["e2e_recall"] = metrics.e2e_recall(stage_scores, lists["gt"] & mask, quotas=tuple(quotas[k] for k in keys),
                                               mask=mask)
    return out


def evaluate(rows: Mapping[str, np.ndarray], stage_keys: Sequence[str], config: EvaluatorConfig,
             baselines: Mapping[str, str] = {}) -> Dict[str, object]:
    """All metrics of one evaluation, as a JSON-able dict. `stage_keys`: the present stage inputs
    in cascade order (the ranking `model` always); `baselines`: stage input → its baseline input,
    for the stages whose baseline was scored."""
    shown = rows["ui_position"] > 0
    y = rows["click"][shown]
    req = rows["request_id"][shown]
    pos = rows["ui_position"][shown]
    result: Dict[str, object] = {"examples": int(rows["click"].size), "shown": int(shown.sum()), "click_rate": float(y.mean())}
    ctr = rows[ctr_column(RANKING_INPUT)][shown]
    result["model"] = ranking_metrics(y, ctr, req, pos, config)
    if RANKING_INPUT in baselines:
        baseline_ctr = rows[ctr_column(baselines[RANKING_INPUT])][shown]
        result["baseline"] = ranking_metrics(y, baseline_ctr, req, pos, config)
        result["pd_vs_baseline"] = metrics.prediction_difference(ctr, baseline_ctr)
    oracle = rows["true_ctr"][shown]
    if oracle.size and np.all(oracle >= 0):
        result["oracle"] = ranking_metrics(y, oracle, req, pos, config)
    result["cascade"] = cascade_metrics(rows, stage_keys, config)
    result["baseline_cascade"] = baseline_cascade_metrics(rows, stage_keys, baselines, config)
    if np.all(rows["true_ctr"] >= 0):
        # The same cascade with every stage ordering by the true CTR: what ideal scorers recover.
        oracle_rows = dict(rows, **{key: rows["true_ctr"] for key in stage_keys})
        oracle_cascade = cascade_metrics(oracle_rows, stage_keys, config)
        oracle_cascade.pop("recall_at_k")
        result["oracle_cascade"] = oracle_cascade
    return result


def stage_metric(result: Mapping, stage: str, metric: str, baseline: bool = False) -> float:
    """A stage's metric (see `stage_metric_names`) from an `evaluate` result, of the stage's model or
    (baseline=True) of its baseline."""
    key = STAGE_INPUTS[stage]
    if metric in CASCADE_STAGE_METRICS:
        section = result["baseline_cascade" if baseline else "cascade"]
        quota = section["quotas"][section["stages"].index(key)]
        return float(section[f"{metric}_at_{quota}/{key}"])  # recall_at_q/key, recall_lift_at_q/key
    section = result["baseline" if baseline else "model"]
    if metric == "calibration":
        return float(section["mean_prediction"]) / float(result["click_rate"])
    return float(section[metric])


def _cuts_nothing(result: Mapping, stage: str) -> bool:
    """Whether the stage's quota keeps every candidate of every request (its chance recall is 1)."""
    section, key = result["cascade"], STAGE_INPUTS[stage]
    quota = section["quotas"][section["stages"].index(key)]
    return float(section[f"chance_at_{quota}/{key}"]) >= 1.0 - 1e-9


def bless_stages(result: Mapping, config: EvaluatorConfig, ctr_blessed: Optional[bool] = None, ctr_message: str = "",
                 notes: Mapping[str, Sequence[str]] = {}) -> Dict[str, Dict[str, object]]:
    """Stage → {"blessed", "reasons", "notes"} by the rules of the module docstring.

    `ctr_blessed`: the TFMA Evaluator's verdict on the ranker's CTR (None: no TFMA blessing given),
    `ctr_message` what the reason says about it; `notes`: stage → notes to carry (e.g. a baseline
    that could not be scored).
    """
    verdicts = {}
    for stage in STAGES:
        key = STAGE_INPUTS[stage]
        reasons: List[str] = []
        stage_notes = list(notes.get(stage, ()))
        if key not in result["cascade"]["stages"]:
            verdicts[stage] = {"blessed": False, "reasons": ["no model"], "notes": stage_notes}
            continue
        for _, metric, bound, value in (t for t in config.thresholds if t[0] == stage):
            got = stage_metric(result, stage, metric)
            if metric == "recall_lift" and _cuts_nothing(result, stage):
                stage_notes.append("recall_lift not applied: the quota keeps every candidate of every request, "
                                   "so this stage cuts nothing on this data (chance recall 1)")
            elif math.isnan(got):
                reasons.append(f"{metric} is undefined (NaN) on this data, so it cannot pass {bound} {value}")
            elif (bound == "min" and got < value) or (bound == "max" and got > value):
                reasons.append(f"{metric} = {got:.4f} fails {bound} {value}")
        if key in result["baseline_cascade"]["stages"]:
            for _, metric, tolerance in (t for t in config.change_thresholds if t[0] == stage):
                got, base = stage_metric(result, stage, metric), stage_metric(result, stage, metric, baseline=True)
                change = base - got if metric in LOWER_IS_BETTER else got - base  # > 0: better than the baseline
                if not change >= -tolerance:  # also when either is NaN
                    reasons.append(f"{metric} = {got:.4f} is worse than the baseline's {base:.4f} "
                                   f"by more than {tolerance}")
        else:
            stage_notes.append(NO_BASELINE_NOTE)
        if stage == CTR_STAGE:
            if ctr_blessed is None:
                stage_notes.append(NO_CTR_BLESSING_NOTE)
            elif not ctr_blessed:
                reasons.append(f"the TFMA Evaluator did not bless the CTR: {ctr_message}")
        verdicts[stage] = {"blessed": not reasons, "reasons": reasons, "notes": stage_notes}
    return verdicts


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
