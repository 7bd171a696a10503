"""Trainer module of the ranking stage: the Factory Floor ranker (`models.ranker`).

custom_config: {"ranker": RankerConfig JSON} (defaults: `RankerConfig()`, the full model).
Batches hold whole requests (`ranker.request_batches`) so the per-request rank loss has its pairs;
rows whose `teacher_logit` is present are distilled. Exports `serving_default`, `quality`, `ui`
and `score_ui_grid` with a warmup file (`models.ranker_export`).
"""
import tensorflow as tf
from absl import logging

from models import ranker, ranker_export
from models.ranker_config import RankerConfig
from models.trainers import common


def train_and_export(fn_args, default: RankerConfig) -> None:
    config = RankerConfig.from_dict({**default.to_dict(), **common.config_json(fn_args, "ranker")})
    logging.info("Training the ranker with %s", config)
    tf.keras.utils.set_random_seed(config.lspr_seed)
    train = ranker.request_batches(fn_args.train_files, config.requests_per_batch, shuffle_seed=0)
    model = ranker.FactoryFloorRanker(config)
    model.adapt(train)
    model.compile()
    model.fit(train, epochs=config.epochs, callbacks=common.callbacks(fn_args), verbose=2)
    result = common.evaluate_ctr_model(model, fn_args.eval_files)
    logging.info("Eval metrics: %s", result)
    common.write_eval_metrics(fn_args.model_run_dir, result)
    ranker_export.export_ranker(model, fn_args.serving_model_dir, common.warmup_examples(fn_args.eval_files))


def run_fn(fn_args) -> None:
    """Called by the TFX Trainer (GenericExecutor)."""
    train_and_export(fn_args, RankerConfig())
