"""Tests for models/export.py: the baseline DNN's serving_default and the shared presence check."""
import numpy as np
import pytest
import tensorflow as tf

from cascade_ranking.models import export
from cascade_ranking.models.baseline_ranker import BaselineRanker
from cascade_ranking.models.config import TrainerConfig
from cascade_ranking.schema import features as F
from tests.test_ranker_export import make_rows, parse, serialize


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    tf.keras.utils.set_random_seed(0)
    rows = make_rows(40, seed=3)
    parsed = parse([serialize(r) for r in rows])
    model = BaselineRanker(TrainerConfig(embedding_dim=4, hidden_units=(8,)))
    model.embedding.adapt(tf.data.Dataset.from_tensors(parsed), steps=1)
    model(parsed)
    export_dir = str(tmp_path_factory.mktemp("baseline") / "1")
    export.export_saved_model(model, export_dir, [serialize(r) for r in rows[:4]])
    return model, tf.saved_model.load(export_dir).signatures["serving_default"], rows


def test_served_ctr_is_the_model_output(baseline):
    model, serve, rows = baseline
    serialized = [serialize(r) for r in rows]
    out = serve(examples=tf.constant(serialized))
    logit = model(parse(serialized)).numpy()[:, 0]
    np.testing.assert_allclose(out["logit"].numpy(), logit, atol=1e-5)
    np.testing.assert_allclose(out["ctr"].numpy(), 1 / (1 + np.exp(-logit)), atol=1e-6)


@pytest.mark.parametrize("feature", ["query_tokens", "item_tags", "item_dense", "user_id"])
def test_missing_required_feature_error_names_it(baseline, feature):
    _, serve, rows = baseline
    # A variable-length feature that is absent parses as an empty list: without the check the
    # model would silently serve a prediction for an empty query.
    assert F.serving_parse_spec()[feature] is not None and export.required_values(feature) == 1
    good = serialize(rows[0])
    bad = serialize({k: v for k, v in rows[1].items() if k != feature})
    with pytest.raises(tf.errors.InvalidArgumentError, match=feature):
        serve(examples=tf.constant([good, bad]))
    serve(examples=tf.constant([good]))  # still serves complete examples


def test_parse_examples_checks_only_required_ragged_features():
    spec = {"query_tokens": tf.io.RaggedFeature(tf.int64), "hour": tf.io.FixedLenFeature([1], tf.int64)}
    empty = serialize({"hour": [3]})
    with pytest.raises(tf.errors.InvalidArgumentError, match="query_tokens"):
        export.parse_examples(tf.constant([empty]), spec)
    assert export.required_values("teacher_logit") == 0  # optional: never checked
    assert export.required_values("not_a_feature") == 0
    parsed = export.parse_examples(tf.constant([serialize({"hour": [3], "query_tokens": [5, 6]})]), spec)
    assert parsed["query_tokens"].to_list() == [[5, 6]]
