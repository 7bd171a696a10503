"""Weight-sharing width search of the ranker (Factory Floor §3.2): layer widths and embedding
dimension chosen by a REINFORCE controller under a FLOPs target.

Anil et al., "On the Factory Floor: ML Engineering for Industrial-Scale Ads Recommendation Models"
(2022), §3.2, after TuNAS (Bender et al., "Can weight sharing outperform random architecture
search?", CVPR 2020), whose "absolute value" reward it uses. One-shot search:

    super-network   the ranker's quality tower at the config's own (largest) widths; an
                    architecture a = (k_emb, k_1, …, k_L, k_proj) uses the first k units of each
                    searched layer (weight sharing): the activations are multiplied by 0/1 masks
                        e_f ← e_f ⊙ 1[j < k_emb]            (every sparse feature's embedding)
                        x_{l+1} = α·x0 ⊙ (((x_l V_l) ⊙ 1[j < k_proj]) U_l + b_l) + x_l     (DCNv2)
                        h_i ← act(W_i h_{i−1} + b_i) ⊙ 1[j < k_i]
                        logit = w·h_L + b  (+ w_ui·concat(e_ui) + b_ui with Q·U, see below)
                    so the masked network is exactly the small network made of the first k rows
                    and columns of every weight (tests/test_width_search.py checks both ends).
    controller      one categorical distribution per decision d, π_d = softmax(θ_d) (θ_d a
                    tf.Variable, 0 at the start: uniform); a ~ Π_d π_d.
    step t          a_t ~ π (uniform during `warmup_steps`); on the batch B_t
                        L_t = logistic loss of the super-network at a_t on B_t, before the step
                              trains on B_t (progressive validation: the data is new to the model
                              in the first pass; `reward_data="eval"` reads a held-out batch instead)
                        w ← w − η ∇_w L_t                              (the super-network's weights)
                        R_t = −L_t + γ·|c(a_t)/T − 1|,   γ < 0         (TuNAS's absolute reward)
                        θ ← Adam step on −(R_t − b_t)·log π(a_t) − β·H(π)      (REINFORCE)
                        b_{t+1} = δ·b_t + (1 − δ)·R_t                   (moving-average baseline)
    result          â = argmax_d π_d per decision (the most likely architecture).

The cost c(a) = FLOPs per candidate of the ranker at a (`models.ranker.ranker_flops`, the
package's analytic count in tf.profiler's convention, which `FactoryFloorRanker.flops()` returns) over the FLOPs of the config's own widths, so a
target T means "T × the default's FLOPs". `SearchConfig.cost` picks the count: "per_candidate"
(what `serving_default` runs per candidate, the cascade tower included: the default) or
"ctr_per_candidate" (the CTR path alone).

The default γ = −1: the accuracy reward is a log loss (~0.35 on the synthetic data, differences
between widths of a few 10⁻³), so at γ = −1 missing the target by 1 % costs as much as 0.01 of log loss,
more than any width buys here: the search lands on an architecture at the target and, among those
near it, prefers the one with the lower loss. A smaller |γ| (TuNAS used −0.07 against accuracies
in [0, 1]) trades more cost for accuracy but needs more steps against the batch-to-batch noise of
the loss (standard deviation 0.035 over batches of 256 shown rows). The controller's Adam has no
momentum (β1 = 0; see `Controller`).

Simplifications (the super-network is not the whole ranker): no Q·U factorisation: the quality
tower's h feeds a Dense(1) logit, plus, for a Q·U config, a linear term on the UI embeddings (so
the position effect is not mistaken for quality); no cascade head or tower (its FLOPs are counted,
its loss is not trained); no bottleneck (a `bottleneck_rank` config trains plain Dense layers,
its FLOPs count LowRankDense as the ranker does); no rank, distillation, bias or LSPR terms: the
logistic loss on shown rows only. The cross stack keeps the ranker's ReZero ramp
(`models.cross.alpha_schedule`). Features with `lookup: vocabulary` have no Transform output here:
the search hashes them into `VOCABULARY_STAND_IN_BUCKETS` rows (`search_features`); the table size
does not change a width's FLOPs.

Written by hand because no library has it: the masked super-network (its embeddings are the
package's `FeatureEmbedding`, its dense layers Keras's; the masked low-rank cross is written out
since `tfrs.layers.dcn.Cross` has no mask between its U and V), the controller and its baseline,
the reward and the search loop. Adam is Keras's.
"""
import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from cascade_ranking.models import activations, losses
from cascade_ranking.models.config import config_from_dict, to_dict
from cascade_ranking.models.cross import alpha_schedule
from cascade_ranking.models.embedding import FeatureEmbedding
from cascade_ranking.models.ranker import input_sizes, ranker_flops
from cascade_ranking.models.ranker import quality_input_names as quality_names
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.schema import features as F

COSTS = ("per_candidate", "ctr_per_candidate")
REWARD_DATA = ("train", "eval")
VOCABULARY_STAND_IN_BUCKETS = 65_536  # hash rows of a `lookup: vocabulary` feature during the search
EMBEDDING = "embedding_dim"
CROSS_PROJECTION = "cross_projection_dim"


def hidden_decision(i: int) -> str:
    return f"hidden_units[{i}]"


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """How a width search runs (`search`). Defaults: γ as the module docstring says; 1,000 steps of
    256 shown rows, the first 300 training the super-network on uniformly sampled architectures.
    Measured with `cascade search --cost-target 0.85,0.9,0.95 --requests 2000` (2 cores, 53 s in all):
    the cascade_stage ranker at 0.841, 0.902 and 0.964 of the default's FLOPs (the closest
    architectures of the space: 0.850, 0.901, 0.937), eval log loss 0.3596, 0.3635, 0.3624 against
    0.3603 at the default widths. 600 steps on 120 requests land within 0.024 of the target
    (tests/test_width_search.py, seeds 0–3); fewer leave the controller undecided."""

    cost_target: float = 0.85  # T: the searched architecture's FLOPs ≈ T × the config's own
    # Choices of each decision. A hidden layer's width: these fractions of the config's width
    # (rounded, at least 1); the embedding dimension: these dims below the config's, and the config's;
    # the cross stack's projection (rank): these fractions of it (empty: not searched; never for a
    # full-rank cross or a config without cross layers).
    # Eighths from a half up: on the pipeline's ranker (cascade_stage, 242,051 FLOPs a candidate, a
    # third of them the cascade tower's) they give architectures at 0.850, 0.901 and 0.937/0.964 of
    # the default, where quarters (0.25, 0.5, 0.75, 1) give none between 0.873 and 0.928.
    hidden_fractions: Tuple[float, ...] = (0.5, 0.625, 0.75, 0.875, 1.0)
    embedding_dims: Tuple[int, ...] = (4, 8, 12, 16)
    cross_projection_fractions: Tuple[float, ...] = (0.5, 0.625, 0.75, 0.875, 1.0)
    cost: str = "per_candidate"  # the FLOPs count of `ranker_flops` the target is of
    gamma: float = -1.0  # γ < 0: weight of |cost/T − 1| in the reward (module docstring)
    steps: int = 1_000  # super-network steps in all, one batch each
    warmup_steps: int = 300  # the first steps sample uniformly and leave the controller alone
    batch_size: int = 256  # shown rows a step
    controller_learning_rate: float = 0.05  # Adam on the controller's logits
    baseline_decay: float = 0.95  # δ of the moving-average baseline
    entropy_weight: float = 0.0  # β of the entropy bonus
    reward_data: str = "train"  # "train": the step's batch before the step; "eval": a held-out batch
    eval_batches: int = 20  # eval batches of the result's log loss (0: none)
    seed: int = 0

    def __post_init__(self):
        if not self.cost_target > 0:
            raise ValueError(f"cost_target must be > 0, got {self.cost_target}")
        for name in ("hidden_fractions", "cross_projection_fractions"):
            values = getattr(self, name)
            if any(not 0.0 < f <= 1.0 for f in values) or list(values) != sorted(set(values)):
                raise ValueError(f"{name} must be increasing fractions in (0, 1], got {list(values)}")
        if not self.hidden_fractions:
            raise ValueError("hidden_fractions needs at least one fraction")
        if any(d <= 0 for d in self.embedding_dims) or list(self.embedding_dims) != sorted(set(self.embedding_dims)):
            raise ValueError(f"embedding_dims must be increasing positive dims, got {list(self.embedding_dims)}")
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {self.cost!r}")
        if self.gamma > 0:
            raise ValueError(f"gamma must be <= 0 (a penalty on missing the cost target), got {self.gamma}")
        if self.steps <= 0 or not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"need steps > warmup_steps >= 0, got steps {self.steps}, warmup_steps {self.warmup_steps}")
        if self.batch_size <= 0 or self.controller_learning_rate <= 0:
            raise ValueError("batch_size and controller_learning_rate must be > 0")
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {self.baseline_decay}")
        if self.entropy_weight < 0 or self.eval_batches < 0:
            raise ValueError("entropy_weight and eval_batches must be >= 0")
        if self.reward_data not in REWARD_DATA:
            raise ValueError(f"reward_data must be one of {REWARD_DATA}, got {self.reward_data!r}")

    def replace(self, **changes) -> "SearchConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "SearchConfig":
        return config_from_dict(cls, values)


# ---- search space --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Decision:
    """One searched width: its name (a RankerConfig field, `hidden_units[i]` for a layer) and its
    choices, increasing, the last one the config's own."""

    name: str
    choices: Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The widths of one sampled network; `apply` writes them into a RankerConfig."""

    embedding_dim: int
    hidden_units: Tuple[int, ...]
    cross_projection_dim: int

    def apply(self, config: RankerConfig) -> RankerConfig:
        return config.replace(embedding_dim=self.embedding_dim, hidden_units=tuple(self.hidden_units),
                              cross_projection_dim=self.cross_projection_dim)

    def to_dict(self) -> Dict[str, Any]:
        return {"embedding_dim": self.embedding_dim, "hidden_units": list(self.hidden_units),
                "cross_projection_dim": self.cross_projection_dim}


def _fraction_choices(width: int, fractions: Sequence[float]) -> Tuple[int, ...]:
    return tuple(sorted({max(1, int(round(f * width))) for f in fractions} | {width}))


class SearchSpace:
    """The decisions of a RankerConfig's width search: the embedding dimension, each hidden layer's
    width, and the cross projection (rank) when it is searched (`SearchConfig`)."""

    def __init__(self, config: RankerConfig, search_config: SearchConfig = SearchConfig()):
        self.config = config
        decisions = [Decision(EMBEDDING, tuple(d for d in search_config.embedding_dims if d < config.embedding_dim)
                              + (config.embedding_dim,))]
        decisions += [Decision(hidden_decision(i), _fraction_choices(units, search_config.hidden_fractions))
                      for i, units in enumerate(config.hidden_units)]
        if config.cross_layers and config.cross_projection_dim and search_config.cross_projection_fractions:
            decisions.append(Decision(CROSS_PROJECTION, _fraction_choices(config.cross_projection_dim,
                                                                          search_config.cross_projection_fractions)))
        self.decisions: Tuple[Decision, ...] = tuple(decisions)
        self.names = tuple(d.name for d in self.decisions)

    @property
    def sizes(self) -> Tuple[int, ...]:
        return tuple(len(d.choices) for d in self.decisions)

    @property
    def num_architectures(self) -> int:
        return int(np.prod(self.sizes))

    def largest(self) -> Tuple[int, ...]:
        """The indices of the config's own architecture (the last choice of every decision)."""
        return tuple(n - 1 for n in self.sizes)

    def widths(self, indices: Sequence[int]) -> np.ndarray:
        """int32 [decisions]: the width chosen by each decision."""
        return np.array([d.choices[i] for d, i in zip(self.decisions, indices)], np.int32)

    def architecture(self, indices: Sequence[int]) -> Architecture:
        chosen = dict(zip(self.names, (int(w) for w in self.widths(indices))))
        return Architecture(
            embedding_dim=chosen[EMBEDDING],
            hidden_units=tuple(chosen[hidden_decision(i)] for i in range(len(self.config.hidden_units))),
            cross_projection_dim=chosen.get(CROSS_PROJECTION, self.config.cross_projection_dim))

    def all_indices(self):
        return np.ndindex(*self.sizes)


# ---- cost ----------------------------------------------------------------------------------------
class CostModel:
    """c(a): FLOPs of an architecture (`ranker_flops[key]`) over the config's own, memoised."""

    def __init__(self, config: RankerConfig, features: F.FeatureConfig = F.DEFAULT, key: str = "per_candidate"):
        if key not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {key!r}")
        self.config, self.features, self.key = config, features, key
        self.full_flops = ranker_flops(config, features)[key]
        self._cache: Dict[Architecture, int] = {}

    def flops(self, architecture: Architecture) -> int:
        if architecture not in self._cache:
            self._cache[architecture] = ranker_flops(architecture.apply(self.config), self.features)[self.key]
        return self._cache[architecture]

    def ratio(self, architecture: Architecture) -> float:
        return self.flops(architecture) / self.full_flops


def cost_penalty(ratio: float, target: float, gamma: float) -> float:
    """γ·|c/T − 1| (≤ 0 for γ ≤ 0)."""
    return gamma * abs(ratio / target - 1.0)


# ---- controller ----------------------------------------------------------------------------------
class Controller(tf.Module):
    """REINFORCE over independent categorical decisions (module docstring).

    `sample()` draws indices (numpy, seeded), `update(indices, reward)` takes one Adam step on
    −(R − b)·log π(a) − β·H(π) and moves the baseline b toward R; `observe(reward)` moves the
    baseline alone (warm-up). The first reward seen is the baseline's start."""

    def __init__(self, sizes: Sequence[int], learning_rate: float = 0.05, baseline_decay: float = 0.95,
                 entropy_weight: float = 0.0, seed: int = 0, name: str = "controller"):
        super().__init__(name=name)
        if not sizes or any(n < 1 for n in sizes):
            raise ValueError(f"every decision needs a choice, got sizes {list(sizes)}")
        self.sizes = tuple(int(n) for n in sizes)
        self.logits = [tf.Variable(tf.zeros([n]), name=f"logits_{i}") for i, n in enumerate(self.sizes)]
        self.baseline_decay = float(baseline_decay)
        self.entropy_weight = float(entropy_weight)
        self.baseline: Optional[float] = None
        # Adam without momentum (β1 = 0): a step follows this sample's advantage, not the drift of
        # earlier samples' (with β1 = 0.9 one of 8 seeds of tests' flat-accuracy controller had not
        # reached the cheapest architecture after 1,000 steps; with 0 every one had).
        self.optimizer = tf.keras.optimizers.Adam(learning_rate, beta_1=0.0)
        self.optimizer.build(self.logits)
        self._rng = np.random.default_rng(seed)
        self._step = tf.function(self._apply, input_signature=[tf.TensorSpec([len(self.sizes)], tf.int32),
                                                               tf.TensorSpec([], tf.float32)])

    def probabilities(self) -> List[np.ndarray]:
        return [tf.nn.softmax(v).numpy() for v in self.logits]

    def sample(self) -> Tuple[int, ...]:
        return tuple(int(self._rng.choice(len(p), p=p / p.sum())) for p in self.probabilities())

    def sample_uniform(self) -> Tuple[int, ...]:
        return tuple(int(self._rng.integers(n)) for n in self.sizes)

    def most_likely(self) -> Tuple[int, ...]:
        return tuple(int(np.argmax(v.numpy())) for v in self.logits)

    def log_prob(self, indices) -> tf.Tensor:
        indices = tf.convert_to_tensor(indices, tf.int32)
        return tf.add_n([tf.gather(tf.nn.log_softmax(v), indices[d]) for d, v in enumerate(self.logits)])

    def entropy(self) -> tf.Tensor:
        return tf.add_n([-tf.reduce_sum(tf.nn.softmax(v) * tf.nn.log_softmax(v)) for v in self.logits])

    def _apply(self, indices, advantage):
        with tf.GradientTape() as tape:
            loss = -advantage * self.log_prob(indices)
            if self.entropy_weight:
                loss -= self.entropy_weight * self.entropy()
        self.optimizer.apply_gradients(zip(tape.gradient(loss, self.logits), self.logits))
        return loss

    def observe(self, reward: float) -> float:
        """Moves the baseline toward `reward`; returns the advantage R − b (b before the move)."""
        reward = float(reward)
        if self.baseline is None:
            self.baseline = reward
        advantage = reward - self.baseline
        self.baseline = self.baseline_decay * self.baseline + (1.0 - self.baseline_decay) * reward
        return advantage

    def update(self, indices: Sequence[int], reward: float) -> float:
        """One REINFORCE step for the sampled `indices` and their `reward`; returns the advantage."""
        advantage = self.observe(reward)
        self._step(tf.constant(indices, tf.int32), tf.constant(advantage, tf.float32))
        return advantage


def train_controller(controller: Controller, reward_fn: Callable[[Tuple[int, ...]], float], steps: int) -> List[float]:
    """`steps` REINFORCE updates against `reward_fn(indices)` (no network: the controller alone)."""
    rewards = []
    for _ in range(steps):
        indices = controller.sample()
        reward = float(reward_fn(indices))
        controller.update(indices, reward)
        rewards.append(reward)
    return rewards


# ---- super-network -------------------------------------------------------------------------------
def search_features(features: F.FeatureConfig) -> F.FeatureConfig:
    """`features` with each `lookup: vocabulary` feature hashed into VOCABULARY_STAND_IN_BUCKETS
    rows (the search has no Transform output; a table's size does not change FLOPs)."""
    if not features.vocabulary_features():
        return features
    inputs = tuple(dataclasses.replace(f, lookup="hash", buckets=VOCABULARY_STAND_IN_BUCKETS, min_count=0,
                                       max_tokens=0) if f.has_vocabulary else f for f in features.inputs)
    return dataclasses.replace(features, inputs=inputs, vocabularies=())


class SuperNetwork(tf.keras.Model):
    """The ranker's quality tower at the config's widths, masked to a sampled architecture
    (`call(features, widths)`, widths int32 [decisions] in the SearchSpace's order)."""

    def __init__(self, config: RankerConfig, space: SearchSpace, features: F.FeatureConfig = F.DEFAULT, **kwargs):
        super().__init__(**kwargs)
        self.config, self.space = config, space
        features = search_features(features)
        self.features = features
        self.embedding = FeatureEmbedding(config.embedding_dim, features.sparse_features(), features.dense_features(),
                                          lr_multiplier=config.embedding_lr_multiplier, name="embedding")
        self.sparse_names = {f.name for f in features.sparse_features()}
        self.tower_names = quality_names(config, features)
        self.ui_names = features.ui_names if config.qu_dim > 0 else ()
        sizes = input_sizes(config, features)
        self.width = sum(sizes[name] for name in self.tower_names)
        self._segments = [(name in self.sparse_names, sizes[name]) for name in self.tower_names]
        self.activation_fn = activations.get_activation(config.activation)
        self.projection_dim = config.cross_projection_dim or None
        def init():  # TFRS Cross's "truncated_normal", a new initializer a weight (distinct draws)
            return tf.keras.initializers.TruncatedNormal(stddev=0.05)

        self.cross_down, self.cross_up, self.cross_bias = [], [], []
        d, k = self.width, self.projection_dim
        for i in range(config.cross_layers):
            if k:
                self.cross_down.append(self.add_weight(name=f"cross_{i}_v", shape=(d, k), initializer=init()))
                self.cross_up.append(self.add_weight(name=f"cross_{i}_u", shape=(k, d), initializer=init()))
            else:
                self.cross_up.append(self.add_weight(name=f"cross_{i}_w", shape=(d, d), initializer=init()))
            self.cross_bias.append(self.add_weight(name=f"cross_{i}_b", shape=(d,), initializer="zeros"))
        self.hidden = [tf.keras.layers.Dense(units, name=f"hidden_{i}") for i, units in enumerate(config.hidden_units)]
        self.head = tf.keras.layers.Dense(1, name="logit")
        self.ui_head = tf.keras.layers.Dense(1, name="ui_logit") if self.ui_names else None
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")  # the cross ramp's step
        self._index = {name: i for i, name in enumerate(space.names)}

    def adapt(self, batches: tf.data.Dataset, steps: int = 50) -> None:
        self.embedding.adapt(batches, steps)

    def _width(self, widths, name: str, full: int):
        i = self._index.get(name)
        return tf.constant(full, tf.int32) if i is None else widths[i]

    def call(self, features: Dict[str, tf.Tensor], widths=None, training=None) -> tf.Tensor:
        """Logit [B] of the architecture `widths` (None: the full network)."""
        c = self.config
        if widths is None:
            widths = tf.constant(self.space.widths(self.space.largest()))
        widths = tf.convert_to_tensor(widths, tf.int32)
        embedding_mask = tf.sequence_mask(self._width(widths, EMBEDDING, c.embedding_dim), c.embedding_dim, tf.float32)
        embedded = self.embedding(features, names=self.tower_names + tuple(self.ui_names), training=training)
        x0 = tf.concat([embedded[n] * embedding_mask if n in self.sparse_names else embedded[n]
                        for n in self.tower_names], axis=-1)
        x = x0
        if self.cross_bias:
            scaled = alpha_schedule(self.step, c.cross_ramp_steps) * x0
            if self.projection_dim:
                rank_mask = tf.sequence_mask(self._width(widths, CROSS_PROJECTION, self.projection_dim),
                                             self.projection_dim, tf.float32)
            for i, bias in enumerate(self.cross_bias):
                if self.projection_dim:
                    inner = tf.matmul(tf.matmul(x, self.cross_down[i]) * rank_mask, self.cross_up[i])
                else:
                    inner = tf.matmul(x, self.cross_up[i])
                x = scaled * (inner + bias) + x
        for i, layer in enumerate(self.hidden):
            mask = tf.sequence_mask(self._width(widths, hidden_decision(i), layer.units), layer.units, tf.float32)
            x = self.activation_fn(layer(x)) * mask
        logit = self.head(x)[:, 0]
        if self.ui_head is not None:
            ui = tf.concat([embedded[n] * embedding_mask if n in self.sparse_names else embedded[n]
                            for n in self.ui_names], axis=-1)
            logit += self.ui_head(ui)[:, 0]
        return logit


def _labels_weights(batch: Dict[str, tf.Tensor], label_key: str):
    labels = tf.cast(tf.reshape(batch[label_key], [-1]) > 0, tf.float32)
    weights = (tf.reshape(tf.cast(batch[F.SAMPLE_WEIGHT_KEY], tf.float32), [-1]) if F.SAMPLE_WEIGHT_KEY in batch
               else tf.ones_like(labels))
    return labels, weights


def make_optimizer(config: RankerConfig) -> tf.keras.optimizers.Optimizer:
    """The super-network's optimizer: Adam for a config whose optimizer is Adam, else Adagrad (the
    ranker's default; it stands in for Shampoo and ClippyAdagrad too), at the config's learning rate
    and without EMA (the search reads the trained weights themselves)."""
    name = config.optimizer.lower()
    return (tf.keras.optimizers.Adam if name == "adam" else tf.keras.optimizers.Adagrad)(config.learning_rate)


class _Trainer:
    """The super-network's train and loss steps, traced once for every architecture (the widths
    are a tensor argument)."""

    def __init__(self, net: SuperNetwork, element_spec, label_key: str):
        self.net, self.label_key = net, label_key
        self.optimizer = make_optimizer(net.config)
        widths_spec = tf.TensorSpec([len(net.space.names)], tf.int32)
        self.train = tf.function(self._train, input_signature=[element_spec, widths_spec])
        self.loss_sums = tf.function(self._loss_sums, input_signature=[element_spec, widths_spec])

    def _loss(self, batch, widths, training):
        labels, weights = _labels_weights(batch, self.label_key)
        logit = self.net(batch, widths, training=training)
        return losses.weighted_logistic_loss(labels, logit, sample_weight=weights)

    def _train(self, batch, widths):
        with tf.GradientTape() as tape:
            loss = self._loss(batch, widths, training=True)
        variables = self.net.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        self.net.step.assign_add(1)
        return loss  # of the weights before this step's update

    def _loss_sums(self, batch, widths):
        labels, weights = _labels_weights(batch, self.label_key)
        logit = self.net(batch, widths, training=False)
        per_row = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logit)
        return tf.reduce_sum(weights * per_row), tf.cast(tf.size(labels), tf.float32)

    def mean_loss(self, batches: Sequence, widths: np.ndarray) -> float:
        total, count = 0.0, 0.0
        for batch in batches:
            s, n = self.loss_sums(batch, tf.constant(widths))
            total, count = total + float(s), count + float(n)
        return total / count if count else float("nan")


# ---- the search ----------------------------------------------------------------------------------
@dataclasses.dataclass
class SearchResult:
    """What `search` found: the most likely architecture and how it was reached.

    final_reward is −(eval log loss) + γ·|c/T − 1| at the result when eval batches were given, else
    the mean training reward of the last 10 % of the steps; eval_log_loss is the super-network's at
    the architecture, full_eval_log_loss the same network's at the default widths (its weights shared
    with every sampled architecture: not a default ranker trained alone); `trace` holds one record
    per step (step, architecture indices, cost ratio, loss, reward, advantage)."""

    base_config: RankerConfig
    search_config: SearchConfig
    space: SearchSpace
    indices: Tuple[int, ...]
    architecture: Architecture
    cost_ratio: float
    flops: int
    full_flops: int
    final_reward: float
    eval_log_loss: Optional[float]
    full_eval_log_loss: Optional[float]
    probabilities: List[List[float]]
    trace: List[Dict[str, Any]]
    seconds: float

    @property
    def rewards(self) -> List[float]:
        return [r["reward"] for r in self.trace]

    def ranker_config(self) -> RankerConfig:
        """The searched RankerConfig: the base config with the architecture's widths."""
        return self.architecture.apply(self.base_config)

    def changed_fields(self) -> Dict[str, Any]:
        """The searched fields whose value differs from the base config's (plain values)."""
        base, found = self.base_config.to_dict(), self.ranker_config().to_dict()
        return {name: found[name] for name in self.architecture.to_dict() if found[name] != base[name]}

    def to_dict(self) -> Dict[str, Any]:
        return {
            "cost_target": self.search_config.cost_target,
            "architecture": self.architecture.to_dict(),
            "default_architecture": self.space.architecture(self.space.largest()).to_dict(),
            "cost": self.search_config.cost,
            "cost_ratio": self.cost_ratio,
            "flops": self.flops,
            "default_flops": self.full_flops,
            "final_reward": self.final_reward,
            "eval_log_loss": self.eval_log_loss,
            "default_eval_log_loss": self.full_eval_log_loss,
            "probabilities": {d.name: {str(c): p for c, p in zip(d.choices, probs)}
                              for d, probs in zip(self.space.decisions, self.probabilities)},
            "search_config": self.search_config.to_dict(),
            "seconds": self.seconds,
            "steps": len(self.trace),
        }


def search(
    config: RankerConfig,
    train_batches: tf.data.Dataset,
    eval_batches: Optional[tf.data.Dataset] = None,
    search_config: SearchConfig = SearchConfig(),
    features: F.FeatureConfig = F.DEFAULT,
    label_key: str = F.LABEL_KEY,
    progress: Optional[Callable[[Dict[str, Any]], None]] = None,
    log_every: int = 100,
) -> SearchResult:
    """Searches the widths of `config` (module docstring) on `train_batches`, a tf.data.Dataset of
    parsed shown-row batches (dicts with the registry's inputs and `label_key`; `sample_weight` is
    read when present), read again as often as `search_config.steps` needs. `eval_batches` (the
    same kind, held out) give the reward with `reward_data="eval"` and the result's log loss (its
    first `eval_batches` batches). `progress` gets a dict every `log_every` steps and at the end."""
    sc = search_config
    start = time.time()
    tf.keras.utils.set_random_seed(sc.seed)
    space = SearchSpace(config, sc)
    cost = CostModel(config, features, sc.cost)
    net = SuperNetwork(config, space, features, name="width_search_supernet")
    net.adapt(train_batches)
    trainer = _Trainer(net, train_batches.element_spec, label_key)
    controller = Controller(space.sizes, sc.controller_learning_rate, sc.baseline_decay, sc.entropy_weight, sc.seed)
    held_out = list(eval_batches.take(sc.eval_batches)) if eval_batches is not None and sc.eval_batches else []
    if sc.reward_data == "eval":
        if eval_batches is None:
            raise ValueError("reward_data 'eval' needs eval_batches")
        reward_batches = iter(eval_batches.repeat())
    batches = iter(train_batches.repeat())
    trace: List[Dict[str, Any]] = []
    for step in range(sc.steps):
        warm = step < sc.warmup_steps
        indices = controller.sample_uniform() if warm else controller.sample()
        architecture = space.architecture(indices)
        widths = tf.constant(space.widths(indices))
        batch = next(batches)
        if sc.reward_data == "eval":
            s, n = trainer.loss_sums(next(reward_batches), widths)
            loss = float(s) / max(float(n), 1.0)
            trainer.train(batch, widths)
        else:
            loss = float(trainer.train(batch, widths))
        ratio = cost.ratio(architecture)
        reward = -loss + cost_penalty(ratio, sc.cost_target, sc.gamma)
        advantage = controller.observe(reward) if warm else controller.update(indices, reward)
        trace.append({"step": step, "indices": list(indices), "cost_ratio": ratio, "loss": loss, "reward": reward,
                      "advantage": advantage})
        if progress is not None and (step + 1) % log_every == 0 and step + 1 < sc.steps:
            best = controller.most_likely()
            recent = trace[-log_every:]
            progress({"step": step + 1, "steps": sc.steps, "warmup": warm,
                      "mean_reward": float(np.mean([r["reward"] for r in recent])),
                      "mean_loss": float(np.mean([r["loss"] for r in recent])),
                      "most_likely": space.architecture(best), "most_likely_cost_ratio": cost.ratio(space.architecture(best))})
    best = controller.most_likely()
    architecture = space.architecture(best)
    ratio = cost.ratio(architecture)
    eval_loss = full_loss = None
    if held_out:
        eval_loss = trainer.mean_loss(held_out, space.widths(best))
        full_loss = trainer.mean_loss(held_out, space.widths(space.largest()))
        final = -eval_loss + cost_penalty(ratio, sc.cost_target, sc.gamma)
    else:
        tail = trace[-max(1, sc.steps // 10):]
        final = float(np.mean([r["reward"] for r in tail]))
    result = SearchResult(
        base_config=config, search_config=sc, space=space, indices=best, architecture=architecture, cost_ratio=ratio,
        flops=cost.flops(architecture), full_flops=cost.full_flops, final_reward=float(final),
        eval_log_loss=eval_loss, full_eval_log_loss=full_loss,
        probabilities=[p.tolist() for p in controller.probabilities()], trace=trace, seconds=time.time() - start)
    if progress is not None:
        progress({"step": sc.steps, "steps": sc.steps, "warmup": False, "done": True,
                  "mean_reward": float(np.mean([r["reward"] for r in trace[-log_every:]])),
                  "mean_loss": float(np.mean([r["loss"] for r in trace[-log_every:]])),
                  "most_likely": architecture, "most_likely_cost_ratio": ratio})
    return result


def closest_ratio(space: SearchSpace, cost: CostModel, target: float) -> float:
    """The cost ratio of the space's architecture closest to `target` (what a perfect search of the
    cost term alone would reach)."""
    return min((cost.ratio(space.architecture(i)) for i in space.all_indices()), key=lambda r: abs(r - target))


__all__ = [
    "Architecture", "Controller", "CostModel", "Decision", "SearchConfig", "SearchResult", "SearchSpace",
    "SuperNetwork", "closest_ratio", "cost_penalty", "ranker_flops", "search", "search_features",
    "train_controller",
]
