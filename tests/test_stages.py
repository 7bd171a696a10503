"""The stage registry (`models.stages`): the three built-in stages in cascade order, the rules a
declaration must keep, and a new stage added as one folder, wired into the pipeline, the
CascadeEvaluator's channels, the config's checks and the blessing, with no other edit."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cascade_ranking.components import cascade_evaluator, evaluation
from cascade_ranking.models import stages
from cascade_ranking.models.config import ConfigError, to_dict
from cascade_ranking.pipelines.config import PipelineConfig


def test_the_built_in_stages_in_cascade_order():
    assert stages.names() == ("retrieval", "preranking", "ranking")
    assert stages.ctr_stage().name == "ranking"
    assert stages.required() == ("preranking", "ranking")  # ranking is required, pre-ranking shares its Trainer
    assert [t.name for t in stages.trainers(stages.names())] == ["retrieval", "cascade"]
    assert [t.name for t in stages.trainers(("preranking", "ranking"))] == ["cascade"]
    assert stages.get("preranking").model_source == ("StageModel.preranking", "stage_model")
    assert stages.get("ranking").model_source == ("Trainer.cascade", "model")


def test_the_evaluator_channels_and_defaults_come_from_the_declarations():
    spec = cascade_evaluator.CascadeEvaluatorSpec
    for stage in stages.registered():
        assert spec.INPUTS[stage.model_input].optional == (not stage.ctr)
        assert spec.INPUTS[stage.baseline_input].optional
        assert stage.blessing_output in spec.OUTPUTS
    config = evaluation.EvaluatorConfig()
    assert {t[0] for t in config.thresholds} == set(stages.names())
    assert {t[0] for t in config.change_thresholds} == set(stages.names())
    scored = {name: (signature, key) for name, signature, key in PipelineConfig().evaluator_config().score_outputs}
    assert scored == {"retrieval_model": ("score", "score"), "preranking_model": ("serving_default", "score"),
                      "model": ("serving_default", "score")}


def _stage(**changes):
    values = dict(name="a", order=1, label="a", model_input="a_model", blessing_output="a_blessing",
                  trainer=stages.StageTrainer("a", "m.run_fn"), ctr=True, optional=False)
    values.update(changes)
    return stages.Stage(**values)


@pytest.mark.parametrize("second, message", [
    (_stage(name="b", order=1, model_input="b_model", blessing_output="b_blessing", ctr=False), "share order"),
    (_stage(name="b", order=2, blessing_output="b_blessing", ctr=False), "share model_input"),
    (_stage(name="b", order=2, model_input="b_model", blessing_output="b_blessing"), "exactly one stage"),
    (_stage(name="b", order=2, model_input="b_model", blessing_output="b_blessing", ctr=False,
            trainer=stages.StageTrainer("a", "other.run_fn")), "two different Trainers named 'a'"),
])
def test_clashing_declarations_are_refused(second, message):
    with pytest.raises(stages.StageRegistryError, match=message):
        stages._check((_stage(), second))


def test_an_optional_ctr_stage_is_refused():
    with pytest.raises(stages.StageRegistryError, match="cannot be optional"):
        stages._check((_stage(optional=True),))


@pytest.mark.parametrize("stage_list, message", [
    (("retrieval", "ranking"), "every cascade trains preranking, ranking; add preranking"),
    (("ranking", "preranking"), "in cascade order"),
    (("retrieval", "rerank", "preranking", "ranking"), "unknown stage"),
])
def test_config_stages_are_checked_against_the_registry(stage_list, message):
    with pytest.raises(ConfigError, match=message):
        PipelineConfig(stages=stage_list).check_quotas()


@pytest.mark.parametrize("options, message", [
    ({"rerank": {"k": 1}}, "stage_options: unknown stage 'rerank'"),
    ({"retrieval": [1, 2]}, "stage_options.retrieval: expected a mapping"),
    ([["retrieval", 1]], "stage_options: expected a mapping of stage name"),
])
def test_stage_options_are_mappings_for_registered_stages(options, message):
    with pytest.raises(ConfigError, match=message):
        PipelineConfig(stage_options=options).check_stages()


# A stage the package does not have, as a user adds it: one folder with its declaration and its
# Trainer module. The subprocess puts the folder on the registry's package path before anything
# reads the registry (the package itself is not edited), builds the pipeline from a config that
# names the stage, and evaluates a 4-stage cascade.
NEW_STAGE = '''
from cascade_ranking.models.stages import Stage, StageTrainer

STAGE = Stage(name="popularity", order=15, label="popularity", model_input="popularity_model",
              blessing_output="popularity_blessing",
              trainer=StageTrainer("popularity", "cascade_ranking.models.stages.popularity.trainer.run_fn"),
              thresholds=(("recall", "min", 0.5),))
'''
NEW_STAGE_TRAINER = '''
def run_fn(fn_args):
    """Not run here: the test checks the wiring."""
    raise NotImplementedError
'''
SCRIPT = '''
import json, sys
import numpy as np
from cascade_ranking.models import stages
stages.__path__.append(sys.argv[1])
from cascade_ranking.components import evaluation
from cascade_ranking.pipelines import config as config_lib, pipeline as pipeline_lib

config = config_lib.load_config(None, [
    "stages=[retrieval, popularity, preranking, ranking]", "evaluator.quotas=[50, 45, 30, 20]",
    "retrieval.eval_quota=50", "stage_options.popularity={top: 3}", "output_dir=" + sys.argv[2]])
config.validate()
p = pipeline_lib.create_pipeline(config)
nodes = {c.id: c for c in p.components}
evaluator = nodes["CascadeEvaluator"]
pusher = nodes["Pusher.popularity"]
blessing = pusher.inputs["model_blessing"]
out = {
    "stages": list(stages.names()),
    "nodes": sorted(nodes),
    "evaluator_inputs": sorted(k for k, v in evaluator.inputs.items()),
    "evaluator_outputs": sorted(evaluator.outputs),
    "pusher_blessing": [blessing.producer_component_id, blessing.output_key],
    "pusher_model": [pusher.inputs["model"].producer_component_id, pusher.inputs["model"].output_key],
    "trainer_config": nodes["Trainer.popularity"].exec_properties["custom_config"],
    "thresholds": [list(t) for t in evaluation.EvaluatorConfig().thresholds],
}
# A 4-stage cascade over scored rows: request r has 60 candidates, 5 in the ground-truth tier.
rng = np.random.default_rng(0)
n, rows = 60, {"request_id": [], "stage": [], "click": [], "ui_position": [], "true_ctr": []}
keys = ["retrieval_model", "popularity_model", "preranking_model", "model"]
scores = {k: [] for k in keys}
for r in range(30):
    gt = np.zeros(n, bool); gt[rng.choice(n, 5, replace=False)] = True
    rows["request_id"] += [r] * n
    rows["stage"] += ["rerank_pos" if g else "prerank_neg" for g in gt]
    rows["click"] += list((gt & (rng.random(n) < 0.5)).astype(int))
    rows["ui_position"] += list(np.where(np.arange(n) < 10, np.arange(n) + 1, 0))
    rows["true_ctr"] += [-1.0] * n
    for i, k in enumerate(keys):
        scores[k] += list(gt * (i + 1) * 0.3 + rng.random(n))
rows = {k: np.asarray(v) for k, v in {**rows, **scores}.items()}
rows["model/ctr"] = 1 / (1 + np.exp(-rows["model"]))
config = evaluation.EvaluatorConfig(quotas=(50, 45, 30, 20))
result = evaluation.evaluate(rows, keys, config)
out["cascade"] = {k: v for k, v in result["cascade"].items() if k != "recall_at_k"}
out["verdicts"] = evaluation.bless_stages(result, config)
out["rows"] = {k: v.tolist() for k, v in rows.items() if k in ("request_id", "stage", "popularity_model")}
print("RESULT " + json.dumps(out))
'''


def _recall(request_ids, gt, scores, quota):
    """Recall@|GT|@quota by plain per-request sorting (independent of `models.metrics`)."""
    recalls = []
    for r in np.unique(request_ids):
        mine = request_ids == r
        top = np.argsort(-scores[mine], kind="stable")[:quota]
        recalls.append(gt[mine][top].sum() / gt[mine].sum())
    return float(np.mean(recalls))


def test_a_new_stage_is_one_folder(tmp_path):
    folder = tmp_path / "user_stages" / "popularity"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(textwrap.dedent(NEW_STAGE))
    (folder / "trainer.py").write_text(textwrap.dedent(NEW_STAGE_TRAINER))
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "user_stages"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])

    assert out["stages"] == ["retrieval", "popularity", "preranking", "ranking"]
    for node in ("Trainer.popularity", "LatestBlessed.popularity", "Pusher.popularity"):
        assert node in out["nodes"]
    assert "StageModel.popularity" not in out["nodes"]  # it has its own Trainer
    assert {"popularity_model", "baseline_popularity_model"} <= set(out["evaluator_inputs"])
    assert "popularity_blessing" in out["evaluator_outputs"]
    assert out["pusher_blessing"] == ["CascadeEvaluator", "popularity_blessing"]  # gated by its own blessing
    assert out["pusher_model"] == ["Trainer.popularity", "model"]
    custom = json.loads(out["trainer_config"])
    assert json.loads(custom["options"]) == {"popularity": {"top": 3}}
    assert ["popularity", "recall", "min", 0.5] in out["thresholds"]

    # Its quota is the second of four, and its recall is an independent per-request sort's.
    cascade = out["cascade"]
    assert cascade["stages"] == ["retrieval_model", "popularity_model", "preranking_model", "model"]
    assert cascade["quotas"] == [50, 45, 30, 20]
    rows = {k: np.asarray(v) for k, v in out["rows"].items()}
    expected = _recall(rows["request_id"], rows["stage"] == "rerank_pos", rows["popularity_model"], 45)
    assert cascade["recall_at_45/popularity_model"] == pytest.approx(expected)
    verdict = out["verdicts"]["popularity"]
    assert verdict["blessed"] == (expected >= 0.5), verdict
    assert set(out["verdicts"]) == {"retrieval", "popularity", "preranking", "ranking"}


def test_a_stage_trainer_reads_its_options_from_custom_config():
    """What `stage_trainer_config` writes, `models.trainers.common.stage_options` reads back."""
    import types

    from cascade_ranking.models.stages import StageTrainer
    from cascade_ranking.models.trainers import common
    from cascade_ranking.pipelines.pipeline import stage_trainer_config

    config = PipelineConfig(stage_options={"retrieval": {"top": 3, "note": "x"}})
    custom = stage_trainer_config(stages.get("retrieval").trainer, config)
    assert json.loads(custom["retrieval"]) == to_dict(config.retrieval)  # its own field, as JSON
    fn_args = types.SimpleNamespace(custom_config=custom)
    assert common.stage_options(fn_args, "retrieval") == {"top": 3, "note": "x"}
    assert common.stage_options(fn_args, "ranking") == {}
    cascade = stage_trainer_config(StageTrainer("cascade", "m.run_fn", ("cascade", "ranker")), config)
    assert set(cascade) == {"cascade", "ranker"}  # no options for its stages: no key
