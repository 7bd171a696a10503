"""`models.trainers.warm_start`: a Trainer given a base model continues from it (weights, optimizer
steps and slots, bias-constraint duals, the cross ramp), trains its warm-start epochs, and records
its span; a base model of another architecture is not used, and the run says so.

The Trainer modules run at tiny scale on two "spans" (request lists of two seeds), the second run
getting the first's Format-Serving directory as `fn_args.base_model`, as TFX's Trainer passes it.
"""
import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from tfx.components.trainer.fn_args_utils import FnArgs

from cascade_ranking.models import list_inputs as LI
from cascade_ranking.models.trainers import cascade, retrieval, teacher, warm_start
from tests.component_fixtures import request_list_splits, synthetic_examples

pytestmark = pytest.mark.slow
LIST_SIZE = 60


@pytest.fixture(scope="module")
def spans(tmp_path_factory):
    """Request lists of two spans (40 requests each, other seeds)."""
    root = tmp_path_factory.mktemp("warm_spans")
    return [request_list_splits(root / f"span-{k}", num_requests=40, seed=20 + k, list_size=LIST_SIZE)
            for k in (1, 2)]


def _fn_args(data, out, custom_config, span, base=None):
    return FnArgs(train_files=[str(data / "Split-train" / "*")], eval_files=[str(data / "Split-eval" / "*")],
                  serving_model_dir=str(out / "model" / "Format-Serving"), model_run_dir=str(out / "model_run"),
                  custom_config={**custom_config, warm_start.WARM_START_KEY: json.dumps({"span": span, "epochs": 1})},
                  base_model=str(base / "model" / "Format-Serving") if base else None)


def _values(variables):
    return [np.array(v.numpy()) for v in variables]


def _capture(monkeypatch, batch=None):
    """Records each run's model at save time and, at restore (before the first step), its
    variables, whether it restored, and its loss on `batch` when given."""
    record = {"saved": [], "restored": [], "loss": []}
    real_save, real_restore = warm_start.save, warm_start.restore

    def save(model, fn_args):
        record["saved"].append(model)
        return real_save(model, fn_args)

    def restore(model, fn_args, name):
        done = real_restore(model, fn_args, name)
        record["restored"].append((done, _values(model.variables), model))
        record.setdefault("trainable", []).append(_values(model.trainable_variables))
        if batch is not None:
            record["loss"].append(float(model.compute_terms(batch, training=False)["loss"]))
        return done

    monkeypatch.setattr(warm_start, "save", save)
    monkeypatch.setattr(warm_start, "restore", restore)
    return record


def test_the_cascade_continues_from_the_base_model(spans, tmp_path, monkeypatch, capsys):
    span2_lists = next(cascade.iterate_lists([str(spans[1] / "Split-train" / "*")], LIST_SIZE, 8))
    batch = next(iter(LI.dataset_from_lists(span2_lists, 8)))  # the first batch of span 2, in file order
    record = _capture(monkeypatch, batch)
    config = {cascade.CONFIG_KEY: json.dumps({"epochs": 2, "batch_size": 8}),
              cascade.RANKER_KEY: json.dumps({"bias_start_step": 0, "bias_ramp_steps": 1})}  # duals move at once
    first = _fn_args(spans[0], tmp_path / "span1", config, span=1)
    cascade.run_fn(first)
    base = record["saved"][0]
    base_values = _values(base.variables)
    base_stage = base.ranking_stage
    base_steps = int(base_stage.optimizer.iterations.numpy())
    base_duals = base_stage.ranker.bias_constraints.duals.numpy().copy()
    assert base_steps > 0 and np.abs(base_duals).sum() > 0  # the duals moved during span 1
    info = json.loads((tmp_path / "span1" / "model" / "checkpoint" / "warm_start.json").read_text())
    assert info["span"] == 1 and info["optimizer_steps"] == int(base.optimizer.iterations.numpy())

    second = _fn_args(spans[1], tmp_path / "span2", config, span=2, base=tmp_path / "span1")
    cascade.run_fn(second)
    done, restored_values, model = record["restored"][1]
    assert done and "Trainer.cascade: warm start from" in capsys.readouterr().out
    # Every variable starts at the base model's value: weights, optimizer steps and slots, duals, ramp.
    assert len(restored_values) == len(base_values)
    for restored, original in zip(restored_values, base_values):
        np.testing.assert_array_equal(restored, original)
    # One pass over span 2: the ranker's step counter (the curriculum's t) went on from span 1's.
    span2_steps = int(model.ranking_stage.optimizer.iterations.numpy()) - base_steps
    assert 0 < span2_steps <= base_steps // 2 + 1  # one pass (warm_start epochs 1) of a like span, not the config's two
    assert int(model.ranking_stage.ranker.cross.step.numpy()) == base_steps + span2_steps
    # The first step on span 2 starts from span 1's loss on that data, not from a fresh model's.
    fresh_loss, warm_loss = record["loss"]  # at the restore of run 1 (nothing to restore) and of run 2
    base_loss = float(base.compute_terms(batch, training=False)["loss"])
    assert warm_loss == pytest.approx(base_loss, rel=1e-5)
    assert abs(fresh_loss - base_loss) > 1e-2


def test_another_architecture_trains_afresh_and_says_so(spans, tmp_path, monkeypatch, capsys):
    record = _capture(monkeypatch)
    first = _fn_args(spans[0], tmp_path / "span1", {cascade.CONFIG_KEY: json.dumps({"epochs": 1, "batch_size": 8})},
                     span=1)
    cascade.run_fn(first)
    wider = {cascade.CONFIG_KEY: json.dumps({"epochs": 1, "batch_size": 8, "embedding_dim": 8})}
    cascade.run_fn(_fn_args(spans[1], tmp_path / "span2", wider, span=2, base=tmp_path / "span1"))
    done, _, model = record["restored"][1]
    assert not done
    out = capsys.readouterr().out
    assert "Trainer.cascade: trained afresh:" in out and "another architecture" in out
    steps = int(model.ranking_stage.optimizer.iterations.numpy())
    assert steps == int(record["saved"][0].ranking_stage.optimizer.iterations.numpy())  # one epoch each, from 0


@pytest.mark.parametrize("name", ["retrieval", "teacher"])
def test_the_other_trainers_warm_start_too(name, spans, tmp_path, monkeypatch):
    record = _capture(monkeypatch)
    if name == "retrieval":
        module, config, data = retrieval, {retrieval.CONFIG_KEY: json.dumps(
            {"epochs": 2, "batch_size": 64, "num_negatives": 16, "top_k": 10})}, spans
    else:
        module, config = teacher, {teacher.CONFIG_KEY: json.dumps({"epochs": 2, "batch_size": 64})}
        data = [pathlib.Path(synthetic_examples(str(tmp_path / f"rows{k}"), num_requests=30, seed=k).uri)
                for k in (1, 2)]
    module.run_fn(_fn_args(data[0], tmp_path / "span1", config, span=1))
    base_values = _values(record["saved"][0].trainable_variables)  # (Keras adds its metrics' in the first step)
    base_steps = int(record["saved"][0].optimizer.iterations.numpy())
    module.run_fn(_fn_args(data[1], tmp_path / "span2", config, span=2, base=tmp_path / "span1"))
    done, _, model = record["restored"][1]
    assert done
    restored_values = record["trainable"][1]
    assert len(restored_values) == len(base_values)
    for restored, original in zip(restored_values, base_values):
        np.testing.assert_array_equal(restored, original)
    assert 0 < int(model.optimizer.iterations.numpy()) - base_steps <= base_steps // 2 + 1  # one epoch of two
