"""SavedModel export of the Factory Floor ranker for TF Serving (DESIGN §7).

Signatures (all inputs are serialized `tf.Example`s, parsed with the schema's serving spec; a missing
required feature or a wrong dtype fails with an error naming it: `tf.io.parse_example` does this
for fixed-length features, and `parse_examples` adds the check for required variable-length ones
such as `query_tokens`, which would otherwise parse as an empty list):

    serving_default   examples [N]                        -> ctr [N], logit [N]
    quality           examples [A] (quality features)     -> q [A, d]
    ui                examples [M] (UI features; other features are ignored) -> u [M, d]
    score_ui_grid     ad_examples [A], ui_examples [M]    -> ctr [A, M], logit [A, M]
                      ctr[a, m] = σ(a·(q_a·u_m) + b): Q runs once per ad, U once per treatment.

`quality`, `ui` and `score_ui_grid` exist only for Q·U models (qu_dim > 0). The bias-constraint
duals are training state outside the model and are not saved. `assets.extra/
tf_serving_warmup_requests` holds one PredictionLog per signature, built from real examples.
The export goes to a temporary directory that is renamed into place (as `models.export` does).
"""
import os
from typing import Dict, Optional, Sequence

import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from models import export
from models.ranker import FactoryFloorRanker
from schema import features as F

AD_INPUT_KEY = "ad_examples"
UI_INPUT_KEY = "ui_examples"


def _spec_for(names) -> Dict:
    spec = F.serving_parse_spec()
    missing = [n for n in names if n not in spec]
    if missing:
        raise ValueError(f"features {missing} are not serving inputs of the schema")
    return {n: spec[n] for n in names}


def _min_values(name: str) -> int:
    """Values a variable-length feature must have per example (schema value_count.min if required)."""
    feature = next((f for f in F.load_schema().feature if f.name == name), None)
    if feature is None or feature.presence.min_fraction < 1.0:
        return 0
    return max(int(feature.value_count.min), 1)


def parse_examples(serialized: tf.Tensor, spec: Dict) -> Dict[str, tf.Tensor]:
    """`tf.io.parse_example`, plus a presence check on required variable-length features.

    Fixed-length features already fail in `parse_example` with an error naming them; a missing
    variable-length (ragged) feature would parse as an empty list, so it is checked here and the
    error names it too.
    """
    features = tf.io.parse_example(serialized, spec)
    for name, value in features.items():
        needed = _min_values(name) if isinstance(value, tf.RaggedTensor) else 0
        if needed:  # a stateful Assert: tf.function runs it before returning (automatic control deps)
            lengths = value.row_splits[1:] - value.row_splits[:-1]
            tf.debugging.Assert(tf.reduce_all(lengths >= needed), [
                f"Feature: {name} is required (at least {needed} value(s)) but could not be found"])
    return features


def quality_parse_spec(model: FactoryFloorRanker) -> Dict:
    return _spec_for(model.quality_names)


def ui_parse_spec(model: FactoryFloorRanker) -> Dict:
    return _spec_for(model.ui_names)


def ranker_signatures(model: FactoryFloorRanker) -> Dict[str, tf.types.experimental.GenericFunction]:
    """The tf.functions to save as signatures (see the module docstring)."""
    q_spec, u_spec = quality_parse_spec(model), ui_parse_spec(model)
    all_spec = _spec_for(model.feature_names)
    examples = tf.TensorSpec([None], tf.string, name=export.SERVING_INPUT_KEY)

    @tf.function(input_signature=[examples])
    def serving_default(examples):  # as models.export.serving_function, with the ragged presence check
        logit = tf.reshape(model(parse_examples(examples, all_spec), training=False), [-1])
        return {"ctr": tf.sigmoid(logit), "logit": logit}

    signatures = {"serving_default": serving_default}
    if not model.factorized:
        return signatures

    @tf.function(input_signature=[examples])
    def quality(examples):
        return {"q": model.quality(parse_examples(examples, q_spec))}

    @tf.function(input_signature=[examples])
    def ui(examples):
        return {"u": model.ui(parse_examples(examples, u_spec))}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=AD_INPUT_KEY),
                                  tf.TensorSpec([None], tf.string, name=UI_INPUT_KEY)])
    def score_ui_grid(ad_examples, ui_examples):
        logit = model.grid_logits(parse_examples(ad_examples, q_spec), parse_examples(ui_examples, u_spec))
        return {"ctr": tf.sigmoid(logit), "logit": logit}

    signatures.update(quality=quality, ui=ui, score_ui_grid=score_ui_grid)
    return signatures


def _log(signature: str, inputs: Dict[str, Sequence[bytes]], model_name: str) -> bytes:
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
    for key, values in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(list(values), dtype=tf.string))
    return prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString()


def write_warmup_requests(export_dir: str, serialized_examples: Sequence[bytes], signatures: Sequence[str],
                          model_name: str = "model") -> str:
    """One PredictionLog per signature, on the given examples (`models.export.WARMUP_FILE`)."""
    examples = list(serialized_examples)
    if not examples:
        raise ValueError("warmup needs at least one serialized example")
    path = os.path.join(export_dir, export.WARMUP_FILE)
    tf.io.gfile.makedirs(os.path.dirname(path))
    per_signature = {
        "serving_default": {export.SERVING_INPUT_KEY: examples},
        "quality": {export.SERVING_INPUT_KEY: examples},
        "ui": {export.SERVING_INPUT_KEY: examples},
        "score_ui_grid": {AD_INPUT_KEY: examples, UI_INPUT_KEY: examples[: min(len(examples), 8)]},
    }
    with tf.io.TFRecordWriter(path) as writer:
        for name in signatures:
            writer.write(_log(name, per_signature[name], model_name))
    return path


def export_ranker(model: FactoryFloorRanker, export_dir: str, warmup_examples: Sequence[bytes],
                  model_name: str = "model", options: Optional[tf.saved_model.SaveOptions] = None) -> str:
    """Saves the ranker with its signatures and warmup file (temporary directory, then rename)."""
    signatures = ranker_signatures(model)
    return export.save_atomically(model, export_dir, signatures,
                                  lambda tmp: write_warmup_requests(tmp, warmup_examples, list(signatures), model_name),
                                  options)
