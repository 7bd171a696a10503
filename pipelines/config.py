"""PipelineConfig: the one configuration object of a pipeline run, every switch named with a default.

Each stage's own configuration is the dataclass its Trainer module reads from `custom_config`
(`RankerConfig` for the teacher and the ranker, `RetrievalTrainerConfig`, `CascadeTrainerConfig`
for the joint pre-ranking + ranking training), plus `SamplerConfig` for the NegativeSampler and
`EvaluatorConfig` for the evaluators and gates; PipelineConfig holds one of each. `cascade run`
and `cascade compile-kubeflow` build it from the same flags (`pipelines.cli.pipeline_config`).
"""
import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from cascade_ranking.components.evaluation import EvaluatorConfig
from cascade_ranking.components.sampling import SamplerConfig
from cascade_ranking.datasources import spans
from cascade_ranking.datasources.example_io import InputError, check_examples_dir
from cascade_ranking.datasources.synthetic import SyntheticConfig
from cascade_ranking.models import stages as stage_registry
from cascade_ranking.models.config import ConfigError, merge, to_dict
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.schema.features import CANDIDATES_PER_TIER, STAGE_TIERS, FeatureConfig
from cascade_ranking.schema.keys import KeyConfig
from cascade_ranking.models.trainers.cascade import CascadeTrainerConfig
from cascade_ranking.models.trainers import distribute
from cascade_ranking.models.trainers.distribute import ClusterConfig
from cascade_ranking.models.trainers.retrieval import RetrievalTrainerConfig

SOURCES = ("synthetic", "examples")
TEACHER_RUN_FN = "cascade_ranking.models.trainers.teacher.run_fn"
CASCADE_STAGES = stage_registry.names()  # every stage of the registry (`models.stages`), cascade order
BEAM_MODES = ("auto", "in_process", "in_memory", "multi_processing")
# `beam_mode: auto` runs the Beam components in one process up to this many input candidate rows,
# and in multi_processing above. Measured on 2 cores: at 50,000 rows multi_processing ran at
# 0.45–0.58× in-process (BENCHMARKS §5, bench/component_throughput.py); at the demo's 250,000 rows
# the Beam components took 93 s in-process against 97 s in multi_processing (two demo runs of
# 2026-12-06): each component pays its worker processes' start-up (Python + TensorFlow imports),
# which more data or more cores amortise. Larger inputs are not measured yet; above the bound the
# worker processes can at least use every core.
AUTO_IN_PROCESS_MAX_ROWS = 300_000
# For --source examples the rows are estimated from the gzipped files' size at the synthetic
# demo's ~38 bytes a row (9.5 MB for 250,000 rows); a remote (gs://…) source counts as large.
AUTO_BYTES_PER_ROW = 38


def _installed_package_flag() -> List[str]:
    """`--setup_file=<this package's setup.py>` when it exists. DirectRunner's worker processes
    import the installed package and ignore the flag, but without some dependency flag TFX builds an
    ephemeral sdist of itself for every Beam component (seconds each) to stage for remote workers."""
    setup_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    return [f"--setup_file={setup_file}"] if os.path.exists(setup_file) else []


def to_json(config) -> str:
    """A stage config dataclass as the JSON its Trainer module reads (`config_from_dict`)."""
    return json.dumps(to_dict(config), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Where the pipeline reads, where it writes, and how each component is configured."""

    pipeline_name: str = "cascade-ranking"
    output_dir: str = "cascade_output"
    # Data source: "synthetic" (built-in generator) or "examples" (an Examples directory with
    # Split-train/ and Split-eval/ of candidate rows, e.g. from `cascade convert` or `cascade generate`).
    source: str = "synthetic"
    examples_dir: Optional[str] = None
    # An examples_dir of spans (span-1/, span-2/, …, each with Split-train/ and Split-eval/; TFX's
    # span convention, `datasources.spans`) is read one span a run: `span`, or the newest when None.
    span: Optional[int] = None
    # Continuous training on spans (issue 17): each Trainer starts from the newest model it trained on
    # an older span (`pipelines.warm_start_strategy`, `models.trainers.warm_start`) and trains
    # `warm_start_epochs` on the new one (one pass: Factory Floor's online training). No effect
    # without spans; false: every span trains afresh.
    warm_start: bool = True
    warm_start_epochs: int = 1
    # The rolling window of spans a run on span k trains on: spans k−span_window+1 … k (the eval is
    # span k's alone; `components.span_window`, TFX's SpanRangeStrategy). 1: the run's span only.
    # A window with warm_start false is the retrain-from-scratch alternative to warm starts.
    span_window: int = 1
    synthetic: SyntheticConfig = SyntheticConfig()
    # Stage models.
    teacher: RankerConfig = RankerConfig.teacher()  # the wider, deeper ranker of the teacher pass
    ranker: RankerConfig = RankerConfig.cascade_stage()  # the ranking stage (Factory Floor ranker), distilled
    retrieval: RetrievalTrainerConfig = dataclasses.field(default_factory=RetrievalTrainerConfig)
    # The joint training of pre-ranking and ranking (the ranker's own switches are `ranker`).
    cascade: CascadeTrainerConfig = dataclasses.field(default_factory=CascadeTrainerConfig)
    sampler: SamplerConfig = SamplerConfig()
    evaluator: EvaluatorConfig = EvaluatorConfig()
    # Training beyond one process (issue 18): the Trainers named in training_cluster.trainers train
    # on a tf.distribute cluster from TF_CONFIG, started on localhost by `cascade run`
    # (`components.local_cluster_trainer`) or as Vertex AI worker pools by `cascade compile-kubeflow`.
    # workers 0: one process, as before (`models.trainers.distribute.ClusterConfig`).
    training_cluster: ClusterConfig = ClusterConfig()
    # The trained stages, earliest first: the stage registry's (`models.stages`), or any of them
    # that keeps the required ones, e.g. pre-ranking and ranking alone (a 2-stage cascade: no
    # retrieval Trainer, no retrieval model evaluated or pushed).
    stages: Tuple[str, ...] = CASCADE_STAGES
    # Settings of a stage added as a folder of `models.stages`, by stage name: its Trainer reads
    # them (`models.trainers.common.stage_options`); the built-in stages have their own fields.
    stage_options: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    # The feature registry: every model input declared once (features.inputs: name, role, kind,
    # dtype, width, buckets), passed to every Trainer and the NegativeSampler; `features.buckets`
    # overrides bucket counts by name (e.g. [[item_id, 1000000]]).
    features: FeatureConfig = FeatureConfig()
    # The log's own names for the request key, the click label and the request time (a string
    # request key is hashed to int64); other than the defaults, the KeyMapper adds the pipeline's.
    keys: KeyConfig = KeyConfig()
    # Beam: "multi_processing" runs DirectRunner with `beam_workers` processes (0 = one per core);
    # "in_process" passes no Beam args (one process, the fastest for small data, as in tests);
    # "auto" picks one of them by the input's size (`AUTO_IN_PROCESS_MAX_ROWS`).
    beam_mode: str = "auto"
    beam_workers: int = 0
    enable_cache: bool = True
    # Where ImportSchemaGen finds schema.pbtxt (default: this package's schema/); a Kubeflow run
    # names the path inside the container image or a gs:// copy.
    schema_file: Optional[str] = None
    # Beam args used as they are instead of the beam_mode ones (e.g. DataflowRunner flags).
    beam_args_override: Tuple[str, ...] = ()

    @property
    def pipeline_root(self) -> str:
        return os.path.join(self.output_dir, "pipeline_root")

    @property
    def metadata_path(self) -> str:
        return os.path.join(self.output_dir, "metadata.sqlite")

    @property
    def serving_dir(self) -> str:
        return os.path.join(self.output_dir, "serving")

    def replace(self, **changes) -> "PipelineConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}; choose one of {', '.join(SOURCES)}")
        self.local_schema()
        if self.source == "examples":
            if not self.examples_dir:
                raise ValueError("source 'examples' needs examples_dir")
            if "://" not in self.examples_dir and not os.path.isdir(self.examples_dir):
                raise FileNotFoundError(f"data path {self.examples_dir} does not exist")
            root = self.split_root()
            for split in ("train", "eval") if "://" not in self.examples_dir else ():
                path = os.path.join(root, f"Split-{split}")
                if not os.path.isdir(path):
                    raise FileNotFoundError(f"data path {path} does not exist (expected Split-train/ and Split-eval/)")
        elif self.span is not None:
            raise ConfigError(f"span {self.span}: only source 'examples' reads spans (synthetic data is one span)")
        if self.warm_start_epochs <= 0:
            raise ConfigError(f"warm_start_epochs must be > 0, got {self.warm_start_epochs}")
        if self.span_window < 1:
            raise ConfigError(f"span_window must be >= 1 (the spans a run trains on), got {self.span_window}")
        if self.span_window > 1 and self.source != "examples":
            raise ConfigError(f"span_window {self.span_window}: only source 'examples' with an examples_dir of spans "
                              f"has spans to window")
        if self.span_window > 1 and self.read_span() is None:
            raise ConfigError(f"span_window {self.span_window}: {self.examples_dir} has no span-<number>/ directories "
                              f"(name the span of a remote examples_dir: span: N)")
        if self.source == "synthetic":
            self.synthetic.validate()
        if self.beam_mode not in BEAM_MODES:
            raise ValueError(f"unknown beam_mode {self.beam_mode!r}; choose one of {', '.join(BEAM_MODES)}")
        self.sampler.validate()
        if self.sampler.split != "keep":
            raise ValueError("the pipeline evaluates on the source's eval split: sampler.split must be 'keep'")
        self.check_quotas()
        self.check_features()
        self.check_training_cluster()

    def check_training_cluster(self) -> None:
        """The cluster's Trainers exist in this run and train under its strategy (each Trainer module
        lists its `DISTRIBUTE_STRATEGIES`); otherwise a one-line ConfigError."""
        cluster = self.training_cluster
        if not cluster.distributed:
            return
        run_fns = {"teacher": TEACHER_RUN_FN, **{t.name: t.run_fn for t in stage_registry.trainers(self.stages)}}
        for name in cluster.trainers:
            if name not in run_fns:
                raise ConfigError(f"training_cluster.trainers: no Trainer {name!r} in this run "
                                  f"(choose from {', '.join(run_fns)})")
            supported = distribute.supported_strategies(run_fns[name])
            if cluster.strategy not in supported:
                raise ConfigError(f"Trainer.{name} does not train under {cluster.strategy} (it supports "
                                  f"{', '.join(supported) or 'one process only'}): remove it from training_cluster.trainers")

    def check_features(self) -> None:
        """The ranker configs against the feature registry: a Q·U ranker needs UI features, and a
        bias-constraint slice feature must be a UI id of the registry. A ConfigError names the field."""
        ui_ids = [f.name for f in self.features.of_role("ui") if f.kind == "id" and f.dtype == "int64"]
        for name in ("teacher", "ranker"):
            ranker = getattr(self, name)
            if ranker.qu_dim > 0 and not self.features.ui_names:
                raise ConfigError(f"{name}.qu_dim {ranker.qu_dim}: the Q·U factorisation needs UI features (role ui) "
                                  f"in features.inputs; set {name}.qu_dim: 0")
            if ranker.bias_constraints and ranker.bias_slice_feature and ranker.bias_slice_feature not in ui_ids:
                raise ConfigError(f"{name}.bias_slice_feature {ranker.bias_slice_feature!r} is not a UI int64 id of "
                                  f"features.inputs ({', '.join(ui_ids) or 'none'}); name one or set it to ''")

    def check_stages(self) -> None:
        """`stages` against the stage registry: known names, in cascade order, each once, with every
        required stage; `stage_options` only for stages of the registry, each a mapping."""
        known, stages = stage_registry.names(), tuple(self.stages)
        unknown = [s for s in stages if s not in known]
        if unknown:
            raise ConfigError(f"stages: unknown stage(s) {', '.join(unknown)}; the registry's are {', '.join(known)}")
        if list(stages) != sorted(set(stages), key=known.index):
            raise ConfigError(f"stages {list(stages)}: name each stage once, in cascade order ({', '.join(known)})")
        missing = [s for s in stage_registry.required() if s not in stages]
        if missing:
            raise ConfigError(f"stages {list(stages)}: every cascade trains {', '.join(stage_registry.required())}; "
                              f"add {', '.join(missing)}")
        if not isinstance(self.stage_options, dict):
            raise ConfigError(f"stage_options: expected a mapping of stage name to its settings, got {self.stage_options!r}")
        for name, options in self.stage_options.items():
            if name not in known:
                raise ConfigError(f"stage_options: unknown stage {name!r}; the registry's are {', '.join(known)}")
            if not isinstance(options, dict):
                raise ConfigError(f"stage_options.{name}: expected a mapping, got {options!r}")

    def check_quotas(self) -> None:
        """Cross-field rules of the cascade's sizes. The list size is set once, `sampler.list_size`
        (the Trainers read it from the lists). The stage quotas: `evaluator.quotas` (retrieval,
        pre-ranking, ranking) are positive and decreasing, the Trainers' own recall quotas are the
        same numbers, and LCRON's training quota fits in a list. A ConfigError names the fields."""
        stages = tuple(self.stages)
        self.check_stages()
        quotas = tuple(self.evaluator.quotas)
        if len(quotas) < len(stages) or any(q <= 0 for q in quotas) or any(a <= b for a, b in zip(quotas, quotas[1:])):
            raise ConfigError(f"evaluator.quotas {list(quotas)}: need one positive quota per stage "
                              f"({', '.join(stages)}), each smaller than the one before")
        quota = dict(zip(stages, quotas[len(quotas) - len(stages):]))  # the last len(stages), in order
        if tuple(self.cascade.eval_quotas) != (quota["preranking"], quota["ranking"]):
            raise ConfigError(f"cascade.eval_quotas {list(self.cascade.eval_quotas)} must be the pre-ranking and ranking "
                              f"quotas of evaluator.quotas {list(quotas)}: {[quota['preranking'], quota['ranking']]}")
        if "retrieval" in stages and self.retrieval.eval_quota != quota["retrieval"]:
            raise ConfigError(f"retrieval.eval_quota {self.retrieval.eval_quota} must be the retrieval quota of "
                              f"evaluator.quotas {list(quotas)}: {quota['retrieval']}")
        training = self.cascade.quota if isinstance(self.cascade.quota, tuple) else (self.cascade.quota,)
        if any(not 0 < q < self.sampler.list_size for q in training):
            raise ConfigError(f"cascade.quota {self.cascade.quota} must be positive and below sampler.list_size "
                              f"{self.sampler.list_size}")

    def check_inputs(self) -> None:
        """Reads a local --source examples directory before a run (`check_split_readable`): every
        split has records, every file reads to its end, and the first records of each file have the
        schema's types; a problem is one line naming the split or the file. `validate` does not read
        the data; the local runner calls this once per run."""
        if self.source != "examples" or "://" in (self.examples_dir or ""):
            return
        check_examples_dir(self.split_root(), self.local_schema(),
                           required=self.features.model_inputs + self.keys.data_columns())

    def read_span(self) -> Optional[int]:
        """The span of examples_dir this run reads (`datasources.spans.chosen_span`: `span`, or the
        newest), None when it has no spans or the source is synthetic."""
        if self.source != "examples" or not self.examples_dir:
            return None
        return spans.chosen_span(self.examples_dir, self.span)

    def split_root(self) -> str:
        """The directory with the run's Split-train/ and Split-eval/: the read span's, or examples_dir."""
        return spans.split_root(self.examples_dir, self.span)

    def local_schema(self):
        """The run's schema (`schema_file`, default the packaged one) when it is a local file, else
        None (a Kubeflow path inside the image); a file that is missing or does not parse as a TFMD
        schema is one line naming it."""
        from google.protobuf import text_format

        from cascade_ranking.schema import features as F

        path = self.schema_file or F.SCHEMA_PATH
        if "://" in path:
            return None
        if not os.path.isfile(path):
            if "://" in self.output_dir:
                return None  # compile-kubeflow: a path inside the container image
            raise FileNotFoundError(f"schema file {path} does not exist")
        try:
            schema = F.load_schema(os.path.abspath(path))
        except text_format.ParseError as e:
            raise InputError(f"schema file {path} is not a TFMD schema text proto: {e}") from None
        missing = F.missing_pipeline_features(schema)
        if missing:
            raise InputError(f"schema file {path} lacks the optional features the pipeline's components add and read: "
                             f"{', '.join(missing)} (copy them from {F.SCHEMA_PATH}; `cascade init` adds them)")
        try:
            self.features.check_schema(schema)
        except ValueError as e:
            raise InputError(f"schema file {path}: {e}") from None
        declared = {f.name for f in schema.feature}
        needed = [name for name in (F.REQUEST_ID_KEY, F.LABEL_KEY, F.REQUEST_TIME_KEY) if name not in declared]
        if needed:
            what = ("the KeyMapper adds them from keys " + ", ".join(f"{k}={v!r}" for k, v in to_dict(self.keys).items())
                    if self.keys.mapped else "or name your own columns in keys")
            raise InputError(f"schema file {path} lacks the key feature(s) {', '.join(needed)} the pipeline reads "
                             f"({what}; `cascade init` declares them)")
        return schema

    def estimated_rows(self) -> Optional[int]:
        """The input's candidate rows as `beam_mode: auto` judges them: exact for synthetic data,
        from the files' size for a local examples directory, None (unknown: large) otherwise."""
        if self.source == "synthetic":
            return self.synthetic.num_requests * len(STAGE_TIERS) * CANDIDATES_PER_TIER
        if self.source == "examples" and self.examples_dir and "://" not in self.examples_dir:
            size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(self.split_root())
                       for name in names)
            return size // AUTO_BYTES_PER_ROW
        return None

    def effective_beam_mode(self) -> str:
        """`beam_mode`, with "auto" resolved by `estimated_rows` against `AUTO_IN_PROCESS_MAX_ROWS`."""
        if self.beam_mode != "auto":
            return self.beam_mode
        rows = self.estimated_rows()
        return "in_process" if rows is not None and rows <= AUTO_IN_PROCESS_MAX_ROWS else "multi_processing"

    def beam_mode_label(self) -> str:
        """What the run's first line says of the Beam mode, e.g. "in_process (auto: ~250,000 rows)"."""
        mode = self.effective_beam_mode()
        if self.beam_mode != "auto":
            return mode
        rows = self.estimated_rows()
        return f"{mode} (auto: {'~' + format(rows, ',') if rows is not None else 'unknown'} rows, " \
               f"in_process up to {AUTO_IN_PROCESS_MAX_ROWS:,})"

    def beam_pipeline_args(self) -> List[str]:
        if self.beam_args_override:
            return list(self.beam_args_override)
        mode = self.effective_beam_mode()
        if mode == "in_process":
            return []
        if mode == "in_memory":
            return ["--direct_running_mode=in_memory"] + _installed_package_flag()
        workers = self.beam_workers or os.cpu_count() or 1
        return ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"] + _installed_package_flag()

    def evaluator_config(self) -> EvaluatorConfig:
        """`evaluator`, told how each stage model scores a candidate (its declaration's
        `score_output`) unless it says so itself: the two-tower model by its `score` signature
        (u·v), the pre-ranker and the ranker by the `score` output of `serving_default` (the
        ranker's cascade score; its CTR is `ctr`)."""
        if self.evaluator.score_outputs:
            return self.evaluator
        return dataclasses.replace(self.evaluator, score_outputs=tuple(
            (s.model_input, *s.score_output) for s in stage_registry.registered()))


# ---- the config file ------------------------------------------------------------------------------
def parse_override(text: str) -> Dict:
    """`--set a.b.c=value` as the nested dict {"a": {"b": {"c": value}}}; the value is read as YAML
    (`3`, `0.5`, `true`, `[64, 32]`, `multi_task`)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. ranker.epochs=2")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not YAML ({str(e).splitlines()[0]})") from None
    out: Dict = parsed
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> "PipelineConfig":
    """The PipelineConfig of a YAML or JSON file (any subset of its fields, nested as `to_dict`
    writes them; `cascade config --show` prints a complete one), then each `--set KEY=VALUE`
    override in order, over the defaults. Untrusted input: read with `yaml.safe_load`, every key and
    type checked (`models.config.merge`), errors in one line naming the file or the override."""
    import yaml

    config = PipelineConfig()
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            with open(path) as f:
                values = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not YAML or JSON: {' '.join(str(e).split())}") from None
        if values is not None:
            try:
                config = merge(config, values)
            except ConfigError as e:
                raise ConfigError(f"config file {path}: {e}") from None
    for text in overrides:
        try:
            config = merge(config, parse_override(text))
        except ConfigError as e:
            raise ConfigError(f"--set {text}: {e}" if not str(e).startswith("--set") else str(e)) from None
    return config


def dump_config(config: "PipelineConfig") -> str:
    """The whole config as YAML: what `cascade config --show` prints and `load_config` reads back."""
    import yaml

    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None)
