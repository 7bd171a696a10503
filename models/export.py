"""SavedModel export for TF Serving (DESIGN §7).

`serving_default` takes a batch of serialized candidate `tf.Example`s (input key `examples`),
parses them with the serving parse spec derived from the schema, and returns `ctr` (a calibrated
probability) and `logit`. A missing required feature or a wrong dtype fails with an error that
names the feature: `tf.io.parse_example` does this for fixed-length features, and
`parse_examples` adds the check for required variable-length ones (such as `query_tokens`, which
would otherwise parse as an empty list). It also rejects what the schema's domains exclude, where
the model would otherwise change it silently: an int value outside the feature's `int_domain`
(`ui_position = 99` would be folded into bucket 99 mod 11; a negative id would be folded too) and a
NaN in a float feature with `disallow_nan` (it would become 0). The error names the feature and
its domain. A feature whose schema allows NaN (no `disallow_nan`) still maps NaN to 0, as in
training. Every exporter (this one, `models.ranker_export`) parses through `parse_examples`.

TF Serving warms a model up from `assets.extra/tf_serving_warmup_requests`, a TFRecord file of
`PredictionLog`s; `write_warmup_requests` writes one from real examples.
"""
import contextlib
import os
from typing import Callable, Dict, Optional, Sequence

import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from cascade_ranking.schema import features as F

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


def domain_checks(name: str, schema=None) -> Dict[str, object]:
    """What serving checks of a feature's values, from the schema: {"min": m, "max": M} of an
    int_domain (either bound may be absent) and {"disallow_nan": True} of a float_domain."""
    feature = next((f for f in (schema or F.load_schema()).feature if f.name == name), None)
    checks: Dict[str, object] = {}
    if feature is None:
        return checks
    if feature.HasField("int_domain"):
        for bound in ("min", "max"):
            if feature.int_domain.HasField(bound):
                checks[bound] = int(getattr(feature.int_domain, bound))
    if feature.HasField("float_domain") and feature.float_domain.disallow_nan:
        checks["disallow_nan"] = True
    return checks


def check_domain(name: str, values: tf.Tensor, checks: Dict[str, object]) -> None:
    """Asserts (stateful, so it runs inside a tf.function) that `values` of feature `name` lie in its
    schema domain (`domain_checks`); the message names the feature and the rule."""
    values = values.flat_values if isinstance(values, tf.RaggedTensor) else values
    if "min" in checks or "max" in checks:
        low, high = checks.get("min"), checks.get("max")
        ok = tf.constant(True)
        if low is not None:
            ok = tf.logical_and(ok, tf.reduce_all(values >= low))
        if high is not None:
            ok = tf.logical_and(ok, tf.reduce_all(values <= high))
        domain = f"[{'' if low is None else low}, {'' if high is None else high}]"
        tf.debugging.Assert(ok, [f"Feature: {name} has a value outside its schema domain {domain}:",
                                 tf.reduce_min(values), tf.reduce_max(values)])
    if checks.get("disallow_nan"):
        tf.debugging.Assert(tf.logical_not(tf.reduce_any(tf.math.is_nan(values))), [
            f"Feature: {name} has a NaN value and its schema says disallow_nan"])


def parse_examples(serialized: tf.Tensor, spec: Dict, schema=None) -> Dict[str, tf.Tensor]:
    """`tf.io.parse_example`, plus a presence check on required variable-length features and the
    schema's domain checks (`check_domain`).

    Fixed-length features already fail in `parse_example` with an error naming them; a missing
    variable-length (ragged) feature would parse as an empty list, so each required one gets an
    Assert `row_length >= required_values(name)` whose message names it. The Asserts are stateful:
    inside a tf.function the automatic control dependencies run them before the function returns.
    """
    features = tf.io.parse_example(serialized, spec)
    for name, value in features.items():
        needed = required_values(name, schema) if isinstance(value, tf.RaggedTensor) else 0
        if needed:
            lengths = value.row_splits[1:] - value.row_splits[:-1]
            tf.debugging.Assert(tf.reduce_all(lengths >= needed), [
                f"Feature: {name} is required (at least {needed} value(s)) but could not be found"])
        if value.dtype != tf.string:  # every serving input: the spec holds the model's inputs only
            check_domain(name, value, domain_checks(name, schema))
    return features


def serving_function(model: tf.keras.Model, parse_spec: Optional[Dict] = None, schema=None):
    """`serving_default`: serialized examples [N] -> {"ctr": [N], "logit": [N]} (`parse_examples`)."""
    spec = parse_spec or F.serving_parse_spec(schema)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=SERVING_INPUT_KEY)], autograph=False)
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


def _without_keras_traces():
    """The scope `keras.Model.save(save_traces=False)` saves in: Keras layers add no traced copies of
    their call functions (nor the Keras metadata to revive them as Keras objects) to the SavedModel.
    Served models are called through their signatures and nothing here loads them back as Keras
    objects, so those traces were pure cost: tracing every layer's call took most of each export
    (measured on the demo's cascade Trainer: the ranker's export 3.2–3.9 s → 1.1 s, the
    pre-ranker's 0.9 s → 0.5 s). The variables keep their checkpoint names. The scope is
    Keras-internal (pinned keras 2.15); without it, the traces are saved as before."""
    try:
        from keras.src.saving.legacy.saved_model.utils import keras_option_scope
    except ImportError:  # another Keras: save as it does by default
        return contextlib.nullcontext()
    return keras_option_scope(save_traces=False)


def save_atomically(module, export_dir: str, signatures: Dict, write_assets: Callable[[str], object],
                    options: Optional[tf.saved_model.SaveOptions] = None) -> str:
    """Saves a SavedModel into `<export_dir>.tmp`, lets `write_assets(tmp)` add its files (the
    warmup requests), then renames it over `export_dir`: a failed export leaves nothing half-written."""
    tf.io.gfile.makedirs(os.path.dirname(export_dir.rstrip("/")) or ".")
    tmp = export_dir.rstrip("/") + ".tmp"
    if tf.io.gfile.exists(tmp):
        tf.io.gfile.rmtree(tmp)
    with _without_keras_traces():
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
