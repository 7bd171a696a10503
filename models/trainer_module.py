"""TFX Trainer entry point (`run_fn`) for the stage models (GenericExecutor).

The pipeline passes `run_fn='models.trainer_module.run_fn'` (a dotted path, as the TFX taxi
template does) and the stage and its switches as `custom_config={'trainer': TrainerConfig JSON}`.
`run_fn`:
  1. reads the train/eval Examples with tf.data over the artifact files (`models.inputs`);
  2. trains for `TrainerConfig.epochs` passes over the train split, writing TensorBoard logs to the ModelRun and resuming after a kill through
     `tf.keras.callbacks.BackupAndRestore`;
  3. evaluates on the eval split and writes `eval_metrics.json` to the ModelRun: AUC, NE and
     PerQueryAUC of the model next to those of the oracle `true_ctr` (synthetic data only);
  4. exports the SavedModel with its serving signatures and warmup requests.
"""
import json
import os
from typing import Dict

import numpy as np
import tensorflow as tf
from absl import logging

from models import export, inputs, metrics
from models.baseline_ranker import BaselineRanker
from models.config import TrainerConfig
from schema import features as F

EVAL_METRICS_FILE = "eval_metrics.json"


def _optimizer(config: TrainerConfig) -> tf.keras.optimizers.Optimizer:
    name = config.optimizer.lower()
    if name == "adam":
        return tf.keras.optimizers.Adam(config.learning_rate)
    if name == "adagrad":
        return tf.keras.optimizers.Adagrad(config.learning_rate)
    raise ValueError(f"unknown optimizer {config.optimizer!r} (adam, adagrad)")


def build_model(config: TrainerConfig) -> tf.keras.Model:
    if config.stage == "ranking":
        return BaselineRanker(config)
    raise ValueError(f"unknown stage {config.stage!r}")


def evaluate(model: tf.keras.Model, eval_files, config: TrainerConfig) -> Dict[str, float]:
    """Model and oracle metrics over the eval split's shown candidates."""
    clicks, scores, oracle, requests = [], [], [], []
    for batch in inputs.parsed_batches(eval_files, 4096, exposed_only=config.exposed_only):
        model_inputs, label, _ = inputs.to_model_io(batch)
        scores.append(tf.sigmoid(model(model_inputs, training=False)).numpy().reshape(-1))
        clicks.append(label.numpy().reshape(-1))
        oracle.append(batch[F.TRUE_CTR_KEY].numpy().reshape(-1))
        requests.append(batch[F.REQUEST_ID_KEY].numpy().reshape(-1))
    y, p, o, q = (np.concatenate(a) for a in (clicks, scores, oracle, requests))
    result = {
        "examples": int(y.size),
        "click_rate": float(y.mean()),
        "auc": metrics.auc(y, p),
        "per_query_auc": metrics.per_query_auc(y, p, q),
        "ne": metrics.normalized_entropy(y, p),
    }
    if np.all(o >= 0):  # the oracle is known (synthetic data)
        result.update(
            oracle_auc=metrics.auc(y, o),
            oracle_per_query_auc=metrics.per_query_auc(y, o, q),
            oracle_ne=metrics.normalized_entropy(y, o),
        )
    return result


def run_fn(fn_args) -> None:
    """Trains, evaluates and exports one stage model; called by the TFX Trainer."""
    custom = fn_args.custom_config or {}
    config = TrainerConfig.from_dict(json.loads(custom["trainer"]) if "trainer" in custom else {})
    logging.info("Training %s with %s", config.stage, config)
    tf.keras.utils.set_random_seed(config.shuffle_seed)

    train = inputs.parsed_batches(
        fn_args.train_files, config.batch_size, shuffle_seed=config.shuffle_seed, num_epochs=1,
        exposed_only=config.exposed_only,
    )
    model = build_model(config)
    model.embedding.adapt(train)
    model.compile(
        optimizer=_optimizer(config),
        loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
        weighted_metrics=[tf.keras.metrics.AUC(from_logits=True, name="auc")],
    )
    callbacks = [
        tf.keras.callbacks.TensorBoard(log_dir=os.path.join(fn_args.model_run_dir, "logs"), update_freq=50),
        tf.keras.callbacks.BackupAndRestore(backup_dir=os.path.join(fn_args.model_run_dir, "backup")),
    ]
    model.fit(train.map(inputs.to_model_io), epochs=config.epochs, callbacks=callbacks, verbose=2)

    result = evaluate(model, fn_args.eval_files, config)
    logging.info("Eval metrics: %s", result)
    with tf.io.gfile.GFile(os.path.join(fn_args.model_run_dir, EVAL_METRICS_FILE), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)

    warmup = [
        e for e in tf.data.TFRecordDataset(inputs.list_files(fn_args.eval_files)[:1], compression_type="GZIP")
        .take(8).as_numpy_iterator()
    ]
    export.export_saved_model(model, fn_args.serving_model_dir, warmup)
