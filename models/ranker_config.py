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
    list_loss               the registered loss (`models.losses.get`) of the per-request term:
                            "ranknet" (default), or any `@losses.register`ed class taking
                            (labels, scores, sample_weight=, grouping=)
    distill_weight          max weight of the distillation loss (0 = off)
    bias_constraints        slice-calibration duals (Factory Floor §7)
    lspr                    loss-balanced small perturbation regularisation (off by default)
    optimizer               "adagrad" (default), "adam", "shampoo" (dense weights; the embedding
                            tables keep Adagrad: `models.shampoo`, Factory Floor §4.2) or
                            "clippy_adagrad" (TFRS's ClippyAdagrad)
"""
import dataclasses
import json
from typing import Any, Dict, Tuple

from cascade_ranking.models.config import config_from_dict, to_dict

RANK_LOSSES = ("none", "multi_objective", "multi_task")
CASCADE_SCORES = ("reference_ui", "head", "tower")
OPTIMIZERS = ("adagrad", "adam", "shampoo", "clippy_adagrad")


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
    # The reference UI treatment of the cascade score (`FactoryFloorRanker.cascade_logit`): a
    # candidate that the ranking stage orders has not been shown yet, so its score is the CTR logit
    # it would have at this treatment (τ(q·u_ref) for a Q·U model), never its logged UI features.
    reference_ui_position: int = 1
    reference_ui_format: int = 0
    # What the cascade orders by (`FactoryFloorRanker.cascade_logit`):
    #   "reference_ui"  that logit;
    #   "head"          an MLP (cascade_head_units, then Dense(1)) on the quality body h;
    #   "tower"         its own DCNv2 cross stack (cross_layers, cross_projection_dim) and MLP on the
    #                   shared embeddings: a second task on a shared-embedding ranker.
    # A head or tower is trained by the cascade loss only (`models.ranking_stage`); see
    # `cascade_stage()` for the measured choice.
    cascade_score: str = "reference_ui"
    cascade_head_units: Tuple[int, ...] = (64,)
    cascade_head_stop_gradient: bool = False  # "head" reads sg(h): the cascade loss leaves the body alone

    # Rank loss (RankNet per request) and its curriculum ramp.
    rank_loss: str = "multi_objective"
    list_loss: str = "ranknet"  # registry name of the per-request loss (models.losses)
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
    bias_slice_feature: str = "ui_position"  # a UI id feature of the registry whose values are slices too ("" = none)
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
    # optimizer: one of OPTIMIZERS (`models.ranker.make_optimizer`). "shampoo" steps the dense weights with
    # Shampoo grafted onto AdaGrad's step size (`models.shampoo.Shampoo`) and the embedding tables with
    # Adagrad at the same learning rate (Factory Floor §4.2); "clippy_adagrad" is TFRS's ClippyAdagrad.
    optimizer: str = "adagrad"
    learning_rate: float = 0.1
    # Shampoo (optimizer "shampoo" only; `models.shampoo` has the formulas):
    shampoo_block_size: int = 128  # largest block side b of a preconditioned matrix (blocks of ≤ b × b)
    shampoo_start_step: int = 100  # warm-up t₀: the first t₀ steps are plain AdaGrad's (statistics accumulate)
    shampoo_update_every: int = 10  # k: the inverse 4th roots L^-1/4, R^-1/4 are recomputed every k steps from t₀
    shampoo_epsilon: float = 1e-6  # ε of the roots' ridge ε·λ_max (relative to the largest eigenvalue)
    shampoo_beta2: float = 1.0  # 1: L, R are sums of G·Gᵀ, Gᵀ·G; < 1: exponential moving averages with this decay
    shampoo_momentum: float = 0.0  # μ of a momentum on the grafted update (0: none)
    # The embedding tables learn at embedding_lr_multiplier × learning_rate (`FeatureEmbedding`'s
    # reparametrisation, which needs no optimizer of its own; with "shampoo" it applies to the tables' Adagrad).
    # Measured in the joint cascade: 3 gives the cascade tower the id signal it needs at no CTR cost
    # (bench/ranker_variants.py).
    embedding_lr_multiplier: float = 1.0
    ema_momentum: float = 0.99  # > 0: serve the exponential moving average of the weights (Keras `use_ema`)
    # Shown rows per batch when trained on rows (the teacher: no per-request loss; `inputs.shown_row_batches`;
    # `teacher()` sets 256). The lab bench bench/ranking_quality.py reads it as candidate rows per batch
    # (`inputs.parsed_batches`, then the shown ones kept), as the teacher did before 2026-12-06.
    batch_size: int = 128
    # Trained on rows, the parsed shown rows stay in memory between epochs when the train split's
    # files hold at most this many MB on disk (the demo's: 7 MB); larger splits are read every epoch.
    cache_train_mb: float = 128.0
    requests_per_batch: int = 10  # whole requests per batch of `ranker.request_batches` (bench/ lab path)
    epochs: int = 3

    def __post_init__(self):
        if self.rank_loss not in RANK_LOSSES:
            raise ValueError(f"rank_loss must be one of {RANK_LOSSES}, got {self.rank_loss!r}")
        if self.list_loss != "ranknet":  # the default needs no registry lookup (and no TF import)
            from cascade_ranking.models import losses

            losses.get_class(self.list_loss)  # ValueError naming the unknown loss and the known ones
        if self.cascade_score not in CASCADE_SCORES:
            raise ValueError(f"cascade_score must be one of {CASCADE_SCORES}, got {self.cascade_score!r}")
        if self.optimizer.lower() not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.shampoo_block_size < 1 or self.shampoo_update_every < 1 or self.shampoo_start_step < 0:
            raise ValueError("shampoo_block_size and shampoo_update_every must be >= 1, shampoo_start_step >= 0")
        if not self.shampoo_epsilon >= 0:
            raise ValueError(f"shampoo_epsilon must be >= 0, got {self.shampoo_epsilon}")
        if not 0.0 < self.shampoo_beta2 <= 1.0:
            raise ValueError(f"shampoo_beta2 must be in (0, 1], got {self.shampoo_beta2}")
        if not 0.0 <= self.shampoo_momentum < 1.0:
            raise ValueError(f"shampoo_momentum must be in [0, 1), got {self.shampoo_momentum}")
        if not self.embedding_lr_multiplier > 0:
            raise ValueError(f"embedding_lr_multiplier must be > 0, got {self.embedding_lr_multiplier}")
        if not 0.0 <= self.rank_alpha <= 1.0:
            raise ValueError(f"rank_alpha must be in [0, 1], got {self.rank_alpha}")
        for name in ("embedding_dim", "batch_size", "requests_per_batch", "epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("cache_train_mb", "cross_layers", "cross_ramp_steps", "bottleneck_rank", "qu_dim", "rank_start_step",
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
        if self.reference_ui_position < 1:
            raise ValueError(f"reference_ui_position must be a shown position (>= 1), got {self.reference_ui_position}")
        if self.reference_ui_format < 0:
            raise ValueError(f"reference_ui_format must be >= 0, got {self.reference_ui_format}")
        if self.lspr and not 0.0 <= self.lspr_dropout_rate < 1.0:
            raise ValueError("lspr_dropout_rate must be in [0, 1)")

    # ---- variants ---------------------------------------------------------------------------
    @classmethod
    def teacher(cls, **overrides) -> "RankerConfig":
        """A wider and deeper model for the teacher pass (no distillation of its own).

        It trains on candidate rows in any order (the rows of ExampleGen, before the NegativeSampler
        groups requests), so it has no per-request loss: `rank_loss="none"`. Its job is the soft
        label σ(teacher_logit) of every shown row, which the logistic loss alone learns."""
        values = dict(
            embedding_dim=32, cross_layers=3, cross_projection_dim=64, hidden_units=(512, 256, 128),
            qu_dim=32, ui_hidden_units=(32,), distill_weight=0.0, rank_loss="none",
            # 256 shown rows a batch, measured on the demo's data (teacher eval AUC, fit seconds for 3
            # epochs on 2 cores): 128 → 0.8286, 10.8 s; 256 → 0.8289, 10.2 s; 512 → 0.8219, 9.5 s.
            # (Before, 128 candidate rows a batch, ~26 of them shown: 0.8250, 26.9 s.)
            batch_size=256,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def cascade_stage(cls, **overrides) -> "RankerConfig":
        """The ranking stage of the joint cascade (`cascade_ranking.models.trainers.cascade`, the pipeline's ranker):
        the full model with a cascade tower on the shared embeddings, which learn 3× faster.

        Measured on the demo's request lists (bench/ranker_variants.py, synthetic, 3 seeds;
        BENCHMARKS.md §0): with the reference-UI logit as the cascade score the ranker's
        Recall@|GT|@20 stays below the pre-ranker's (0.852 vs 0.878) and the CTR AUC drops to
        0.825; a head on the quality body keeps the CTR but not the ranking (0.855); the tower
        with `embedding_lr_multiplier` 3 passes the pre-ranker (0.885 vs 0.879) at AUC 0.830."""
        values = dict(cascade_score="tower", cascade_head_units=(128, 64), embedding_lr_multiplier=3.0)
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
        return to_dict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "RankerConfig":
        return config_from_dict(cls, values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RankerConfig":
        return cls.from_dict(json.loads(text))
