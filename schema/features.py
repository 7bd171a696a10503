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

import numpy as np
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
# Logs without tiers (impression and click logs with no logging cascade): a candidate row without
# a `stage` is ground truth when clicked (tier rerank_pos) and a logged negative otherwise
# (rerank_neg); a row without `ui_position` was shown, at `SHOWN_WITHOUT_POSITION`. Every reader
# applies this one rule (`tier_without_stage`): the NegativeSampler, the evaluators, the teacher.
SHOWN_WITHOUT_POSITION = 1
MASK_KEY = "mask"  # request lists: 1 = a real candidate, 0 = padding
# Keys and labels the pipeline reads by these names; none of them may be declared as a model input.
RESERVED_NAMES: Tuple[str, ...] = (REQUEST_ID_KEY, REQUEST_TIME_KEY, LABEL_KEY, STAGE_KEY, MASK_KEY, TRUE_CTR_KEY,
                                   TEACHER_LOGIT_KEY, SAMPLE_WEIGHT_KEY, SAMPLING_PROBABILITY_KEY, "propensity_score",
                                   "logging_policy")
NOT_SHOWN_POSITION = 0  # ui_position of a candidate that was not shown
MAX_UI_POSITION = 10
NUM_UI_FORMATS = 3


ROLES = ("query", "item", "ui")  # request/user/query side, candidate item side, UI treatment
KINDS = ("id", "ids", "dense")  # one id, a list of ids (average-pooled), a fixed-width float vector
ID_DTYPES = ("int64", "string")
LOOKUPS = ("hash", "vocabulary")  # how ids become embedding rows (InputFeature.lookup)


@dataclasses.dataclass(frozen=True)
class SparseFeature:
    """An id feature embedded by the model (the model-facing view of an `InputFeature`).

    lookup "hash": int64 ids are folded into `num_buckets` by id mod buckets (ids in [0, buckets)
    never share a row); string ids are hashed into them (Keras `Hashing`, FarmHash64).
    lookup "vocabulary": ids are looked up in `vocabulary_file` (one id a line, as `tft.vocabulary`
    writes it; Keras `StringLookup`/`IntegerLookup`), unseen ids go to `oov_buckets` OOV rows, and
    `num_buckets` = vocabulary size + oov_buckets (0 until the Transform output is resolved,
    `FeatureConfig.with_vocabularies`).
    A multivalent feature is a list of at most `max_length` ids, average-pooled; its padding (0, or
    the empty string) is no id."""

    name: str
    num_buckets: int
    multivalent: bool = False
    tower: str = "quality"  # "quality" (query/user/item) or "ui" (UI treatment)
    dtype: str = "int64"
    max_length: int = 1
    lookup: str = "hash"
    vocabulary_file: str = ""
    oov_buckets: int = 0


@dataclasses.dataclass(frozen=True)
class DenseFeature:
    """A fixed-length float feature, normalised by the model."""

    name: str
    size: int
    tower: str = "quality"


@dataclasses.dataclass(frozen=True)
class InputFeature:
    """One model input of the feature registry (`FeatureConfig.inputs`), declared once.

    role    "query" (one value per request: user, query, context), "item" (per candidate) or "ui"
            (per candidate: how it was shown; the ranker's U tower reads these, the cascade score
            does not);
    kind    "id" (one id), "ids" (a list of ids, average-pooled) or "dense" (floats, normalised);
    dtype   "int64" or "string" for ids (strings are hashed: Keras `Hashing`); dense is float;
    width   dense: values per row; ids: the most values a row keeps (request lists cut longer
            lists, and the NegativeSampler counts the cuts);
    lookup  id kinds: how ids become embedding rows. "hash" (the default): `buckets` rows, int64
            ids fold as id mod buckets (a catalogue of N ids numbered 0..N−1 needs buckets ≥ N to
            embed without sharing rows), strings are hashed into them. "vocabulary": one row per
            distinct id of the train split (a `tft.vocabulary` computed by the pipeline's Transform
            step, `schema.vocabulary`) plus `oov_buckets` rows for ids it has not seen; the table
            size is known after that step, so a vocabulary feature declares no `buckets`; not
            for UI features (their values 0..buckets−1 are enumerated by score_ui_grid);
    buckets id kinds with lookup hash: embedding rows;
    oov_buckets  lookup vocabulary: rows shared by ids outside the vocabulary (default 1);
    min_count    lookup vocabulary: keep ids seen at least this often in train (0: all);
    max_tokens   lookup vocabulary: keep the most frequent ones only (0: all).
    """

    name: str
    role: str
    kind: str = "id"
    dtype: str = "int64"
    width: int = 1
    buckets: int = 0
    lookup: str = "hash"
    oov_buckets: int = 1
    min_count: int = 0
    max_tokens: int = 0

    def __post_init__(self):
        if not self.name:
            raise ValueError("a feature needs a name")
        if self.role not in ROLES:
            raise ValueError(f"feature {self.name}: role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.kind not in KINDS:
            raise ValueError(f"feature {self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.width, int) or self.width <= 0:
            raise ValueError(f"feature {self.name}: width must be a positive int, got {self.width!r}")
        if self.lookup not in LOOKUPS:
            raise ValueError(f"feature {self.name}: lookup must be one of {', '.join(LOOKUPS)}, got {self.lookup!r}")
        if self.kind == "dense" and self.lookup != "hash":
            raise ValueError(f"feature {self.name}: lookup {self.lookup} is for id features, not dense ones")
        for field in ("oov_buckets", "min_count", "max_tokens"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"feature {self.name}: {field} must be an int ≥ 0, got {value!r}")
        if self.lookup == "vocabulary":
            if self.role == "ui":  # the UI grid and the bias slices enumerate ids 0..buckets−1
                raise ValueError(f"feature {self.name}: a UI feature's ids are its values 0..buckets−1 (score_ui_grid, "
                                 f"bias slices); use lookup hash with buckets")
            if self.oov_buckets < 1:
                raise ValueError(f"feature {self.name}: a vocabulary feature needs oov_buckets ≥ 1 for unseen ids, "
                                 f"got {self.oov_buckets}")
            if self.buckets:
                raise ValueError(f"feature {self.name}: a vocabulary feature's table size comes from its vocabulary; "
                                 f"drop buckets ({self.buckets}) or use lookup hash")
        elif self.min_count or self.max_tokens:
            raise ValueError(f"feature {self.name}: min_count and max_tokens need lookup vocabulary")
        if self.kind == "dense":
            if self.dtype not in ("float32", "float", "int64"):  # int64 is the field's default
                raise ValueError(f"feature {self.name}: a dense feature is float32, got dtype {self.dtype!r}")
            object.__setattr__(self, "dtype", "float32")
        else:
            if self.dtype not in ID_DTYPES:
                raise ValueError(f"feature {self.name}: an id feature's dtype is int64 or string, got {self.dtype!r}")
            if self.lookup == "hash" and (not isinstance(self.buckets, int) or self.buckets <= 0):
                raise ValueError(f"feature {self.name}: an id feature needs buckets > 0, got {self.buckets!r}")
            if self.kind == "id" and self.width != 1:
                raise ValueError(f"feature {self.name}: a single id has width 1 (kind ids for a list), got {self.width}")

    @property
    def is_dense(self) -> bool:
        return self.kind == "dense"

    @property
    def has_vocabulary(self) -> bool:
        return self.lookup == "vocabulary"

    def omitted_fields(self) -> Tuple[str, ...]:
        """Fields a config file need not show (at their defaults): a hashed feature's vocabulary
        settings, a vocabulary feature's buckets (`models.config.to_dict`)."""
        if self.has_vocabulary:
            return ("buckets",) if not self.buckets else ()
        defaults = {"lookup": "hash", "oov_buckets": 1, "min_count": 0, "max_tokens": 0}
        return tuple(name for name, default in defaults.items() if getattr(self, name) == default)

    @property
    def multivalent(self) -> bool:
        return self.kind == "ids"

    @property
    def is_string(self) -> bool:
        return self.dtype == "string"

    @property
    def pad_value(self):
        """The value of padding: 0.0 dense, b"" string ids, 0 int ids."""
        return 0.0 if self.is_dense else (b"" if self.is_string else 0)

    @property
    def tf_dtype(self) -> tf.DType:
        return tf.float32 if self.is_dense else (tf.string if self.is_string else tf.int64)

    @property
    def np_dtype(self):
        return np.float32 if self.is_dense else (object if self.is_string else np.int64)

    @property
    def schema_type(self) -> int:
        return schema_pb2.FLOAT if self.is_dense else (schema_pb2.BYTES if self.is_string else schema_pb2.INT)

    def sparse(self, vocabulary: Optional[Tuple[str, int]] = None) -> SparseFeature:
        """The model's view; `vocabulary` = (file, size) of a vocabulary feature once resolved."""
        tower = "ui" if self.role == "ui" else "quality"
        if not self.has_vocabulary:
            return SparseFeature(self.name, self.buckets, self.multivalent, tower, self.dtype, self.width)
        path, size = vocabulary or ("", 0)
        return SparseFeature(self.name, size + self.oov_buckets if path else 0, self.multivalent, tower, self.dtype,
                             self.width, "vocabulary", path, self.oov_buckets)

    def dense(self) -> DenseFeature:
        return DenseFeature(self.name, self.width, "ui" if self.role == "ui" else "quality")


# The package's own layout: the synthetic generator's and the converters' candidate rows.
DEFAULT_INPUTS: Tuple[InputFeature, ...] = (
    InputFeature("user_id", "query", buckets=5_000),
    InputFeature("query_tokens", "query", "ids", width=8, buckets=2_048),
    InputFeature("hour", "query", buckets=24),
    InputFeature("device", "query", buckets=3),
    InputFeature("user_dense", "query", "dense", width=4),
    InputFeature("item_id", "item", buckets=10_000),
    InputFeature("item_category", "item", buckets=64),
    InputFeature("item_tags", "item", "ids", width=8, buckets=512),
    InputFeature("item_dense", "item", "dense", width=4),
    InputFeature("ui_position", "ui", buckets=MAX_UI_POSITION + 1),
    InputFeature("ui_format", "ui", buckets=NUM_UI_FORMATS),
)
ITEM_KEY = "item_id"  # the candidate's id: random negatives, the item corpus and retrieval's index
SHOWN_KEY = "ui_position"  # > 0 when the candidate was shown (NOT_SHOWN_POSITION otherwise)


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """The feature registry: every model input declared once (`inputs`), set once per run
    (`PipelineConfig.features`, passed to every Trainer as custom_config "features" and to the
    NegativeSampler). Parse specs, request-list specs, the sampler's columns, every stage's towers
    and the serving signatures derive from it (`schema.request_list`, `models.list_inputs`,
    `components.negative_sampler`, `models.export`), and `check_schema` holds it against the run's
    Schema artifact. `buckets` overrides the bucket counts of `inputs` by name, e.g.
    `(("item_id", 1_000_000),)` for a catalogue of a million items (`--set features.buckets=...`).

    `item_key` names the candidate's id (an "item" id feature): the item corpus of random negatives
    and retrieval's index key on it.

    `vocabularies` is not for users: each Trainer fills it from the pipeline's Transform output
    (`with_vocabularies`, in `models.trainers.common.feature_config`) with (name, vocabulary file,
    vocabulary size) of every `lookup: vocabulary` feature, so the towers' `sparse_features()`
    carry the file and the table size."""

    inputs: Tuple[InputFeature, ...] = DEFAULT_INPUTS
    buckets: Tuple[Tuple[str, int], ...] = ()
    item_key: str = ITEM_KEY
    vocabularies: Tuple[Tuple[str, str, int], ...] = ()

    def __post_init__(self):
        names = [f.name for f in self.inputs]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"inputs: {', '.join(duplicated)} declared more than once")
        reserved = sorted(set(names) & set(RESERVED_NAMES))
        if reserved:
            raise ValueError(f"inputs: {', '.join(reserved)} is a key or label of the pipeline, not a model input")
        sparse = {f.name for f in self.inputs if not f.is_dense}
        for name, count in self.buckets:
            if name not in sparse:
                raise ValueError(f"buckets: {name!r} is not a sparse model input; known: {', '.join(sorted(sparse))}")
            if not isinstance(count, int) or count <= 0:
                raise ValueError(f"buckets: {name} needs a positive bucket count, got {count!r}")
        vocabulary_names = {f.name for f in self.inputs if f.has_vocabulary}
        for name, _ in self.buckets:
            if name in vocabulary_names:
                raise ValueError(f"buckets: {name} has lookup vocabulary; its table size comes from its vocabulary")
        for entry in self.vocabularies:
            if len(entry) != 3 or entry[0] not in vocabulary_names or not entry[1] or int(entry[2]) < 0:
                raise ValueError(f"vocabularies: {entry!r} is not (name of a lookup vocabulary feature, file, size)")
        if not any(f.role == "query" for f in self.inputs) or not any(f.role == "item" for f in self.inputs):
            raise ValueError("inputs: the towers need at least one query-side and one item-side feature")
        item = self.feature(self.item_key) if self.item_key in names else None
        if item is None or item.role != "item" or item.kind != "id":
            raise ValueError(f"item_key: {self.item_key!r} must name an item-side id feature of inputs")

    def omitted_fields(self) -> Tuple[str, ...]:
        """`vocabularies` is the Trainers' (see above): a config file shows it only when set."""
        return () if self.vocabularies else ("vocabularies",)

    def feature(self, name: str) -> InputFeature:
        for f in self.resolved():
            if f.name == name:
                return f
        raise KeyError(name)

    def resolved(self) -> Tuple[InputFeature, ...]:
        """`inputs` with the `buckets` overrides applied."""
        counts = dict(self.buckets)
        return tuple(dataclasses.replace(f, buckets=counts[f.name]) if f.name in counts else f for f in self.inputs)

    def of_role(self, *roles: str) -> Tuple[InputFeature, ...]:
        return tuple(f for f in self.resolved() if f.role in roles)

    def sparse_features(self) -> Tuple[SparseFeature, ...]:
        """The id features as the towers embed them; a vocabulary feature not yet resolved
        (`with_vocabularies`) is an error naming it."""
        found = {name: (path, int(size)) for name, path, size in self.vocabularies}
        unresolved = [f.name for f in self.vocabulary_features() if f.name not in found]
        if unresolved:
            raise ValueError(f"features {', '.join(unresolved)} have lookup vocabulary but no vocabulary: the Trainer "
                             f"needs the pipeline's Transform output (transform_graph)")
        return tuple(f.sparse(found.get(f.name)) for f in self.resolved() if not f.is_dense)

    def vocabulary_features(self) -> Tuple[InputFeature, ...]:
        """The `lookup: vocabulary` features (those the Transform step computes a vocabulary of)."""
        return tuple(f for f in self.resolved() if f.has_vocabulary)

    def with_vocabularies(self, vocabularies: Dict[str, Tuple[str, int]]) -> "FeatureConfig":
        """This registry with each vocabulary feature's (file, size) resolved (see `vocabularies`)."""
        missing = [f.name for f in self.vocabulary_features() if f.name not in vocabularies]
        if missing:
            raise ValueError(f"no vocabulary for {', '.join(missing)}")
        return dataclasses.replace(self, vocabularies=tuple(
            (f.name, vocabularies[f.name][0], int(vocabularies[f.name][1])) for f in self.vocabulary_features()))

    def dense_features(self) -> Tuple[DenseFeature, ...]:
        return tuple(f.dense() for f in self.resolved() if f.is_dense)

    @property
    def query_names(self) -> Tuple[str, ...]:
        return tuple(f.name for f in self.of_role("query"))

    @property
    def item_names(self) -> Tuple[str, ...]:
        return tuple(f.name for f in self.of_role("item"))

    @property
    def ui_names(self) -> Tuple[str, ...]:
        return tuple(f.name for f in self.of_role("ui"))

    @property
    def model_inputs(self) -> Tuple[str, ...]:
        return tuple(f.name for f in self.inputs)

    @property
    def item_key_is_string(self) -> bool:
        return self.feature(self.item_key).is_string

    def check_schema(self, schema: schema_pb2.Schema) -> None:
        """Raises ValueError naming every declared input the schema lacks or types differently."""
        declared = {f.name: f for f in schema.feature}
        problems = []
        for f in self.resolved():
            if f.name not in declared:
                problems.append(f"{f.name} is not in the schema")
            elif declared[f.name].type != f.schema_type:
                problems.append(f"{f.name} is {schema_pb2.FeatureType.Name(declared[f.name].type)} in the schema, "
                                f"declared {f.kind} {f.dtype}")
        if problems:
            raise ValueError("features.inputs do not match the schema: " + "; ".join(problems))


def tier_without_stage(click) -> str:
    """The tier of a logged candidate row that carries no `stage` (see SHOWN_WITHOUT_POSITION)."""
    return STAGE_TIERS[0] if int(click) > 0 else STAGE_TIERS[1]


DEFAULT = FeatureConfig()
# Views of the default registry, for the synthetic generator, the converters and their tests.
SPARSE_FEATURES: Tuple[SparseFeature, ...] = DEFAULT.sparse_features()
DENSE_FEATURES: Tuple[DenseFeature, ...] = DEFAULT.dense_features()
UI_FEATURES: Tuple[str, ...] = DEFAULT.ui_names
MODEL_INPUTS: Tuple[str, ...] = DEFAULT.model_inputs

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


def serving_parse_spec(schema: Optional[schema_pb2.Schema] = None,
                       features: Optional["FeatureConfig"] = None) -> Dict[str, tf.io.FixedLenFeature]:
    """Parse spec of the model inputs of `features` (the registry) only: what a serving request must carry."""
    inputs = set((features or DEFAULT).model_inputs)
    return {
        f.name: _parse_spec_for(f)
        for f in (schema or load_schema()).feature
        if _is_serving_feature(f) and f.name in inputs
    }
