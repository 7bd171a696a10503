"""Tests for models/ranker_export.py: signatures of the reloaded SavedModel against the in-memory model."""
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from cascade_ranking.datasources.example_io import make_example
from cascade_ranking.models import export, ranker, ranker_export
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.schema import features as F

SMALL = dict(embedding_dim=4, cross_layers=1, cross_projection_dim=4, cross_ramp_steps=10, hidden_units=(16, 8),
             qu_dim=4, ui_hidden_units=(4,), rank_start_step=0, bias_start_step=0)
INPUTS = ("user_id", "query_tokens", "hour", "device", "item_id", "item_category", "item_tags", "user_dense",
          "item_dense", "ui_position", "ui_format")


def make_rows(n, seed=0):
    """n candidate rows (10 per request) as python dicts with every training feature."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        item_dense = rng.normal(size=4)
        position = 1 + i % 10
        logit = 1.5 * item_dense[0] - 0.25 * (position - 1) - 0.8
        rows.append({
            "request_id": [i // 10], "request_time": [i // 10 * 30], "stage": ["rerank_pos"],
            "user_id": [int(rng.integers(0, 40))], "query_tokens": [int(t) for t in rng.integers(1, 20, 2)],
            "hour": [int(rng.integers(0, 24))], "device": [int(rng.integers(0, 3))],
            "item_id": [int(rng.integers(0, 100))], "item_category": [int(rng.integers(0, 10))],
            "item_tags": [int(t) for t in rng.integers(1, 30, 1 + i % 3)],
            "user_dense": [float(x) for x in rng.normal(size=4)], "item_dense": [float(x) for x in item_dense],
            "ui_position": [position], "ui_format": [int(rng.integers(0, F.NUM_UI_FORMATS))],
            "click": [int(rng.random() < 1 / (1 + np.exp(-logit)))],
        })
    return rows


def serialize(row, **replace):
    return make_example({**row, **replace}).SerializeToString()


def parse(serialized):
    return tf.io.parse_example(tf.constant(serialized), F.serving_parse_spec())


def train_and_export(config, export_dir, steps=20):
    rows = make_rows(400, seed=1)
    serialized = [serialize(r) for r in rows]
    train = tf.data.Dataset.from_tensor_slices(serialized).batch(100).map(
        lambda s: tf.io.parse_example(s, F.training_parse_spec())).repeat()
    model = ranker.FactoryFloorRanker(config)
    model.adapt(train, steps=4)
    model.compile()
    model.fit(train, steps_per_epoch=steps, epochs=1, verbose=0)
    ranker_export.export_ranker(model, export_dir, serialized[:16])
    return model, rows


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tf.keras.utils.set_random_seed(0)
    export_dir = str(tmp_path_factory.mktemp("ranker") / "serving" / "1")
    model, _ = train_and_export(RankerConfig(**SMALL), export_dir)
    return model, tf.saved_model.load(export_dir), export_dir


@pytest.fixture(scope="module")
def rows():
    return make_rows(60, seed=7)


def test_signatures_and_trained_cross_alpha(exported):
    model, loaded, _ = exported
    assert set(loaded.signatures) == {"serving_default", "quality", "ui", "score_ui_grid"}
    assert float(model.cross_step()) == 1.0  # 20 steps > ramp of 10: the served α is 1


def test_reloaded_model_predicts_like_the_in_memory_model(exported, rows):
    model, loaded, _ = exported
    serialized = [serialize(r) for r in rows]
    out = loaded.signatures["serving_default"](examples=tf.constant(serialized))
    features = parse(serialized)
    np.testing.assert_allclose(out["logit"].numpy(), model(features).numpy()[:, 0], atol=1e-5)
    np.testing.assert_allclose(out["ctr"].numpy(), model.predict_ctr(features).numpy(), atol=1e-6)
    np.testing.assert_allclose(loaded.signatures["quality"](examples=tf.constant(serialized))["q"].numpy(),
                               model.quality(features).numpy(), atol=1e-5)
    np.testing.assert_allclose(loaded.signatures["ui"](examples=tf.constant(serialized))["u"].numpy(),
                               model.ui(features).numpy(), atol=1e-5)


def grid(loaded, ad_examples, treatments):
    """score_ui_grid on serialized ads and (position, format) treatments given as int64 vectors."""
    return loaded.signatures["score_ui_grid"](
        ad_examples=tf.constant(ad_examples), ui_position=tf.constant([p for p, _ in treatments], tf.int64),
        ui_format=tf.constant([f for _, f in treatments], tf.int64))


def test_score_ui_grid_equals_serving_default_per_pair(exported, rows):
    _, loaded, _ = exported
    ads = rows[:7]
    # Every position and format of the schema's domains (values outside them are rejected: see below).
    treatments = [(p, f) for p in range(F.MAX_UI_POSITION + 1) for f in range(F.NUM_UI_FORMATS)]
    grid_out = grid(loaded, [serialize(a) for a in ads], treatments)
    assert grid_out["ctr"].shape == (len(ads), len(treatments))
    pairs = [serialize(a, ui_position=[p], ui_format=[f]) for a in ads for p, f in treatments]
    naive = loaded.signatures["serving_default"](examples=tf.constant(pairs))
    naive_ctr = naive["ctr"].numpy().reshape(len(ads), len(treatments))
    assert np.abs(grid_out["ctr"].numpy() - naive_ctr).max() < 1e-5
    assert np.abs(grid_out["logit"].numpy() - naive["logit"].numpy().reshape(naive_ctr.shape)).max() < 1e-4
    assert naive_ctr.std(axis=1).min() > 0  # the UI treatment matters


def test_ui_only_change_leaves_q_unchanged_and_grid_is_tau_of_dot(exported, rows):
    model, loaded, _ = exported
    a = [serialize(r) for r in rows[:10]]
    treatments = [(1 + (r["ui_position"][0] + 4) % 10, (r["ui_format"][0] + 1) % 3) for r in rows[:10]]
    b = [serialize(r, ui_position=[p], ui_format=[f]) for r, (p, f) in zip(rows[:10], treatments)]
    q_a = loaded.signatures["quality"](examples=tf.constant(a))["q"].numpy()
    q_b = loaded.signatures["quality"](examples=tf.constant(b))["q"].numpy()
    np.testing.assert_array_equal(q_a, q_b)
    u_a = loaded.signatures["ui"](examples=tf.constant(a))["u"].numpy()
    u_b = loaded.signatures["ui"](examples=tf.constant(b))["u"].numpy()
    assert np.abs(u_a - u_b).max() > 1e-4
    # ctr[a, m] = σ(scale·(q_a·u_m) + bias), by hand from the two towers' outputs (the grid's cached U
    # must equal the `ui` signature's).
    scale, bias = float(model.transfer_scale.numpy()), float(model.transfer_bias.numpy())
    by_hand = 1 / (1 + np.exp(-(scale * q_a.astype(np.float64) @ u_b.T.astype(np.float64) + bias)))
    np.testing.assert_allclose(grid(loaded, a, treatments)["ctr"].numpy(), by_hand, atol=1e-5)


def test_ui_table_rows_are_the_u_tower_on_folded_ids(exported):
    model, _, _ = exported
    table = ranker_export.ui_table(model).numpy()
    n_pos, n_fmt = F.MAX_UI_POSITION + 1, F.NUM_UI_FORMATS
    assert table.shape == (n_pos * n_fmt, model.config.qu_dim)
    pos = np.array([0, 3, 10, 11, 25, -1])
    fmt = np.array([2, 0, 1, 5, 2, 0])
    rows = ranker_export.ui_table_rows([tf.constant(pos), tf.constant(fmt)], [n_pos, n_fmt]).numpy()
    np.testing.assert_array_equal(rows, (pos % n_pos) * n_fmt + fmt % n_fmt)  # numpy % is floor-mod too
    u = model.ui({"ui_position": tf.constant(pos[:, None]), "ui_format": tf.constant(fmt[:, None])}).numpy()
    np.testing.assert_allclose(table[rows], u, atol=1e-6)


def test_grid_without_the_ui_cache_runs_the_u_tower_and_agrees(exported, rows, monkeypatch):
    model, _, _ = exported
    ads = tf.constant([serialize(r) for r in rows[:5]])
    pos, fmt = tf.constant([1, 4, 10], tf.int64), tf.constant([0, 2, 1], tf.int64)
    cached = ranker_export.ranker_signatures(model)["score_ui_grid"](ads, pos, fmt)
    monkeypatch.setattr(ranker_export, "MAX_UI_TABLE_ROWS", 0)
    assert ranker_export.ui_table(model) is None
    tower = ranker_export.ranker_signatures(model)["score_ui_grid"](ads, pos, fmt)
    np.testing.assert_allclose(tower["logit"].numpy(), cached["logit"].numpy(), atol=1e-5)


def _schema_allowing_nan():
    """The packaged schema with disallow_nan dropped from every feature (a user's --schema-file)."""
    schema = F.load_schema().__deepcopy__()
    for feature in schema.feature:
        if feature.HasField("float_domain"):
            feature.float_domain.ClearField("disallow_nan")
    return schema


def test_nan_dense_input_is_rejected_naming_the_feature_unless_the_schema_allows_nan(exported, rows):
    model, loaded, _ = exported
    nan_rows = [serialize(r, user_dense=[float("nan")] * 4) for r in rows[:5]]
    for signature, key in (("serving_default", "examples"), ("quality", "examples")):
        with pytest.raises(tf.errors.InvalidArgumentError, match="user_dense has a NaN value"):
            loaded.signatures[signature](**{key: tf.constant(nan_rows)})
    with pytest.raises(tf.errors.InvalidArgumentError, match="user_dense has a NaN value"):
        grid(loaded, nan_rows, [(1, 0)])
    # A schema without disallow_nan: NaN becomes 0, as in training, and the output is finite.
    allowing = ranker_export.ranker_signatures(model, schema=_schema_allowing_nan())
    nan_rows = [serialize(r, user_dense=[float("nan")] * 4, item_dense=[1.0, float("nan"), 0.0, 2.0]) for r in rows[:5]]
    out = allowing["serving_default"](tf.constant(nan_rows))
    assert all(np.isfinite(t.numpy()).all() for t in out.values())
    zeros = [serialize(r, user_dense=[0.0] * 4, item_dense=[1.0, 0.0, 0.0, 2.0]) for r in rows[:5]]
    np.testing.assert_allclose(out["logit"].numpy(), allowing["serving_default"](tf.constant(zeros))["logit"].numpy(),
                               atol=1e-6)


@pytest.mark.parametrize("feature,value", [("ui_position", 99), ("ui_position", -1), ("ui_format", 3), ("hour", 24),
                                           ("item_id", -5)])
def test_a_value_outside_the_schema_domain_is_rejected_naming_the_feature(exported, rows, feature, value):
    _, loaded, _ = exported
    good, bad = serialize(rows[0]), serialize(rows[1], **{feature: [value]})
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"{feature} has a value outside its schema domain"):
        loaded.signatures["serving_default"](examples=tf.constant([good, bad]))
    loaded.signatures["serving_default"](examples=tf.constant([good]))  # in-domain requests still serve


@pytest.mark.parametrize("position,fmt,feature", [(99, 0, "ui_position"), (1, 7, "ui_format")])
def test_the_grid_rejects_ui_treatments_outside_the_schema_domain(exported, rows, position, fmt, feature):
    _, loaded, _ = exported
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"{feature} has a value outside its schema domain"):
        grid(loaded, [serialize(rows[0])], [(1, 0), (position, fmt)])


@pytest.mark.parametrize("signature,key,feature", [
    ("serving_default", "examples", "item_dense"),
    ("serving_default", "examples", "user_id"),
    ("quality", "examples", "query_tokens"),
    ("ui", "examples", "ui_format"),
])
def test_missing_required_feature_error_names_it(exported, rows, signature, key, feature):
    _, loaded, _ = exported
    row = {k: v for k, v in rows[0].items() if k != feature}
    with pytest.raises(tf.errors.InvalidArgumentError, match=feature):
        loaded.signatures[signature](**{key: tf.constant([serialize(row)])})


@pytest.mark.parametrize("feature", ["query_tokens", "item_dense"])
def test_grid_missing_required_ad_feature_error_names_it(exported, rows, feature):
    _, loaded, _ = exported
    row = {k: v for k, v in rows[0].items() if k != feature}
    with pytest.raises(tf.errors.InvalidArgumentError, match=feature):
        grid(loaded, [serialize(rows[1]), serialize(row)], [(1, 0)])


@pytest.mark.parametrize("feature,value", [("user_id", [1.5]), ("item_dense", [1, 2, 3, 4]), ("ui_position", ["x"])])
def test_wrong_dtype_error_names_the_feature(exported, rows, feature, value):
    _, loaded, _ = exported
    with pytest.raises(tf.errors.InvalidArgumentError, match=feature):
        loaded.signatures["serving_default"](examples=tf.constant([serialize(rows[0], **{feature: value})]))


def test_bias_duals_are_not_in_the_saved_model(exported):
    model, loaded, export_dir = exported
    assert model.bias_constraints is not None
    assert np.abs(model.bias_constraints.duals.numpy()).max() > 0  # they were trained
    saved = [name for name, _ in tf.train.list_variables(os.path.join(export_dir, "variables", "variables"))]
    assert not any("dual" in name for name in saved)
    reader = tf.train.load_checkpoint(os.path.join(export_dir, "variables", "variables"))
    stored = {(tuple(reader.get_tensor(name).shape), reader.get_tensor(name).tobytes()) for name in saved
              if name.endswith("VARIABLE_VALUE")}
    assert all((tuple(v.shape), v.numpy().tobytes()) in stored for v in model.variables)  # every weight, as trained


def test_warmup_requests_cover_every_signature_and_replay(exported):
    _, loaded, export_dir = exported
    path = os.path.join(export_dir, export.WARMUP_FILE)
    logs = [prediction_log_pb2.PredictionLog.FromString(r)
            for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]
    names = [log.predict_log.request.model_spec.signature_name for log in logs]
    assert sorted(names) == sorted(loaded.signatures)
    for log in logs:
        request = log.predict_log.request
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        out = loaded.signatures[request.model_spec.signature_name](**{k: tf.constant(v) for k, v in inputs.items()})
        assert all(np.isfinite(t.numpy()).all() for t in out.values())
    assert not [d for d in os.listdir(os.path.dirname(export_dir)) if d.startswith(".export-")]


def test_plain_head_model_exports_serving_default_only(tmp_path, rows):
    config = RankerConfig(**{**SMALL, "qu_dim": 0, "cross_layers": 0, "bias_constraints": False})
    export_dir = str(tmp_path / "plain" / "1")
    model, _ = train_and_export(config, export_dir, steps=3)
    loaded = tf.saved_model.load(export_dir)
    assert list(loaded.signatures) == ["serving_default"]
    serialized = [serialize(r) for r in rows]
    out = loaded.signatures["serving_default"](examples=tf.constant(serialized))
    np.testing.assert_allclose(out["ctr"].numpy(), model.predict_ctr(parse(serialized)).numpy(), atol=1e-6)
