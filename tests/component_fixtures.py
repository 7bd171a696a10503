"""Helpers for component tests: Examples artifacts on disk and a small exported ranking model."""
import os

import tensorflow as tf
from google.protobuf import text_format
from tfx.types import artifact_utils, standard_artifacts

from cascade_ranking.datasources import example_io, synthetic
from cascade_ranking.models import export, inputs
from cascade_ranking.models.baseline_ranker import BaselineRanker
from cascade_ranking.models.config import TrainerConfig


def schema_artifact(uri: str, schema) -> standard_artifacts.Schema:
    """A Schema artifact whose directory holds `schema` as schema.pbtxt, as ImportSchemaGen writes it."""
    tf.io.gfile.makedirs(uri)
    with open(os.path.join(uri, "schema.pbtxt"), "w") as f:
        f.write(text_format.MessageToString(schema))
    artifact = standard_artifacts.Schema()
    artifact.uri = uri
    return artifact


def examples_artifact(uri: str, splits=("train", "eval")) -> standard_artifacts.Examples:
    artifact = standard_artifacts.Examples()
    artifact.uri = uri
    artifact.split_names = artifact_utils.encode_split_names(list(splits))
    return artifact


def synthetic_examples(root: str, num_requests: int, seed: int = 0, extra_records=None) -> standard_artifacts.Examples:
    """Generates candidate rows into `root` (Split-train/, Split-eval/); `extra_records` maps a
    split to raw records appended to it (e.g. corrupted bytes)."""
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=num_requests, seed=seed), root)
    for split, records in (extra_records or {}).items():
        path = os.path.join(root, f"Split-{split}", "extra.gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as w:
            for raw in records:
                w.write(raw)
    return examples_artifact(root)


def exported_model(examples_root: str, model_root: str) -> standard_artifacts.Model:
    """Trains the baseline ranker for a few steps and exports it as a Model artifact."""
    config = TrainerConfig(batch_size=128, embedding_dim=4, hidden_units=(16,))
    train = inputs.parsed_batches([os.path.join(examples_root, "Split-train", "data_*")], 128, exposed_only=True)
    model = BaselineRanker(config)
    model.embedding.adapt(train)
    model.compile(optimizer="adam", loss=tf.keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(train.map(inputs.to_model_io).take(5), verbose=0)
    artifact = standard_artifacts.Model()
    artifact.uri = model_root
    warmup = list(example_io.read_examples(os.path.join(examples_root, "Split-eval", "data_*")))[:2]
    export.export_saved_model(model, os.path.join(model_root, "Format-Serving"), [e.SerializeToString() for e in warmup])
    return artifact


def request_list_splits(root, num_requests: int, seed: int, list_size: int):
    """Synthetic candidate rows under `root/examples`, packed into request lists in the
    NegativeSampler's layout (`root/lists/Split-{train,eval}/*.gz`); returns `root/lists`."""
    from cascade_ranking.models import list_inputs as LI

    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=num_requests, seed=seed), str(root / "examples"))
    for split in ("train", "eval"):
        lists = LI.request_lists_from_candidates(str(root / "examples" / f"Split-{split}"), list_size, shuffle_seed=0)
        LI.write_request_lists(lists, str(root / "lists" / f"Split-{split}" / "data_tfrecord-00000-of-00001.gz"))
    return root / "lists"


def candidate_blind_model(model_root: str) -> standard_artifacts.Model:
    """A Model artifact that cannot rank: its `serving_default` scores a candidate by a hash of
    (request_id, item_id), a random order of each request independent of relevance (outputs `score`
    and `ctr` = 0.05 + 0.2·score). A hash of item_id alone would not do: popular items are the GT of
    many requests, so one lucky hash of such an item lifts recall in all of them."""

    class Blind(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=export.SERVING_INPUT_KEY)])
        def serve(self, examples):
            ids = tf.io.parse_example(examples, {name: tf.io.FixedLenFeature([], tf.int64)
                                                 for name in ("request_id", "item_id")})
            key = tf.strings.join([tf.strings.as_string(ids["request_id"]), tf.strings.as_string(ids["item_id"])], ":")
            score = tf.cast(tf.strings.to_hash_bucket_fast(key, 1 << 20), tf.float32) / (1 << 20)
            return {"score": score, "ctr": 0.05 + 0.2 * score}

    module = Blind()
    tf.saved_model.save(module, os.path.join(model_root, "Format-Serving"), signatures={"serving_default": module.serve})
    artifact = standard_artifacts.Model()
    artifact.uri = model_root
    return artifact
