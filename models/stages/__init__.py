"""The stage registry: the cascade's served stages, each declared once in its own folder.

A stage is the folder `models/stages/<name>/`, whose `__init__.py` declares `STAGE = Stage(...)`:
its place in the cascade, the Trainer that trains it, how the CascadeEvaluator scores it and its
default blessing thresholds. Everything the pipeline wires per stage is derived from these
declarations: the Trainer nodes (one per distinct `StageTrainer`), the `StageModel` node of a stage
served out of another stage's Trainer, the `LatestBlessed.<stage>` Resolver, the
CascadeEvaluator's input, baseline input and blessing output channels, the Pusher, the evaluator's
default thresholds and score outputs, the valid `stages:` of a config and the report's rows.

A new stage is therefore one folder: its `__init__.py` with the declaration, and beside it the
model and Trainer module (`run_fn`) it names. Its Trainer reads the NegativeSampler's request lists
and the Schema, gets the run's feature registry under custom_config "features", its own
`stage_options.<name>` mapping from the config under "options", and the PipelineConfig fields it
names in `config_fields`; its export needs a signature that scores a batch of serialized candidate
rows (`score_output`, default `serving_default` → `score`). The evaluator then scores it in cascade
order between the stages around it, with its own quota in `evaluator.quotas`.

Written by hand: TFX has no notion of a model cascade. The registry reads the folders with
`pkgutil` and imports nothing heavy (a declaration names its `run_fn` as a dotted path).
"""
import dataclasses
import functools
import importlib
import pkgutil
from typing import Dict, Tuple

# Default blessing, per stage: bless no model that orders its candidates no better than chance
# (recall lift over a random order), nor one that loses more than 0.01 recall to its baseline.
DEFAULT_THRESHOLDS = (("recall_lift", "min", 0.25),)
DEFAULT_CHANGE_THRESHOLDS = (("recall", 0.01),)


@dataclasses.dataclass(frozen=True)
class StageTrainer:
    """A Trainer node, `Trainer.<name>`, reading the NegativeSampler's request lists. Several stages
    may share one (pre-ranking and ranking train as one network)."""

    name: str
    run_fn: str  # dotted path of the module's run_fn
    config_fields: Tuple[str, ...] = ()  # PipelineConfig fields passed as JSON, each under its own name


@dataclasses.dataclass(frozen=True)
class Stage:
    """One served stage of the cascade."""

    name: str  # the stage's name in configs, node ids (`Pusher.<name>`) and the serving directory
    order: int  # position in the cascade: the registry lists stages by it, earliest first
    label: str  # how tables name it
    model_input: str  # the CascadeEvaluator input of its model; its baseline's is `baseline_<model_input>`
    blessing_output: str  # the CascadeEvaluator output with its ModelBlessing
    trainer: StageTrainer
    # True: the Trainer's Model artifact holds this stage at `stages/<name>` (`models.export
    # .stage_model_dir`), which a `StageModel.<name>` node publishes as the stage's own Model.
    extracted: bool = False
    # (signature, output key) that scores a batch of serialized candidate rows.
    score_output: Tuple[str, str] = ("serving_default", "score")
    # The stage whose model also predicts the CTR: CTR metrics, the TFMA Evaluator and its gate.
    ctr: bool = False
    optional: bool = True  # whether a config's `stages` may leave it out
    thresholds: Tuple[Tuple[str, str, float], ...] = DEFAULT_THRESHOLDS  # (metric, "min"|"max", value)
    change_thresholds: Tuple[Tuple[str, float], ...] = DEFAULT_CHANGE_THRESHOLDS  # (metric, tolerance)

    @property
    def baseline_input(self) -> str:
        return f"baseline_{self.model_input}"

    @property
    def model_source(self) -> Tuple[str, str]:
        """(node id, output key) of the stage's served Model."""
        if self.extracted:
            return f"StageModel.{self.name}", "stage_model"
        return f"Trainer.{self.trainer.name}", "model"


class StageRegistryError(ValueError):
    """Two stage declarations that clash, or a declaration that breaks a registry rule."""


def _check(stages: Tuple[Stage, ...]) -> None:
    for field in ("name", "order", "model_input", "blessing_output"):
        values = [getattr(s, field) for s in stages]
        clash = sorted({str(v) for v in values if values.count(v) > 1})
        if clash:
            raise StageRegistryError(f"stage declarations share {field} {', '.join(clash)}")
    ctr = [s.name for s in stages if s.ctr]
    if len(ctr) != 1:
        raise StageRegistryError(f"exactly one stage must predict the CTR (ctr=True); got {ctr or 'none'}")
    if next(s for s in stages if s.ctr).optional:
        raise StageRegistryError(f"the CTR stage {ctr[0]!r} cannot be optional")
    trainers: Dict[str, StageTrainer] = {}
    for s in stages:
        if trainers.setdefault(s.trainer.name, s.trainer) != s.trainer:
            raise StageRegistryError(f"stages declare two different Trainers named {s.trainer.name!r}")


@functools.lru_cache(maxsize=None)
def registered() -> Tuple[Stage, ...]:
    """Every stage of the folders of this package, in cascade order."""
    stages = []
    for module in pkgutil.iter_modules(__path__):
        if not module.ispkg:
            continue
        stage = getattr(importlib.import_module(f"{__name__}.{module.name}"), "STAGE", None)
        if not isinstance(stage, Stage):
            raise StageRegistryError(f"stage folder {module.name!r} declares no STAGE = Stage(...) in its __init__.py")
        if stage.name != module.name:
            raise StageRegistryError(f"stage folder {module.name!r} declares a stage named {stage.name!r}")
        stages.append(stage)
    stages = tuple(sorted(stages, key=lambda s: s.order))
    _check(stages)
    return stages


def names() -> Tuple[str, ...]:
    return tuple(s.name for s in registered())


def get(name: str) -> Stage:
    for stage in registered():
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage {name!r}; the stages are {', '.join(names())}")


def ctr_stage() -> Stage:
    return next(s for s in registered() if s.ctr)


def required() -> Tuple[str, ...]:
    """The stages every cascade trains: those that are not optional, and the stages that share a
    Trainer with one of them (they are trained together)."""
    trainers = {s.trainer.name for s in registered() if not s.optional}
    return tuple(s.name for s in registered() if not s.optional or s.trainer.name in trainers)


def trainers(stage_names) -> Tuple[StageTrainer, ...]:
    """The Trainers of the given stages, each once, in cascade order of their first stage."""
    out: Dict[str, StageTrainer] = {}
    for stage in registered():
        if stage.name in stage_names:
            out.setdefault(stage.trainer.name, stage.trainer)
    return tuple(out.values())

