"""`cascade init`: a starter schema and config inferred from a user's own data (TFDV).

    cascade init --examples-dir D --out DIR [--lookup hash|vocabulary]

reads the Examples directory D (Split-train/, Split-eval/ of candidate-row tf.Examples; of a
directory of spans, span-<k>/, its newest span: `datasources.spans`), computes
TFDV statistics of its train split (`tfdv.generate_statistics_from_tfrecord`, Beam DirectRunner)
and infers a TFMD schema from them (`tfdv.infer_schema`, with feature shapes). On top of TFDV's
inference it writes what the package's contract needs and TFDV cannot know:
  * every float feature without a NaN in the data gets `disallow_nan` (one with NaN is left
    allowed, and said so: its NaN will be read as 0 and counted);
  * an int feature whose values are all ≥ 0 gets `int_domain { min: 0 }`;
  * the label and logging features the package reads (`click`, `stage` and the optional oracle and
    logging features of `schema.features`) are `not_in_environment: "SERVING"`;
  * a string model input keeps no vocabulary domain (TFDV infers one for few distinct values): it is
    hashed, and a value unseen in the train split must not be an anomaly;
  * the optional features the pipeline's components add and read (`teacher_logit`, `sample_weight`,
    ... : `schema.features.PIPELINE_OPTIONAL_FEATURES`) are copied from the packaged schema when the
    data lacks them (a run refuses a schema without them).
It names the features that look like ids (univalent int features whose value range, or bytes
features whose distinct values, exceed `ID_MIN_UNIQUE`).

The feature registry (`features.inputs` of the config, `schema.features.InputFeature`) is inferred
from the data's own features, every one but the keys and labels the pipeline reads by name
(`schema.features.RESERVED_NAMES`, `ui_position` aside):
  * role: "query" when the feature has one value per request in the first `ROLE_SAMPLE_RECORDS`
    rows of the train split (the same on every row of a request_id), "ui" for a name that says it
    is a display slot (`UI_NAME_HINTS`), "item" otherwise; when every sampled request has one row
    (nothing to compare), a name with a request-side word (`QUERY_NAME_HINTS`) is "query" (said);
  * kind and width: a float feature of a fixed count w is dense of width w; an int or bytes feature
    with one value is an id, with several an id list ("ids") of width its most values per row; a
    float feature of varying count is left out (said);
  * dtype: int64, or string for a bytes feature (hashed by the model: Keras `Hashing`);
  * buckets: int ids the next power of two above twice their largest value (ids 0..N−1 never share
    a row, and there is room for new ones); string ids the next power of two above 4 × their distinct values in the train split
    (hashing N strings into 4N buckets leaves ~1/8 of them sharing one);
  * with `--lookup vocabulary`, every id feature but the UI ones is declared `lookup: vocabulary` instead (no
    buckets: one embedding row per distinct id of the train split, computed by the pipeline's TFX
    Transform step, plus an OOV row; see schema/README.md): the memory of the ids the data has,
    not of their range, e.g. 9,742 MovieLens movies instead of 524,288 buckets for ids up to
    193,609; the default `hash` keeps no Transform step in the pipeline;
  * item_key: `item_id` if the data has it, else the item-side id with the most distinct values.

It writes DIR/schema.pbtxt and DIR/cascade.yaml (a `cascade run --config` file: source examples,
this directory, this schema, and the registry), each to a temporary name renamed at the end. Nothing
is guessed silently: the report, printed and written as the YAML's leading comments, says what was
inferred; the user edits the YAML (a role, a bucket count, a feature to leave out) before running.
"""
import dataclasses
import os
from typing import Dict, List, Optional

from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2, statistics_pb2

ID_MIN_UNIQUE = 1_000  # a univalent int feature with a wider value range, or a bytes feature with more
                       # distinct values, looks like an id
ROLE_SAMPLE_RECORDS = 20_000  # train rows read to tell request-level features from candidate-level ones
UI_NAME_HINTS = ("ui_", "position", "slot")  # a feature whose name has one of these is a UI treatment
# With one row per request, a feature whose name has one of these (and not "item") is request-side,
# any other item-side.
QUERY_NAME_HINTS = ("user", "query", "context", "hour", "weekday", "device", "region", "country")
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
    registry: List[str] = dataclasses.field(default_factory=list)  # one line per inferred input
    notes: List[str] = dataclasses.field(default_factory=list)

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
            out.append("the pipeline reads keys your data lacks: " + ", ".join(self.missing_model_inputs))
        out.extend(self.notes)
        if self.registry:
            out.append("model inputs (features.inputs; edit roles, buckets or drop a feature):")
            out.extend("  " + line for line in self.registry)
        if self.not_read:
            out.append("in your data but not model inputs: " + ", ".join(self.not_read))
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


def find_keys(names, request_key: str = "", label: str = "", request_time: str = ""):
    """The log's key columns (`schema.keys.KeyConfig`): the names given, else the pipeline's own
    names when the data has them, else the first column whose name is a usual one for the key
    (`KEY_NAME_HINTS`, case-insensitive). Raises InputError naming a request key or label it cannot
    find (pass --request-key / --label)."""
    from cascade_ranking.datasources.example_io import InputError
    from cascade_ranking.schema.keys import KEY_NAME_HINTS, KeyConfig

    by_lower = {n.lower(): n for n in names}
    given = {"request_id": request_key, "click": label, "request_time": request_time}
    found = {}
    for key, hints in KEY_NAME_HINTS.items():
        if given[key]:
            if given[key] not in names:
                raise InputError(f"the data has no column {given[key]!r} for the {key} key; its columns: {', '.join(names)}")
            found[key] = given[key]
            continue
        found[key] = next((by_lower[h] for h in hints if h in by_lower), "")
    for key, flag in (("request_id", "--request-key"), ("click", "--label")):
        if not found[key]:
            raise InputError(f"no {key} column found (tried {', '.join(KEY_NAME_HINTS[key])}): name it with {flag}")
    return KeyConfig(**found)


def refine(schema: schema_pb2.Schema, stats: statistics_pb2.DatasetFeatureStatisticsList, keys=None) -> InitReport:
    """Adds disallow_nan, min-0 int domains and the SERVING environment to TFDV's inferred `schema`
    (in place) and reports what it found (see the module docstring). With `keys` naming the log's
    own key columns, the pipeline's key features the KeyMapper adds are declared too."""
    from cascade_ranking.schema import features as F
    from cascade_ranking.schema.keys import KeyConfig

    keys = keys or KeyConfig()
    by_name = _feature_stats(stats)
    labels = {F.LABEL_KEY, F.STAGE_KEY, keys.click, *F.OPTIONAL_DEFAULTS, *F.OPTIONAL_STRING_DEFAULTS}
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
        key_columns = labels | {F.REQUEST_ID_KEY, F.REQUEST_TIME_KEY, keys.request_id, keys.request_time}
        if st is not None and univalent and feature.name not in key_columns and _id_span(feature, st) > ID_MIN_UNIQUE:
            id_like[feature.name] = _id_span(feature, st)
        if feature.name in labels and "SERVING" not in feature.not_in_environment:
            feature.not_in_environment.append("SERVING")
        if feature.type == schema_pb2.BYTES and feature.name not in labels and feature.HasField("domain"):
            # A string model input is hashed (any value embeds), and a string request key takes new
            # values every day: TFDV's vocabulary of the values it saw would make each new one an
            # anomaly that stops the run.
            domain = feature.domain
            feature.ClearField("domain")
            kept = [d for d in schema.string_domain if d.name != domain]
            del schema.string_domain[:]
            schema.string_domain.extend(kept)
    names = [f.name for f in schema.feature]  # the data's own features
    packaged = {f.name: f for f in F.load_schema().feature}
    added = list(F.missing_pipeline_features(schema))
    if keys.mapped:  # the KeyMapper adds the pipeline's keys from the log's own columns
        added += [name for name in (F.REQUEST_ID_KEY, F.LABEL_KEY, F.REQUEST_TIME_KEY) if name not in names]
    for name in added:  # the features the components add, as the package declares them
        schema.feature.add().CopyFrom(packaged[name])
    rows = int(stats.datasets[0].num_examples)
    required = (F.REQUEST_ID_KEY, F.LABEL_KEY) if not keys.mapped else ()
    report = InitReport(rows=rows, features=names, added=added, id_like=id_like, nan_features=nan_features,
                        missing_model_inputs=[n for n in required if n not in names], not_read=[])
    if keys.mapped:
        report.notes.append("keys: " + ", ".join(f"{k} from {v!r}" for k, v in dataclasses.asdict(keys).items() if v)
                            + " (the KeyMapper adds the pipeline's key features; a string request key is hashed)")
    if F.STAGE_KEY not in names:
        report.notes.append(f"no {F.STAGE_KEY} (tiers): the ground truth is the click; a clicked row is tier "
                            f"{F.STAGE_TIERS[0]}, another logged row {F.STAGE_TIERS[1]}")
    if F.SHOWN_KEY not in names:
        report.notes.append(f"no {F.SHOWN_KEY}: every logged row was shown")
    return report


def _next_power_of_two(n: int) -> int:
    return 1 << max(int(n) - 1, 1).bit_length()


def _max_values(st: statistics_pb2.FeatureNameStatistics) -> int:
    common = st.num_stats.common_stats if st.HasField("num_stats") else st.string_stats.common_stats
    return int(common.max_num_values)


def request_level_features(examples_dir: str, names, records: int = ROLE_SAMPLE_RECORDS,
                           request_key: str = "request_id") -> Optional[set]:
    """The features of `names` with one value per request in the first `records` train rows: the
    same values on every row of a request_id (a feature no row carries is not one). None when no
    request of the sample has two rows: constancy then says nothing (a log of one row per request,
    as the Open Bandit sample)."""
    from cascade_ranking.datasources.example_io import read_examples

    first: Dict[tuple, tuple] = {}
    varying, seen = set(), set()
    rows_of: Dict[tuple, int] = {}
    for i, example in enumerate(read_examples(os.path.join(examples_dir, "Split-train"))):
        if i >= records:
            break
        fmap = example.features.feature
        if request_key not in fmap:
            continue
        kind = fmap[request_key].WhichOneof("kind")
        request = tuple(getattr(fmap[request_key], kind).value) if kind else ()
        rows_of[request] = rows_of.get(request, 0) + 1
        for name in names:
            if name in varying or name not in fmap:
                continue
            seen.add(name)
            kind = fmap[name].WhichOneof("kind")
            value = tuple(getattr(fmap[name], kind).value) if kind else ()
            key = (name, request)
            if first.setdefault(key, value) != value:
                varying.add(name)
    if not any(count > 1 for count in rows_of.values()):
        return None
    return seen - varying


def infer_registry(schema: schema_pb2.Schema, stats: statistics_pb2.DatasetFeatureStatisticsList,
                   report: InitReport, request_level: Optional[set], keys=None, lookup: str = "hash"):
    """The starter's feature registry (`FeatureConfig`) from the refined schema, the train split's
    statistics and the request-level features (see the module docstring); fills `report.registry`
    and `report.not_read`. `lookup` "vocabulary" declares every id feature `lookup: vocabulary`."""
    from cascade_ranking.schema import features as F

    if lookup not in F.LOOKUPS:
        raise ValueError(f"lookup must be one of {', '.join(F.LOOKUPS)}, got {lookup!r}")
    by_name = _feature_stats(stats)
    reserved = set(F.RESERVED_NAMES) | (set(keys.data_columns()) | {keys.request_time} if keys else set())
    inputs, lines, left_out, distinct_ids = [], [], [], {}
    for feature in schema.feature:
        name = feature.name
        if name in reserved or name in report.added:
            continue
        st = by_name.get(name)
        shape = [d.size for d in feature.shape.dim] if feature.HasField("shape") else None
        if name == F.SHOWN_KEY or any(hint in name.lower() for hint in UI_NAME_HINTS):
            role = "ui"
        elif request_level is None:  # one row per request: the name decides (`QUERY_NAME_HINTS`), said
            lower = name.lower()
            role = "query" if "item" not in lower and any(hint in lower for hint in QUERY_NAME_HINTS) else "item"
        else:
            role = "query" if name in request_level else "item"
        if feature.type == schema_pb2.FLOAT:
            if not shape or len(shape) != 1:
                left_out.append(f"{name} (a float feature of varying length)")
                continue
            spec = F.InputFeature(name, role, "dense", "float32", width=shape[0])
            how = f"dense, width {shape[0]}"
        else:
            string = feature.type == schema_pb2.BYTES
            single = shape == [1]
            width = 1 if single else max(_max_values(st) if st is not None else 1, 1)
            if string:
                distinct = int(st.string_stats.unique) if st is not None and st.HasField("string_stats") else 1
                buckets, why = _next_power_of_two(4 * max(distinct, 1)), f"hashed, {distinct:,} distinct in train"
            else:  # room for ids up to twice the largest seen, so new ones in a later span rarely fold
                top = int(st.num_stats.max) if st is not None and st.HasField("num_stats") else 0
                distinct = _id_span(feature, st) if st is not None else 0
                buckets, why = _next_power_of_two(2 * (max(top, 0) + 1)), f"ids up to {top:,}"
            distinct_ids[name] = distinct
            kind, dtype = "id" if single else "ids", "string" if string else "int64"
            if lookup == "vocabulary" and role != "ui":  # UI ids stay 0..buckets−1 (score_ui_grid)
                spec = F.InputFeature(name, role, kind, dtype, width=width, lookup="vocabulary")
                seen = f"{distinct:,} distinct in train" if string else f"instead of {buckets:,} buckets for {why}"
                table = f"a vocabulary of the train split's ids + 1 OOV row ({seen})"
            else:
                spec = F.InputFeature(name, role, kind, dtype, width=width, buckets=buckets)
                table = f"{buckets:,} buckets ({why})"
            how = f"{spec.kind} {spec.dtype}{'' if single else f', up to {width} values'}, {table}"
        inputs.append(spec)
        lines.append(f"{name}: {role}, {how}")
    if request_level is None:
        report.notes.append("every request of the sample has one row, so roles come from the names (user, "
                            "context, hour ... → query; others → item): check them")
    report.registry = lines
    report.not_read = left_out
    items = [f for f in inputs if f.role == "item" and f.kind == "id"]
    if F.ITEM_KEY in {f.name for f in items}:
        item_key = F.ITEM_KEY
    elif items:
        item_key = max(items, key=lambda f: distinct_ids.get(f.name, 0)).name
    else:
        raise ValueError("no item-side id feature in the data: the cascade needs one to identify candidates")
    report.registry.append(f"item_key: {item_key} (the candidate's id)")
    return F.FeatureConfig(inputs=tuple(inputs), item_key=item_key)


def fit_rankers(config, report: InitReport):
    """The teacher and ranker configs fitted to the registry: without UI features no Q·U
    factorisation (qu_dim 0); the bias constraints slice by the first UI int64 id, or by the
    predicted CTR alone when there is none. Each change is a line of the report."""
    ui_ids = [f.name for f in config.features.of_role("ui") if f.kind == "id" and f.dtype == "int64"]
    changes = {}
    for name in ("teacher", "ranker"):
        ranker = getattr(config, name)
        update = {}
        if ranker.qu_dim > 0 and not config.features.ui_names:
            update["qu_dim"] = 0
        if ranker.bias_slice_feature and ranker.bias_slice_feature not in ui_ids:
            update["bias_slice_feature"] = ui_ids[0] if ui_ids else ""
        if update:
            changes[name] = dataclasses.replace(ranker, **update)
            report.notes.append(f"{name}: " + ", ".join(f"{k} {v!r}" for k, v in update.items())
                                + " (fitted to the data's UI features)")
    return dataclasses.replace(config, **changes)


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def check_inputs_and_outputs(examples_dir: str, out_dir: str, overwrite: bool = False) -> Dict[str, str]:
    """Checks the Examples directory (`check_split_readable`) and that the output files may be
    written; returns their paths. Raises InputError naming the problem."""
    from cascade_ranking.datasources.example_io import InputError, check_examples_dir
    from cascade_ranking.pipelines.run_log import check_writable

    from cascade_ranking.datasources import spans

    if not os.path.isdir(examples_dir):
        raise InputError(f"data path {examples_dir} does not exist")
    check_examples_dir(spans.split_root(examples_dir, None))
    paths = {name: os.path.join(out_dir, name) for name in (SCHEMA_FILE, CONFIG_FILE)}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise InputError(f"{', '.join(existing)} exist (pass --overwrite)")
    check_writable(out_dir)
    return paths


def infer(examples_dir: str, out_dir: str, overwrite: bool = False, request_key: str = "", label: str = "",
          request_time: str = "", lookup: str = "hash") -> InitReport:
    """Writes out_dir/schema.pbtxt and out_dir/cascade.yaml inferred from `examples_dir` and returns
    the report. Refuses to replace existing files unless `overwrite`. `lookup` "vocabulary"
    declares every id feature `lookup: vocabulary` (see the module docstring)."""
    import tensorflow_data_validation as tfdv

    from cascade_ranking.pipelines.config import PipelineConfig, dump_config

    from cascade_ranking.datasources import spans

    paths = check_inputs_and_outputs(examples_dir, out_dir, overwrite)
    root = spans.split_root(examples_dir, None)  # a directory of spans: its newest span
    stats = tfdv.generate_statistics_from_tfrecord(os.path.join(root, "Split-train", "*"))
    schema = tfdv.infer_schema(stats, infer_feature_shape=True)
    keys = find_keys([f.name for f in schema.feature], request_key, label, request_time)
    report = refine(schema, stats, keys)
    candidates = [f.name for f in schema.feature if f.name not in report.added]
    registry = infer_registry(schema, stats, report,
                              request_level_features(root, candidates, request_key=keys.request_id), keys,
                              lookup=lookup)
    _write_atomically(paths[SCHEMA_FILE], text_format.MessageToString(schema))
    config = PipelineConfig(source="examples", examples_dir=os.path.abspath(examples_dir),
                            schema_file=os.path.abspath(paths[SCHEMA_FILE]), features=registry, keys=keys)
    config = fit_rankers(config, report)
    header = "".join(f"# {line}\n" for line in
                     [f"cascade init --examples-dir {examples_dir}: a starter config (cascade run --config this file)"]
                     + report.lines())
    _write_atomically(paths[CONFIG_FILE], header + dump_config(config))
    return report
