"""Where a Trainer keeps its BackupAndRestore state, so that a rerun after a kill finds it."""
import os

from tfx.components.trainer.fn_args_utils import FnArgs

from cascade_ranking.models.trainers import common


def _args(root, execution, config='{"epochs": 3}', train="/data/Split-train/*", model_run_dir=None):
    return FnArgs(train_files=[train], eval_files=["/data/Split-eval/*"], serving_model_dir="/s",
                  model_run_dir=model_run_dir or os.path.join(root, "Trainer.ranking", "model_run", str(execution)),
                  custom_config={"ranker": config}, train_steps=None, eval_steps=None)


def test_a_rerun_on_the_same_inputs_shares_the_backup_across_executions(tmp_path):
    first, rerun = common.backup_dir(_args(str(tmp_path), 7)), common.backup_dir(_args(str(tmp_path), 12))
    assert first == rerun
    assert os.path.dirname(first) == os.path.join(str(tmp_path), "Trainer.ranking", "backup")


def test_other_inputs_or_config_get_their_own_backup(tmp_path):
    base = common.backup_dir(_args(str(tmp_path), 7))
    assert common.backup_dir(_args(str(tmp_path), 7, config='{"epochs": 4}')) != base
    assert common.backup_dir(_args(str(tmp_path), 7, train="/other/Split-train/*")) != base


def test_outside_the_tfx_layout_the_backup_stays_in_the_model_run(tmp_path):
    args = _args(str(tmp_path), 7, model_run_dir=str(tmp_path / "run"))
    assert common.backup_dir(args) == str(tmp_path / "run" / "backup")
    callbacks = common.callbacks(args)
    assert callbacks[1].backup_dir == str(tmp_path / "run" / "backup")
