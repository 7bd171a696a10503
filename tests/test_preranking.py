"""HAP pre-ranking (models/preranking.py): groups, group-wise losses, routing, FLOPs, training."""
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.profiler import model_analyzer, option_builder

from cascade_ranking.datasources import synthetic
from cascade_ranking.models import list_inputs as LI
from cascade_ranking.models import preranking as H
from cascade_ranking.schema import request_list as RL

T = RL.TIER_INDEX


def _hand_list():
    """One request of 8 slots: tiers and exposure chosen to hit every group, one padded slot."""
    stage = [T["rerank_pos"], T["rerank_pos"], T["rerank_pos"], T["rerank_neg"], T["rank_neg"],
             T["coarse_neg"], T["random_neg"], RL.PAD_STAGE]
    return {
        "mask": np.array([[1, 1, 1, 1, 1, 1, 1, 0]]),
        "ui_position": np.array([[1, 2, 3, 4, 0, 0, 0, 0]]),  # slot 3: a shown rerank_neg (MovieLens-like)
        "click": np.array([[1, 0, 1, 0, 0, 0, 0, 1]]),  # the padded slot's click must not count
        "stage": np.array([stage]),
    }


def test_groups_of_a_hand_made_list():
    positives, groups = H.hap_groups(_hand_list())
    assert list(np.flatnonzero(positives.numpy()[0])) == [0, 2]
    members = {g: list(np.flatnonzero(groups.numpy()[0, :, i])) for i, g in enumerate(H.GROUPS)}
    assert members == {"exposed_nonclick": [1, 3], "rank_neg": [4], "prerank_neg": [5], "random_neg": [6]}


def test_groups_with_the_gt_label():
    """label="gt": positives = the rerank_pos tier (slots 0, 1, 2, clicked or not), g0 = shown non-GT."""
    positives, groups = H.hap_groups(_hand_list(), label="gt")
    assert list(np.flatnonzero(positives.numpy()[0])) == [0, 1, 2]
    members = {g: list(np.flatnonzero(groups.numpy()[0, :, i])) for i, g in enumerate(H.GROUPS)}
    assert members == {"exposed_nonclick": [3], "rank_neg": [4], "prerank_neg": [5], "random_neg": [6]}
    with pytest.raises(ValueError, match="label must be"):
        H.hap_groups(_hand_list(), label="rating")


def _np_group_loss(s, pos, groups, kind, weights):
    terms = []
    for g in range(groups.shape[2]):
        values = []
        for b in range(s.shape[0]):
            negs = np.flatnonzero(groups[b, :, g])
            if negs.size == 0:
                continue
            for p in np.flatnonzero(pos[b]):
                if kind == "softmax":
                    z = np.concatenate([[s[b, p]], s[b, negs]])
                    values.append(-(s[b, p] - np.log(np.exp(z).sum())))
                else:
                    values.append(np.mean(np.log1p(np.exp(-(s[b, p] - s[b, negs])))))
        terms.append(np.mean(values) if values else 0.0)
    return float(np.dot(weights, terms)), terms


@pytest.mark.parametrize("kind", ["softmax", "pairwise"])
def test_group_wise_loss_equals_numpy(kind):
    rng = np.random.default_rng(0)
    b, l, g = 5, 9, 4
    s = rng.normal(scale=2.0, size=(b, l))
    kind_of = rng.integers(-1, g, size=(b, l))  # −1 = positive, else the group
    pos = kind_of == -1
    groups = np.stack([kind_of == i for i in range(g)], -1)
    groups[0, :, 3] = False  # a request without a group-3 negative
    pos[1] = False  # a request without a positive
    weights = [1.0, 0.5, 2.0, 0.0]
    total, terms = H.group_wise_loss(s, pos, groups, kind, weights)
    ref_total, ref_terms = _np_group_loss(s, pos, groups, kind, weights)
    np.testing.assert_allclose(terms.numpy(), ref_terms, rtol=1e-5)
    np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)


def test_strong_loss_ignores_the_easy_groups():
    positives, groups = H.hap_groups(_hand_list())
    s = np.array([[2.0, 1.0, 0.5, -1.0, 0.3, -0.2, 0.7, 9.0]])
    changed = s.copy()
    changed[0, 5:] = [50.0, -40.0, 3.0]  # the prerank_neg, random_neg and padded slots
    w = H.hard_group_weights()
    assert w == (1.0, 1.0, 0.0, 0.0)
    a, _ = H.group_wise_loss(s, positives, groups, "softmax", w)
    b, _ = H.group_wise_loss(changed, positives, groups, "softmax", w)
    assert float(a) == pytest.approx(float(b))
    light_a, _ = H.group_wise_loss(s, positives, groups, "softmax")
    light_b, _ = H.group_wise_loss(changed, positives, groups, "softmax")
    assert float(light_a) != pytest.approx(float(light_b))


def test_routing_orders_the_light_top_m_by_the_strong_score():
    light = np.array([[5.0, 4.0, 3.0, 2.0, 1.0, 9.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    strong = np.array([[0.1, 0.9, 0.5, 99.0, 99.0, 99.0], [9.0, 8.0, 7.0, 0.3, 0.1, 0.2]])
    mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    routed = H.route(light, strong, 3, mask).numpy()
    order0 = [i for i in np.argsort(-routed[0], kind="stable") if mask[0, i]]
    assert order0 == [1, 2, 0, 3, 4]  # top 3 by light {0,1,2} reordered by strong, then 3, 4 by light
    order1 = list(np.argsort(-routed[1], kind="stable"))
    assert order1 == [3, 5, 4, 2, 1, 0]  # top 3 by light {5,4,3}: strong 0.3 > 0.2 > 0.1


def _profiled_flops(fn, *specs_by_n):
    """Float ops of fn's graph at two batch sizes; their difference per row is the per-row cost."""
    flops = []
    for specs in specs_by_n:
        graph = tf.function(fn).get_concrete_function(*specs).graph
        opts = option_builder.ProfileOptionBuilder.float_operation()
        opts["output"] = "none"
        flops.append(model_analyzer.profile(graph, options=opts).total_float_ops)
    return flops


def test_flops_per_candidate_match_tf_profiler_and_a_hand_count():
    light = H.LightPreranker(embedding_dim=4, tower_units=(16,), output_dim=8, head_units=(6,))
    strong = H.StrongRanker(embedding_dim=4, num_cross_layers=2, projection_dim=3, hidden_units=(10, 5))
    d_item = light.item_tower.input_dim
    assert d_item == 3 * 4 + 4  # item_id, item_category, item_tags embeddings + item_dense
    assert strong.input_dim == 7 * 4 + 8
    # Hand count. Light per candidate: item MLP 16→16→8, u ⊙ v (8), head 24→6→1.
    light_hand = (2 * 16 * 16 + 16) + (2 * 16 * 8 + 8) + 8 + (2 * 24 * 6 + 6) + (2 * 6 * 1 + 1)
    assert light.flops()["per_candidate"] == light_hand
    # Strong per candidate: 2 cross layers on D = 36, k = 3 (V, U, its bias, x0 ⊙, + x), α · x0 once
    # for the stack, then MLP 36→10→5→1.
    d = 36
    strong_hand = 2 * (2 * d * 3 + 2 * 3 * d + d + d + d) + d + (2 * d * 10 + 10) + (2 * 10 * 5 + 5) + (2 * 5 + 1)
    assert strong.flops()["per_candidate"] == strong_hand
    # tf.profiler on the per-candidate graphs at N = 1 and N = 5 rows.
    small, big = _profiled_flops(
        lambda u, x: light.score_candidates(u, x),
        (tf.TensorSpec([1, 8]), tf.TensorSpec([1, d_item])),
        (tf.TensorSpec([5, 8]), tf.TensorSpec([5, d_item])),
    )
    assert (big - small) / 4 == light_hand
    small, big = _profiled_flops(lambda x: strong.score_candidates(x), (tf.TensorSpec([1, d]),), (tf.TensorSpec([5, d]),))
    assert (big - small) / 4 == strong_hand
    assert strong.flops()["per_candidate"] > light.flops()["per_candidate"]
    # Serving cost of a request of n = 7 candidates with M = 3 rescored. Query tower per request:
    # 5 query features (4 embeddings + user_dense 4) = 20 → 16 → 8.
    query_hand = (2 * 20 * 16 + 16) + (2 * 16 * 8 + 8)
    cached_hand = 8 + (2 * 24 * 6 + 6) + (2 * 6 * 1 + 1)  # u ⊙ v + head, item vectors precomputed
    cost = H.hap_flops(light, strong, top_m=3, candidates=7)
    assert cost == {
        "light_per_candidate": light_hand, "light_per_candidate_cached_items": cached_hand,
        "light_per_request": query_hand, "strong_per_candidate": strong_hand,
        "routed_per_request": query_hand + 7 * light_hand + 3 * strong_hand,
        "routed_per_request_cached_items": query_hand + 7 * cached_hand + 3 * strong_hand,
        "strong_only_per_request": 7 * strong_hand,
    }
    assert H.hap_flops(light, strong, top_m=30, candidates=7)["routed_per_request"] == query_hand + 7 * (
        light_hand + strong_hand)
    with pytest.raises(ValueError, match="must be >= 1"):
        H.hap_flops(light, strong, top_m=0, candidates=7)


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hap") / "examples")
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=80, seed=11), out)
    return LI.request_lists_from_candidates(os.path.join(out, "Split-train"))


def test_hap_training_lowers_both_losses(lists):
    tf.keras.utils.set_random_seed(0)
    model = H.HAPPreranker(H.LightPreranker(embedding_dim=8, tower_units=(16,), output_dim=8, head_units=(8,)),
                           H.StrongRanker(embedding_dim=8, num_cross_layers=1, projection_dim=4, hidden_units=(16,)),
                           top_m=10)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01))
    data = LI.dataset_from_lists(lists, batch_size=16)
    before = model.evaluate(data, return_dict=True, verbose=0)
    model.fit(LI.dataset_from_lists(lists, batch_size=16, shuffle_seed=0, num_epochs=8), verbose=0)
    after = model.evaluate(data, return_dict=True, verbose=0)
    assert after["light_loss"] < 0.8 * before["light_loss"]
    assert after["strong_loss"] < 0.8 * before["strong_loss"]
    routed = model.predict(data, verbose=0)
    assert routed.shape == lists["mask"].shape and np.all(np.isfinite(routed))


def test_trainer_evaluation_leaves_out_and_counts_requests_without_gt(lists):
    from cascade_ranking.models.metrics import stage_recall
    from cascade_ranking.models.trainers import preranking as trainer
    lists = LI.take_lists(lists, slice(0, 6))
    lists["stage"] = lists["stage"].copy()
    lists["stage"][:2][lists["stage"][:2] == T["rerank_pos"]] = T["rerank_neg"]  # requests 0, 1: no GT
    tf.keras.utils.set_random_seed(0)
    model = H.HAPPreranker(H.LightPreranker(4, (8,), 4, (4,)), H.StrongRanker(4, 1, 2, (8,)), top_m=30)
    out = trainer.evaluate(model, lists, quota=20)
    assert out["requests"] == 6 and out["requests_without_gt"] == 2
    light = trainer.scores_on(model.light, lists)
    gt = (lists["stage"] == T["rerank_pos"]) & (lists["mask"] > 0)
    top = np.argsort(-light, axis=1, kind="stable")[:, :20]
    by_hand = np.mean([np.isin(np.flatnonzero(gt[r]), top[r]).mean() for r in range(2, 6)])
    assert out["recall_light@20"] == pytest.approx(by_hand)
    assert stage_recall(light, gt, m=20, mask=lists["mask"]) == pytest.approx(by_hand)


def test_bad_input():
    with pytest.raises(ValueError, match="kind must be"):
        H.group_wise_loss(np.zeros((1, 3)), np.ones((1, 3), bool), np.ones((1, 3, 2), bool), "listwise")
    with pytest.raises(ValueError, match="do not match"):
        H.group_wise_loss(np.zeros((1, 3)), np.ones((1, 4), bool), np.ones((1, 3, 2), bool))
    with pytest.raises(ValueError, match="3 group weights for 2 groups"):
        H.group_wise_loss(np.zeros((1, 3)), np.ones((1, 3), bool), np.ones((1, 3, 2), bool), "softmax", [1, 1, 1])
    with pytest.raises(ValueError, match="top_m must be"):
        H.route(np.zeros((1, 3)), np.zeros((1, 3)), 0)


@pytest.mark.parametrize("kind", ["softmax", "pairwise"])
def test_group_wise_loss_class_equals_numpy(kind):
    from cascade_ranking.models import losses
    rng = np.random.default_rng(1)
    b, l, g = 4, 8, 4
    s = rng.normal(scale=2.0, size=(b, l)).astype(np.float32)
    kind_of = rng.integers(-1, g, size=(b, l))
    pos = kind_of == -1
    groups = np.stack([kind_of == i for i in range(g)], -1)
    weights = H.hard_group_weights()
    loss = losses.get("hap_group_wise", kind=kind, group_weights=weights)
    ref_total, ref_terms = _np_group_loss(s.astype(np.float64), pos, groups, kind, weights)
    np.testing.assert_allclose(float(loss(pos.astype(np.float32), s, groups=groups)), ref_total, rtol=1e-5)
    total, terms = loss.terms(pos, s, groups)
    np.testing.assert_allclose(terms.numpy(), ref_terms, rtol=1e-5)
