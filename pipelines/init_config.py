"""`cascade init`: a starter schema and config inferred from a user's own data (TFDV).

    cascade init --examples-dir D --out DIR

reads the Examples directory D (Split-train/, Split-eval/ of candidate-row tf.Examples), computes
TFDV statistics of its train split (`tfdv.generate_statistics_from_tfrecord`, Beam DirectRunner)
and infers a TFMD schema from them (`tfdv.infer_schema`, with feature shapes). On top of TFDV's
inference it writes what the package's contract needs and TFDV cannot know:
  * every float feature without a NaN in the data gets `disallow_nan` (one with NaN is left
    allowed, and said so: its NaN will be read as 0 and counted);
  * an int feature whose values are all ≥ 0 gets `int_domain { min: 0 }`;
  * the label and logging features the package reads (`click`, `stage` and the optional oracle and
    logging features of `schema.features`) are `not_in_environment: "SERVING"`;
  * the optional features the pipeline's components add and read (`teacher_logit`, `sample_weight`,
    ... : `schema.features.PIPELINE_OPTIONAL_FEATURES`) are copied from the packaged schema when the
    data lacks them (a run refuses a schema without them).
It names the features that look like ids (univalent int features whose value range, or bytes
features whose distinct values, exceed `ID_MIN_UNIQUE`: embed them by hashing or a vocabulary), and compares the data's
features with the model inputs the package reads today (`schema.features.MODEL_INPUTS`): a
missing one is named, an extra one is listed as not read.

It writes DIR/schema.pbtxt and DIR/cascade.yaml (a `cascade run --config` file: source examples,
this directory, this schema, and `features.buckets` sized for every id-like model input whose values
span more than its default buckets), each to a temporary name renamed at the end. Nothing is guessed
silently: the report, printed and written as the YAML's leading comments, says what was inferred.
"""
import dataclasses
import os
from typing import Dict, List

from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2, statistics_pb2

ID_MIN_UNIQUE = 1_000  # a univalent int feature with a wider value range, or a bytes feature with more
                       # distinct values, looks like an id
SCHEMA_FILE, CONFIG_FILE = "schema.pbtxt", "cascade.yaml"


@dataclasses.dataclass
class InitReport:
    """What `infer` inferred and found, for the console and the config's comments."""

    rows: int
    features: List[str]  # the data's own
    added: List[str]  # the optional features the components add, declared as the packaged schema does
    id_like: Dict[str, int]  # feature → its value range (ints) or distinct values (bytes)
    nan_features: List[str]  # float features with NaN in the data (left allowed)
    missing_model_inputs: List[str]
    not_read: List[str]

    def lines(self) -> List[str]:
        out = [f"{self.rows:,} train rows, {len(self.features)} features: {', '.join(self.features)}"]
        if self.added:
            out.append("declared for the pipeline's components (not in the data): " + ", ".join(self.added))
        if self.id_like:
            out.append("look like ids (embed by hashing or a vocabulary): " + ", ".join(
                f"{name} ({n:,} values)" for name, n in sorted(self.id_like.items())))
        if self.nan_features:
            out.append("have NaN values, left allowed (read as 0 and counted): " + ", ".join(self.nan_features))
        else:
            out.append("no float feature has NaN: every one is disallow_nan")
        if self.missing_model_inputs:
            out.append("the package's models read features your data lacks (`cascade run` will stop at the "
                       "AnomalyGate until they exist): " + ", ".join(self.missing_model_inputs))
        if self.not_read:
            out.append("in your data but not read by the package's models: " + ", ".join(self.not_read))
        return out


def _feature_stats(stats: statistics_pb2.DatasetFeatureStatisticsList) -> Dict[str, statistics_pb2.FeatureNameStatistics]:
    return {f.path.step[0] if f.path.step else f.name: f for f in stats.datasets[0].features}


def _num_nan(feature: statistics_pb2.FeatureNameStatistics) -> int:
    return int(sum(h.num_nan for h in feature.num_stats.histograms))


def _id_span(feature: schema_pb2.Feature, st: statistics_pb2.FeatureNameStatistics) -> int:
    """How many ids a univalent int or bytes feature may take: its value range (ints) or its
    distinct values (bytes); 0 for other features."""
    if feature.type == schema_pb2.INT and st.HasField("num_stats"):
        return int(st.num_stats.max - st.num_stats.min + 1)
    if feature.type == schema_pb2.BYTES and st.HasField("string_stats"):
        return int(st.string_stats.unique)
    return 0


def refine(schema: schema_pb2.Schema, stats: statistics_pb2.DatasetFeatureStatisticsList) -> InitReport:
    """Adds disallow_nan, min-0 int domains and the SERVING environment to TFDV's inferred `schema`
    (in place) and reports what it found (see the module docstring)."""
    from schema import features as F

    by_name = _feature_stats(stats)
    labels = {F.LABEL_KEY, F.STAGE_KEY, *F.OPTIONAL_DEFAULTS, *F.OPTIONAL_STRING_DEFAULTS}
    nan_features, id_like = [], {}
    if "SERVING" not in schema.default_environment:
        schema.default_environment.extend(["TRAINING", "SERVING"])
    for feature in schema.feature:
        st = by_name.get(feature.name)
        if feature.type == schema_pb2.FLOAT:
            if st is not None and _num_nan(st):
                nan_features.append(feature.name)
            else:
                feature.float_domain.disallow_nan = True
        if feature.type == schema_pb2.INT and st is not None and st.num_stats.min >= 0 and not feature.HasField("domain"):
            feature.int_domain.min = 0
        univalent = feature.HasField("shape") and [d.size for d in feature.shape.dim] == [1]
        keys = labels | {F.REQUEST_ID_KEY, F.REQUEST_TIME_KEY}
        if st is not None and univalent and feature.name not in keys and _id_span(feature, st) > ID_MIN_UNIQUE:
            id_like[feature.name] = _id_span(feature, st)
        if feature.name in labels and "SERVING" not in feature.not_in_environment:
            feature.not_in_environment.append("SERVING")
    names = [f.name for f in schema.feature]  # the data's own features
    packaged = {f.name: f for f in F.load_schema().feature}
    added = list(F.missing_pipeline_features(schema))
    for name in added:  # the features the components add, as the package declares them
        schema.feature.add().CopyFrom(packaged[name])
    rows = int(stats.datasets[0].num_examples)
    return InitReport(rows=rows, features=names, added=added, id_like=id_like, nan_features=nan_features,
                      missing_model_inputs=[n for n in F.MODEL_INPUTS if n not in names],
                      not_read=[n for n in names if n not in F.MODEL_INPUTS and n not in labels
                                and n not in (F.REQUEST_ID_KEY, F.REQUEST_TIME_KEY)])


def bucket_config(report: InitReport):
    """The starter's FeatureConfig: an id-like model input whose values span more than its default
    buckets gets the next power of two above its span, so that its ids are not folded together."""
    from schema import features as F

    defaults = {f.name: f.num_buckets for f in F.SPARSE_FEATURES}
    buckets = tuple((name, 1 << (span - 1).bit_length()) for name, span in sorted(report.id_like.items())
                    if name in defaults and span > defaults[name])
    return F.FeatureConfig(buckets=buckets)


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def check_inputs_and_outputs(examples_dir: str, out_dir: str, overwrite: bool = False) -> Dict[str, str]:
    """Checks the Examples directory (`check_split_readable`) and that the output files may be
    written; returns their paths. Raises InputError naming the problem."""
    from datasources.example_io import InputError, check_examples_dir
    from pipelines.run_log import check_writable

    if not os.path.isdir(examples_dir):
        raise InputError(f"data path {examples_dir} does not exist")
    check_examples_dir(examples_dir)
    paths = {name: os.path.join(out_dir, name) for name in (SCHEMA_FILE, CONFIG_FILE)}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise InputError(f"{', '.join(existing)} exist (pass --overwrite)")
    check_writable(out_dir)
    return paths


def infer(examples_dir: str, out_dir: str, overwrite: bool = False) -> InitReport:
    """Writes out_dir/schema.pbtxt and out_dir/cascade.yaml inferred from `examples_dir` and returns
    the report. Refuses to replace existing files unless `overwrite`."""
    import tensorflow_data_validation as tfdv

    from pipelines.config import PipelineConfig, dump_config

    paths = check_inputs_and_outputs(examples_dir, out_dir, overwrite)
    stats = tfdv.generate_statistics_from_tfrecord(os.path.join(examples_dir, "Split-train", "*"))
    schema = tfdv.infer_schema(stats, infer_feature_shape=True)
    report = refine(schema, stats)
    _write_atomically(paths[SCHEMA_FILE], text_format.MessageToString(schema))
    config = PipelineConfig(source="examples", examples_dir=os.path.abspath(examples_dir),
                            schema_file=os.path.abspath(paths[SCHEMA_FILE]), features=bucket_config(report))
    header = "".join(f"# {line}\n" for line in
                     [f"cascade init --examples-dir {examples_dir}: a starter config (cascade run --config this file)"]
                     + report.lines())
    _write_atomically(paths[CONFIG_FILE], header + dump_config(config))
    return report
