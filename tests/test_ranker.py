"""Tests for models/ranker.py and models/ranker_config.py against hand computations in numpy."""
import json

import numpy as np
import pytest
import tensorflow as tf

from cascade_ranking.datasources.example_io import make_example
from cascade_ranking.models import lspr, metrics, ranker
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.schema import features as F

SMALL = dict(embedding_dim=4, cross_layers=1, cross_projection_dim=4, cross_ramp_steps=10, hidden_units=(16, 8),
             qu_dim=4, ui_hidden_units=(4,))


def make_rows(n_requests, seed=0, rows_per_request=10, teacher=True):
    """Request-contiguous candidate rows with a known click model, as a dict of numpy arrays/lists."""
    rng = np.random.default_rng(seed)
    n = n_requests * rows_per_request
    user = np.repeat(rng.integers(0, 50, n_requests), rows_per_request)
    user_dense = np.repeat(rng.normal(size=(n_requests, 4)), rows_per_request, axis=0).astype(np.float32)
    item_dense = rng.normal(size=(n, 4)).astype(np.float32)
    position = np.tile(np.arange(1, rows_per_request + 1), n_requests) % (F.MAX_UI_POSITION + 1)
    ui_format = rng.integers(0, F.NUM_UI_FORMATS, n)
    true_logit = 1.5 * item_dense[:, 0] + user_dense[:, 0] * item_dense[:, 1] - 0.25 * (position - 1) - 0.8
    click = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(np.int64)
    tags = [list(rng.integers(1, 30, rng.integers(1, 4))) for _ in range(n)]
    query = np.repeat(np.arange(n_requests), rows_per_request)
    return {
        "request_id": np.repeat(np.arange(n_requests) + 1000 * seed, rows_per_request)[:, None].astype(np.int64),
        "request_time": np.repeat(np.arange(n_requests) * 30, rows_per_request)[:, None].astype(np.int64),
        "stage": [b"rerank_pos"] * n,
        "user_id": user[:, None].astype(np.int64),
        "query_tokens": [[1 + int(q) % 7, 2 + int(q) % 5] for q in query],
        "hour": rng.integers(0, 24, n)[:, None].astype(np.int64),
        "device": rng.integers(0, 3, n)[:, None].astype(np.int64),
        "item_id": rng.integers(0, 200, n)[:, None].astype(np.int64),
        "item_category": rng.integers(0, 10, n)[:, None].astype(np.int64),
        "item_tags": [[int(t) for t in ts] for ts in tags],
        "user_dense": user_dense,
        "item_dense": item_dense,
        "ui_position": position[:, None].astype(np.int64),
        "ui_format": ui_format[:, None].astype(np.int64),
        "click": click[:, None],
        "sample_weight": rng.uniform(0.5, 2.0, n)[:, None].astype(np.float32),
        "teacher_logit": np.where(rng.random(n) < 0.7, true_logit + rng.normal(size=n) * 0.3, np.nan)[:, None]
        .astype(np.float32) if teacher else None,
        "true_logit": true_logit,
    }


def to_tensors(rows, drop=()):
    out = {}
    for k, v in rows.items():
        if v is None or k in drop or k in ("true_logit", "stage"):
            continue
        out[k] = tf.ragged.constant(v, dtype=tf.int64) if k in ("query_tokens", "item_tags") else tf.constant(v)
    return out


def serialize(rows, i, drop=()):
    row = {k: (v[i] if not isinstance(v, np.ndarray) else v[i].reshape(-1).tolist()) for k, v in rows.items()
           if v is not None and k not in drop and k != "true_logit"}
    return make_example(row).SerializeToString()


def build(config, rows, step=0):
    model = ranker.FactoryFloorRanker(config)
    model.adapt(tf.data.Dataset.from_tensors(to_tensors(rows)), steps=1)
    model.compile()
    model(to_tensors(rows))  # builds every layer
    model.optimizer.iterations.assign(step)
    return model


@pytest.fixture(scope="module")
def rows():
    return make_rows(8, seed=1)


# ---- config ---------------------------------------------------------------------------------------
def test_config_json_round_trip_and_validation():
    config = RankerConfig(hidden_units=(32, 16), activation="smelu:0.5", rank_loss="multi_task", lspr=True)
    text = config.to_json()
    assert RankerConfig.from_json(text) == config
    assert RankerConfig.from_dict(json.loads(text)) == config
    assert json.loads(text)["hidden_units"] == [32, 16]
    with pytest.raises(ValueError, match=r"unknown RankerConfig field\(s\) no_such_switch"):
        RankerConfig.from_dict({"no_such_switch": 1})
    with pytest.raises(ValueError, match="rank_loss"):
        RankerConfig(rank_loss="listwise")
    with pytest.raises(ValueError, match="optimizer"):
        RankerConfig(optimizer="sgd")
    teacher = RankerConfig.teacher()
    assert teacher.embedding_dim > RankerConfig().embedding_dim
    assert len(teacher.hidden_units) > len(RankerConfig().hidden_units)
    assert teacher.distill_weight == 0.0
    assert RankerConfig().optimizer == "adagrad" and not RankerConfig().lspr


# ---- architecture ---------------------------------------------------------------------------------
def test_ui_features_change_only_u_and_head_is_affine_sigmoid_of_dot(rows):
    model = build(RankerConfig(**SMALL), rows, step=5)
    base = to_tensors(rows)
    other = dict(base)
    other["ui_position"] = tf.constant((rows["ui_position"] % 7) + 2)
    other["ui_format"] = tf.constant((rows["ui_format"] + 1) % F.NUM_UI_FORMATS)
    out_a, out_b = model.forward(base), model.forward(other)
    np.testing.assert_array_equal(out_a.q.numpy(), out_b.q.numpy())  # q identical
    assert np.abs(out_a.u.numpy() - out_b.u.numpy()).max() > 1e-4  # u changed
    np.testing.assert_array_equal(model.quality(base).numpy(), model.quality(other).numpy())
    # Only the UI features are read by `ui`, only the quality ones by `quality`.
    ui_only = {k: base[k] for k in F.UI_FEATURES}
    np.testing.assert_allclose(model.ui(ui_only).numpy(), out_a.u.numpy(), atol=1e-6)
    quality_only = {k: v for k, v in base.items() if k not in F.UI_FEATURES}
    np.testing.assert_allclose(model.quality(quality_only).numpy(), out_a.q.numpy(), atol=1e-6)
    # logit = a·(q·u) + b, ctr = σ(logit), by hand.
    a, b = float(model.transfer_scale.numpy()), float(model.transfer_bias.numpy())
    q, u = out_a.q.numpy().astype(np.float64), out_a.u.numpy().astype(np.float64)
    logit = a * (q * u).sum(-1) + b
    np.testing.assert_allclose(out_a.logit.numpy(), logit, atol=1e-5)
    np.testing.assert_allclose(model(base).numpy()[:, 0], logit, atol=1e-5)
    np.testing.assert_allclose(model.predict_ctr(base).numpy(), 1 / (1 + np.exp(-logit)), atol=1e-6)


def test_score_grid_equals_pairwise_forward(rows):
    model = build(RankerConfig(**SMALL), rows, step=20)
    base = to_tensors(rows)
    ads = {k: v[:5] for k, v in base.items()}
    treatments = [(p, f) for p in (1, 4, 9) for f in range(F.NUM_UI_FORMATS)]
    uis = {"ui_position": tf.constant([[p] for p, _ in treatments], tf.int64),
           "ui_format": tf.constant([[f] for _, f in treatments], tf.int64)}
    grid = model.score_grid(ads, uis).numpy()
    assert grid.shape == (5, len(treatments))
    for m, (p, f) in enumerate(treatments):
        pair = dict(ads)
        pair["ui_position"] = tf.fill([5, 1], tf.constant(p, tf.int64))
        pair["ui_format"] = tf.fill([5, 1], tf.constant(f, tf.int64))
        np.testing.assert_allclose(grid[:, m], model.predict_ctr(pair).numpy(), atol=1e-5)


def test_plain_head_without_factorisation_reads_ui_features(rows):
    config = RankerConfig(**{**SMALL, "qu_dim": 0, "cross_layers": 0, "rank_loss": "multi_task"})
    model = build(config, rows)
    assert not model.factorized and "ui_position" in model.quality_names
    out = model.forward(to_tensors(rows))
    assert out.q is None and out.logit.shape == (80,)
    assert np.abs(out.rank_logit.numpy() - out.logit.numpy()).max() > 1e-4  # its own head
    with pytest.raises(ValueError, match="qu_dim"):
        model.score_grid(to_tensors(rows), to_tensors(rows))


@pytest.mark.parametrize("activation,bottleneck", [("smelu:0.5", 4), ("relu", 0)])
def test_activation_and_bottleneck_switches(rows, activation, bottleneck):
    config = RankerConfig(**{**SMALL, "activation": activation, "bottleneck_rank": bottleneck})
    model = build(config, rows)
    kinds = {type(layer).__name__ for layer in model.hidden}
    assert kinds == ({"LowRankDense"} if bottleneck else {"Dense"})
    assert np.isfinite(model(to_tensors(rows)).numpy()).all()


def test_nan_dense_features_are_replaced_and_output_is_finite(rows):
    config = RankerConfig(**{**SMALL, "nan_replacement": 0.5})
    model = build(config, rows, step=3)
    base = to_tensors(rows)
    user_dense = rows["user_dense"].copy()
    user_dense[::3, 1] = np.nan
    with_nan = dict(base, user_dense=tf.constant(user_dense))
    replaced = dict(base, user_dense=tf.constant(np.where(np.isnan(user_dense), 0.5, user_dense)))
    got = model(with_nan).numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, model(replaced).numpy(), atol=1e-6)
    assert np.isfinite(model.quality(with_nan).numpy()).all()
    before = int(model.embedding.nan_count.numpy())
    model.train_step(with_nan)
    assert int(model.embedding.nan_count.numpy()) - before == int(np.isnan(user_dense).sum())
    # Default (nan_replacement 0): FeatureEmbedding replaces NaN by 0 itself.
    default = build(RankerConfig(**SMALL), rows, step=3)
    zeroed = dict(base, user_dense=tf.constant(np.where(np.isnan(user_dense), 0.0, user_dense)))
    got = default(with_nan).numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, default(zeroed).numpy(), atol=1e-6)
    all_nan = dict(base, user_dense=tf.fill([80, 4], float("nan")), item_dense=tf.fill([80, 4], float("nan")))
    assert np.isfinite(default.predict_ctr(all_nan).numpy()).all()
    assert np.isfinite(float(default.train_step(all_nan)["loss"]))


# ---- loss composition -----------------------------------------------------------------------------
def _bce(y, s):
    return np.maximum(s, 0) - s * y + np.log1p(np.exp(-np.abs(s)))


def _hand_data_loss(y, s, rank_s, w, rid, teacher, alpha, w_d, rank_on, distill_on):
    logistic = np.sum(w * _bce(y, s)) / y.size
    rank = 0.0
    if rank_on:
        for r in np.unique(rid):
            idx = np.flatnonzero(rid == r)
            for i in idx:
                for j in idx:
                    if y[i] > y[j]:
                        rank += w[i] * np.log1p(np.exp(-(rank_s[i] - rank_s[j])))
        rank /= y.size
    present = ~np.isnan(teacher)
    soft = 1 / (1 + np.exp(-np.where(present, teacher, 0.0)))
    distill = np.sum(np.where(present, w * _bce(soft, s), 0.0)) / present.sum() if distill_on else 0.0
    return (1 - alpha) * logistic + alpha * rank + w_d * distill, logistic, rank, distill


def _ramp(step, start, ramp):
    return float(np.clip((step - start) / ramp, 0.0, 1.0)) if ramp else float(step >= start)


VARIANTS = {
    "full": {},
    "no_rank": {"rank_loss": "none"},
    "multi_task": {"rank_loss": "multi_task"},
    "no_distill": {"distill_weight": 0.0},
    "no_bias": {"bias_constraints": False},
    "no_lspr": {"lspr": False},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_train_step_total_is_sum_of_hand_computed_terms(rows, variant):
    step = 15
    config = RankerConfig(**{
        **SMALL, "rank_alpha": 0.4, "rank_start_step": 5, "rank_ramp_steps": 20, "distill_weight": 0.7,
        "distill_start_step": 10, "distill_ramp_steps": 10, "bias_start_step": 0, "bias_ramp_steps": 30,
        "bias_alpha": 0.5, "bias_dual_lr": 0.1, "lspr": True, "lspr_noise_scale": 0.2, "lspr_dropout_rate": 0.25,
        "lspr_weight": 0.3, **VARIANTS[variant]})
    model = build(config, rows, step=step)
    batch = to_tensors(rows)
    y = rows["click"][:, 0].astype(np.float64)
    w = rows["sample_weight"][:, 0].astype(np.float64)
    rid = rows["request_id"][:, 0]
    teacher = rows["teacher_logit"][:, 0].astype(np.float64)
    alpha = 0.4 * _ramp(step, 5, 20) if config.rank_loss != "none" else 0.0
    w_d = config.distill_weight * _ramp(step, 10, 10)
    m = _ramp(step, 0, 30) if config.bias_constraints else 0.0
    assert 0 < alpha < 0.4 or config.rank_loss == "none"
    assert 0 < w_d < 0.7 or config.distill_weight == 0

    out = model.forward(batch, training=False, step=step)
    s, rank_s = out.logit.numpy().astype(np.float64), out.rank_logit.numpy().astype(np.float64)
    data, logistic, rank, distill = _hand_data_loss(y, s, rank_s, w, rid, teacher, alpha, w_d,
                                                    config.rank_loss != "none", config.distill_weight > 0)
    bias = 0.0
    if config.bias_constraints:
        duals = np.linspace(-0.3, 0.4, model.bias_constraints.num_slices)
        model.bias_constraints.duals.assign(duals.astype(np.float32))
        p = 1 / (1 + np.exp(-s))
        bucket = np.searchsorted(np.array(config.bias_ctr_boundaries), p, side="right")
        n_buckets = len(config.bias_ctr_boundaries) + 1
        category = rows["ui_position"][:, 0] + n_buckets
        r = np.zeros_like(duals)
        c = np.zeros_like(duals)
        for ids in (bucket, category):  # residuals and counts weighted by the rows' sample_weight
            np.add.at(r, ids, w * (y - p))
            np.add.at(c, ids, w)
        bias = m / y.size * np.sum(duals * r - 0.5 * 0.5 * duals ** 2 * c)
        expected_duals = duals + 0.1 * m / y.size * (r - 0.5 * duals * c)
    lspr_term = 0.0
    if config.lspr:
        embedded = model.embed(batch, model.feature_names)
        dense = {k: v for k, v in embedded.items() if k in ranker.DENSE_NAMES}
        sparse = {k: v for k, v in embedded.items() if k not in ranker.DENSE_NAMES}
        noisy, dropped = lspr.perturb_batch(dense, sparse, 0.2, 0.25, [config.lspr_seed, step])
        pert = model.forward_embedded({**noisy, **dropped}, step=step)
        lspr_term = 0.3 * _hand_data_loss(y, pert.logit.numpy().astype(np.float64),
                                          pert.rank_logit.numpy().astype(np.float64), w, rid, teacher, alpha, w_d,
                                          config.rank_loss != "none", config.distill_weight > 0)[0]
        assert np.abs(pert.logit.numpy() - s).max() > 1e-3  # the copy really is perturbed
    expected = data + bias + lspr_term

    before = [v.numpy().copy() for v in model.trainable_variables]
    for tracker in model.metrics:
        tracker.reset_state()
    logs = {k: float(v) for k, v in model.train_step(batch).items()}
    assert logs["loss"] == pytest.approx(expected, rel=2e-5, abs=1e-6)
    assert logs["logistic"] == pytest.approx(logistic, rel=2e-5)
    assert logs["rank"] == pytest.approx(rank, rel=2e-5, abs=1e-7)
    assert logs["distillation"] == pytest.approx(distill, rel=2e-5, abs=1e-7)
    assert logs["bias"] == pytest.approx(bias, rel=2e-5, abs=1e-7)
    assert logs["lspr"] == pytest.approx(lspr_term, rel=2e-5, abs=1e-7)
    assert logs["rank_weight"] == pytest.approx(alpha) and logs["distill_weight"] == pytest.approx(w_d)
    assert logs["bias_weight"] == pytest.approx(m)
    assert logs["cross_alpha"] == pytest.approx(min(1.0, step / 10))
    # Each switch that is off removes its term.
    if config.rank_loss == "none":
        assert logs["rank"] == 0 and logs["rank_weight"] == 0
    if config.distill_weight == 0:
        assert logs["distillation"] == 0
    if not config.bias_constraints:
        assert logs["bias"] == 0 and model.bias_constraints is None
    else:  # one ascent step on the duals, on the pre-update predictions
        np.testing.assert_allclose(model.bias_constraints.duals.numpy(), expected_duals, rtol=1e-4, atol=1e-7)
    if not config.lspr:
        assert logs["lspr"] == 0
    assert int(model.optimizer.iterations.numpy()) == step + 1
    assert int(model.cross.step.numpy()) == step + 1  # the served α follows training
    changed = [np.abs(a - v.numpy()).max() > 0 for a, v in zip(before, model.trainable_variables)]
    assert all(changed)


def test_missing_optional_features_take_defaults(rows):
    config = RankerConfig(**{**SMALL, "rank_start_step": 0, "distill_start_step": 0, "bias_start_step": 0})
    model = build(config, rows, step=50)
    full = to_tensors(rows)
    full["sample_weight"] = tf.ones_like(full["sample_weight"])
    full["teacher_logit"] = tf.fill(tf.shape(full["teacher_logit"]), float("nan"))
    explicit = model.loss_terms(full, step=50)
    missing = model.loss_terms(to_tensors(rows, drop=("sample_weight", "teacher_logit")), step=50)
    for name in ranker.LOSS_TERMS:
        assert float(missing[name]) == pytest.approx(float(explicit[name]), rel=1e-6, abs=1e-8)
    assert float(missing["distillation"]) == 0.0  # no teacher: no distillation term
    # Parsed from tf.Examples without the optional features: the schema defaults (1 and NaN).
    serialized = [serialize(rows, i, drop=("sample_weight", "teacher_logit")) for i in range(20)]
    parsed = tf.io.parse_example(serialized, F.training_parse_spec())
    np.testing.assert_array_equal(parsed["sample_weight"].numpy(), 1.0)
    assert np.isnan(parsed["teacher_logit"].numpy()).all()
    logs = model.train_step(parsed)
    assert np.isfinite(float(logs["loss"])) and float(logs["distillation"]) == 0.0


def test_tuple_batches_match_dict_batches(rows):
    config = RankerConfig(**{**SMALL, "rank_start_step": 0, "bias_constraints": False})
    model = build(config, rows, step=40)
    batch = to_tensors(rows)
    features = {k: v for k, v in batch.items() if k not in ("click", "sample_weight")}
    as_dict = model.loss_terms(batch, step=40)
    as_tuple = model.loss_terms((features, batch["click"], batch["sample_weight"]), step=40)
    assert float(as_tuple["loss"]) == pytest.approx(float(as_dict["loss"]), rel=1e-6)
    no_ids = {k: v for k, v in features.items() if k != "request_id"}
    with pytest.raises(ValueError, match="request_id"):
        model.loss_terms((no_ids, batch["click"]), step=40)


def test_precomputed_list_layout_gives_the_same_rank_loss(rows):
    config = RankerConfig(**{**SMALL, "rank_start_step": 0, "rank_ramp_steps": 0, "rank_alpha": 0.5})
    model = build(config, rows, step=40)
    shuffled = {k: tf.gather(v, np.random.default_rng(0).permutation(80)) for k, v in to_tensors(rows).items()}
    with_layout = ranker.add_list_layout(shuffled)
    assert with_layout[ranker.LIST_INDEX_KEY].shape == (8, 10)
    plain, precomputed = model.loss_terms(shuffled, step=40), model.loss_terms(with_layout, step=40)
    assert float(plain["rank"]) > 0
    for name in ("rank", "loss"):
        assert float(precomputed[name]) == pytest.approx(float(plain[name]), rel=1e-6)


def test_bias_duals_are_checkpointed_but_not_model_variables(rows, tmp_path):
    model = build(RankerConfig(**SMALL), rows)
    duals = model.bias_constraints.duals
    assert all(v is not duals for v in model.variables)
    assert not any("dual" in v.name for v in model.variables)
    values = np.linspace(-1.0, 2.0, model.bias_constraints.num_slices).astype(np.float32)
    duals.assign(values)
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    checkpoint_vars = [name for name, _ in tf.train.list_variables(path)]
    assert [n for n in checkpoint_vars if "dual" in n] == [f"model/{ranker.BIAS_CHECKPOINT_KEY}/duals/.ATTRIBUTES/VARIABLE_VALUE"]
    fresh = build(RankerConfig(**SMALL), rows)
    np.testing.assert_array_equal(fresh.bias_constraints.duals.numpy(), 0.0)
    tf.train.Checkpoint(model=fresh).read(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(fresh.bias_constraints.duals.numpy(), values)
    # Without bias constraints there is nothing extra to checkpoint.
    plain = build(RankerConfig(**{**SMALL, "bias_constraints": False}), rows)
    path = tf.train.Checkpoint(model=plain).write(str(tmp_path / "plain"))
    assert not any("dual" in name for name, _ in tf.train.list_variables(path))


class _Interrupt(tf.keras.callbacks.Callback):
    """Records the duals at the end of each epoch; raises at the start of epoch `at`."""

    def __init__(self, at=None):
        super().__init__()
        self.at, self.duals_at_epoch_end, self.duals_at_begin = at, {}, {}

    def on_epoch_begin(self, epoch, logs=None):
        self.duals_at_begin[epoch] = self.model.bias_constraints.duals.numpy().copy()
        if epoch == self.at:
            raise RuntimeError("interrupted")

    def on_epoch_end(self, epoch, logs=None):
        self.duals_at_epoch_end[epoch] = self.model.bias_constraints.duals.numpy().copy()


def test_backup_and_restore_resumes_the_bias_duals(rows, tmp_path):
    config = RankerConfig(**{**SMALL, "bias_start_step": 0, "bias_ramp_steps": 0, "bias_dual_lr": 5.0,
                             "ema_momentum": 0.0, "rank_loss": "none", "distill_weight": 0.0})
    data = tf.data.Dataset.from_tensors(to_tensors(rows)).repeat(2)

    def fit(callback, epochs):
        model = build(config, rows)
        model.compile(run_eagerly=True)  # a few tiny steps: cheaper than tracing the train step
        backup = tf.keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
        model.fit(data, epochs=epochs, verbose=0, callbacks=[backup, callback])

    first = _Interrupt(at=1)
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(first, epochs=3)  # epoch 0 is trained and backed up, then the run is killed
    saved = first.duals_at_epoch_end[0]
    assert np.abs(saved).max() > 0  # the duals moved in the epoch trained
    resumed = _Interrupt()
    fit(resumed, epochs=3)
    assert sorted(resumed.duals_at_begin) == [1, 2]  # epoch 0 was not trained again
    np.testing.assert_array_equal(resumed.duals_at_begin[1], saved)  # the duals resumed where they were


# ---- input pipeline -------------------------------------------------------------------------------
def test_request_batches_keep_requests_whole_and_shuffle_requests(tmp_path):
    rows = make_rows(30, seed=3, rows_per_request=7)
    rows["ui_position"][rows["ui_position"] == 7] = F.NOT_SHOWN_POSITION  # one unshown row each
    path = str(tmp_path / "data.gz")
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for i in range(rows["click"].shape[0]):
            writer.write(serialize(rows, i))
    plain = list(ranker.request_batches([path], requests_per_batch=4, exposed_only=True))
    shuffled = list(ranker.request_batches([path], requests_per_batch=4, shuffle_seed=1, exposed_only=True))
    for batches in (plain, shuffled):
        ids = [b["request_id"].numpy()[:, 0] for b in batches]
        assert sum(i.size for i in ids) == 30 * 6  # every shown row once
        for batch_ids in ids:
            values, counts = np.unique(batch_ids, return_counts=True)
            assert len(values) <= 4 and (counts == 6).all()  # whole requests, unshown rows dropped
        assert all((b["ui_position"].numpy() > 0).all() for b in batches)
        for b in batches:  # the request-list layout rides along: each list is one request's rows
            index, mask = b[ranker.LIST_INDEX_KEY].numpy(), b[ranker.LIST_MASK_KEY].numpy()
            listed = b["request_id"].numpy()[:, 0][index]
            assert mask.sum() == b["request_id"].shape[0]
            assert all(len(set(listed[r][mask[r]])) == 1 for r in range(index.shape[0]))
    order = lambda bs: [int(b["request_id"][0, 0]) for b in bs]  # noqa: E731
    assert order(plain) == sorted(order(plain)) and order(shuffled) != order(plain)


# ---- behaviour ------------------------------------------------------------------------------------
def test_request_batches_group_rows_by_request_id_whatever_the_file_order(tmp_path):
    """Rows of a request scattered over files and shuffled (as ExampleGen, RunInference and Beam
    leave them) still arrive together: the grouping is by request_id, never by file order."""
    rows = make_rows(12, seed=4, rows_per_request=5)
    order = np.random.default_rng(0).permutation(rows["click"].shape[0])
    paths = [str(tmp_path / f"part-{k}.gz") for k in range(2)]
    writers = [tf.io.TFRecordWriter(p, options="GZIP") for p in paths]
    for n, i in enumerate(order):
        writers[n % 2].write(serialize(rows, int(i)))
    for w in writers:
        w.close()
    batches = list(ranker.request_batches(paths, requests_per_batch=3, exposed_only=False))
    seen = []
    for b in batches:
        ids, counts = np.unique(b["request_id"].numpy()[:, 0], return_counts=True)
        assert (counts == 5).all()  # whole requests
        seen += ids.tolist()
    assert sorted(seen) == sorted(set(rows["request_id"][:, 0].tolist()))  # each request once


def test_training_a_few_hundred_steps_beats_the_constant_predictor():
    tf.keras.utils.set_random_seed(0)
    train_rows, test_rows = make_rows(600, seed=10), make_rows(200, seed=11)
    train = tf.data.Dataset.from_tensor_slices(
        {k: v for k, v in to_tensors(train_rows).items()}).batch(100)  # 10 whole requests per batch
    config = RankerConfig(**{**SMALL, "hidden_units": (32, 16), "rank_start_step": 50, "rank_ramp_steps": 100,
                             "distill_start_step": 50, "bias_start_step": 50, "learning_rate": 0.1})
    model = ranker.FactoryFloorRanker(config)
    model.adapt(train, steps=10)
    model.compile()
    test = to_tensors(test_rows)
    y = test_rows["click"][:, 0]
    before = metrics.log_loss(y, model.predict_ctr(test).numpy())
    history = model.fit(train, epochs=5, verbose=0)  # 300 steps
    p = model.predict_ctr(test).numpy()
    after = metrics.log_loss(y, p)
    assert int(model.optimizer.iterations.numpy()) == 300
    assert after < 0.8 * before
    assert metrics.normalized_entropy(y, p) < 0.9  # beats the base rate by > 10%
    assert metrics.auc(y, p) > 0.75
    assert history.history["logistic"][-1] < history.history["logistic"][0]


def test_the_feature_configs_buckets_stop_the_fold_and_survive_get_config():
    from cascade_ranking.schema import features as F

    features = F.FeatureConfig(buckets=(("item_id", 20_000),))
    wide = ranker.FactoryFloorRanker(RankerConfig(hidden_units=(8,), cross_projection_dim=4), features)
    narrow = ranker.FactoryFloorRanker(RankerConfig(hidden_units=(8,), cross_projection_dim=4))
    ids = tf.constant([5, 10_005], tf.int64)
    np.testing.assert_array_equal(*narrow.embedding.embed_sparse("item_id", ids).numpy())  # folded: the same row
    a, b = wide.embedding.embed_sparse("item_id", ids).numpy()
    assert np.abs(a - b).max() > 0
    assert wide.embedding.tables["item_id"].input_dim == 20_000 and wide.embedding.tables["user_id"].input_dim == 5_000
    assert ranker.FactoryFloorRanker.from_config(wide.get_config()).features == features
    with pytest.raises(ValueError, match="'itemid' is not a sparse model input"):
        F.FeatureConfig(buckets=(("itemid", 10),))
    with pytest.raises(ValueError, match="item_id needs a positive bucket count"):
        F.FeatureConfig(buckets=(("item_id", 0),))
