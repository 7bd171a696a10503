"""The width search (models.width_search, Factory Floor §3.2) and `cascade search`: the controller on
synthetic rewards, the FLOPs count against an independent one, weight sharing of the masked
super-network, a short search end to end, and the command line."""
import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs

from cascade_ranking.datasources import synthetic
from cascade_ranking.models import inputs
from cascade_ranking.models import width_search as ws
from cascade_ranking.models.ranker import FactoryFloorRanker
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.pipelines.config import load_config
from cascade_ranking.schema import features as F
from tests.cli_runner import run_cli


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("width_search") / "examples"
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=120, seed=3), str(root))
    return root


def _batches(data_dir, split="train", batch_size=64, seed=None):
    return inputs.shown_row_batches([str(data_dir / f"Split-{split}")], batch_size, shuffle_seed=seed)


# ---- controller ------------------------------------------------------------------------------------
def test_controller_converges_to_the_cheapest_architecture_when_accuracy_is_flat():
    config = RankerConfig.cascade_stage()
    space, cost = ws.SearchSpace(config), ws.CostModel(config)
    cheapest = min(cost.ratio(space.architecture(i)) for i in space.all_indices())
    target = 0.5 * cheapest  # below every architecture: the cheaper, the higher the reward
    controller = ws.Controller(space.sizes, seed=1)
    ws.train_controller(controller, lambda i: -0.4 + ws.cost_penalty(cost.ratio(space.architecture(i)), target, -1.0),
                        steps=1000)
    assert controller.most_likely() == (0,) * len(space.sizes)
    assert cost.ratio(space.architecture(controller.most_likely())) == pytest.approx(cheapest)
    assert all(p[0] > 0.8 for p in controller.probabilities())


def test_controller_finds_the_most_accurate_architecture_when_cost_is_free():
    best = (2, 0, 3, 1)
    rng = np.random.default_rng(0)

    def reward(indices):  # γ = 0: R_accuracy alone, highest at `best`, with batch-like noise
        accuracy = -0.4 - 0.01 * sum(abs(i - b) for i, b in zip(indices, best)) + rng.normal(0.0, 0.005)
        return accuracy + ws.cost_penalty(0.5, 0.9, 0.0)

    controller = ws.Controller((4, 5, 5, 5), seed=2)
    ws.train_controller(controller, reward, steps=500)
    assert controller.most_likely() == best


def test_controller_baseline_is_a_moving_average_and_advantage_is_reward_minus_it():
    controller = ws.Controller((3,), baseline_decay=0.5)
    assert controller.observe(1.0) == 0.0  # the first reward starts the baseline
    assert controller.observe(3.0) == pytest.approx(2.0)  # 3 − 1
    assert controller.baseline == pytest.approx(2.0)  # 0.5·1 + 0.5·3
    advantage = controller.update((1,), 0.0)
    assert advantage == pytest.approx(-2.0)
    assert np.argmin(controller.probabilities()[0]) == 1  # a negative advantage lowers the sampled choice


def test_entropy_bonus_pulls_the_controller_toward_uniform():
    controller = ws.Controller((4,), entropy_weight=1.0, seed=0)
    controller.logits[0].assign([3.0, 0.0, 0.0, 0.0])
    before = float(controller.entropy())
    ws.train_controller(controller, lambda i: -0.4, steps=50)  # flat reward: advantage 0, the bonus alone
    assert float(controller.entropy()) > before + 0.3


# ---- cost --------------------------------------------------------------------------------------------
def _mlp(*dims):  # 2·m·n per matmul + n per bias add
    return sum(2 * a * b + b for a, b in zip(dims[:-1], dims[1:]))


def test_flops_of_an_architecture_equal_an_independent_count():
    config = RankerConfig.cascade_stage()  # 2 cross layers, Q·U 16, cascade tower (128, 64)
    arch = ws.Architecture(embedding_dim=8, hidden_units=(160, 96), cross_projection_dim=20)
    # The quality tower reads 7 sparse features of the default registry and 2 dense ones of width 4.
    d = 7 * 8 + 2 * 4
    k = 20
    cross_layer = 2 * d * k + 2 * k * d + d + d + d  # x·V, ·U, + b, x0 ⊙, + x
    cross = 2 * cross_layer + d  # α·x0 once
    ctr = cross + _mlp(d, 160, 96, 16) + 2 * 16 + 2  # DNN, q; q·u (16 mults, 16 adds), τ = a·s + b
    tower = cross + _mlp(d, 128, 64, 1)  # the cascade tower: its own cross stack and MLP on x0
    flops = ws.ranker_flops(arch.apply(config))
    assert flops["ctr_per_candidate"] == ctr
    assert flops["per_candidate"] == ctr + tower
    cost = ws.CostModel(config)
    d0 = 7 * 16 + 8
    full = 2 * (4 * d0 * 32 + 3 * d0) + d0
    assert cost.full_flops == 2 * full + _mlp(d0, 256, 128, 16) + 34 + _mlp(d0, 128, 64, 1)
    assert cost.ratio(arch) == pytest.approx((ctr + tower) / cost.full_flops)
    assert ws.CostModel(config, key="ctr_per_candidate").flops(arch) == ctr


@pytest.mark.parametrize("config", [
    RankerConfig.plain(hidden_units=(64, 32, 16)),
    RankerConfig.plain(hidden_units=(64, 32), bottleneck_rank=16),
], ids=["dense", "bottleneck"])
def test_the_config_count_is_the_built_rankers_weights(config, data_dir):
    """`ranker_flops` counts from the config alone; on a ranker without cross or Q·U every FLOP of its
    CTR path is a matmul or a bias add, so the count must equal 2·|kernel| + |bias| summed over the
    built model's dense weights (a LowRankDense's two kernels included)."""
    model = FactoryFloorRanker(config)
    model(next(iter(_batches(data_dir, "eval"))), training=False)
    weights = [w for w in model.trainable_weights if "/embedding/" not in w.name]
    assert all(len(w.shape) in (1, 2) for w in weights) and weights
    expected = sum((2 if len(w.shape) == 2 else 1) * int(np.prod(w.shape)) for w in weights)
    assert ws.ranker_flops(config)["ctr_per_candidate"] == model.flops()["ctr_per_candidate"] == expected


# ---- super-network -----------------------------------------------------------------------------------
SMALL = RankerConfig.cascade_stage(embedding_dim=8, hidden_units=(32, 16), cross_projection_dim=8, cross_ramp_steps=0)


def _net_and_batch(data_dir, config=SMALL):
    space = ws.SearchSpace(config)
    net = ws.SuperNetwork(config, space)
    batch = next(iter(_batches(data_dir)))
    net.adapt(_batches(data_dir), steps=2)
    net(batch)  # builds
    for v in net.trainable_variables:  # biases away from 0, so a mask that leaks shows
        v.assign(v + tf.random.stateless_normal(v.shape, [1, len(v.name)], stddev=0.05))
    return net, space, batch


def _embedded(net, batch):
    return {k: v.numpy() for k, v in net.embedding(batch, names=net.tower_names + net.ui_names).items()}


def _dense(x, layer, rows=None, cols=None):
    w, b = layer.kernel.numpy(), layer.bias.numpy()
    rows = slice(None) if rows is None else rows
    cols = slice(None) if cols is None else cols
    return x @ w[rows][:, cols] + b[cols]


def test_supernetwork_at_the_full_architecture_is_the_unmasked_network(data_dir):
    net, space, batch = _net_and_batch(data_dir)
    logit = net(batch, space.widths(space.largest())).numpy()
    e = _embedded(net, batch)
    x0 = tf.constant(np.concatenate([e[n] for n in net.tower_names], axis=1))
    x = x0
    for v, u, b in zip(net.cross_down, net.cross_up, net.cross_bias):  # the TFRS cross with the same weights
        cross = tfrs.layers.dcn.Cross(projection_dim=SMALL.cross_projection_dim)
        cross(x0, x)
        cross._dense_u.kernel.assign(v)
        cross._dense_v.kernel.assign(u)
        cross._dense_v.bias.assign(b)
        x = cross(x0, x)
    h = x.numpy()
    for layer in net.hidden:
        h = np.maximum(_dense(h, layer), 0.0)
    expected = _dense(h, net.head)[:, 0] + _dense(np.concatenate([e[n] for n in net.ui_names], axis=1), net.ui_head)[:, 0]
    np.testing.assert_allclose(logit, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net(batch).numpy(), logit)  # no widths: the full network


def test_supernetwork_at_a_smaller_architecture_is_the_small_network_of_its_first_units(data_dir):
    net, space, batch = _net_and_batch(data_dir)
    ke, (k1, k2), kp = 4, (16, 8), 4
    indices = tuple(d.choices.index(w) for d, w in zip(space.decisions, (ke, k1, k2, kp)))
    logit = net(batch, space.widths(indices)).numpy()
    e = _embedded(net, batch)
    keep, at = [], 0  # positions of x0 the small network has: the first ke of each embedding, every dense value
    for name in net.tower_names:
        width = e[name].shape[1]
        keep += list(range(at, at + (ke if name in net.sparse_names else width)))
        at += width
    x0 = np.concatenate([e[n][:, :ke] if n in net.sparse_names else e[n] for n in net.tower_names], axis=1)
    x = x0
    for v, u, b in zip(net.cross_down, net.cross_up, net.cross_bias):
        x = x0 * (x @ v.numpy()[keep][:, :kp] @ u.numpy()[:kp][:, keep] + b.numpy()[keep]) + x
    h = np.maximum(_dense(x, net.hidden[0], keep, slice(0, k1)), 0.0)
    h = np.maximum(_dense(h, net.hidden[1], slice(0, k1), slice(0, k2)), 0.0)
    ui = np.concatenate([e[n][:, :ke] for n in net.ui_names], axis=1)
    ui_rows = [i * SMALL.embedding_dim + j for i in range(len(net.ui_names)) for j in range(ke)]
    expected = _dense(h, net.head, slice(0, k2))[:, 0] + _dense(ui, net.ui_head, ui_rows)[:, 0]
    np.testing.assert_allclose(logit, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(logit - net(batch).numpy()).max() > 1e-3  # the masks do change the network


# ---- end to end ----------------------------------------------------------------------------------------
def test_a_short_search_reaches_the_target_and_gives_a_ranker_config(data_dir):
    config = RankerConfig.cascade_stage()
    target = 0.85
    sc = ws.SearchConfig(cost_target=target, steps=600, warmup_steps=120, batch_size=64, eval_batches=2)
    seen = []
    result = ws.search(config, _batches(data_dir, seed=0), _batches(data_dir, "eval", 256), sc,
                       progress=seen.append, log_every=200)
    space, cost = ws.SearchSpace(config, sc), ws.CostModel(config)
    closest = ws.closest_ratio(space, cost, target)
    assert abs(result.cost_ratio - target) <= max(0.03, abs(closest - target) + 0.01), result.architecture
    # Measured on this data (seeds 0–3, targets 0.85 and 0.7): within 0.024 of the target at 600 steps.
    assert len(result.rewards) == 600 and [p["step"] for p in seen] == [200, 400, 600]
    assert result.eval_log_loss is not None and 0.0 < result.eval_log_loss < 1.0
    searched = result.ranker_config()
    assert isinstance(searched, RankerConfig) and searched.embedding_dim == result.architecture.embedding_dim
    assert searched.hidden_units == result.architecture.hidden_units
    others = set(config.to_dict()) - set(result.architecture.to_dict())
    assert {k: searched.to_dict()[k] for k in others} == {k: config.to_dict()[k] for k in others}  # nothing else changed
    assert RankerConfig.from_json(searched.to_json()) == searched
    ranker = FactoryFloorRanker(searched)
    logit = ranker(next(iter(_batches(data_dir, "eval"))))
    assert logit.shape[1] == 1
    assert ranker.flops()["per_candidate"] / FactoryFloorRanker(config).flops()["per_candidate"] == \
        pytest.approx(result.cost_ratio)


def test_search_with_the_reward_on_held_out_batches(data_dir):
    sc = ws.SearchConfig(cost_target=0.9, steps=20, warmup_steps=5, batch_size=64, reward_data="eval", eval_batches=0)
    result = ws.search(SMALL, _batches(data_dir, seed=0), _batches(data_dir, "eval", 64), sc)
    assert len(result.trace) == 20 and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in result.trace)
    assert result.eval_log_loss is None  # no eval batches asked for: the final reward is the last steps' mean
    assert result.final_reward == pytest.approx(np.mean(result.rewards[-2:]))
    with pytest.raises(ValueError, match="needs eval_batches"):
        ws.search(SMALL, _batches(data_dir), None, sc)


def test_search_config_checks_its_fields():
    for bad in (dict(gamma=0.5), dict(steps=10, warmup_steps=10), dict(hidden_fractions=(0.5, 1.5)),
                dict(embedding_dims=(8, 4)), dict(cost="flops"), dict(baseline_decay=1.0), dict(cost_target=0.0)):
        with pytest.raises(ValueError):
            ws.SearchConfig(**bad)
    assert ws.SearchConfig.from_dict(ws.SearchConfig(gamma=-0.5).to_dict()) == ws.SearchConfig(gamma=-0.5)


def test_search_features_hash_vocabulary_features():
    registry = F.FeatureConfig(inputs=tuple(
        F.InputFeature("item_id", "item", lookup="vocabulary") if f.name == "item_id" else f for f in F.DEFAULT_INPUTS))
    hashed = ws.search_features(registry)
    assert hashed.feature("item_id").lookup == "hash"
    assert hashed.feature("item_id").buckets == ws.VOCABULARY_STAND_IN_BUCKETS
    assert ws.search_features(F.DEFAULT) is F.DEFAULT


# ---- command line -------------------------------------------------------------------------------------
_run = run_cli


@pytest.mark.parametrize("targets, names", [
    ("0", "outside (0, 1.5]"),
    ("-0.5", "outside (0, 1.5]"),
    ("1.6", "outside (0, 1.5]"),
    ("0.9,lots", "'lots' is not a number"),
    ("0.9,,0.8", "comma-separated"),
    ("0.9,0.9", "given twice"),
])
def test_bad_cost_target_is_one_line_exit_2(capsys, tmp_path, targets, names):
    code, _, err = _run(capsys, "search", "--cost-target", targets, "--out", str(tmp_path / "out"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "--cost-target" in lines[0] and names in lines[0]
    assert not (tmp_path / "out").exists()


def test_bad_search_settings_are_one_line_exit_2(capsys, tmp_path):
    code, _, err = _run(capsys, "search", "--cost-target", "0.9", "--gamma", "0.5", "--out", str(tmp_path / "out"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "gamma must be <= 0" in err
    code, _, err = _run(capsys, "search", "--cost-target", "0.9", "--out", str(tmp_path / "out"),
                        "--source", "examples", "--examples-dir", str(tmp_path / "nowhere"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nowhere" in err


def test_search_command_writes_a_config_cascade_run_reads(capsys, tmp_path, data_dir):
    out = tmp_path / "search"
    code, stdout, err = _run(capsys, "search", "--cost-target", "0.9", "--out", str(out), "--source", "examples",
                             "--examples-dir", str(data_dir), "--steps", "40", "--set", "ranker.epochs=2")
    assert code == 0, err
    assert "target 0.9: 40 steps (12 warm-up)" in stdout and "default" in stdout
    config = load_config(str(out / "ranker-0.9.yaml"))
    summary = json.loads((out / "summary.json").read_text())["results"][0]
    assert list(config.ranker.hidden_units) == summary["architecture"]["hidden_units"]
    assert config.ranker.embedding_dim == summary["architecture"]["embedding_dim"]
    assert config.ranker.epochs == 2 and config.source == "examples"  # the run's other settings are kept
    assert summary["flops"] == ws.ranker_flops(config.ranker)["per_candidate"]
    assert len(json.loads((out / "search-0.9.json").read_text())["trace"]) == 40
    assert (out / "logs" / "run.log").exists()
