"""Tests for models/curriculum.py: linear ramps of the auxiliary loss weights."""

import pytest
import tensorflow as tf

from cascade_ranking.models import curriculum


@pytest.mark.parametrize("step,want", [
    (0, 0.0), (99, 0.0), (100, 0.0), (110, 0.2), (125, 0.5), (149, 0.98),
    (150, 1.0), (10_000, 1.0)])
def test_linear_ramp(step, want):
    assert float(curriculum.linear_ramp(step, 100, 50)) == pytest.approx(want)


@pytest.mark.parametrize("step,want", [(0, 0.0), (99, 0.0), (100, 1.0),
                                       (101, 1.0)])
def test_linear_ramp_without_ramp_is_a_step(step, want):
    assert float(curriculum.linear_ramp(step, 100, 0)) == want


def test_linear_ramp_on_tensors_in_graph():
    @tf.function
    def ramp(step):
        return curriculum.linear_ramp(step, 10, 40)
    got = ramp(tf.constant([0, 10, 30, 50, 90], tf.int64)).numpy()
    assert got.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])


def test_curriculum_weights_at_chosen_steps():
    cur = curriculum.Curriculum(
        rank=curriculum.Ramp(max_weight=0.5, start_step=0, ramp_steps=100),
        distillation=curriculum.Ramp(max_weight=2.0, start_step=50,
                                     ramp_steps=50),
        bias_constraint=curriculum.Ramp(max_weight=1.0, start_step=200))
    table = {  # step: (rank, distillation, bias_constraint)
        0: (0.0, 0.0, 0.0),
        50: (0.25, 0.0, 0.0),
        75: (0.375, 1.0, 0.0),
        100: (0.5, 2.0, 0.0),
        200: (0.5, 2.0, 1.0),
    }
    for step, (rank, distill, bias) in table.items():
        w = cur.weights(step)
        assert float(w["rank"]) == pytest.approx(rank)
        assert float(w["distillation"]) == pytest.approx(distill)
        assert float(w["bias_constraint"]) == pytest.approx(bias)


def test_default_curriculum_is_logistic_only():
    w = curriculum.Curriculum().weights(1_000_000)
    assert [float(v) for v in w.values()] == [0.0, 0.0, 0.0]


def test_from_config_round_trip():
    config = {"rank": {"max_weight": 0.3, "start_step": 5, "ramp_steps": 10}}
    cur = curriculum.Curriculum.from_config(config)
    assert float(cur.rank(10)) == pytest.approx(0.15)
    assert curriculum.Curriculum.from_config(cur.to_config()) == cur
    with pytest.raises(ValueError):
        curriculum.Curriculum.from_config({"ranking": {}})
    with pytest.raises(ValueError):
        curriculum.linear_ramp(0, 0, -1)
