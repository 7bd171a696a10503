"""The benchmark plumbing that the report's figures rest on: ablation variants differ from their
baseline only in the switches their names give, and the report's tables and plots state the
numbers that are in the results files."""
import dataclasses
import json
import os
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import factory_floor_table  # noqa: E402
import ranking_ablations  # noqa: E402
import report  # noqa: E402


def changed_fields(a, b):
    return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


@pytest.mark.parametrize("dataset,qu_axis", [("synthetic", ("off",)), ("obd", ("off", "on"))])
def test_each_ablation_changes_only_its_own_switches(dataset, qu_axis):
    configs = ranking_ablations.variant_configs(dataset, qu_axis)
    for qu in qu_axis:
        base = configs[("baseline", qu)]
        assert base.cross_layers == 0 and base.rank_loss == "none" and base.distill_weight == 0
        assert not base.bias_constraints and not base.lspr and base.activation == "relu"
        assert base.qu_dim == (0 if qu == "off" else ranking_ablations.QU_DIM)
        for name, switches in ranking_ablations.TECHNIQUES.items():
            assert changed_fields(configs[(name, qu)], base) == set(switches), name
        assert changed_fields(configs[("all", qu)], base) == set(ranking_ablations.ALL)
    if dataset == "synthetic":
        assert changed_fields(configs[("+Q·U", "off")], configs[("baseline", "off")]) == {"qu_dim"}
    assert {c.requests_per_batch for c in configs.values()} == {ranking_ablations.REQUESTS_PER_BATCH[dataset]}


def test_factory_floor_variants_are_pipeline_configs_that_differ_in_their_own_switches():
    """Every variant of bench/factory_floor_table.py is a valid `cascade run` config on the hard
    preset; a Table 1 variant is the baseline (every technique off) with its one technique on, a
    Table 2 one the default ranker with its sampler's keep rate, and every run is seeded."""
    from cascade_ranking.pipelines.config import PipelineConfig, load_config

    base = factory_floor_table.hard_base(1000, 2, 0)
    configs = {name: load_config(None, base + overrides) for name, (_, overrides) in factory_floor_table.VARIANTS.items()}
    baseline, default = configs["baseline"], configs["default"]
    assert baseline.synthetic.knobs == dataclasses.replace(baseline.synthetic, preset="hard").knobs
    assert baseline.synthetic.preset == "hard" and baseline.cascade.seed == 2 and baseline.teacher.lspr_seed == 2
    r = baseline.ranker
    assert (r.cross_layers, r.qu_dim, r.rank_loss, r.distill_weight, r.bias_constraints, r.lspr) == \
        (0, 0, "none", 0, False, False)
    assert default.ranker == PipelineConfig().ranker.replace(lspr_seed=2)
    expected = {"+DCN": {"cross_layers"}, "+rank loss": {"rank_loss"}, "+distill": {"distill_weight"},
                "+Q·U": {"qu_dim"}, "+bias": {"bias_constraints"}, "+SmeLU": {"activation"}, "+LSPR": {"lspr"},
                "+Shampoo": {"optimizer"}}
    for name, fields in expected.items():
        assert changed_fields(configs[name].ranker, baseline.ranker) == fields, name
        assert configs[name].sampler == baseline.sampler
    for name, config in configs.items():
        if factory_floor_table.VARIANTS[name][0] == "2":
            assert config.ranker == default.ranker and config.sampler != default.sampler, name
    assert configs["default +Shampoo"].ranker == default.ranker.replace(optimizer="shampoo")


def test_pairwise_pd_covers_every_seed_pair():
    preds = [np.array([0.1, 0.2]), np.array([0.2, 0.2]), np.array([0.1, 0.4])]
    # by hand: PD(0,1) = (0.1/0.15 + 0)/2; PD(0,2) = (0 + 0.2/0.3)/2; PD(1,2) = (0.1/0.15 + 0.2/0.3)/2
    expected = [(0.1 / 0.15) / 2, (0.2 / 0.3) / 2, (0.1 / 0.15 + 0.2 / 0.3) / 2]
    np.testing.assert_allclose(ranking_ablations.pairwise_pd(preds), expected)


def fake_ablations():
    def run(auc, ne):
        return {"auc": auc, "per_query_auc": float("nan"), "ne": ne, "bucket_bias_variance": 0.01}
    variants = {
        "baseline | Q·U off": {"variant": "baseline", "qu": "off", "runs": [run(0.80, 0.9), run(0.82, 0.8)],
                               "pd_pairs": [0.1], "train_speed_ratio": 1.0},
        "+SmeLU | Q·U off": {"variant": "+SmeLU", "qu": "off", "runs": [run(0.70, 1.0), run(0.74, 1.2)],
                             "pd_pairs": [0.02, 0.04], "train_speed_ratio": 0.5},
    }
    return {"seeds": 2, "results": {"synthetic": {"eval_rows": 100, "eval_clicks": 10, "oracle_auc": 0.9,
                                                  "auc_bootstrap_std": 0.01, "variants": variants}}}


def test_ablation_and_reproducibility_tables_state_the_results(tmp_path):
    data = fake_ablations()
    text = report.ablation_tables(data)
    # sample std (ddof 1) of two values a, b is |a − b| / √2
    assert "| +SmeLU | off | 0.7200 ± 0.0283 | n/a | 1.1000 ± 0.1414 | 0.0100 ± 0.0000 | 0.50 |" in text
    assert "| baseline | off | 0.8100 ± 0.0141 |" in text
    repro = report.reproducibility_table(data)
    assert "| synthetic | off | SmeLU | off | 0.0300 ± 0.0141 | 0.7200 ± 0.0283 |" in repro
    with open(tmp_path / "ranking_ablations.json", "w") as f:
        json.dump(data, f)
    assert report.main(["--results", str(tmp_path), "--plots"]) == 0
    assert (tmp_path / "ranking_ablations.png").stat().st_size > 1000
    assert (tmp_path / "reproducibility_pd.png").stat().st_size > 1000


def test_benchmarks_md_states_what_the_committed_results_say():
    """Every table row that report.py prints from bench/results/ stands verbatim in BENCHMARKS.md, so
    the page cannot drift from the measured figures (rerunning a bench and not the page fails here)."""
    root = os.path.dirname(BENCH)
    with open(os.path.join(root, "BENCHMARKS.md")) as f:
        page = set(f.read().splitlines())
    checked = 0
    for name, (table, _) in report.SECTIONS.items():
        data = report.load(os.path.join(BENCH, "results"), name)
        assert data is not None, f"bench/results/{name}.json is missing"
        rows = [line for line in table(data).splitlines() if line.startswith("| ") and "---" not in line]
        missing = [row for row in rows if row not in page]
        assert not missing, f"{name}: rows not in BENCHMARKS.md, e.g. {missing[0]}"
        checked += len(rows)
    assert checked > 100
