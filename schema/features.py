"""Feature contract of candidate rows (DESIGN §4), read from `schema/schema.pbtxt`.

`schema.pbtxt` is the single source of truth for names, types, shapes and domains; this module
adds what a schema cannot say: which features a model reads and in which role, how many
embedding buckets an id feature gets, and the defaults of optional features. Parse specs for
training and serving are derived from the schema, so they cannot drift from it.
"""
import dataclasses
import functools
import os
from typing import Dict, Optional, Tuple

import tensorflow as tf
from tensorflow_metadata.proto.v0 import schema_pb2
from google.protobuf import text_format

SCHEMA_DIR = os.path.dirname(os.path.abspath(__file__))
SCHEMA_PATH = os.path.join(SCHEMA_DIR, "schema.pbtxt")

# Stage tiers of the RecFlow layout, best first. The ground truth (GT) is `rerank_pos`.
STAGE_TIERS: Tuple[str, ...] = ("rerank_pos", "rerank_neg", "rank_neg", "coarse_neg", "prerank_neg")
GROUND_TRUTH_TIER = "rerank_pos"
CANDIDATES_PER_TIER = 10

LABEL_KEY = "click"
STAGE_KEY = "stage"
REQUEST_ID_KEY = "request_id"
REQUEST_TIME_KEY = "request_time"
TRUE_CTR_KEY = "true_ctr"
TEACHER_LOGIT_KEY = "teacher_logit"
SAMPLE_WEIGHT_KEY = "sample_weight"
SAMPLING_PROBABILITY_KEY = "sampling_probability"
NOT_SHOWN_POSITION = 0  # ui_position of a candidate that was not shown
MAX_UI_POSITION = 10
NUM_UI_FORMATS = 3


@dataclasses.dataclass(frozen=True)
class SparseFeature:
    """An id feature embedded by the model; ids are folded into `num_buckets` (id mod buckets)."""

    name: str
    num_buckets: int
    multivalent: bool = False  # variable-length list, average-pooled (0 is the padding id)
    tower: str = "quality"  # "quality" (query/user/item) or "ui" (UI treatment)


@dataclasses.dataclass(frozen=True)
class DenseFeature:
    """A fixed-length float feature, normalised by the model."""

    name: str
    size: int
    tower: str = "quality"


# The model inputs. Everything else in the schema is a label, a key, an oracle or a
# component-added feature and is never fed to a model.
SPARSE_FEATURES: Tuple[SparseFeature, ...] = (
    SparseFeature("user_id", 5_000),
    SparseFeature("query_tokens", 2_048, multivalent=True),
    SparseFeature("hour", 24),
    SparseFeature("device", 3),
    SparseFeature("item_id", 10_000),
    SparseFeature("item_category", 64),
    SparseFeature("item_tags", 512, multivalent=True),
    SparseFeature("ui_position", MAX_UI_POSITION + 1, tower="ui"),
    SparseFeature("ui_format", NUM_UI_FORMATS, tower="ui"),
)
DENSE_FEATURES: Tuple[DenseFeature, ...] = (
    DenseFeature("user_dense", 4),
    DenseFeature("item_dense", 4),
)


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """How the model inputs are embedded, set once per run (`PipelineConfig.features`, passed to
    every Trainer as custom_config "features" and to the NegativeSampler). Today: the embedding
    buckets of each sparse feature (id mod buckets), overriding `SPARSE_FEATURES`' defaults, e.g.
    `(("item_id", 1_000_000),)` for a catalogue of a million items without 10k-fold collisions.
    The rest of the feature registry (roles, dtypes, widths, hashing or vocabularies) is to come."""

    buckets: Tuple[Tuple[str, int], ...] = ()

    def __post_init__(self):
        known = {f.name for f in SPARSE_FEATURES}
        for name, count in self.buckets:
            if name not in known:
                raise ValueError(f"buckets: {name!r} is not a sparse model input; known: {', '.join(sorted(known))}")
            if not isinstance(count, int) or count <= 0:
                raise ValueError(f"buckets: {name} needs a positive bucket count, got {count!r}")

    def sparse_features(self) -> Tuple[SparseFeature, ...]:
        """`SPARSE_FEATURES` with this config's bucket counts."""
        counts = dict(self.buckets)
        return tuple(dataclasses.replace(f, num_buckets=counts.get(f.name, f.num_buckets)) for f in SPARSE_FEATURES)


UI_FEATURES: Tuple[str, ...] = tuple(f.name for f in SPARSE_FEATURES if f.tower == "ui")
MODEL_INPUTS: Tuple[str, ...] = tuple(f.name for f in SPARSE_FEATURES) + tuple(
    f.name for f in DENSE_FEATURES
)

# Optional scalar features and the value a missing one takes when parsed.
OPTIONAL_DEFAULTS: Dict[str, float] = {
    TRUE_CTR_KEY: -1.0,  # -1 marks "unknown" (real data has no oracle)
    "propensity_score": 1.0,
    TEACHER_LOGIT_KEY: float("nan"),  # NaN marks "no teacher prediction": no distillation term
    SAMPLE_WEIGHT_KEY: 1.0,
    SAMPLING_PROBABILITY_KEY: 1.0,
}
OPTIONAL_STRING_DEFAULTS: Dict[str, str] = {"logging_policy": ""}
# The optional features every schema of a pipeline run declares: the components add some
# (teacher_logit, sample_weight, sampling_probability) and read all of them with their defaults.
PIPELINE_OPTIONAL_FEATURES: Tuple[str, ...] = tuple(OPTIONAL_DEFAULTS) + tuple(OPTIONAL_STRING_DEFAULTS)


def missing_pipeline_features(schema: schema_pb2.Schema) -> Tuple[str, ...]:
    """The optional features of `PIPELINE_OPTIONAL_FEATURES` that `schema` does not declare."""
    names = {f.name for f in schema.feature}
    return tuple(name for name in PIPELINE_OPTIONAL_FEATURES if name not in names)


@functools.lru_cache(maxsize=None)
def load_schema(path: str = SCHEMA_PATH) -> schema_pb2.Schema:
    """Reads a TFMD schema text proto (local, gs://, s3:// ... through tf.io.gfile)."""
    with tf.io.gfile.GFile(path) as f:
        return text_format.Parse(f.read(), schema_pb2.Schema())


def _is_serving_feature(feature: schema_pb2.Feature) -> bool:
    return "SERVING" not in feature.not_in_environment


def _parse_spec_for(feature: schema_pb2.Feature):
    dtype = {
        schema_pb2.INT: tf.int64,
        schema_pb2.FLOAT: tf.float32,
        schema_pb2.BYTES: tf.string,
    }[feature.type]
    if feature.name in OPTIONAL_DEFAULTS:
        return tf.io.FixedLenFeature([1], dtype, default_value=[OPTIONAL_DEFAULTS[feature.name]])
    if feature.name in OPTIONAL_STRING_DEFAULTS:
        return tf.io.FixedLenFeature([1], dtype, default_value=[OPTIONAL_STRING_DEFAULTS[feature.name]])
    if feature.HasField("shape"):
        return tf.io.FixedLenFeature([d.size for d in feature.shape.dim], dtype)
    return tf.io.RaggedFeature(dtype, row_splits_dtype=tf.int64)


def training_parse_spec(schema: Optional[schema_pb2.Schema] = None) -> Dict[str, tf.io.FixedLenFeature]:
    """Parse spec of every feature of `schema` (default: the packaged one); optional ones take
    their defaults. A pipeline passes its Schema artifact's schema (`load_schema(fn_args.schema_path)`)."""
    return {f.name: _parse_spec_for(f) for f in (schema or load_schema()).feature}


def serving_parse_spec(schema: Optional[schema_pb2.Schema] = None) -> Dict[str, tf.io.FixedLenFeature]:
    """Parse spec of the model inputs only: what a serving request must carry."""
    return {
        f.name: _parse_spec_for(f)
        for f in (schema or load_schema()).feature
        if _is_serving_feature(f) and f.name in MODEL_INPUTS
    }
