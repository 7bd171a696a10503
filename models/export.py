"""SavedModel export for TF Serving (DESIGN §7).

`serving_default` takes a batch of serialized candidate `tf.Example`s (input key `examples`),
parses them with the serving parse spec derived from the schema, and returns `ctr` (a calibrated
probability) and `logit`. A missing required feature or a wrong dtype fails with an error that
names the feature: `tf.io.parse_example` does this for fixed-length features, and
`parse_examples` adds the check for required variable-length ones (such as `query_tokens`, which
would otherwise parse as an empty list). Every exporter (this one, `models.ranker_export`) parses
through `parse_examples`.

TF Serving warms a model up from `assets.extra/tf_serving_warmup_requests`, a TFRecord file of
`PredictionLog`s; `write_warmup_requests` writes one from real examples.
"""
import os
from typing import Callable, Dict, Optional, Sequence

import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from schema import features as F

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
SERVING_INPUT_KEY = "examples"
STAGE_MODELS_DIR = "stages"  # beside Format-Serving: the other stages a joint Trainer exports


def stage_model_dir(serving_model_dir: str, stage: str) -> str:
    """Where a Trainer that trains several stages jointly exports the SavedModel of `stage`:
    `<model artifact>/stages/<stage>`, beside its own `Format-Serving`."""
    return os.path.join(os.path.dirname(serving_model_dir.rstrip("/")), STAGE_MODELS_DIR, stage)


def required_values(name: str, schema=None) -> int:
    """Values a variable-length feature must have per example: the schema's value_count.min (at
    least 1) if the feature is required (presence.min_fraction == 1), else 0. `schema` defaults to
    the packaged one."""
    feature = next((f for f in (schema or F.load_schema()).feature if f.name == name), None)
    if feature is None or feature.presence.min_fraction < 1.0:
        return 0
    return max(int(feature.value_count.min), 1)


def parse_examples(serialized: tf.Tensor, spec: Dict, schema=None) -> Dict[str, tf.Tensor]:
    """`tf.io.parse_example`, plus a presence check on required variable-length features.

    Fixed-length features already fail in `parse_example` with an error naming them; a missing
    variable-length (ragged) feature would parse as an empty list, so each required one gets an
    Assert `row_length >= required_values(name)` whose message names it. The Assert is stateful:
    inside a tf.function the automatic control dependencies run it before the function returns.
    """
    features = tf.io.parse_example(serialized, spec)
    for name, value in features.items():
        needed = required_values(name, schema) if isinstance(value, tf.RaggedTensor) else 0
        if needed:
            lengths = value.row_splits[1:] - value.row_splits[:-1]
            tf.debugging.Assert(tf.reduce_all(lengths >= needed), [
                f"Feature: {name} is required (at least {needed} value(s)) but could not be found"])
    return features


def serving_function(model: tf.keras.Model, parse_spec: Optional[Dict] = None, schema=None):
    """`serving_default`: serialized examples [N] -> {"ctr": [N], "logit": [N]} (`parse_examples`)."""
    spec = parse_spec or F.serving_parse_spec(schema)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=SERVING_INPUT_KEY)])
    def serve(examples):
        features = parse_examples(examples, spec, schema)
        logit = tf.reshape(model(features, training=False), [-1])
        return {"ctr": tf.sigmoid(logit), "logit": logit}

    return serve


def write_warmup_requests(export_dir: str, serialized_examples: Sequence[bytes], model_name: str = "model") -> str:
    """Writes one PredictionLog per signature call of `serving_default` on the examples."""
    path = os.path.join(export_dir, WARMUP_FILE)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.TFRecordWriter(path) as writer:
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name="serving_default")
        )
        request.inputs[SERVING_INPUT_KEY].CopyFrom(tf.make_tensor_proto(list(serialized_examples), dtype=tf.string))
        log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
        writer.write(log.SerializeToString())
    return path


def save_atomically(module, export_dir: str, signatures: Dict, write_assets: Callable[[str], object],
                    options: Optional[tf.saved_model.SaveOptions] = None) -> str:
    """Saves a SavedModel into `<export_dir>.tmp`, lets `write_assets(tmp)` add its files (the
    warmup requests), then renames it over `export_dir`: a failed export leaves nothing half-written."""
    tf.io.gfile.makedirs(os.path.dirname(export_dir.rstrip("/")) or ".")
    tmp = export_dir.rstrip("/") + ".tmp"
    if tf.io.gfile.exists(tmp):
        tf.io.gfile.rmtree(tmp)
    tf.saved_model.save(module, tmp, signatures=signatures, options=options)
    write_assets(tmp)
    if tf.io.gfile.exists(export_dir):
        tf.io.gfile.rmtree(export_dir)
    tf.io.gfile.rename(tmp, export_dir)
    return export_dir


def export_saved_model(
    model: tf.keras.Model,
    export_dir: str,
    warmup_examples: Sequence[bytes],
    extra_signatures: Optional[Dict] = None,
) -> str:
    """Saves `model` with `serving_default` (and any extra signatures) and its warmup file."""
    signatures = {"serving_default": serving_function(model)}
    signatures.update(extra_signatures or {})
    return save_atomically(model, export_dir, signatures, lambda tmp: write_warmup_requests(tmp, warmup_examples))
