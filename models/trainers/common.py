"""What every Trainer module shares: its config from `custom_config`, callbacks, evaluation on the
eval split, and the eval-metrics file the pipeline report reads.

Every module trains with TensorBoard logs in the ModelRun (`<model_run>/logs`) and resumes after a
kill through `tf.keras.callbacks.BackupAndRestore`. A rerun of a killed pipeline is a new TFX
execution with a new ModelRun directory, so the backup cannot live there: it goes to
`<node dir>/backup/<fingerprint>/`, the fingerprint being a hash of the Trainer's input files,
custom_config and step counts. The same Trainer on the same inputs finds it and continues from
the last finished epoch; other inputs or another config start afresh. Keras removes the backup
when training finishes.
"""
import hashlib
import json
import os
from typing import Dict, List, Sequence

import numpy as np
import tensorflow as tf

from cascade_ranking.models import inputs, metrics
from cascade_ranking.models.config import config_from_dict
from cascade_ranking.schema import features as F

EVAL_METRICS_FILE = "eval_metrics.json"


def config_json(fn_args, key: str) -> Dict:
    """The JSON object under `key` in the Trainer's custom_config ({} when absent)."""
    custom = fn_args.custom_config or {}
    return json.loads(custom[key]) if key in custom else {}


def config_from(fn_args, key: str, cls):
    """The dataclass `cls` with the defaults overridden by the JSON under custom_config[key];
    an unknown key is an error (a typo should not silently train the default)."""
    return config_from_dict(cls, config_json(fn_args, key))


FEATURES_KEY = "features"  # custom_config key of the run's `schema.features.FeatureConfig`, the same for every Trainer
# custom_config key of a stage Trainer's `stage_options` (JSON: stage name → its mapping from the
# config), given only when the config has options for one of the Trainer's stages (`models.stages`).
STAGE_OPTIONS_KEY = "options"


def stage_options(fn_args, stage: str) -> dict:
    """The config's `stage_options.<stage>` mapping given to this Trainer ({} when none): how a stage
    added as a folder of `models.stages` gets its settings from the one config file."""
    return config_json(fn_args, STAGE_OPTIONS_KEY).get(stage, {})


def feature_config(fn_args) -> F.FeatureConfig:
    """The run's FeatureConfig (custom_config "features"; the defaults when absent), checked against
    the Trainer's schema (`pipeline_schema`): a declared input the schema lacks or types otherwise
    fails the Trainer with one line naming it, on any orchestrator (the local runner checks it
    before the run too). Its `lookup: vocabulary` features get their vocabulary files and sizes
    from the Trainer's transform_graph (the pipeline's Transform output, `schema.vocabulary`)."""
    features = config_from(fn_args, FEATURES_KEY, F.FeatureConfig)
    schema, path = pipeline_schema(fn_args)
    try:
        features.check_schema(schema)
    except ValueError as e:
        raise ValueError(f"{e} (schema {path})") from None
    if features.vocabulary_features():
        from cascade_ranking.schema import vocabulary  # TFT: imported only when a feature needs it

        features = vocabulary.resolve(features, getattr(fn_args, "transform_graph_path", None))
    return features


def pipeline_schema(fn_args):
    """(schema, path): the pipeline's Schema artifact (`fn_args.schema_path`, given by the Trainer's
    `schema` channel), or the packaged schema when the Trainer has none. Parse specs and serving
    signatures are built from it, so the model reads what ExampleValidator checked."""
    path = getattr(fn_args, "schema_path", None) or F.SCHEMA_PATH
    return F.load_schema(path), path


def backup_dir(fn_args) -> str:
    """The BackupAndRestore directory of a Trainer run (see the module docstring)."""
    model_run_dir = fn_args.model_run_dir.rstrip("/")
    identity = json.dumps({
        "train_files": list(fn_args.train_files or []), "eval_files": list(fn_args.eval_files or []),
        "custom_config": fn_args.custom_config or {}, "train_steps": fn_args.train_steps,
        "eval_steps": fn_args.eval_steps,
    }, sort_keys=True, default=str)
    fingerprint = hashlib.sha256(identity.encode()).hexdigest()[:16]
    run_parent = os.path.dirname(model_run_dir)
    if os.path.basename(run_parent) != "model_run":  # not TFX's <node>/model_run/<execution> layout
        return os.path.join(model_run_dir, "backup")
    return os.path.join(os.path.dirname(run_parent), "backup", fingerprint)


def callbacks(fn_args) -> List[tf.keras.callbacks.Callback]:
    """TensorBoard logs in the ModelRun and BackupAndRestore at `backup_dir(fn_args)`."""
    return [
        tf.keras.callbacks.TensorBoard(log_dir=os.path.join(fn_args.model_run_dir, "logs"), update_freq=50),
        tf.keras.callbacks.BackupAndRestore(backup_dir=backup_dir(fn_args)),
    ]


def evaluate_ctr_model(model: tf.keras.Model, eval_files: Sequence[str], schema=None) -> Dict[str, float]:
    """AUC, PerQueryAUC (rows grouped by request_id explicitly) and NE over the eval split's shown
    candidates, next to the oracle `true_ctr` when the data knows it (synthetic data). The shown
    rows are picked by their `ui_position` before the full parse (`inputs.shown_row_batches`: the
    demo's 50,900 eval candidates, 10,180 shown, read in 0.26–0.64 s against 1.0–1.1 s when every
    candidate was parsed and then filtered)."""
    clicks, scores, oracle, requests = [], [], [], []
    for batch in inputs.shown_row_batches(eval_files, 4096, parse_spec=F.training_parse_spec(schema)):
        model_inputs, label, _ = inputs.to_model_io(batch, getattr(model, "features", F.DEFAULT))
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
