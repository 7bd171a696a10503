"""What every Trainer module shares: its config from `custom_config`, callbacks, evaluation on the
eval split, and the eval-metrics file the pipeline report reads.

Every module trains with TensorBoard logs in the ModelRun (`<model_run>/logs`) and resumes after a
kill through `tf.keras.callbacks.BackupAndRestore` (`<model_run>/backup`, removed when training
finishes).
"""
import json
import os
from typing import Dict, List, Sequence

import numpy as np
import tensorflow as tf

from models import inputs, metrics
from models.config import config_from_dict
from schema import features as F

EVAL_METRICS_FILE = "eval_metrics.json"


def config_json(fn_args, key: str) -> Dict:
    """The JSON object under `key` in the Trainer's custom_config ({} when absent)."""
    custom = fn_args.custom_config or {}
    return json.loads(custom[key]) if key in custom else {}


def config_from(fn_args, key: str, cls):
    """The dataclass `cls` with the defaults overridden by the JSON under custom_config[key];
    an unknown key is an error (a typo should not silently train the default)."""
    return config_from_dict(cls, config_json(fn_args, key))


def callbacks(model_run_dir: str) -> List[tf.keras.callbacks.Callback]:
    return [
        tf.keras.callbacks.TensorBoard(log_dir=os.path.join(model_run_dir, "logs"), update_freq=50),
        tf.keras.callbacks.BackupAndRestore(backup_dir=os.path.join(model_run_dir, "backup")),
    ]


def evaluate_ctr_model(model: tf.keras.Model, eval_files: Sequence[str]) -> Dict[str, float]:
    """AUC, PerQueryAUC and NE over the eval split's shown candidates, next to the oracle
    `true_ctr` when the data knows it (synthetic data)."""
    clicks, scores, oracle, requests = [], [], [], []
    for batch in inputs.parsed_batches(eval_files, 4096, exposed_only=True):
        model_inputs, label, _ = inputs.to_model_io(batch)
        scores.append(tf.sigmoid(model(model_inputs, training=False)).numpy().reshape(-1))
        clicks.append(label.numpy().reshape(-1))
        oracle.append(batch[F.TRUE_CTR_KEY].numpy().reshape(-1))
        requests.append(batch[F.REQUEST_ID_KEY].numpy().reshape(-1))
    y, p, o, q = (np.concatenate(a) for a in (clicks, scores, oracle, requests))
    result = {
        "examples": int(y.size),
        "click_rate": float(y.mean()),
        "mean_prediction": float(p.mean()),
        "auc": metrics.auc(y, p),
        "per_query_auc": metrics.per_query_auc(y, p, q),
        "ne": metrics.normalized_entropy(y, p),
    }
    if np.all(o >= 0):
        result.update(
            oracle_auc=metrics.auc(y, o),
            oracle_per_query_auc=metrics.per_query_auc(y, o, q),
            oracle_ne=metrics.normalized_entropy(y, o),
        )
    return result


def write_eval_metrics(model_run_dir: str, result: Dict) -> None:
    with tf.io.gfile.GFile(os.path.join(model_run_dir, EVAL_METRICS_FILE), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)


def warmup_examples(eval_files: Sequence[str], count: int = 8) -> List[bytes]:
    """A few real serialized eval examples for the TF Serving warmup file."""
    files = inputs.list_files(eval_files)[:1]
    return list(tf.data.TFRecordDataset(files, compression_type="GZIP").take(count).as_numpy_iterator())
