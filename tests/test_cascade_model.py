"""Request-list inputs (models/list_inputs.py) and the joint cascade model (models/cascade_model.py)."""
import os

import numpy as np
import pytest
import tensorflow as tf

from datasources import example_io, synthetic
from models import cascade_model as CM
from models import lcron
from models import list_inputs as LI
from models.preranking import LightPreranker, StrongRanker
from models.retrieval import TwoTowerScorer
from schema import request_list as RL


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


@pytest.mark.slow
def test_train_cascade_keeps_the_best_validation_epoch(lists):
    train, valid = LI.take_lists(lists, slice(0, 40)), LI.take_lists(lists, slice(40, None))
    model = CM.train_cascade(train, "lcron", epochs=3, batch_size=8, embedding_dim=4,
                             stages=_small_stages(), valid_lists=valid, valid_quotas=(40, 30, 20))
    assert len(model.history_) == 3
    scores = model.predict_stage_scores(valid)
    metrics = CM.evaluate_cascade(scores, valid, (40, 30, 20), model.stage_names)
    assert metrics["e2e_recall"] == pytest.approx(max(model.history_))
    assert set(metrics) == {"e2e_recall", "recall_retrieval@40", "recall_prerank@30", "recall_rank@20", "ndcg@10_rank"}


def test_bad_configuration_raises_value_error():
    with pytest.raises(ValueError, match="method must be one of"):
        CM.CascadeModel(_small_stages(), method="softmax")
    with pytest.raises(ValueError, match="tau must be > 0"):
        CM.CascadeModel(_small_stages(), tau=0.0)
    with pytest.raises(ValueError, match="quota has 2 entries but there are 3 stages"):
        CM.CascadeModel(_small_stages(), quota=[10, 10])
    with pytest.raises(ValueError, match="label must be"):
        CM.cascade_labels({"mask": np.ones((1, 2)), "stage": np.zeros((1, 2))}, "rating")
