"""Tests for models/ranking_stage.py: the Factory Floor ranker as the last stage of the joint
cascade, against independent computations on small request lists."""
import numpy as np
import pytest
import tensorflow as tf

from cascade_ranking.models import cascade_model as CM
from cascade_ranking.models import list_inputs as LI
from cascade_ranking.models.preranking import LightPreranker
from cascade_ranking.models.ranker import LIST_INDEX_KEY, LIST_MASK_KEY, FactoryFloorRanker
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.models.ranking_stage import RankingStage, list_rows, shown_row_index
from cascade_ranking.schema import features as F
from tests.component_fixtures import request_list_splits

SMALL = dict(embedding_dim=4, cross_layers=1, cross_projection_dim=4, cross_ramp_steps=10, hidden_units=(16,),
             qu_dim=4, ui_hidden_units=(4,), cascade_head_units=(8,), rank_start_step=0, rank_ramp_steps=0,
             distill_start_step=0, distill_ramp_steps=0, bias_start_step=0, bias_ramp_steps=0)
LIST_SIZE = 60


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    root = request_list_splits(tmp_path_factory.mktemp("stage"), num_requests=12, seed=5, list_size=LIST_SIZE)
    batch = next(iter(LI.request_list_dataset([str(root / "Split-train" / "*")], 8, LIST_SIZE)))
    # Some weights and teacher logits, so that dropping a row or a weight would show.
    rng = np.random.default_rng(0)
    shape = batch["mask"].shape
    batch["sample_weight"] = tf.constant(rng.uniform(0.5, 3.0, shape).astype(np.float32))
    batch["teacher_logit"] = tf.constant(rng.normal(-1.5, 1.0, shape).astype(np.float32))
    return batch


def _stage(cascade_score="tower", **changes):
    tf.keras.utils.set_random_seed(3)
    return RankingStage(FactoryFloorRanker(RankerConfig(**{**SMALL, "cascade_score": cascade_score, **changes})))


def test_shown_rows_are_the_real_shown_slots_grouped_by_their_list(lists):
    stage = _stage()
    rows = stage.shown_rows(lists)
    mask, position = lists["mask"].numpy(), lists["ui_position"].numpy()
    b, j = np.nonzero((mask > 0) & (position > 0))
    np.testing.assert_array_equal(rows["item_id"].numpy().reshape(-1), lists["item_id"].numpy()[b, j])
    np.testing.assert_allclose(rows["sample_weight"].numpy().reshape(-1), lists["sample_weight"].numpy()[b, j])
    np.testing.assert_array_equal(rows["request_id"].numpy().reshape(-1), lists["request_id"].numpy()[b, 0])
    # The rank loss's layout: one row per list that has shown rows, holding exactly that list's rows.
    index, layout_mask = rows[LIST_INDEX_KEY].numpy(), rows[LIST_MASK_KEY].numpy()
    assert index.shape[0] == len(np.unique(b))
    for r in range(index.shape[0]):
        assert len(set(b[index[r][layout_mask[r]]])) == 1
    assert layout_mask.sum() == len(b)
    np.testing.assert_array_equal(shown_row_index(lists).numpy(), b * mask.shape[1] + j)


def test_training_terms_are_the_rankers_own_terms_on_the_shown_rows(lists):
    """The ranker's losses in the cascade equal `loss_terms` on the shown rows alone, built here by
    hand from the lists: unshown and padded slots never enter the CTR losses."""
    stage = _stage(bias_constraints=True)
    scores, terms = stage.training_terms(lists, training=True)
    mask, position = lists["mask"].numpy(), lists["ui_position"].numpy()
    b, j = np.nonzero((mask > 0) & (position > 0))
    flat = list_rows(lists)
    size = mask.shape[1]
    by_hand = {name: tf.gather(flat[name], b * size + j) for name in stage.ranker.feature_names}
    by_hand.update({name: tf.constant(lists[name].numpy()[b, j].reshape(-1, 1))
                    for name in ("click", "sample_weight", "teacher_logit")})
    by_hand["request_id"] = tf.constant(lists["request_id"].numpy()[b])
    expected = stage.ranker.loss_terms(by_hand, step=stage.step, training=True)
    for name in ("logistic", "rank", "distillation", "bias", "loss"):
        np.testing.assert_allclose(float(terms[name]), float(expected[name]), rtol=1e-4, atol=1e-6, err_msg=name)
    assert scores.shape == mask.shape


@pytest.mark.parametrize("qu_dim", [SMALL.get("qu_dim", 16), 0], ids=["q_u", "one_tower"])
@pytest.mark.parametrize("cascade_score", ["reference_ui", "head", "tower"])
def test_the_cascade_score_never_reads_the_logged_ui(lists, cascade_score, qu_dim):
    """In logs ui_position > 0 exactly when a candidate was shown (the GT): a cascade score that read
    it would learn the label. Changing every UI feature leaves the scores as they are, also for a
    one-tower ranker (qu_dim 0), whose quality inputs include the UI features."""
    stage = _stage(cascade_score, qu_dim=qu_dim)
    before = stage(lists).numpy()
    moved = dict(lists, ui_position=tf.zeros_like(lists["ui_position"]) + 3,
                 ui_format=tf.ones_like(lists["ui_format"]))
    np.testing.assert_allclose(stage(moved).numpy(), before, rtol=1e-5, atol=1e-6)
    ctr = stage.ranker(list_rows(lists)).numpy()  # while the CTR does read it
    assert not np.allclose(ctr, stage.ranker(list_rows(moved)).numpy())


def test_the_reference_ui_score_is_the_ctr_logit_at_the_reference_treatment(lists):
    stage = _stage("reference_ui", reference_ui_position=2, reference_ui_format=1)
    at_reference = dict(lists, ui_position=tf.fill(tf.shape(lists["ui_position"]), tf.constant(2, tf.int64)),
                        ui_format=tf.fill(tf.shape(lists["ui_format"]), tf.constant(1, tf.int64)))
    np.testing.assert_allclose(stage(lists).numpy().reshape(-1),
                               stage.ranker(list_rows(at_reference)).numpy().reshape(-1), rtol=1e-5, atol=1e-6)


def test_a_joint_step_trains_the_tower_with_the_cascade_optimizer_and_the_rest_with_the_rankers(lists):
    stage = _stage("tower", ema_momentum=0.0)
    model = CM.CascadeModel({"prerank": LightPreranker(4, (8,), 8, (8,), name="prerank"), "rank": stage},
                            method="lcron")
    model.adapt({k: v.numpy() if not isinstance(v, tf.RaggedTensor) else v.to_tensor().numpy()
                 for k, v in lists.items()})
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
    model.train_step(lists)
    tower = {id(v) for v in stage.cascade_variables}
    assert tower and not tower & {id(v) for v in stage.ranker_variables}
    assert int(stage.optimizer.iterations) == 1 and int(model.optimizer.iterations) == 1
    # Adam holds the tower's slots (and the pre-ranker's), the ranker's Adagrad the ranker's only.
    adam, adagrad = set(model.optimizer._index_dict), set(stage.optimizer._index_dict)
    assert {model.optimizer._var_key(v) for v in stage.cascade_variables} <= adam - adagrad
    assert {stage.optimizer._var_key(v) for v in stage.ranker_variables} <= adagrad - adam


def test_compiling_the_ranker_alone_freezes_its_cascade_head():
    """Trained on rows (the teacher, the benches) no loss reaches a cascade head: compile freezes it,
    so Keras's end-of-fit EMA step only sees variables the optimizer steps."""
    ranker = FactoryFloorRanker(RankerConfig(**{**SMALL, "cascade_score": "tower"}))
    ranker.compile()
    assert not ranker.cascade_head.trainable


def test_finalize_writes_the_ema_into_the_ranker_but_not_the_tower(lists):
    stage = _stage("tower", ema_momentum=0.5)
    model = CM.CascadeModel({"prerank": LightPreranker(4, (8,), 8, (8,), name="prerank"), "rank": stage},
                            method="bce")
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    for _ in range(3):
        model.train_step(lists)
    tower_before = [v.numpy().copy() for v in stage.cascade_variables]
    averages = {stage.optimizer._var_key(v): stage.optimizer._model_variables_moving_average[
        stage.optimizer._index_dict[stage.optimizer._var_key(v)]].numpy() for v in stage.ranker_variables}
    stage.finalize()
    for v in stage.ranker_variables:
        np.testing.assert_allclose(v.numpy(), averages[stage.optimizer._var_key(v)])
    for v, before in zip(stage.cascade_variables, tower_before):
        np.testing.assert_array_equal(v.numpy(), before)


def test_ranking_stage_flops_add_the_tower_to_the_ctr_path():
    c = RankerConfig(**{**SMALL, "cascade_score": "tower"})
    flops = FactoryFloorRanker(c).flops()
    width = sum(c.embedding_dim for f in F.SPARSE_FEATURES if f.tower == "quality") + sum(
        f.size for f in F.DENSE_FEATURES)
    k = c.cross_projection_dim
    cross = c.cross_layers * (4 * width * k + 3 * width) + width  # layers (V, U + bias, x0 ⊙, + x), then α · x0 once
    tower_mlp = 2 * width * 8 + 8 + 2 * 8 * 1 + 1
    assert flops["cascade_per_candidate"] == cross + tower_mlp
    body = cross + 2 * width * 16 + 16
    q = 2 * 16 * c.qu_dim + c.qu_dim
    assert flops["ctr_per_candidate"] == body + q + 2 * c.qu_dim + 2
    assert flops["per_candidate"] == flops["ctr_per_candidate"] + flops["cascade_per_candidate"]
    assert FactoryFloorRanker(RankerConfig(**SMALL)).flops()["cascade_per_candidate"] == 0  # reference UI


def test_a_sampled_out_row_trains_the_cascade_but_not_the_ctr(lists):
    """The NegativeSampler keeps a sampled-out shown row in its list with weight 0: it is not a row
    of the CTR losses, and it still is a candidate of the cascade score."""
    weights = lists["sample_weight"].numpy().copy()
    shown = (lists["mask"].numpy() > 0) & (lists["ui_position"].numpy() > 0)
    b, j = np.nonzero(shown)
    weights[b[::2], j[::2]] = 0.0  # every other shown row sampled out
    sampled = dict(lists, sample_weight=tf.constant(weights))
    stage = _stage()
    rows = stage.shown_rows(sampled)
    np.testing.assert_array_equal(rows["item_id"].numpy().reshape(-1), lists["item_id"].numpy()[b[1::2], j[1::2]])
    assert np.all(rows["sample_weight"].numpy() > 0)
    np.testing.assert_allclose(stage(sampled).numpy(), stage(lists).numpy())  # the cascade sees every candidate
