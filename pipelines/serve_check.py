"""`cascade serve-check DIR`: loads every pushed SavedModel as TF Serving would and exercises it.

For each stage directory `<serving>/<stage>/` the newest numeric version is checked:
  1. `assets.extra/tf_serving_warmup_requests` exists and every record parses as a
     `PredictionLog` whose request names a signature of the model; each request is replayed
     (TF Serving replays them at load time);
  2. every signature is called on real serialized tf.Examples of the eval split: a string input
     gets the examples, an integer input the same-named feature of those examples (e.g. the UI
     ids of `score_ui_grid`), a signature without inputs is called as it is;
  3. every output is finite and has one row per example where its input had one.

DIR is a pipeline output directory (with `serving/` and `metadata.sqlite`, from which the eval
split of the run's example source is found) or a serving directory given with `--examples`.

`cascade run --serve-check` runs the same checks in the run's process and keeps a record of the
models that passed (`CACHE_FILE` in the output directory, keyed by a fingerprint of every file of
the model's version directory, the examples and their count): a rerun that pushed nothing new
reports those models as passed before instead of loading them again. `cascade serve-check`
always loads and calls every model.
"""
import dataclasses
import glob
import hashlib
import json
import os
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from cascade_ranking.models import scann_index
from cascade_ranking.models.export import WARMUP_FILE

EXAMPLE_SOURCES = ("SyntheticExampleGen", "ImportExampleGen")


@dataclasses.dataclass
class ModelCheck:
    stage: str
    path: str
    signatures: Dict[str, Dict[str, tuple]] = dataclasses.field(default_factory=dict)  # name → output shapes
    warmup_requests: int = 0
    cached: bool = False  # passed the same check before (`CACHE_FILE`) and was not loaded again

    def summary(self) -> str:
        """One line: the signatures called and the shapes they returned."""
        return ", ".join(f"{name} → {', '.join(f'{k}{list(v)}' for k, v in outputs.items())}"
                         for name, outputs in self.signatures.items())


CACHE_FILE = "serve_check.json"


class ServeCheckError(ValueError):
    """A pushed model that TF Serving would not load or that answers wrongly (one line)."""


def latest_version(stage_dir: str) -> str:
    versions = [d for d in os.listdir(stage_dir) if d.isdigit() and os.path.isdir(os.path.join(stage_dir, d))]
    if not versions:
        raise ServeCheckError(f"{stage_dir} has no numeric version directory")
    return os.path.join(stage_dir, max(versions, key=int))


def eval_examples_from_run(output_dir: str) -> str:
    """The eval split's files of the newest Examples of the run's example source (from its MLMD)."""
    import ml_metadata as mlmd
    from tfx.orchestration import metadata

    from cascade_ranking.pipelines.report import latest_artifact

    path = os.path.join(output_dir, "metadata.sqlite")
    if not os.path.exists(path):
        raise ServeCheckError(f"{output_dir} has no metadata.sqlite; pass --examples")
    store = mlmd.MetadataStore(metadata.sqlite_metadata_connection_config(os.path.abspath(path)))
    for context in store.get_contexts_by_type("node"):
        if context.name.rsplit(".", 1)[-1] in EXAMPLE_SOURCES:
            examples = latest_artifact(store, "Examples", context.name)
            if examples is not None:
                return os.path.join(examples.uri, "Split-eval", "*")
    raise ServeCheckError(f"no Examples of {' or '.join(EXAMPLE_SOURCES)} in {path}")


def read_examples(pattern: str, count: int) -> List[bytes]:
    files = sorted(glob.glob(pattern)) if "://" not in pattern else tf.io.gfile.glob(pattern)
    if not files:
        raise ServeCheckError(f"no files match {pattern}")
    compression = "GZIP" if files[0].endswith(".gz") else ""
    examples = list(tf.data.TFRecordDataset(files, compression_type=compression).take(count).as_numpy_iterator())
    if not examples:
        raise ServeCheckError(f"{pattern} holds no records")
    return examples


def _feature_values(examples: List[bytes], name: str, dtype: tf.DType) -> tf.Tensor:
    values = []
    for raw in examples:
        feature = tf.train.Example.FromString(raw).features.feature.get(name)
        if feature is None or not feature.int64_list.value:
            raise ServeCheckError(f"the eval examples have no integer feature {name!r} for the signature input")
        values.append(feature.int64_list.value[0])
    return tf.constant(values, dtype=dtype)


def _check_outputs(stage: str, signature: str, outputs: Dict[str, tf.Tensor], rows: Optional[int]) -> Dict[str, tuple]:
    shapes = {}
    for key, value in outputs.items():
        array = value.numpy()
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise ServeCheckError(f"{stage}: signature {signature!r} output {key!r} is not finite")
        if rows is not None and array.ndim and array.shape[0] != rows:
            raise ServeCheckError(f"{stage}: signature {signature!r} output {key!r} has {array.shape[0]} rows "
                                  f"for {rows} inputs")
        shapes[key] = tuple(array.shape)
    return shapes


def replay_warmup(stage: str, model_dir: str, signatures) -> int:
    path = os.path.join(model_dir, WARMUP_FILE)
    if not os.path.exists(path):
        raise ServeCheckError(f"{stage}: {path} is missing")
    try:
        records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
    except tf.errors.DataLossError:
        raise ServeCheckError(f"{stage}: {path} is not a TFRecord file of PredictionLogs")
    count = 0
    for record in records:
        try:
            log = prediction_log_pb2.PredictionLog.FromString(record)
        except Exception as e:  # a DecodeError names no file; say which
            raise ServeCheckError(f"{stage}: a warmup record of {path} is not a PredictionLog ({e})")
        request = log.predict_log.request
        name = request.model_spec.signature_name or "serving_default"
        if name not in signatures:
            raise ServeCheckError(f"{stage}: warmup request names signature {name!r}, the model has {sorted(signatures)}")
        inputs = {key: tf.constant(tf.make_ndarray(proto)) for key, proto in request.inputs.items()}
        _check_outputs(stage, f"{name} (warmup)", signatures[name](**inputs), None)
        count += 1
    if count == 0:
        raise ServeCheckError(f"{stage}: {path} holds no PredictionLog")
    return count


def check_model(stage: str, model_dir: str, examples: List[bytes]) -> ModelCheck:
    try:
        loaded = scann_index.load_saved_model(model_dir)  # a ScaNN retrieval index needs its ops registered
    except scann_index.ScannNotInstalled as e:
        raise ServeCheckError(f"{stage}: {e}") from None
    result = ModelCheck(stage=stage, path=model_dir)
    if not loaded.signatures:
        raise ServeCheckError(f"{stage}: {model_dir} has no signatures")
    result.warmup_requests = replay_warmup(stage, model_dir, loaded.signatures)
    for name, function in loaded.signatures.items():
        _, input_specs = function.structured_input_signature
        inputs = {}
        for key, spec in input_specs.items():
            inputs[key] = (tf.constant(examples) if spec.dtype == tf.string
                           else _feature_values(examples, key, spec.dtype))
        try:
            outputs = function(**inputs)
        except tf.errors.OpError as e:
            raise ServeCheckError(f"{stage}: signature {name!r} failed on eval examples: {e.message.splitlines()[0]}")
        rows = len(examples) if inputs else None
        result.signatures[name] = _check_outputs(stage, name, outputs, rows)
    return result


def model_fingerprint(model_dir: str) -> str:
    """A digest of the relative path, size and modification time of every file of a SavedModel
    version directory: it changes when any file of the model is written again."""
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(model_dir)):
        for name in sorted(files):
            path = os.path.join(root, name)
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, model_dir)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_cache(path: str) -> Dict[str, dict]:
    try:
        with open(path, encoding="utf-8") as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: every model is checked
        return {}


def _write_cache(path: str, cache: Dict[str, dict]) -> None:
    temp = path + ".incomplete"
    with open(temp, "w", encoding="utf-8") as f:
        json.dump(cache, f, indent=1, sort_keys=True)
    os.replace(temp, path)


def serve_check(directory: str, examples_pattern: Optional[str] = None, count: int = 16,
                cache_file: Optional[str] = None) -> List[ModelCheck]:
    """Checks the newest version of every stage model under the run's (or the given) serving dir.
    With `cache_file`, a model that passed the same check before (same fingerprint, examples and
    count) is not loaded again; its check comes back with `cached=True`."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} does not exist")
    serving = os.path.join(directory, "serving")
    if not os.path.isdir(serving):
        serving = directory
    pattern = examples_pattern or eval_examples_from_run(directory)
    examples = read_examples(pattern, count)
    stages = sorted(d for d in os.listdir(serving) if os.path.isdir(os.path.join(serving, d)))
    if not stages:
        raise ServeCheckError(f"{serving} holds no stage directories")
    cache = _read_cache(cache_file) if cache_file else {}
    checks = []
    for stage in stages:
        path = latest_version(os.path.join(serving, stage))
        key = {"fingerprint": model_fingerprint(path), "examples": pattern, "count": count}
        entry = cache.get(path)
        if entry and entry.get("key") == key:
            checks.append(ModelCheck(stage=stage, path=path, warmup_requests=entry["warmup_requests"], cached=True,
                                     signatures={name: {k: tuple(v) for k, v in outputs.items()}
                                                 for name, outputs in entry["signatures"].items()}))
            continue
        check = check_model(stage, path, examples)
        cache[path] = {"key": key, "warmup_requests": check.warmup_requests, "signatures": check.signatures}
        checks.append(check)
    if cache_file:
        _write_cache(cache_file, cache)
    return checks
