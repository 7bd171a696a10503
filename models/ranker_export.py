"""SavedModel export of the Factory Floor ranker for TF Serving (DESIGN §7).

Signatures. Serialized `tf.Example`s are parsed with the schema's serving spec through
`models.export.parse_examples`: a missing required feature or a wrong dtype fails with an error
naming it (`tf.io.parse_example` does this for fixed-length features, `parse_examples` adds the
check for required variable-length ones such as `query_tokens`, which would otherwise parse as an
empty list).

    serving_default   examples [N]                        -> ctr [N], logit [N], score [N]
                      ctr / logit at the example's UI treatment; score = the cascade score (the
                      logit at the reference UI treatment, `FactoryFloorRanker.cascade_logit`),
                      by which the ranking stage orders candidates that have not been shown
    quality           examples [A] (quality features)     -> q [A, d]
    ui                examples [M] (UI features; other features are ignored) -> u [M, d]
    score_ui_grid     ad_examples [A] (tf.Examples, quality features),
                      ui_position [M], ui_format [M] (int64: the M UI treatments, one value each)
                                                          -> ctr [A, M], logit [A, M]
                      ctr[a, m] = σ(a·(q_a·u_m) + b): Q runs once per ad, U is cached.

The grid takes its UI treatments as dense int64 vectors rather than tf.Examples: a treatment is
just its UI ids, and DESIGN §7 only asks for "UI features → U". Its U comes from a cache: the UI
features are univalent ids folded into small vocabularies (id mod num_buckets; 11 positions × 3
formats = 33 treatments), so `ui_table` runs the U tower once, at export, on every folded
combination, and the grid gathers row Σ_f (id_f mod n_f)·Π_{g>f} n_g of that table: the same
u as the tower gives (`serving_default` per pair within 1e-5, a test checks), without the UI parse
and the U tower per call. With more than `MAX_UI_TABLE_ROWS` combinations the grid runs U instead.

`quality`, `ui` and `score_ui_grid` exist only for Q·U models (qu_dim > 0). The bias-constraint
duals are checkpointed with the model for training but are not in the SavedModel.
`assets.extra/tf_serving_warmup_requests` holds one PredictionLog per signature, built from real
examples. The export goes to a temporary directory that is renamed into place (as
`models.export` does).
"""
import os
from typing import Dict, Optional, Sequence

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from cascade_ranking.models import export
from cascade_ranking.models.export import parse_examples  # noqa: F401  (shared with the baseline exporter)
from cascade_ranking.models.ranker import FactoryFloorRanker
from cascade_ranking.schema import features as F

AD_INPUT_KEY = "ad_examples"
MAX_UI_TABLE_ROWS = 4096  # above this many folded UI combinations, the grid runs the U tower per call


def _spec_for(names, schema=None, features: F.FeatureConfig = F.DEFAULT) -> Dict:
    spec = F.serving_parse_spec(schema, features)
    missing = [n for n in names if n not in spec]
    if missing:
        raise ValueError(f"features {missing} are not serving inputs of the schema")
    return {n: spec[n] for n in names}


def quality_parse_spec(model: FactoryFloorRanker, schema=None) -> Dict:
    return _spec_for(model.quality_names, schema, model.features)


def ui_parse_spec(model: FactoryFloorRanker, schema=None) -> Dict:
    return _spec_for(model.ui_names, schema, model.features)


def has_ui_grid(model: FactoryFloorRanker) -> bool:
    """Whether `score_ui_grid` can take the UI treatments as int64 id vectors: every UI feature of
    the model's registry is a univalent int64 id (the package's own ui_position and ui_format are)."""
    by_name = {f.name: f for f in model.embedding.sparse_features}
    features = [by_name.get(name) for name in model.ui_names]
    return model.factorized and all(f is not None and not f.multivalent and f.dtype == "int64" for f in features)


def _ui_buckets(model: FactoryFloorRanker) -> Sequence[int]:
    """num_buckets of each UI feature (in `model.ui_names` order, the model's own bucket counts);
    all must be univalent int64 ids (`has_ui_grid`)."""
    if not has_ui_grid(model):
        raise ValueError(f"the UI grid needs univalent int64 UI id features, got {model.ui_names}")
    by_name = {f.name: f for f in model.embedding.sparse_features}
    return [by_name[name].num_buckets for name in model.ui_names]


def ui_table(model: FactoryFloorRanker) -> Optional[tf.Tensor]:
    """u of every folded UI combination, [Π n_f, d], row-major over `model.ui_names` (None if too big)."""
    buckets = _ui_buckets(model)
    if int(np.prod(buckets)) > MAX_UI_TABLE_ROWS:
        return None
    grids = np.meshgrid(*[np.arange(n, dtype=np.int64) for n in buckets], indexing="ij")
    ids = {name: tf.constant(g.reshape(-1, 1)) for name, g in zip(model.ui_names, grids)}
    return tf.constant(model.ui(ids).numpy())


def ui_table_rows(ui_ids: Sequence[tf.Tensor], buckets: Sequence[int]) -> tf.Tensor:
    """Row of `ui_table` for each treatment: Σ_f (id_f mod n_f)·Π_{g>f} n_g."""
    row = tf.zeros_like(ui_ids[0])
    for ids, n in zip(ui_ids, buckets):
        row = row * n + tf.math.floormod(ids, n)
    return row


def ranker_signatures(model: FactoryFloorRanker, schema=None) -> Dict[str, tf.types.experimental.GenericFunction]:
    """The tf.functions to save as signatures (see the module docstring); parse specs from `schema`
    (the pipeline's Schema artifact; default: the packaged schema)."""
    q_spec, u_spec = quality_parse_spec(model, schema), ui_parse_spec(model, schema)
    examples = tf.TensorSpec([None], tf.string, name=export.SERVING_INPUT_KEY)
    all_spec = _spec_for(model.feature_names, schema, model.features)

    @tf.function(input_signature=[examples], autograph=False)
    def serving_default(examples):
        features = parse_examples(examples, all_spec, schema)
        logit = tf.reshape(model(features, training=False), [-1])
        return {"ctr": tf.sigmoid(logit), "logit": logit, "score": model.cascade_logit(features, training=False)}

    signatures = {"serving_default": serving_default}
    if not model.factorized:
        return signatures

    @tf.function(input_signature=[examples], autograph=False)
    def quality(examples):
        return {"q": model.quality(parse_examples(examples, q_spec, schema))}

    @tf.function(input_signature=[examples], autograph=False)
    def ui(examples):
        return {"u": model.ui(parse_examples(examples, u_spec, schema))}

    signatures.update(quality=quality, ui=ui)
    if not has_ui_grid(model):
        return signatures
    buckets = _ui_buckets(model)
    table = ui_table(model)

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([None], tf.string, name=AD_INPUT_KEY)]
                 + [tf.TensorSpec([None], tf.int64, name=name) for name in model.ui_names])
    def score_ui_grid(ad_examples, *ui_ids):
        for name, ids in zip(model.ui_names, ui_ids):
            export.check_domain(name, ids, export.domain_checks(name, schema))
        q = model.quality(parse_examples(ad_examples, q_spec, schema))
        if table is None:
            u = model.ui({name: ids[:, tf.newaxis] for name, ids in zip(model.ui_names, ui_ids)})
        else:
            u = tf.gather(table, ui_table_rows(ui_ids, buckets))
        logit = model.transfer(tf.matmul(q, u, transpose_b=True))
        return {"ctr": tf.sigmoid(logit), "logit": logit}

    signatures.update(score_ui_grid=score_ui_grid)
    return signatures


def grid_inputs(model: FactoryFloorRanker, ad_examples: Sequence[bytes], ui_examples: Sequence[bytes],
                schema=None) -> Dict:
    """The `score_ui_grid` inputs for ads and UI treatments given as serialized tf.Examples."""
    ui_ids = parse_examples(tf.constant(list(ui_examples)), ui_parse_spec(model, schema), schema)
    inputs = {AD_INPUT_KEY: tf.constant(list(ad_examples))}
    inputs.update({name: tf.reshape(ui_ids[name], [-1]) for name in model.ui_names})
    return inputs


def _log(signature: str, inputs: Dict[str, object], model_name: str) -> bytes:
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
    for key, values in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(values))
    return prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString()


def write_warmup_requests(export_dir: str, serialized_examples: Sequence[bytes], signatures: Sequence[str],
                          model_name: str = "model", model: Optional[FactoryFloorRanker] = None,
                          schema=None) -> str:
    """One PredictionLog per signature, on the given examples (`models.export.WARMUP_FILE`); the grid's
    UI treatments are the UI ids of the first 8 examples (`model` gives their names)."""
    examples = list(serialized_examples)
    if not examples:
        raise ValueError("warmup needs at least one serialized example")
    path = os.path.join(export_dir, export.WARMUP_FILE)
    tf.io.gfile.makedirs(os.path.dirname(path))
    per_signature = {
        "serving_default": {export.SERVING_INPUT_KEY: examples},
        "quality": {export.SERVING_INPUT_KEY: examples},
        "ui": {export.SERVING_INPUT_KEY: examples},
    }
    if "score_ui_grid" in signatures:
        if model is None:
            raise ValueError("the score_ui_grid warmup needs the model (its UI feature names)")
        per_signature["score_ui_grid"] = {k: v.numpy() for k, v in grid_inputs(model, examples, examples[:8], schema).items()}
    with tf.io.TFRecordWriter(path) as writer:
        for name in signatures:
            writer.write(_log(name, per_signature[name], model_name))
    return path


def export_ranker(model: FactoryFloorRanker, export_dir: str, warmup_examples: Sequence[bytes],
                  model_name: str = "model", options: Optional[tf.saved_model.SaveOptions] = None,
                  schema=None) -> str:
    """Saves the ranker with its signatures and warmup file (temporary directory, then rename);
    requests are parsed with `schema` (the pipeline's; default: the packaged schema)."""
    signatures = ranker_signatures(model, schema)
    return export.save_atomically(model, export_dir, signatures,
                                  lambda tmp: write_warmup_requests(tmp, warmup_examples, list(signatures), model_name, model,
                                                                    schema),
                                  options)
