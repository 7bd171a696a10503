"""Request-list inputs (models/list_inputs.py) and the joint cascade model (models/cascade_model.py)."""
import os

import numpy as np
import pytest
import tensorflow as tf

from cascade_ranking.datasources import example_io, synthetic
from cascade_ranking.models import cascade_model as CM
from cascade_ranking.models import lcron
from cascade_ranking.models import list_inputs as LI
from cascade_ranking.models.preranking import LightPreranker, StrongRanker
from cascade_ranking.models.retrieval import TwoTowerScorer
from cascade_ranking.schema import request_list as RL


@pytest.fixture(scope="module")
def examples_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cascade") / "examples")
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=60, seed=7), out)
    return out


@pytest.fixture(scope="module")
def lists(examples_dir):
    return LI.request_lists_from_candidates(os.path.join(examples_dir, "Split-train"))


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def test_grouping_candidate_rows_equals_the_request_list_contract(examples_dir, lists):
    split = os.path.join(examples_dir, "Split-train")
    rows = {}
    for ex in example_io.read_examples(split):
        f = ex.features.feature
        row = {k: (list(v.int64_list.value) or list(v.float_list.value) or list(v.bytes_list.value)) for k, v in f.items()}
        rows.setdefault(row["request_id"][0], []).append(row)
    ids = sorted(rows)
    assert lists["request_id"][:, 0].tolist() == ids
    for r in (0, 5, len(ids) - 1):
        expected = RL.build_request_list(rows[ids[r]], list_size=50)
        for name, value in expected.items():
            got = lists[name][r]
            if name == "query_tokens":
                got = got[got != 0]
            np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(value, dtype=np.float64),
                                       rtol=1e-6, err_msg=name)


def test_request_list_tfrecords_round_trip(lists, tmp_path):
    path = LI.write_request_lists(LI.take_lists(lists, slice(0, 9)), str(tmp_path / "lists" / "data.gz"))
    parsed = next(iter(LI.request_list_dataset(path, batch_size=9, list_size=50)))
    for name in ("item_id", "stage", "mask", "item_dense", "item_tags", "user_dense", "request_id"):
        np.testing.assert_allclose(parsed[name].numpy(), lists[name][:9], err_msg=name)
    tokens = parsed["query_tokens"].to_list()
    assert tokens == [[t for t in row if t] for row in lists["query_tokens"][:9].tolist()]
    # The stages read parsed lists (ragged query tokens) and in-memory ones (dense) alike.
    model = CM.CascadeModel(_small_stages())
    in_memory = next(iter(LI.dataset_from_lists(LI.take_lists(lists, slice(0, 9)), batch_size=9)))
    np.testing.assert_allclose(model(parsed).numpy(), model(in_memory).numpy(), rtol=1e-5, atol=1e-6)


def test_padding_follows_the_contract_and_oversized_lists_are_refused(examples_dir):
    rows = LI.read_candidate_rows(os.path.join(examples_dir, "Split-eval"))
    padded = LI.group_rows(rows, list_size=53, shuffle_seed=3)
    assert padded["mask"].shape[1] == 53 and np.all(padded["mask"][:, 50:] == 0)
    assert np.all(padded["stage"][:, 50:] == RL.PAD_STAGE)
    assert np.all(np.isnan(padded["teacher_logit"][:, 50:]))
    assert np.all(padded["sampling_probability"][:, 50:] == 1.0)
    same = LI.group_rows(rows, list_size=53)
    # Shuffling within a request permutes its candidates and nothing else.
    for r in range(3):
        assert sorted(padded["item_id"][r, :50]) == sorted(same["item_id"][r, :50])
    assert not np.array_equal(padded["item_id"][:, :50], same["item_id"][:, :50])
    with pytest.raises(ValueError, match="50 candidates > list size 40"):
        LI.group_rows(rows, list_size=40)


# ---------------------------------------------------------------------------------------------
# The cascade model
# ---------------------------------------------------------------------------------------------
def _small_stages(seed=0):
    tf.keras.utils.set_random_seed(seed)
    return {
        "retrieval": TwoTowerScorer(4, hidden_units=(8,), output_dim=4, name="retrieval"),
        "prerank": LightPreranker(4, tower_units=(8,), output_dim=4, head_units=(4,), name="prerank"),
        "rank": StrongRanker(4, num_cross_layers=1, projection_dim=2, hidden_units=(8,), name="rank"),
    }


def _batch(lists, n=6):
    b = {k: tf.constant(v[:n]) for k, v in lists.items()}
    b["mask"] = tf.constant(np.where(np.arange(50) < 45, lists["mask"][:n], 0))  # 5 padded slots
    return b


def _np_bce(y, s, valid):
    s = s.astype(np.float64)
    per = np.maximum(s, 0) - s * y + np.log1p(np.exp(-np.abs(s)))
    return per[valid].mean()


def test_lcron_objective_on_the_stage_scores(lists):
    model = CM.CascadeModel(_small_stages(), method="lcron", quota=4, tau=2.0)
    batch = _batch(lists)
    scores = model(batch).numpy()
    assert scores.shape == (6, 3, 50)
    model.weighting.w.assign([0.5, 1.0, 2.0])
    out = model.compute_losses(batch)
    gt = ((lists["stage"][:6] == 0) & (batch["mask"].numpy() > 0)).astype(np.float32)
    l_e2e, singles = lcron.lcron_losses([scores[:, i] for i in range(3)], gt, batch["mask"], 4, 2.0)
    expected = sum(float(s) / (2 * w * w) for s, w in zip(singles, [0.5, 1.0, 2.0])) + float(l_e2e) + np.log(1.0)
    np.testing.assert_allclose(float(out["loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(out["single_rank"]), float(singles[2]), rtol=1e-5)


def test_bce_and_icc_objectives_equal_numpy(lists):
    batch = _batch(lists)
    valid = batch["mask"].numpy() > 0
    y = ((lists["stage"][:6] == 0) & valid).astype(np.float64)
    for method in ("bce", "icc"):
        model = CM.CascadeModel(_small_stages(), method=method)
        scores = model(batch).numpy().astype(np.float64)
        singles = [_np_bce(y, scores[:, i], valid) for i in range(3)]
        expected = sum(singles)
        if method == "icc":
            p = np.prod(1 / (1 + np.exp(-scores)), axis=1)
            expected += np.mean((-y * np.log(p) - (1 - y) * np.log(1 - p + 1e-8))[valid])
        np.testing.assert_allclose(float(model.compute_losses(batch)["loss"]), expected, rtol=1e-5)


def test_bce_trains_every_stage_on_its_own_and_lcron_couples_them(lists):
    """A BCE-trained stage ends with the same weights whether or not other stages are in the model."""
    data = LI.dataset_from_lists(LI.take_lists(lists, slice(0, 24)), batch_size=8)

    def train(stages, method):
        model = CM.CascadeModel(stages, method=method, quota=5)
        model.compile(optimizer=tf.keras.optimizers.Adam(0.01))
        model.fit(data, epochs=2, verbose=0)
        return stages["retrieval"].get_weights()

    alone = train({"retrieval": _small_stages()["retrieval"]}, "bce")
    together = train(_small_stages(), "bce")
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    lcron_alone = train({"retrieval": _small_stages()["retrieval"]}, "lcron")
    lcron_together = train(_small_stages(), "lcron")
    assert max(np.abs(a - b).max() for a, b in zip(lcron_alone, lcron_together)) > 1e-4


def _np_softmax_group_term(s, pos, members):
    """mean over (request, positive) with a non-empty group of −log(e^{s_p} / (e^{s_p} + Σ_n e^{s_n}))."""
    values = []
    for b in range(s.shape[0]):
        negs = np.flatnonzero(members[b])
        if negs.size:
            for p in np.flatnonzero(pos[b]):
                z = np.concatenate([[s[b, p]], s[b, negs]])
                values.append(np.log(np.exp(z - z.max()).sum()) + z.max() - s[b, p])
    return np.mean(values) if values else 0.0


def test_hap_objective_equals_numpy(lists):
    batch = _batch(lists)
    valid = batch["mask"].numpy() > 0
    stage, shown = lists["stage"][:6], lists["ui_position"][:6] > 0
    y = (stage == 0) & valid
    # Groups by hand (label "gt"): g0 shown non-GT, g1 tiers 1-2, g2 tiers 3-4, g3 random_neg (5).
    groups = [valid & shown & ~y, valid & ~shown & np.isin(stage, [1, 2]), valid & ~shown & np.isin(stage, [3, 4]),
              valid & ~shown & (stage == 5)]
    assert groups[1].sum() > 0 and groups[2].sum() > 0  # the synthetic lists fill both
    model = CM.CascadeModel(_small_stages(), method="hap")
    scores = model(batch).numpy().astype(np.float64)
    light = sum(_np_softmax_group_term(scores[:, 1], y, g) for g in groups)
    strong = sum(_np_softmax_group_term(scores[:, 2], y, g) for g in groups[:2])
    expected = _np_bce(y.astype(np.float64), scores[:, 0], valid) + light + strong
    out = model.compute_losses(batch)
    np.testing.assert_allclose(float(out["hap_prerank"]), light, rtol=1e-5)
    np.testing.assert_allclose(float(out["hap_rank"]), strong, rtol=1e-5)
    np.testing.assert_allclose(float(out["loss"]), expected, rtol=1e-5)


def _teacher_batch(lists):
    """6 requests × 50 slots, 5 padded; teacher logits finite, NaN on some real slots, and
    finite (but to be ignored) on the padded ones."""
    batch = _batch(lists)
    rng = np.random.default_rng(3)
    teacher = rng.normal(scale=2.0, size=(6, 50)).astype(np.float32)
    teacher[rng.random((6, 50)) < 0.3] = np.nan
    teacher[:, 45:] = 7.0
    batch["teacher_logit"] = tf.constant(teacher)
    return batch, teacher


def test_distillation_term_equals_numpy_and_skips_nan_and_padding(lists):
    batch, teacher = _teacher_batch(lists)
    plain = CM.CascadeModel(_small_stages(), method="bce")
    model = CM.CascadeModel(_small_stages(), method="bce", distill_weight=0.7)
    s = model(batch).numpy()[:, -1].astype(np.float64)
    keep = (batch["mask"].numpy() > 0) & np.isfinite(teacher)
    assert 0 < keep.sum() < 0.8 * 45 * 6 and not keep[:, 45:].any()
    p = 1.0 / (1.0 + np.exp(-teacher[keep].astype(np.float64)))
    q = 1.0 / (1.0 + np.exp(-s[keep]))
    expected = np.mean(-p * np.log(q) - (1 - p) * np.log(1 - q))
    out = model.compute_losses(batch)
    np.testing.assert_allclose(float(out["distill"]), expected, rtol=1e-5)
    assert "distill" not in plain.compute_losses(batch)
    valid = batch["mask"].numpy() > 0
    y = ((lists["stage"][:6] == 0) & valid).astype(np.float64)
    bce = sum(_np_bce(y, x, valid) for x in model(batch).numpy().astype(np.float64).transpose(1, 0, 2))
    np.testing.assert_allclose(float(out["loss"]), bce + 0.7 * expected, rtol=1e-5)
    # The gradient of the term is finite everywhere and 0 on NaN-teacher and padded slots.
    logits = tf.Variable(np.random.default_rng(4).normal(size=(6, 50)), dtype=tf.float32)
    with tf.GradientTape() as tape:
        term = CM.CascadeModel.distillation(batch, logits)
    grad = tape.gradient(term, logits).numpy()
    assert np.all(np.isfinite(grad)) and np.all(grad[~keep] == 0) and np.all(grad[keep] != 0)
    # Requests without any usable teacher logit give a 0 term, not NaN.
    empty = dict(batch, teacher_logit=tf.fill([6, 50], np.float32(np.nan)))
    assert float(CM.CascadeModel.distillation(empty, logits)) == 0.0


def test_distillation_trains_the_last_stage_towards_the_teacher(lists):
    """The term minus the teacher's entropy is KL(teacher ‖ student) ≥ 0; training with a large
    weight shrinks it."""
    batch, teacher = _teacher_batch(lists)
    keep = (batch["mask"].numpy() > 0) & np.isfinite(teacher)
    p = 1.0 / (1.0 + np.exp(-teacher[keep].astype(np.float64)))
    entropy = np.mean(-p * np.log(p) - (1 - p) * np.log(1 - p))
    model = CM.CascadeModel(_small_stages(), method="bce", distill_weight=10.0)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01))
    kl_before = float(model.compute_losses(batch)["distill"]) - entropy
    model.fit(tf.data.Dataset.from_tensors(batch).repeat(30), verbose=0)
    kl_after = float(model.compute_losses(batch)["distill"]) - entropy
    assert kl_after >= -1e-6 and kl_after < 0.7 * kl_before, (kl_before, kl_after)


def test_a_ranking_stage_distills_itself_so_the_cascade_term_is_refused():
    from cascade_ranking.models.ranker import FactoryFloorRanker
    from cascade_ranking.models.ranker_config import RankerConfig
    from cascade_ranking.models.ranking_stage import RankingStage
    stages = {"prerank": _small_stages()["prerank"], "rank": RankingStage(FactoryFloorRanker(RankerConfig(embedding_dim=4)))}
    with pytest.raises(ValueError, match="distills on its shown rows itself"):
        CM.CascadeModel(stages, method="lcron", distill_weight=0.5)


def test_evaluate_cascade_counts_requests_without_gt_and_refuses_a_quota_above_the_list():
    # 3 requests × 5 slots; request 1 has no GT, request 2 has GT only on its padded slot.
    stage = np.array([[0, 1, 0, 2, 3], [1, 1, 2, 3, 4], [1, 2, 3, 4, 0]])
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    lists = {"stage": stage, "mask": mask}
    s1 = np.array([[5.0, 4, 3, 2, 1]] * 3)  # keeps slots 0-3 → both GT of request 0 survive
    s2 = np.array([[1.0, 4, 3, 2, 5]] * 3)  # keeps slots 1, 2 of {0..3} → 1 of 2 GT
    out = CM.evaluate_cascade([s1, s2], lists, (4, 2), ("a", "b"))
    assert out["requests"] == 3 and out["requests_without_gt"] == 2
    assert out["e2e_recall"] == pytest.approx(0.5)
    assert out["recall_a@4"] == pytest.approx(1.0) and out["recall_b@2"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="quota 6 of stage 'a' > list size 5"):
        CM.evaluate_cascade([s1, s2], lists, (6, 2), ("a", "b"))


def test_a_training_quota_above_the_list_size_is_a_clear_error(lists):
    model = CM.CascadeModel(_small_stages(), method="lcron", quota=51)
    with pytest.raises(ValueError, match="quota 51 > list size 50"):
        model.compute_losses(_batch(lists))
    model = CM.CascadeModel(_small_stages(), method="lcron", quota=46)  # 45 real candidates per request
    with pytest.raises(ValueError, match=r"quota 46 > number of real candidates of a request \(45\)"):
        model.compute_losses(_batch(lists))


@pytest.mark.slow
def test_train_cascade_keeps_the_best_validation_epoch(lists):
    train, valid = LI.take_lists(lists, slice(0, 40)), LI.take_lists(lists, slice(40, None))
    model = CM.train_cascade(train, "lcron", epochs=3, batch_size=8, embedding_dim=4,
                             stages=_small_stages(), valid_lists=valid, valid_quotas=(40, 30, 20))
    assert len(model.history_) == 3
    scores = model.predict_stage_scores(valid)
    metrics = CM.evaluate_cascade(scores, valid, (40, 30, 20), model.stage_names)
    assert metrics["e2e_recall"] == pytest.approx(max(model.history_))
    assert set(metrics) == {"e2e_recall", "recall_retrieval@40", "recall_prerank@30", "recall_rank@20", "ndcg@10_rank",
                            "requests", "requests_without_gt"}
    assert metrics["requests"] == LI.num_lists(valid) and metrics["requests_without_gt"] == 0


def test_bad_configuration_raises_value_error():
    with pytest.raises(ValueError, match="method must be one of"):
        CM.CascadeModel(_small_stages(), method="softmax")
    with pytest.raises(ValueError, match="tau must be > 0"):
        CM.CascadeModel(_small_stages(), tau=0.0)
    with pytest.raises(ValueError, match="quota has 2 entries but there are 3 stages"):
        CM.CascadeModel(_small_stages(), quota=[10, 10])
    with pytest.raises(ValueError, match="label must be"):
        CM.cascade_labels({"mask": np.ones((1, 2)), "stage": np.zeros((1, 2))}, "rating")
    with pytest.raises(ValueError, match="distill_weight must be >= 0"):
        CM.CascadeModel(_small_stages(), distill_weight=-1.0)
    with pytest.raises(ValueError, match="'hap' needs at least two stages"):
        CM.CascadeModel({"rank": _small_stages()["rank"]}, method="hap")
