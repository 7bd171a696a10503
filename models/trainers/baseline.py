"""Trainer module of the baseline DNN (`models.baseline_ranker`): the plain CTR model the
ablations start from, trained row-wise on shown candidates with the logistic loss.

custom_config: {"trainer": TrainerConfig JSON}.
"""
import tensorflow as tf
from absl import logging

from cascade_ranking.models import export, inputs
from cascade_ranking.models.baseline_ranker import BaselineRanker
from cascade_ranking.models.config import TrainerConfig
from cascade_ranking.models.trainers import common, distribute
from cascade_ranking.models.trainers.epoch_progress import EpochProgress


def _optimizer(config: TrainerConfig) -> tf.keras.optimizers.Optimizer:
    name = config.optimizer.lower()
    if name == "adam":
        return tf.keras.optimizers.Adam(config.learning_rate)
    if name == "adagrad":
        return tf.keras.optimizers.Adagrad(config.learning_rate)
    raise ValueError(f"unknown optimizer {config.optimizer!r} (adam, adagrad)")


# One process only (not a Trainer of the pipeline's training_cluster): a TF_CONFIG cluster is refused.
DISTRIBUTE_STRATEGIES = ()


def run_fn(fn_args) -> None:
    """Called by the TFX Trainer (GenericExecutor)."""
    distribute.strategy_for("baseline", DISTRIBUTE_STRATEGIES)
    config = TrainerConfig.from_dict(common.config_json(fn_args, "trainer"))
    logging.info("Training the baseline DNN with %s", config)
    tf.keras.utils.set_random_seed(config.shuffle_seed)
    train = inputs.parsed_batches(fn_args.train_files, config.batch_size, shuffle_seed=config.shuffle_seed,
                                  num_epochs=1, exposed_only=config.exposed_only)
    model = BaselineRanker(config)
    model.embedding.adapt(train)
    model.compile(optimizer=_optimizer(config), loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
                  weighted_metrics=[tf.keras.metrics.AUC(from_logits=True, name="auc")])
    model.fit(train.map(inputs.to_model_io), epochs=config.epochs, verbose=0,
              callbacks=common.callbacks(fn_args) + [EpochProgress("baseline", ("loss", "auc"))])
    result = common.evaluate_ctr_model(model, fn_args.eval_files)
    logging.info("Eval metrics: %s", result)
    common.write_eval_metrics(fn_args.model_run_dir, result)
    export.export_saved_model(model, fn_args.serving_model_dir, common.warmup_examples(fn_args.eval_files))
