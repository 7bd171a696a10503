"""Markdown tables and PNG plots for BENCHMARKS.md, from the JSON files the bench scripts write.

Reads whichever of these exist in --results (default bench/results/) and prints one markdown
table per file; with --plots it also draws the PNGs beside them. Nothing is measured here: every
figure comes from the script named in the table's heading. Every "±" is the sample standard deviation
(ddof 1) over seeds (or seed pairs, or repeats), recomputed here from the runs in the JSON.

    ranking_ablations.json   python bench/ranking_ablations.py --json bench/results/ranking_ablations.json
    data_sampling.json       python bench/data_sampling.py --json bench/results/data_sampling.json
    cascade_lcron.json       python bench/cascade_lcron.py --json bench/results/cascade_lcron.json
    ranking_speed.json       python bench/ranking_speed.py --json bench/results/ranking_speed.json
    stage_throughput.json    python bench/stage_throughput.py --json bench/results/stage_throughput.json
    component_throughput.json python bench/component_throughput.py --json bench/results/component_throughput.json
    demo_wall.json           python bench/demo_wall.py --json bench/results/demo_wall.json
    factory_floor_table.json python bench/factory_floor_table.py --json bench/results/factory_floor_table.json

    python bench/report.py [--results bench/results] [--plots]
"""
import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def mean_std(values, digits=4):
    """'mean ± std' with the sample std (ddof 1) over the finite values, as every table here uses."""
    values = np.asarray([v for v in values if v is not None], np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return "n/a"
    std = np.std(values, ddof=1) if values.size > 1 else float("nan")
    return f"{np.mean(values):.{digits}f} ± {std:.{digits}f}"


def sample_std(values):
    """The sample std (ddof 1) that every "±" and error bar here shows; 0 for a single value."""
    values = np.asarray(values, np.float64)
    return float(np.std(values, ddof=1)) if values.size > 1 else 0.0


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def load(results_dir, name):
    path = os.path.join(results_dir, name + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# ---- ranking ablations and reproducibility ------------------------------------------------------
def ablation_tables(data):
    out = []
    for dataset, result in data["results"].items():
        rows = []
        for v in result["variants"].values():
            runs = v["runs"]
            rows.append([v["variant"], v["qu"], mean_std([r["auc"] for r in runs]),
                         mean_std([r["per_query_auc"] for r in runs]), mean_std([r["ne"] for r in runs]),
                         mean_std([r["bucket_bias_variance"] for r in runs]),
                         f"{v.get('train_speed_ratio', float('nan')):.2f}"])
        out.append(f"**{dataset}** — eval {result['eval_rows']:,} shown rows, {result['eval_clicks']:,} clicks; "
                   f"oracle AUC {oracle(result)}; bootstrap std of one model's AUC over the eval rows "
                   f"{result['auc_bootstrap_std']:.4f}; {data['seeds']} seeds\n\n"
                   + markdown(["variant", "Q·U", "AUC", "PerQueryAUC", "NE", "var(calibration bias) across buckets",
                               "train ex/s ÷ baseline"], rows))
    return "\n\n".join(out)


def oracle(result):
    """The oracle AUC of true_ctr, or why there is none (real data knows no true CTR)."""
    value = result["oracle_auc"]
    return f"{value:.4f}" if value is not None and np.isfinite(value) else "n/a (no true CTR)"


REPRO_VARIANTS = (("baseline", "ReLU", "off"), ("+bias", "ReLU", "on"), ("+SmeLU", "SmeLU", "off"),
                  ("+SmeLU+bias", "SmeLU", "on"))


def reproducibility_table(data):
    rows = []
    for dataset, result in data["results"].items():
        for qu in sorted({v["qu"] for v in result["variants"].values()}):
            for name, activation, bias in REPRO_VARIANTS:
                v = result["variants"].get(f"{name} | Q·U {qu}")
                if v is not None:
                    rows.append([dataset, qu, activation, bias, mean_std(v["pd_pairs"]),
                                 mean_std([r["auc"] for r in v["runs"]])])
    return markdown(["dataset", "Q·U", "activation", "bias constraints", "PD between seed retrains (3 pairs)", "AUC"],
                    rows)


def plot_ablations(data, plt, out_dir):
    results = data["results"]
    fig, axes = plt.subplots(1, 2 * len(results), figsize=(7 * len(results), 4.5), squeeze=False)
    for i, (dataset, result) in enumerate(results.items()):
        variants = list(result["variants"].values())
        labels = [f"{v['variant']}{'' if v['qu'] == 'off' else ' (Q·U)'}" for v in variants]
        for j, metric in enumerate(("auc", "ne")):
            ax = axes[0, 2 * i + j]
            values = [[r[metric] for r in v["runs"]] for v in variants]
            ax.barh(range(len(variants)), [np.mean(x) for x in values], xerr=[sample_std(x) for x in values],
                    color=["#888" if v["variant"] == "baseline" else "#3a7" for v in variants])
            ax.set_yticks(range(len(variants)), labels, fontsize=7)
            ax.invert_yaxis()
            lo = min(np.mean(x) - sample_std(x) for x in values)
            hi = max(np.mean(x) + sample_std(x) for x in values)
            ax.set_xlim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
            ax.set_title(f"{dataset}: {metric.upper()} (mean ± std over seeds)", fontsize=9)
    return save(fig, plt, out_dir, "ranking_ablations.png")


def plot_reproducibility(data, plt, out_dir):
    results = data["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
    for i, (dataset, result) in enumerate(results.items()):
        ax = axes[0, i]
        bars = [(f"{act}{' + bias' if bias == 'on' else ''}{' (Q·U)' if qu == 'on' else ''}", v["pd_pairs"])
                for qu in sorted({v["qu"] for v in result["variants"].values()})
                for name, act, bias in REPRO_VARIANTS
                if (v := result["variants"].get(f"{name} | Q·U {qu}")) is not None]
        ax.bar(range(len(bars)), [np.mean(b[1]) for b in bars], yerr=[sample_std(b[1]) for b in bars], color="#47a")
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{dataset}: PD between seed retrains", fontsize=9)
    return save(fig, plt, out_dir, "reproducibility_pd.png")


def calibration_check_table(data):
    """bench/calibration_check.py: per variant and split, the worst bucket's measured bias, its truth bias
    (the model's own error), the click-noise part, and the size of the duals."""
    edges = data["buckets"]
    rows = []
    for name, runs in data["results"].items():
        for split in ("train", "eval"):
            def worst(field, runs=runs, split=split):
                return [max(abs(b[field]) for b in r[split].values()) for r in runs]
            low = [r[split]["0"]["truth_bias"] for r in runs if "0" in r[split]]
            duals = [float(np.mean(np.abs(r["duals"]))) for r in runs if "duals" in r]
            rows.append([name, split, mean_std(worst("measured"), 3), mean_std(worst("click_noise"), 3),
                         mean_std(worst("truth_bias"), 3), mean_std(low, 3),
                         mean_std(duals, 3) if duals else "–"])
    return (f"synthetic {data['requests']:,} requests, {data['seeds']} seeds; buckets of predicted CTR "
            f"{edges} with >= 500 rows\n\n"
            + markdown(["variant", "split", "max \\|measured bias\\|", "max \\|click-noise part\\|",
                        "max \\|truth bias\\|", f"truth bias of [{edges[0]}, {edges[1]})", "mean \\|λ\\|"], rows))


def obd_calibration_table(data):
    """bench/obd_calibration.py: in-sample and eval calibration of the OBD ablation baseline by epochs."""
    rate = data["click_rate"]
    rows = [[epochs, mean_std([r["train_calibration"] for r in runs], 3), mean_std([r["eval_calibration"] for r in runs], 3),
             mean_std([r["eval_auc"] for r in runs]), mean_std([r["eval_ne"] for r in runs])]
            for epochs, runs in data["results"].items()]
    return (f"OBD, train bts (click rate {rate['train']:.4f}), eval random ({rate['eval']:.4f}; train/eval "
            f"{rate['train'] / rate['eval']:.3f}); ablation baseline, {data['seeds']} seeds\n\n"
            + markdown(["epochs", "Σŷ/Σy train (in-sample)", "Σŷ/Σy eval", "eval AUC", "eval NE"], rows))


# ---- data sampling ---------------------------------------------------------------------------------
def sampling_table(data):
    rows = []
    for name, c in data["configs"].items():
        runs = c["runs"]
        rows.append([name, f"{runs[0]['kept']:,}", f"{runs[0]['kept_fraction']:.3f}", mean_std([r["ne"] for r in runs]),
                     mean_std([r["auc"] for r in runs]), mean_std([r["calibration"] for r in runs], 3)])
    reduction = data.get("reduction_at_neutral_ne")
    verdict = (f"data reduction at neutral NE: **{reduction:.1%}** ({data['neutral_config']})" if reduction is not None
               else "no sampled configuration is NE-neutral")
    return (f"synthetic, {data['requests']:,} requests (data seed {data['data_seed']}); {data['full_train_shown_rows']:,} "
            f"shown train rows (click rate {data['train_click_rate']:.3f}); {data['seeds']} seeds; "
            f"{data['low_loss_fraction_of_nonclicks']:.1%} of train non-clicks have teacher loss below τ\n\n"
            + markdown(["configuration", "rows kept", "fraction kept", "NE", "AUC", "Σŷ/Σy"], rows)
            + f"\n\nNeutral rule: {data['neutral_rule']}. {verdict}.")


def plot_sampling(data, plt, out_dir):
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in data["configs"].items():
        ne = [r["ne"] for r in c["runs"]]
        marker = "s" if name == "full" else ("^" if "loss" in name else "o")
        ax.errorbar(c["runs"][0]["kept_fraction"], np.mean(ne), yerr=sample_std(ne), fmt=marker, capsize=3, label=name)
    ax.set_xlabel("fraction of shown train rows kept")
    ax.set_ylabel("eval NE (mean ± std over seeds)")
    ax.set_title("synthetic: data sampling, rows kept vs NE", fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, plt, out_dir, "data_sampling_ne.png")


# ---- cascade --------------------------------------------------------------------------------------
def cascade_table(data):
    rows = []
    for dataset, variants in data["results"].items():
        for method, runs in variants.items():
            stage_keys = [k for k in runs[0] if k.startswith("recall_")]
            rows.append([dataset, method, mean_std([r["e2e_recall"] for r in runs])]
                        + [f"{k[len('recall_'):]} {mean_std([r[k] for r in runs])}" for k in stage_keys])
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    return markdown(["dataset", "method", "e2e recall"] + ["stage Recall@\\|GT\\|@m"] * (width - 3), rows)


def plot_cascade(data, plt, out_dir):
    results = data["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
    for i, (dataset, variants) in enumerate(results.items()):
        ax = axes[0, i]
        names = list(variants)
        values = [[r["e2e_recall"] for r in variants[n]] for n in names]
        ax.bar(range(len(names)), [np.mean(v) for v in values], yerr=[sample_std(v) for v in values],
               color=["#c53" if n == "lcron" else "#888" for n in names])
        ax.set_xticks(range(len(names)), names)
        lo = min(np.mean(v) - sample_std(v) for v in values)
        hi = max(np.mean(v) + sample_std(v) for v in values)
        ax.set_ylim(lo - 0.5 * (hi - lo), hi + 0.3 * (hi - lo))
        ax.set_title(f"{dataset}: e2e recall (mean ± sample std over seeds)", fontsize=9)
    return save(fig, plt, out_dir, "cascade_e2e_recall.png")


# ---- performance -----------------------------------------------------------------------------------
def speed_table(data):
    parts = []
    if data.get("train"):
        parts.append("Training, ranker (RankerConfig defaults) ÷ plain TFRS DCN of the same width, same cached batches, "
                     "interleaved (median of per-round ratios):\n\n" + markdown(
                         ["requests per batch", "variant", "rows per batch", "ranker ex/s", "plain DCN ex/s", "ratio"],
                         [[t["requests_per_batch"], t["variant"], f"{t['rows_per_batch']:.0f}",
                           f"{t['ranker_examples_per_s']:,.0f}", f"{t['plain_dcn_examples_per_s']:,.0f}",
                           f"{t['ratio']:.2f}"] for t in data["train"]]))
    if data.get("grid"):
        parts.append("`score_ui_grid` (A ads × M UI treatments, reloaded SavedModel) against `serving_default` on the A·M "
                     "pair examples:\n\n" + markdown(
                         ["A × M", "serving_default ms", "score_ui_grid ms", "speed-up", "max abs(grid − naive)"],
                         [[f"{g['num_ads']} × {g['num_uis']}", f"{g['naive_ms']:.2f}", f"{g['grid_ms']:.3f}",
                           f"{g['speedup']:.1f}×", f"{g['max_abs_grid_minus_naive']:.1e}"] for g in data["grid"]]))
        breakdown = [[f"{g['num_ads']} × {g['num_uis']}", part, f"{v['ms']:.3f}", f"{v['share_of_grid']:.0%}"]
                     for g in data["grid"] for part, v in g.get("parts", {}).items()]
        if breakdown:
            parts.append("Where the grid's time goes:\n\n" + markdown(["A × M", "part", "ms", "share of the grid call"],
                                                                       breakdown))
    if data.get("latency"):
        parts.append("SavedModel `serving_default` p50 latency, one request (reloaded SavedModels, interleaved calls):\n\n"
                     + markdown(["candidates", "ranker p50 ms", "plain TFRS DCN p50 ms", "ratio"],
                                [[t["candidates"], f"{t['ranker_p50_ms']:.2f}", f"{t['plain_dcn_p50_ms']:.2f}",
                                  f"{t['ratio']:.2f}"] for t in data["latency"]]))
    return "\n\n".join(parts)


def stage_table(data):
    train = markdown(["stage", "batch", "examples/s", "÷ plain TFRS DCN (ranker batches)"],
                     [[name, t["batch"], f"{t['examples_per_s']:,.0f}", f"{t['ratio_to_plain_dcn']:.2f}"]
                      for name, t in data["train"].items()])
    pipe = markdown(["input function", "examples read/s", "÷ its read floor", "output rows/s"],
                    [[name, f"{t['examples_per_s']:,.0f}", f"{t['ratio_to_read_floor']:.2f}",
                      f"{t['output_rows_per_s']:,.0f}"] for name, t in data["input"].items()])
    definitions = "\n".join(f"- {name}: {t['definition']}" for name, t in data["train"].items() if "definition" in t)
    return (f"synthetic {data['data']['requests']:,} requests\n\n{train}\n\nExamples:\n{definitions}\n\n"
            f"Input pipelines (a full pass each, interleaved):\n\n{pipe}")


def plot_performance(speed, stages, components, plt, out_dir):
    """One bar chart of every performance ratio (each against its own reference, printed on the bar)."""
    bars = []
    for t in speed.get("train", []) if speed else []:
        bars.append((f"ranker train ÷ plain DCN ({t['requests_per_batch']} req/batch)", t["ratio"]))
    for g in speed.get("grid", []) if speed else []:
        bars.append((f"grid speed-up {g['num_ads']}×{g['num_uis']} (÷10)", g["speedup"] / 10))
    for t in speed.get("latency", []) if speed else []:
        bars.append((f"latency ranker ÷ plain DCN, 1×{t['candidates']}", t["ratio"]))
    for name, t in (stages or {}).get("train", {}).items():
        if name != "plain_dcn":
            bars.append((f"train {name} ÷ plain DCN", t["ratio_to_plain_dcn"]))
    for name, t in (stages or {}).get("input", {}).items():
        if not name.startswith("read_floor"):
            bars.append((f"input {name} ÷ read floor", t["ratio_to_read_floor"]))
    for name, modes in (components or {}).get("components", {}).items():
        for mode, f in modes.items():
            if f["ratio_to_reference"] != 1.0:
                bars.append((f"{name} {mode} ÷ in-process", f["ratio_to_reference"]))
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(bars) + 1))
    ax.barh(range(len(bars)), [b[1] for b in bars], color="#47a")
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.8)
    for i, (_, v) in enumerate(bars):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=7)
    ax.set_title("performance ratios, each against\na reference measured in the same run", fontsize=9)
    return save(fig, plt, out_dir, "performance_ratios.png")


# ---- components and demo --------------------------------------------------------------------------
def component_table(data):
    rows = []
    for name, modes in data["components"].items():
        for mode, f in modes.items():
            rows.append([name, mode, f"{np.mean(f['rows_per_s']):,.0f} ± {sample_std(f['rows_per_s']):,.0f}",
                         f"{f['ratio_to_reference']:.2f}"])
    return (f"{data['rows']:,} candidate rows, {data['repeats']} repeats, {data['cpus']} cores\n\n"
            + markdown(["component", "DirectRunner mode", "rows/s", f"÷ {data['reference_mode']}"], rows))


def demo_table(data):
    rows = [[c["id"], f"{c['seconds']:.1f}"] for c in data["components"]]
    rows.append(["**pipeline, cold**", f"**{data['cold_s']:.1f}**"])
    rows.append(["pipeline, cached rerun", f"{data['cached_s']:.1f} (×{data['cached_over_cold']:.3f} of cold; "
                 f"{data['cached_hits']} of {data['cached_components']} cache hits)"])
    return (f"synthetic {data['requests']:,} requests, beam mode {data['beam_mode']}, {data['cpus']} cores\n\n"
            + markdown(["component", "seconds"], rows))


# ---- the pipeline: what `cascade run` serves (bench/pipeline_runs.py, bench/ranker_variants.py) ----
def pipeline_runs_table(data):
    """Every figure of the runs: mean ± std, min and max over the clean runs; then the wall times."""
    runs = data["runs"]
    rows = []
    for name in runs[0]["figures"]:
        values = [r["figures"][name] for r in runs if r["figures"].get(name) is not None]
        if not values:
            continue
        digits = 0 if name.startswith("FLOPs") else 4
        rows.append([name.replace("|", "\\|"), mean_std(values, digits), f"{min(values):.{digits}f}",
                     f"{max(values):.{digits}f}"])
    walls = [r["seconds"] for r in runs]
    rows.append(["pipeline wall time (s)", mean_std(walls, 1), f"{min(walls):.1f}", f"{max(walls):.1f}"])
    components = {}
    for r in runs:
        for name, seconds in r["components"]:
            components.setdefault(name, []).append(seconds)
    slow = [[name, mean_std(v, 1)] for name, v in components.items() if np.mean(v) >= 1.0]
    args = data["args"]
    dataset = (f"{args['config']} {' '.join('--set ' + s for s in args.get('set', []))}".strip() if args.get("config")
               else f"synthetic {args['requests']:,} requests")
    return (f"{dataset}, {len(runs)} runs from clean output dirs\n\n"
            + markdown(["figure", "mean ± std", "min", "max"], rows)
            + "\n\ncomponents of ≥ 1 s (mean ± std over the runs, seconds)\n\n" + markdown(["component", "seconds"], slow))


def ranker_variants_table(data):
    results = data["results"]
    keys = list(next(iter(results.values()))[0])
    rows = [[name] + [mean_std([r[k] for r in runs], 1 if k == "train_seconds" else 4) for k in keys]
            for name, runs in results.items()]
    return f"seeds {data['args']['seeds']}\n\n" + markdown(["variant"] + keys, rows)


def save(fig, plt, out_dir, name):
    """Lays the figure out, writes it as out_dir/name (PNG) and closes it; returns the path."""
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- beyond one machine (BENCHMARKS §9) ---------------------------------------------------------
def distributed_speed_table(data):
    """bench/distributed_training.py --part speed: per Trainer and cluster, steps/s (epochs after the
    first), its ratio to the one-process run of the same repeat, the wall-time ratio and the quality."""
    rows = []
    for node, clusters in data.items():
        reference = clusters["one process"]
        for name, runs in clusters.items():
            quality = _distributed_quality(runs)
            rows.append([node, name, len(runs), mean_std([r["steps_per_s"] for r in runs], 1),
                         "×" + mean_std([r["steps_per_s"] / ref["steps_per_s"] for r, ref in zip(runs, reference)], 2),
                         "×" + mean_std([r["wall_s"] / ref["wall_s"] for r, ref in zip(runs, reference)], 2),
                         quality.get("e2e_recall", "–"), quality.get("auc", quality.get("recall@40", "–")),
                         quality.get("ne", "–")])
    return markdown(["Trainer", "cluster", "repeats", "steps/s", "steps/s vs one process", "Trainer wall vs one process",
                     "e2e recall", "AUC (retrieval: recall@40)", "NE"], rows)


def _distributed_quality(runs):
    metrics = [r["metrics"] for r in runs]
    if "e2e_recall" in metrics[0]:
        return {"e2e_recall": mean_std([m["e2e_recall"] for m in metrics]), "auc": mean_std([m["ranker"]["auc"] for m in metrics]),
                "ne": mean_std([m["ranker"]["ne"] for m in metrics])}
    if "auc" in metrics[0]:
        return {"auc": mean_std([m["auc"] for m in metrics]), "ne": mean_std([m["ne"] for m in metrics])}
    return {"recall@40": mean_std([m["recall_retrieval@40"] for m in metrics])}


def distributed_capacity_table(data):
    """bench/distributed_training.py --part capacity: the peak resident memory of each process of the
    teacher Trainer by item_id table size, one process against ParameterServer."""
    rows = []
    for t in data["trials"]:
        peaks = t["peak_rss_mb"]
        servers = [mb for task, mb in peaks.items() if task.startswith("ps-")]
        rows.append([t["layout"], f"{t['rows']:,}", f"{t['rows'] * data['embedding_dim'] * 4 / 2 ** 20:,.0f}",
                     "yes" if t["ok"] else "no", f"{max(peaks.values()):,}",
                     f"{peaks.get('one process', peaks.get('chief-0', 0)):,}",
                     f"{max(servers):,}" if servers else "–", f"{peaks['worker-0']:,}" if "worker-0" in peaks else "–"])
    table = markdown(["layout", "item_id rows", "table MiB", "trained and exported", "largest process peak MiB",
                      "one process / chief peak MiB", "largest ps peak MiB", "worker peak MiB"], rows)
    layouts = list(dict.fromkeys(t["layout"] for t in data["trials"]))
    budgets = [[f"{gb} GiB"] + [f"{largest_within(data, gb * 1024).get(layout, 0):,}" for layout in layouts]
               for gb in (4, 6, 8, 12)]
    return table + "\n\nThe largest item_id table (rows) whose every process stays within a machine of\n\n" + markdown(
        ["machine memory", *layouts], budgets)


def largest_within(data, budget_mb: float) -> dict:
    """layout → the largest table (rows) whose every process peaked within `budget_mb`."""
    out = {}
    for t in data["trials"]:
        if t["ok"] and max(t["peak_rss_mb"].values()) <= budget_mb:
            out[t["layout"]] = max(out.get(t["layout"], 0), t["rows"])
    return out


def retrieval_index_table(data):
    """bench/retrieval_index.py: BruteForce against ScaNN as served SavedModels, over the seeds."""
    runs = data["runs"]
    rows = []
    for index in ("brute_force", "scann"):
        recall = [r[index].get("recall_at_100", r[index].get("recall_at_100_vs_numpy")) for r in runs]
        speed_1 = [r["ratios"]["speedup_1_query"] if index == "scann" else 1.0 for r in runs]
        speed_100 = [r["ratios"]["speedup_100_queries"] if index == "scann" else 1.0 for r in runs]
        rows.append([index, len(runs), mean_std([r[index]["build_s"] for r in runs], 2),
                     f"{np.mean([r[index]['saved_mb'] for r in runs]):.0f}",
                     mean_std([r[index]["ms_1_query"] for r in runs], 2), mean_std([r[index]["ms_100_queries"] for r in runs], 1),
                     "×" + mean_std(speed_1, 1), "×" + mean_std(speed_100, 1), mean_std(recall, 4)])
    return markdown(["index", "seeds", "build s", "SavedModel MB", "ms, 1 query", "ms, 100 queries",
                     "speed-up, 1 query", "speed-up, 100 queries", "recall@100 vs exact"], rows)


# ---- Factory Floor's Table 1 and 2 on the hard testbed, through the pipeline ---------------------
# The paper's figures where this repository has them (Factory Floor, Anil et al. 2022: the issue that
# asked for this table quotes Shampoo's and the AutoML's; BENCHMARKS §5 quotes DCN's and the rank
# loss's training cost). "–": not transcribed here.
PAPER_FIGURES = {
    "+DCN": "cost +3 %",
    "+rank loss": "cost < 1 %",
    "+Shampoo": "PerQueryAUC +0.44 %, cost +10 %",
    "default +Shampoo": "PerQueryAUC +0.44 %, cost +10 %",
    "searched": "cost −16 % at neutral accuracy",
}
FACTORY_FLOOR_GROUPS = (  # (title, reference variant, which variants)
    ("Table 1 analogue: one technique over the baseline (every technique off)", "baseline",
     lambda n: n == "baseline" or n.startswith("+") or n == "default"),
    ("Table 2 analogue: sampling the default ranker's training rows", "default",
     lambda n: n == "default" or n.startswith("default, rebalance") or n.startswith("default, teacher-loss")),
    ("Shampoo against AdaGrad on the default ranker, at equal epochs and at equal wall time", "default",
     lambda n: n == "default" or "Shampoo" in n and n.startswith("default")),
    ("The searched widths (`cascade search`) against the default ranker", "default",
     lambda n: n == "default" or n.startswith("searched")),
)


def factory_floor_tables(data):
    """bench/factory_floor_table.py: per group, each variant's metrics (mean ± std over the training
    seeds), its paired difference to the group's reference in the same seed, and its Trainer cost ratio."""
    results = {name: {int(seed): run for seed, run in runs.items()} for name, runs in data["results"].items()}
    out = []
    for title, reference, member in FACTORY_FLOOR_GROUPS:
        names = [n for n in results if member(n)]
        if reference not in results or len(names) < 2:
            continue
        rows = []
        for name in names:
            runs, ref = results[name], results[reference]
            seeds = sorted(runs)
            paired = [s for s in seeds if s in ref]

            def cell(key, digits=4):
                return mean_std([runs[s]["figures"][key] for s in seeds], digits)

            def delta(key):
                return "–" if name == reference else \
                    mean_std([runs[s]["figures"][key] - ref[s]["figures"][key] for s in paired], 4)

            cost = "1" if name == reference else mean_std(
                [runs[s]["trainer_seconds"] / ref[s]["trainer_seconds"] for s in paired], 2)
            paper = PAPER_FIGURES.get("searched" if name.startswith("searched") else name, "–")
            rows.append([name, len(seeds), cell("auc"), delta("auc"), cell("per_query_auc"), delta("per_query_auc"),
                         cell("ne"), delta("ne"), cell("random_bias", 3), cell("random_max_position_bias", 3),
                         cell("logged_bias", 3), cell("e2e_recall"), "×" + cost, paper])
        out.append(title + "\n\n" + markdown(
            ["variant", "seeds", "AUC", "ΔAUC", "PerQueryAUC", "ΔPQAUC", "NE", "ΔNE", "random-slice bias",
             "random-slice max abs bias by position", "logged bias", "e2e recall", "Trainer cost", "paper"], rows))
    return "\n\n".join(out)


SECTIONS = {  # json name -> (table, plot or None)
    "pipeline_runs": (pipeline_runs_table, ()),
    "pipeline_runs_movielens_clicks": (pipeline_runs_table, ()),
    "pipeline_runs_obd_native": (pipeline_runs_table, ()),
    "ranker_variants": (ranker_variants_table, ()),
    "ranking_ablations": (lambda d: ablation_tables(d) + "\n\nReproducibility\n\n" + reproducibility_table(d),
                          (plot_ablations, plot_reproducibility)),
    "data_sampling": (sampling_table, (plot_sampling,)),
    "cascade_lcron": (cascade_table, (plot_cascade,)),
    "ranking_speed": (speed_table, ()),
    "stage_throughput": (stage_table, ()),
    "component_throughput": (component_table, ()),
    "demo_wall": (demo_table, ()),
    # supplementary runs behind the report's diagnoses
    "ranking_ablations_smelu_beta0.1": (reproducibility_table, ()),
    "calibration_check": (calibration_check_table, ()),
    "calibration_check_alpha": (calibration_check_table, ()),
    "obd_calibration": (obd_calibration_table, ()),
    "cascade_lcron_movielens_drop_no_gt": (cascade_table, ()),
    # beyond one machine
    "distributed_speed": (distributed_speed_table, ()),
    "distributed_capacity": (distributed_capacity_table, ()),
    "retrieval_index": (retrieval_index_table, ()),
    "retrieval_index_noise": (retrieval_index_table, ()),
    # Factory Floor on the hard testbed
    "factory_floor_table": (factory_floor_tables, ()),
}


PERFORMANCE = ("ranking_speed", "stage_throughput", "component_throughput")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--plots", action="store_true", help="also write the PNGs into --results")
    args = parser.parse_args(argv)
    plt = None
    if args.plots:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    loaded = {}
    for name, (table, plots) in SECTIONS.items():
        data = loaded[name] = load(args.results, name)
        if data is None:
            print(f"## {name}: no {name}.json in {args.results}\n")
            continue
        print(f"## {name}\n\n{table(data)}\n")
        for plot in plots if plt is not None else ():
            print(f"plot: {plot(data, plt, args.results)}\n")
    if plt is not None:
        print(f"plot: {plot_performance(*(loaded[n] for n in PERFORMANCE), plt, args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
