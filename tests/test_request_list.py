"""Request-list packing, parsing and flattening back to candidate rows."""
import math

import numpy as np
import pytest
import tensorflow as tf

from cascade_ranking.datasources import example_io, synthetic
from cascade_ranking.schema import features as F
from cascade_ranking.schema import request_list as RL


def _rows_of_request(seed=0, request=0):
    world = synthetic.World(synthetic.SyntheticConfig(num_requests=1, seed=seed))
    columns = synthetic.generate_request(world, request)
    return [{k: (v[i] if isinstance(v, list) else v[i]) for k, v in columns.items()} for i in range(50)]


def test_round_trip_through_tf_example_keeps_every_candidate():
    rows = _rows_of_request()
    rows.append(dict(rows[0], stage="random_neg", item_id=77, click=0, ui_position=0, sampling_probability=0.01))
    packed = RL.build_request_list(rows)
    serialized = example_io.make_example(packed).SerializeToString()
    parsed = tf.io.parse_example([serialized, serialized], RL.parse_spec())
    flat = RL.flatten_to_candidates(parsed)
    n = RL.LIST_SIZE
    assert flat["item_id"].shape == (2 * n, 1)
    mask = flat["mask"].numpy().reshape(-1)
    assert mask.sum() == 2 * 51 and mask[51:n].sum() == 0
    for i, row in enumerate(rows):
        assert flat["item_id"][i, 0] == row["item_id"]
        assert flat["click"][i, 0] == row["click"]
        assert RL.TIERS[flat["stage"][i, 0]] == (row["stage"].decode() if isinstance(row["stage"], bytes) else row["stage"])
        np.testing.assert_allclose(flat["item_dense"][i].numpy(), row["item_dense"], rtol=1e-6)
        assert list(flat["item_tags"][i].numpy()) == list(row["item_tags"])
        assert list(flat["query_tokens"][i].numpy()) == list(rows[0]["query_tokens"])
        assert flat["user_id"][i, 0] == rows[0]["user_id"]
    assert float(flat["sampling_probability"][50, 0]) == pytest.approx(0.01)
    assert flat["sampling_probability"][0, 0] == 1.0  # default for logged candidates
    assert math.isnan(flat["teacher_logit"][0, 0])  # no teacher yet
    assert flat["stage"][55, 0] == RL.PAD_STAGE
    # The flattened candidates feed the candidate-level parse layout: same model inputs.
    assert set(F.MODEL_INPUTS) <= set(flat)


def test_rows_of_two_requests_or_too_many_rows_are_refused():
    a, b = _rows_of_request(request=0), _rows_of_request(request=1)
    with pytest.raises(ValueError, match="several requests"):
        RL.build_request_list(a[:3] + b[:3])
    with pytest.raises(ValueError, match="do not fit"):
        RL.build_request_list(a, list_size=40)
