"""Configuration of the Factory Floor ranker (`models.ranker.FactoryFloorRanker`).

Every technique of DESIGN §5 that the ranking stage uses is one named switch here, with a
default; `RankerConfig` travels as JSON (`to_json`/`from_json`, `to_dict`/`from_dict`), e.g. in a
TFX Trainer's `custom_config`.

Switches (a value of 0 / "none" / False turns the technique off):
    cross_layers            DCNv2 low-rank cross layers in the quality tower (0 = no DCN)
    bottleneck_rank         LowRankDense in place of each hidden Dense (0 = plain Dense)
    activation              "relu", "smelu", "smelu:<beta>", "gelu", ... (models.activations)
    qu_dim                  d of the Q·U factorisation (0 = plain logit head on one tower that
                            reads every input, the UI features included)
    rank_loss               "none", "multi_objective" (one logit) or "multi_task" (own head)
    distill_weight          max weight of the distillation loss (0 = off)
    bias_constraints        slice-calibration duals (Factory Floor §7)
    lspr                    loss-balanced small perturbation regularisation (off by default)
"""
import dataclasses
import json
from typing import Any, Dict, Tuple

from models.config import config_from_dict

RANK_LOSSES = ("none", "multi_objective", "multi_task")
OPTIMIZERS = ("adagrad", "adam")
BIAS_SLICE_FEATURES = ("", "ui_position", "ui_format")


@dataclasses.dataclass(frozen=True)
class RankerConfig:
    """How the ranker is built and trained. Defaults: the full model of the ranking issue."""

    # Input layer.
    embedding_dim: int = 16
    nan_replacement: float = 0.0  # raw value a NaN dense input becomes (before normalisation)

    # Quality tower Q: embeddings -> DCNv2 low-rank cross (ReZero ramp) -> DNN -> q.
    cross_layers: int = 2
    cross_projection_dim: int = 32
    cross_ramp_steps: int = 200
    hidden_units: Tuple[int, ...] = (256, 128)
    bottleneck_rank: int = 0
    activation: str = "relu"

    # Q·U factorisation: ctr = sigmoid(a·(q·u) + b).
    qu_dim: int = 16
    ui_hidden_units: Tuple[int, ...] = (16,)

    # Rank loss (RankNet per request) and its curriculum ramp.
    rank_loss: str = "multi_objective"
    rank_alpha: float = 0.1
    rank_start_step: int = 100
    rank_ramp_steps: int = 300

    # Distillation against sigmoid(teacher_logit) (rows with a NaN teacher logit are left out).
    distill_weight: float = 0.5
    distill_start_step: int = 100
    distill_ramp_steps: int = 300

    # Bias constraints (duals live outside the served model).
    bias_constraints: bool = True
    bias_ctr_boundaries: Tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.4)
    bias_slice_feature: str = "ui_position"  # a UI feature whose values are slices too ("" = none)
    bias_alpha: float = 0.1  # small α = tight constraint (a slice's mean residual is driven to α·λ)
    bias_dual_lr: float = 0.5
    bias_start_step: int = 100
    bias_ramp_steps: int = 300

    # LSPR (perturbed copy with weight λ).
    lspr: bool = False
    lspr_noise_scale: float = 0.1
    lspr_dropout_rate: float = 0.1
    lspr_weight: float = 0.3
    lspr_seed: int = 0

    # Optimisation. Measured on synthetic data (bench/ranking_quality.py, 3 seeds): at 5,000 requests
    # Adagrad 0.1 × 3 epochs gives AUC 0.8273 (Adam 2e-3 × 1 epoch 0.8236, × 2 epochs 0.8129:
    # the ids overfit); at 20,000 requests Adam 2e-3 × 1 epoch learns the id residuals that
    # Adagrad does not (0.8299 ± 0.0003 vs 0.8246 ± 0.0006), so larger data sets should switch.
    optimizer: str = "adagrad"
    learning_rate: float = 0.1
    ema_momentum: float = 0.99  # > 0: serve the exponential moving average of the weights (Keras `use_ema`)
    requests_per_batch: int = 10  # whole requests per batch (`ranker.request_batches`): ~10 shown rows each
    epochs: int = 3

    def __post_init__(self):
        if self.rank_loss not in RANK_LOSSES:
            raise ValueError(f"rank_loss must be one of {RANK_LOSSES}, got {self.rank_loss!r}")
        if self.optimizer.lower() not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.bias_slice_feature not in BIAS_SLICE_FEATURES:
            raise ValueError(f"bias_slice_feature must be one of {BIAS_SLICE_FEATURES}, got {self.bias_slice_feature!r}")
        if not 0.0 <= self.rank_alpha <= 1.0:
            raise ValueError(f"rank_alpha must be in [0, 1], got {self.rank_alpha}")
        for name in ("embedding_dim", "requests_per_batch", "epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("cross_layers", "cross_ramp_steps", "bottleneck_rank", "qu_dim", "rank_start_step",
                     "rank_ramp_steps", "distill_start_step", "distill_ramp_steps", "bias_start_step",
                     "bias_ramp_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.distill_weight < 0 or self.lspr_weight < 0 or self.learning_rate <= 0:
            raise ValueError("distill_weight and lspr_weight must be >= 0, learning_rate > 0")
        if list(self.bias_ctr_boundaries) != sorted(set(self.bias_ctr_boundaries)):
            raise ValueError("bias_ctr_boundaries must be strictly increasing")
        if self.bias_constraints and not self.bias_ctr_boundaries and not self.bias_slice_feature:
            raise ValueError("bias_constraints needs bias_ctr_boundaries or bias_slice_feature")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1), got {self.ema_momentum}")
        if self.lspr and not 0.0 <= self.lspr_dropout_rate < 1.0:
            raise ValueError("lspr_dropout_rate must be in [0, 1)")

    # ---- variants ---------------------------------------------------------------------------
    @classmethod
    def teacher(cls, **overrides) -> "RankerConfig":
        """A wider and deeper model for the teacher pass (no distillation of its own)."""
        values = dict(
            embedding_dim=32, cross_layers=3, cross_projection_dim=64, hidden_units=(512, 256, 128),
            qu_dim=32, ui_hidden_units=(32,), distill_weight=0.0,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def plain(cls, **overrides) -> "RankerConfig":
        """Every technique off: embeddings -> DNN -> logit on all inputs, logistic loss only."""
        values = dict(
            cross_layers=0, qu_dim=0, rank_loss="none", distill_weight=0.0, bias_constraints=False, lspr=False,
        )
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes) -> "RankerConfig":
        return dataclasses.replace(self, **changes)

    # ---- JSON round trip ----------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "RankerConfig":
        return config_from_dict(cls, values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RankerConfig":
        return cls.from_dict(json.loads(text))
