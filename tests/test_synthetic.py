"""The synthetic cascade-log generator: determinism, layout, position bias, bad input."""
import collections
import filecmp
import os

import numpy as np
import pytest

from cascade_ranking.datasources import example_io, synthetic
from cascade_ranking.schema import features as F


def _rows(examples):
    out = []
    for ex in examples:
        f = ex.features.feature
        out.append(
            {
                "request_id": f["request_id"].int64_list.value[0],
                "stage": f["stage"].bytes_list.value[0].decode(),
                "ui_position": f["ui_position"].int64_list.value[0],
                "click": f["click"].int64_list.value[0],
                "true_ctr": f["true_ctr"].float_list.value[0],
                "item_id": f["item_id"].int64_list.value[0],
                "user_id": f["user_id"].int64_list.value[0],
                "query_tokens": list(f["query_tokens"].int64_list.value),
            }
        )
    return out


@pytest.fixture(scope="module")
def rows_1000():
    return _rows(synthetic.generate_examples(synthetic.SyntheticConfig(num_requests=1000, seed=3)))


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_same_seed_same_bytes_and_different_seed_different_bytes(tmp_path):
    config = synthetic.SyntheticConfig(num_requests=60, seed=11)
    synthetic.write_dataset(config, str(tmp_path / "a"))
    synthetic.write_dataset(config, str(tmp_path / "b"))
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=60, seed=12), str(tmp_path / "c"))
    files = _files(tmp_path / "a")
    assert files == _files(tmp_path / "b")
    assert "Split-train/" + example_io.RECORD_FILE in files
    for name in files:
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False), name
    data = "Split-train/" + example_io.RECORD_FILE
    assert not filecmp.cmp(tmp_path / "a" / data, tmp_path / "c" / data, shallow=False)


def test_ten_candidates_per_tier_per_request(rows_1000):
    per_request = collections.defaultdict(collections.Counter)
    for r in rows_1000:
        per_request[r["request_id"]][r["stage"]] += 1
    assert len(per_request) == 1000
    for counts in per_request.values():
        assert counts == {tier: 10 for tier in F.STAGE_TIERS}


def test_only_ground_truth_is_shown_and_clicked(rows_1000):
    for r in rows_1000:
        shown = r["stage"] == F.GROUND_TRUTH_TIER
        assert (r["ui_position"] > 0) == shown
        if not shown:
            assert r["click"] == 0 and r["true_ctr"] == 0.0
    positions = collections.defaultdict(set)
    for r in rows_1000:
        if r["ui_position"]:
            positions[r["request_id"]].add(r["ui_position"])
    assert all(p == set(range(1, 11)) for p in positions.values())


def test_click_rate_falls_with_position(rows_1000):
    shown = [r for r in rows_1000 if r["ui_position"] > 0]
    pos = np.array([r["ui_position"] for r in shown])
    clicks = np.array([r["click"] for r in shown])
    rate = np.array([clicks[pos == p].mean() for p in range(1, 11)])
    top, middle, bottom = rate[:3].mean(), rate[3:6].mean(), rate[6:].mean()
    assert top > middle > bottom
    assert rate[0] > 2 * rate[-1]
    assert np.polyfit(np.arange(1, 11), rate, 1)[0] < 0


def test_clicks_follow_true_ctr(rows_1000):
    shown = [r for r in rows_1000 if r["ui_position"] > 0]
    ctr = np.array([r["true_ctr"] for r in shown])
    clicks = np.array([r["click"] for r in shown])
    # 10k Bernoulli draws: the click rate is within 4 standard errors of the mean true CTR.
    se = np.sqrt(np.mean(ctr * (1 - ctr)) / ctr.size)
    assert abs(clicks.mean() - ctr.mean()) < 4 * se
    # Higher true CTR means more clicks: top decile clicks far more than the bottom decile.
    order = np.argsort(ctr)
    decile = ctr.size // 10
    assert clicks[order[-decile:]].mean() > 3 * clicks[order[:decile]].mean()


def test_cardinalities_exercise_embeddings(rows_1000):
    items = {r["item_id"] for r in rows_1000}
    users = {r["user_id"] for r in rows_1000}
    assert len(items) > 5_000  # 50k candidates drawn from a 10k-item corpus
    assert len(users) > 300
    n_tokens = np.array([len(r["query_tokens"]) for r in rows_1000])
    assert n_tokens.min() >= 1 and n_tokens.max() > 1 and n_tokens.max() <= 8


def test_shards_generate_the_same_requests_as_one_pass():
    config = synthetic.SyntheticConfig(num_requests=20, seed=5)
    whole = [e.SerializeToString(deterministic=True) for e in synthetic.generate_examples(config)]
    parts = [e.SerializeToString(deterministic=True) for e in synthetic.generate_examples(config, 10, 20)]
    parts = [e.SerializeToString(deterministic=True) for e in synthetic.generate_examples(config, 0, 10)] + parts
    assert whole == parts


@pytest.mark.parametrize(
    "kwargs, message",
    [({"num_requests": 0}, "num_requests"), ({"num_requests": -5}, "num_requests"), ({"seed": -1}, "seed")],
)
def test_invalid_config_is_rejected(kwargs, message, tmp_path):
    with pytest.raises(example_io.InputError, match=message):
        synthetic.write_dataset(synthetic.SyntheticConfig(**kwargs), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synthetic.generate_request

    def failing(world, r):  # fails after 5 requests, mid-write
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk full")
        return real(world, r)

    monkeypatch.setattr(synthetic, "generate_request", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=20), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_existing_output_is_not_clobbered(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(example_io.InputError, match="exists"):
        synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=2), str(out))
    assert (out / "keep.txt").read_text() == "mine"


def test_spans_continue_the_request_stream_and_span_1_is_the_undrifted_log(tmp_path):
    config = synthetic.SyntheticConfig(num_requests=40, seed=2)
    report = synthetic.write_spans(config, str(tmp_path / "spans"), spans=3, drift=0.4)
    synthetic.write_dataset(config, str(tmp_path / "flat"))
    for split in ("train", "eval"):  # span 1 is the log `cascade generate` writes without spans
        assert not filecmp.dircmp(str(tmp_path / "flat" / f"Split-{split}"),
                                  str(tmp_path / "spans" / "span-1" / f"Split-{split}")).diff_files
    last_time = -1
    for k in (1, 2, 3):
        rows = [ex.features.feature for s in ("train", "eval")
                for ex in example_io.read_examples(str(tmp_path / "spans" / f"span-{k}" / f"Split-{s}"))]
        ids = {f["request_id"].int64_list.value[0] for f in rows}
        times = [f["request_time"].int64_list.value[0] for f in rows]
        assert ids == set(range((k - 1) * 40, k * 40))
        assert min(times) > last_time  # each span is later than the one before
        last_time = max(times)
        assert sum(report["spans"][k]["rows"].values()) == len(rows) == 40 * 50


def test_drift_moves_popularity_tastes_and_the_position_effect():
    config = synthetic.SyntheticConfig(num_requests=10, seed=4)
    world = synthetic.World(config)
    assert world.drifted(3, 0.0) is world and world.drifted(0, 0.5) is world
    later = world.drifted(2, 0.5)
    assert later.position_decay == pytest.approx(config.position_decay * 1.5 ** 2)
    # Popularity: still a distribution, its standardised log is the observable 4th item feature.
    assert later.item_popularity.sum() == pytest.approx(1.0)
    log_pop = np.log(later.item_popularity)
    np.testing.assert_allclose(later.pop_z, (log_pop - log_pop.mean()) / log_pop.std(), rtol=1e-6)
    np.testing.assert_allclose(later.item_dense[:, 3], later.pop_z, rtol=1e-5)
    np.testing.assert_array_equal(later.item_dense[:, :3], world.item_dense[:, :3])
    # Two random-walk steps of d·std(w) per coordinate: the tastes moved by about √2·0.5·std(w).
    step = (later.user_latent - world.user_latent).std()
    assert step == pytest.approx(np.sqrt(2) * 0.5 * world.user_latent.std(), rel=0.05)
    assert np.corrcoef(np.log(later.item_popularity), np.log(world.item_popularity))[0, 1] < 0.9
    # The same steps for the same seed, another walk for another seed.
    np.testing.assert_array_equal(world.drifted(2, 0.5).user_latent, later.user_latent)
    other = synthetic.World(synthetic.SyntheticConfig(num_requests=10, seed=5)).drifted(2, 0.5)
    assert not np.allclose(other.user_latent - synthetic.World(other.config).user_latent,
                           later.user_latent - world.user_latent)


def _auc(scores, labels):
    order = np.argsort(scores)
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    positives = labels == 1
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return (ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@pytest.mark.parametrize("drift", [0.0, 0.5])
def test_a_stale_world_ranks_a_newer_spans_clicks_worse(drift):
    """The oracle of span 1 (its relevance ρ) against the oracle of span 3, on span 3's shown rows:
    with drift the stale one ranks the clicks worse; without, they are the same."""
    config = synthetic.SyntheticConfig(num_requests=600, seed=6)
    first = synthetic.World(config)
    third = first.drifted(2, drift)
    stale, fresh, clicks = [], [], []
    for r in range(2 * config.num_requests, 3 * config.num_requests):
        request = synthetic.generate_request(third, r)
        shown = request["ui_position"] > 0
        user, tokens, items = request["user_id"][0], request["query_tokens"][0], request["item_id"][shown]
        stale.append(first.relevance(user, tokens, items))
        fresh.append(third.relevance(user, tokens, items))
        clicks.append(request["click"][shown])
    stale, fresh, clicks = map(np.concatenate, (stale, fresh, clicks))
    if drift == 0.0:
        np.testing.assert_array_equal(stale, fresh)
    else:
        assert _auc(fresh, clicks) > _auc(stale, clicks) + 0.02
