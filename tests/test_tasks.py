"""models/tasks.py: the tasks' objectives are the sums of their terms, and one shared train step of
each stage model moves the weights as a hand-written GradientTape step with the same loss."""
import os

import numpy as np
import pytest
import tensorflow as tf

from cascade_ranking.datasources import synthetic
from cascade_ranking.models import cascade_model as CM
from cascade_ranking.models import list_inputs as LI
from cascade_ranking.models import preranking as H
from cascade_ranking.models import ranker, tasks
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.models.ranking_stage import RankingStage
from cascade_ranking.models.retrieval import TwoTowerScorer
from tests.test_ranker import SMALL, make_rows, to_tensors


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tasks") / "examples")
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=24, seed=3), out)
    return LI.request_lists_from_candidates(os.path.join(out, "Split-train"))


def _batch(lists, n=6):
    return {k: tf.constant(v[:n]) for k, v in lists.items()}


def _stages(seed=0):
    tf.keras.utils.set_random_seed(seed)
    return {
        "retrieval": TwoTowerScorer(4, hidden_units=(8,), output_dim=4, name="retrieval"),
        "prerank": H.LightPreranker(4, tower_units=(8,), output_dim=4, head_units=(4,), name="prerank"),
        "rank": H.StrongRanker(4, num_cross_layers=1, projection_dim=2, hidden_units=(8,), name="rank"),
    }


# ---------------------------------------------------------------------------------------------
# Tasks: the objective is the sum of its (weighted) terms.
# ---------------------------------------------------------------------------------------------
def test_factory_floor_task_is_the_weighted_sum_of_its_terms():
    rng = np.random.default_rng(0)
    n = 12
    labels = tf.constant((rng.random(n) < 0.4).astype(np.float32))
    logit, rank_logit, noisy = (tf.constant(rng.normal(size=n).astype(np.float32)) for _ in range(3))
    weights = tf.constant(rng.uniform(0.5, 2.0, n).astype(np.float32))
    teacher = tf.constant(np.where(rng.random(n) < 0.7, rng.normal(size=n), np.nan).astype(np.float32))
    ids = tf.constant(np.repeat([1, 2, 3], 4))
    w = {"rank_weight": tf.constant(0.3), "distill_weight": tf.constant(0.6)}
    task = tasks.FactoryFloorTask(rank_loss=True, distillation=True, lspr_weight=0.25)
    terms = task((logit, rank_logit), labels, weights, ids, teacher, w, bias=tf.constant(0.05),
                 perturbed=(noisy, noisy))
    data = 0.7 * terms["logistic"] + 0.3 * terms["rank"] + 0.6 * terms["distillation"]
    perturbed = task.data_loss(noisy, noisy, labels, weights, ids, teacher, 0.3, 0.6)[0]
    np.testing.assert_allclose(float(terms["lspr"]), 0.25 * float(perturbed), rtol=1e-6)
    np.testing.assert_allclose(float(terms["loss"]), float(data) + 0.05 + float(terms["lspr"]), rtol=1e-6)
    assert min(float(terms[k]) for k in ("logistic", "rank", "distillation")) > 0
    off = tasks.FactoryFloorTask(rank_loss=False, distillation=False)(
        (logit, rank_logit), labels, weights, None, teacher, w)
    assert float(off["rank"]) == float(off["distillation"]) == float(off["bias"]) == float(off["lspr"]) == 0.0
    np.testing.assert_allclose(float(off["loss"]), 0.7 * float(off["logistic"]), rtol=1e-6)


def test_hap_task_is_the_sum_of_the_light_and_strong_losses(lists):
    batch = _batch(lists)
    rng = np.random.default_rng(1)
    light, strong = (tf.constant(rng.normal(size=batch["mask"].shape).astype(np.float32)) for _ in range(2))
    positives, groups = H.hap_groups(batch)
    terms = tasks.HAPTask("softmax")(light, strong, positives, groups)
    np.testing.assert_allclose(float(terms["loss"]), float(terms["light_loss"]) + float(terms["strong_loss"]),
                               rtol=1e-6)
    np.testing.assert_allclose(float(terms["light_loss"]), sum(float(terms[f"light_{g}"]) for g in H.GROUPS),
                               rtol=1e-6)
    assert float(terms["strong_loss"]) == pytest.approx(
        float(H.group_wise_loss(strong, positives, groups, "softmax", H.hard_group_weights())[0]))


@pytest.mark.parametrize("method", ["lcron", "bce", "icc", "hap"])
def test_cascade_task_is_the_sum_of_its_terms(lists, method):
    batch = _batch(lists)
    batch["teacher_logit"] = tf.constant(np.random.default_rng(2).normal(size=batch["mask"].shape), tf.float32)
    model = CM.CascadeModel(_stages(), method=method, quota=3, tau=2.0, distill_weight=0.5)
    terms = model.compute_terms(batch)
    names = model.stage_names
    if method == "lcron":
        w = [float(terms[f"w_{n}"]) for n in names]
        expected = sum(float(terms[f"single_{n}"]) / (2 * x * x) for n, x in zip(names, w)) + float(terms["e2e"])
        expected += float(np.sum(np.log(np.abs(w))))
    elif method == "hap":
        expected = float(terms["bce_retrieval"]) + float(terms["hap_prerank"]) + float(terms["hap_rank"])
        assert set(f"hap_prerank_{g}" for g in H.GROUPS) <= set(terms)
    else:
        expected = sum(float(terms[f"bce_{n}"]) for n in names) + (float(terms["joint"]) if method == "icc" else 0.0)
    expected += 0.5 * float(terms["distill"])
    np.testing.assert_allclose(float(terms["loss"]), expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The shared train step == a hand-written GradientTape step (SGD).
# ---------------------------------------------------------------------------------------------
def _hand_step(model, loss_fn, learning_rates):
    """Expected weights after one SGD step: w − lr(w)·∂L/∂w, computed before any update."""
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss = loss_fn()
    grads = tape.gradient(loss, variables)
    return [(v, v.numpy() if g is None else v.numpy() - learning_rates(v) * tf.convert_to_tensor(g).numpy())
            for v, g in zip(variables, grads)]


def _assert_stepped(expected):
    for v, want in expected:
        np.testing.assert_allclose(v.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=v.name)


def test_one_ranker_step_equals_a_hand_step_and_logs_its_terms():
    rows = make_rows(6, seed=2)
    config = RankerConfig(**{**SMALL, "rank_start_step": 0, "rank_ramp_steps": 0, "distill_weight": 0.5,
                             "distill_start_step": 0, "distill_ramp_steps": 0, "bias_start_step": 0,
                             "bias_ramp_steps": 0})
    model = ranker.FactoryFloorRanker(config)
    data = to_tensors(rows)
    model.adapt(tf.data.Dataset.from_tensors(data), steps=1)
    model.compile(optimizer=tf.keras.optimizers.SGD(0.1))
    model(data)
    model.optimizer.iterations.assign(3)
    expected = _hand_step(model, lambda: model.loss_terms(data, step=3)["loss"], lambda v: 0.1)
    terms = model.loss_terms(data, step=3)
    duals = model.bias_constraints.duals.numpy().copy() if hasattr(model.bias_constraints, "duals") else None
    logs = model.train_step(data)
    _assert_stepped(expected)
    assert set(logs) == set(ranker.LOSS_TERMS) | set(ranker.WEIGHT_TERMS)
    for name in ranker.LOSS_TERMS:  # the first step's running mean is the step's value
        np.testing.assert_allclose(float(logs[name]), float(terms[name]), rtol=1e-5, err_msg=name)
    assert int(model.optimizer.iterations) == 4 and int(model.cross.step) == 4  # the after-step hook ran
    if duals is not None:
        assert not np.allclose(model.bias_constraints.duals.numpy(), duals)
    evaluation = model.test_step(data)
    assert set(evaluation) == set(ranker.LOSS_TERMS) | set(ranker.WEIGHT_TERMS) | {"auc"}


def test_one_hap_step_equals_a_hand_step_and_logs_its_terms(lists):
    batch = _batch(lists)
    tf.keras.utils.set_random_seed(0)
    model = H.HAPPreranker(H.LightPreranker(4, (8,), 4, (4,)), H.StrongRanker(4, 1, 2, (8,)), top_m=10)
    model.compile(optimizer=tf.keras.optimizers.SGD(0.5))
    model(batch)
    expected = _hand_step(model, lambda: model.compute_loss(batch, training=True), lambda v: 0.5)
    terms = model.compute_terms(batch, training=True)
    logs = model.train_step(batch)
    _assert_stepped(expected)
    assert set(logs) == {"loss", "light_loss", "strong_loss"} | {f"light_{g}" for g in H.GROUPS}
    np.testing.assert_allclose(float(logs["loss"]), float(terms["loss"]), rtol=1e-6)


def test_one_cascade_step_equals_a_hand_step_and_logs_its_terms(lists):
    batch = _batch(lists)
    model = CM.CascadeModel(_stages(), method="lcron", quota=3, tau=2.0)
    model.compile(optimizer=tf.keras.optimizers.SGD(0.5))
    model(batch)
    expected = _hand_step(model, lambda: model.compute_loss(batch, training=True), lambda v: 0.5)
    logs = model.train_step(batch)
    _assert_stepped(expected)
    names = {"loss", "e2e"} | {f"{p}_{n}" for p in ("single", "w") for n in model.stage_names}
    assert set(logs) == names


def test_a_cascade_step_with_a_ranking_stage_uses_both_optimizers_and_the_after_step_hook(tmp_path):
    from tests.component_fixtures import request_list_splits
    root = request_list_splits(tmp_path, num_requests=8, seed=5, list_size=60)
    batch = next(iter(LI.request_list_dataset([str(root / "Split-train" / "*")], 8, 60)))
    tf.keras.utils.set_random_seed(3)
    config = RankerConfig(**{**SMALL, "hidden_units": (16,), "cascade_score": "tower", "cascade_head_units": (8,),
                             "rank_start_step": 0, "rank_ramp_steps": 0, "bias_start_step": 0,
                             "bias_ramp_steps": 0, "ema_momentum": 0.0})
    stage = RankingStage(ranker.FactoryFloorRanker(config))
    stage.optimizer = tf.keras.optimizers.SGD(0.2)  # the ranker's own optimizer
    model = CM.CascadeModel({"prerank": H.LightPreranker(4, (8,), 8, (8,), name="prerank"), "rank": stage},
                            method="lcron", quota=3)
    model.adapt({k: v.numpy() if not isinstance(v, tf.RaggedTensor) else v.to_tensor().numpy()
                 for k, v in batch.items()})
    model.compile(optimizer=tf.keras.optimizers.SGD(0.05))
    model(batch)
    ranker_vars = {id(v) for v in stage.ranker_variables}
    expected = _hand_step(model, lambda: model.compute_loss(batch, training=True),
                          lambda v: 0.2 if id(v) in ranker_vars else 0.05)
    logs = model.train_step(batch)
    _assert_stepped(expected)
    assert int(stage.optimizer.iterations) == 1 and int(model.optimizer.iterations) == 1
    assert int(stage.ranker.cross.step) == 1  # the ranker's after_step ran
    assert {f"ranker_{n}" for n in CM.RANKER_LOG_TERMS} <= set(logs) and "_ranker_terms" not in logs
    assert "_ranker_terms" not in model.test_step(batch)


def test_one_train_step_definition():
    """The three stage models share StageModel's train/test step."""
    for cls in (ranker.FactoryFloorRanker, H.HAPPreranker, CM.CascadeModel):
        assert issubclass(cls, tasks.StageModel)
        assert cls.train_step is tasks.StageModel.train_step and cls.test_step is tasks.StageModel.test_step


# ---------------------------------------------------------------------------------------------
# A new loss is one class: registered, then named by the config.
# ---------------------------------------------------------------------------------------------
def test_a_new_registered_loss_is_the_rankers_per_request_term_by_config(monkeypatch):
    from cascade_ranking.models import losses

    monkeypatch.setattr(losses, "_REGISTRY", dict(losses._REGISTRY))  # the test's loss leaves with it

    @losses.register("test_squared_rows")
    class SquaredRows(losses.ExplicitLoss):
        """Σ w·(y − s)² / N over flat rows (grouping is ignored): a stand-in for a user's loss."""

        def compute(self, y_true, y_pred, sample_weight=None, grouping=None):
            w = tf.ones_like(y_pred) if sample_weight is None else tf.cast(sample_weight, tf.float32)
            return tf.reduce_mean(w * tf.square(tf.cast(y_true, tf.float32) - y_pred))

    assert "test_squared_rows" in losses.known()
    rows = make_rows(6, seed=2)
    config = RankerConfig(**{**SMALL, "rank_start_step": 0, "rank_ramp_steps": 0, "list_loss": "test_squared_rows"})
    model = ranker.FactoryFloorRanker(config)
    data = to_tensors(rows)
    model.adapt(tf.data.Dataset.from_tensors(data), steps=1)
    terms = model.loss_terms(data, step=0)
    out = model.forward(data, step=0)
    labels = np.asarray(terms["_labels"], np.float32).reshape(-1)
    scores = np.asarray(out.rank_logit, np.float32).reshape(-1)
    weights = np.asarray(terms["_weights"], np.float32).reshape(-1)
    np.testing.assert_allclose(float(terms["rank"]), np.mean(weights * (labels - scores) ** 2), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown loss 'no_such_loss'"):
        RankerConfig(list_loss="no_such_loss")
