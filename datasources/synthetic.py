"""Synthetic cascade-log generator: the built-in default data source.

It simulates what an ads/feed system logs, with the ground truth kept:

World (fixed by the seed):
    item i: observable dense features x_i ∈ R^4 (the 4th is its standardised log popularity),
            latent vector v_i = A·x_i + σ_id·ε_i  (ε_i ~ N(0, I_d): what only the id can tell),
            a category (argmax of a projection of v_i, with noise) and 1..3 tags drawn
            around the category, and a Zipf popularity π_i.
    user u: observable dense features z_u ∈ R^4, latent w_u = B·z_u + σ_id·ε_u, Zipf activity.
    query token t: embedding e_t ∈ R^d.
Request r (user u, query tokens T_r, hour, device):
    relevance logit   ρ(r, i) = s·(w_u + q_r)·v_i / √d + β·pop_i + b,   q_r = mean_{t∈T_r} e_t
    true CTR          ctr = σ(ρ) · exam(position) · fmt(format)
                      exam(p) = 1 / (1 + 0.35·(p − 1))       (position bias, falls with p)
                      fmt = (0.75, 1.0, 0.9) for formats (0, 1, 2)
A logging cascade (RecFlow layout) selects what is shown. From a retrieval pool of 500 items
(sampled by popularity), four stages score ρ + N(0, σ_k²) with σ_k falling stage by stage and
keep 120 → 60 → 20 → 10. Each request keeps 10 candidates per tier:
    rerank_pos   the 10 shown items (the ground truth), at positions 1..10 in rerank order,
                 each with a format drawn uniformly (the logging system randomises formats);
    rerank_neg   the 10 the re-ranker dropped;
    rank_neg     10 of the 40 the ranker dropped;
    coarse_neg   10 of the 60 the coarse ranker dropped;
    prerank_neg  10 of the 380 the pre-ranker dropped.
Clicks are Bernoulli(ctr) for shown items and 0 for the rest (ui_position 0, true_ctr 0: they
were never at risk of a click).

Every request draws from its own generator seeded by (seed, request index), so output does not
depend on how requests are sharded across workers, and the same seed gives the same bytes.

Spans with drift (`write_spans`, `cascade generate --spans K --drift d`): span k (1-based) holds
requests [(k−1)·N, k·N), later in time than span k−1's, drawn from the world after k−1 drift
steps. Each step, with its own generator seeded by (seed, step):
    item popularity    log π_i ← log π_i + d·std(log π)·ε_i      (renormalised; the observable
                       standardised log popularity x_i4 and β·pop_i follow)
    user tastes        w_u ← w_u + d·std(w)·ε_u                  (a move the user's features do not
                       show: only the user id can follow it)
    position effect    exam(p) = 1 / (1 + c_k·(p − 1)),  c_k = 0.35·(1 + d)^(k−1)
so a model trained on an older span is stale on a newer one. d = 0: every span is a fresh draw of
the same world.

Testbed knobs (fields of SyntheticConfig, `SyntheticConfig.knobs` gives their effective values).
Each is off in the "default" preset, which gives exactly the log described above (the same bytes
for the same seed as before the knobs existed: every new random draw comes from its own generators,
seeded by (seed, _TESTBED_STREAM) for the world and (seed, request index, _TESTBED_STREAM) for a
request, so the default path's draws are untouched):
    cross_strength c, num_crosses K   explicit feature crosses in the relevance logit:
                       ρ(r, i) += c/√K · Σ_{k=1..K} s_k · a_{j_k}(i) · b_{l_k}(r)
                       a(i) = (x_i1, x_i2, x_i3) (item_dense but its popularity),
                       b(r) = (z_u (the 4 user_dense values), √1.5·(device − 1), √2·cos(2π·hour/24),
                       √2·sin(2π·hour/24)) (each of about unit variance), the K pairs (j_k, l_k)
                       drawn without replacement from the 3 × 7 grid and the signs s_k = ±1 with the
                       world: Var(cross term) ≈ c². Products of observable inputs, what a DCN cross
                       layer represents exactly. c = 0: none (`World.relevance` needs the request's
                       hour and device when c > 0). NB ρ already holds products of observables
                       without them (v_i·w_u contains x_iᵀ·Aᵀ·B·z_u), but none with the context.
    position_by_relevance   the logging policy shows the 10 re-ranked items in the order of their
                       true relevance ρ (the best on top) instead of the re-ranker's noisy order
                       (σ = stage_noise[3]), so in the logs position and relevance are confounded
                       (rank correlation −1 within a request, against about −0.65 by default).
    randomized_eval_fraction f   a randomised slice of the eval split: the eval requests (by
                       `request_split` with the default 4:1 train/eval buckets, DEFAULT_SPLIT_BUCKETS)
                       whose uniform draw u(seed, request id) < f show their 10 items at a uniformly
                       random permutation of positions 1..10; clicks follow those positions.
                       `is_randomized(config, request_id)` / `randomized_requests(config, ids)`
                       name them; no train request is randomised. Written with other split buckets,
                       the same request ids are randomised, whichever split they land in.
    ctr_scale κ        true CTR = κ · σ(ρ) · exam(p) · fmt: rare clicks at κ < 1 (the order by ρ, and
                       so the logging cascade, is unchanged).
    item_zipf α_i, user_zipf α_u   Zipf exponents of item popularity (π_i ∝ rank^−α_i, default 0.9)
                       and user activity (∝ rank^−α_u, default 0.8): heavier tails above them.
                       (Retrieval samples its 500 items without replacement, so the head is in every
                       pool either way: a heavier item tail shows below the head, in fewer distinct
                       items logged.)
Presets (`preset`, `PRESET_KNOBS`):
    default   cross_strength 0, num_crosses 8, position_by_relevance false, randomized_eval_fraction 0,
              ctr_scale 1, item_zipf 0.9, user_zipf 0.8: the log above.
    hard      cross_strength 1.8, num_crosses 8, position_by_relevance true, randomized_eval_fraction
              0.5, ctr_scale 0.06, item_zipf 1.15, user_zipf 1.1: the conditions the Factory Floor
              techniques are for. Measured (seed 0, 2,000 requests): shown CTR 1.4 % (default 15.5 %;
              1.3–1.7 % over seeds 0–5), the crosses 49 % of the within-request variance of ρ, the
              randomised slice about 10 % of all requests (half the eval split). Drift over time
              comes from spans (`write_spans`, `cascade generate --spans K --drift d`), with any preset.
A knob left None takes its preset's value; a knob given explicitly wins over the preset
(SyntheticConfig(preset="hard", ctr_scale=1.0) is "hard" with the default click rate), the same
through `config_from_dict`, YAML (`synthetic: {preset: hard, ctr_scale: 1.0}`) and
`--set synthetic.preset=hard`.
"""
import copy
import dataclasses
import hashlib
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from cascade_ranking.datasources import example_wire
from cascade_ranking.datasources.example_io import InputError, SplitWriter, atomic_output_dir, write_report
from cascade_ranking.schema import features as F

START_TIME = 1_767_225_600  # 2026-01-01T00:00:00Z
_WORLD_STREAM = 0x5EED_0F_5EED
_DRIFT_STREAM = 0xD21F7
_TESTBED_STREAM = 0x7E57_BED  # the testbed knobs' own draws (crosses, random positions)
_RANDOMIZED_STREAM = 0x7A_9D0  # which eval requests are randomised
DEFAULT_SPLIT_BUCKETS: Tuple[Tuple[str, int], ...] = (("train", 4), ("eval", 1))
PRESETS = ("default", "hard")
CROSS_ITEM_VALUES = 3  # a(i): item_dense[:3] (not the popularity, item_dense[3])
CROSS_REQUEST_VALUES = 7  # b(r): user_dense, device, hour (cos, sin)


@dataclasses.dataclass(frozen=True)
class TestbedKnobs:
    """The effective testbed knobs of a SyntheticConfig (its preset's, overridden by the knobs it
    sets; the module docstring gives each one's formula)."""

    __test__ = False  # not a pytest class

    cross_strength: float
    num_crosses: int
    position_by_relevance: bool
    randomized_eval_fraction: float
    ctr_scale: float
    item_zipf: float
    user_zipf: float


PRESET_KNOBS: Dict[str, TestbedKnobs] = {
    "default": TestbedKnobs(cross_strength=0.0, num_crosses=8, position_by_relevance=False,
                            randomized_eval_fraction=0.0, ctr_scale=1.0, item_zipf=0.9, user_zipf=0.8),
    "hard": TestbedKnobs(cross_strength=1.8, num_crosses=8, position_by_relevance=True,
                         randomized_eval_fraction=0.5, ctr_scale=0.06, item_zipf=1.15, user_zipf=1.1),
}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Switches of the generator, with their defaults."""

    num_requests: int = 5_000
    seed: int = 0
    num_items: int = 10_000
    num_users: int = 5_000
    num_query_tokens: int = 2_000
    num_categories: int = 50
    num_item_tags: int = 400
    latent_dim: int = 8
    id_noise: float = 0.5  # σ_id: how much of the latent vectors only the ids reveal
    relevance_scale: float = 1.0  # s
    popularity_weight: float = 0.3  # β
    relevance_bias: float = -5.0  # b: shown CTR ≈ 15%, oracle AUC ≈ 0.86
    pool_size: int = 500
    stage_keep: Tuple[int, ...] = (120, 60, 20, 10)  # pre-rank, coarse, rank, re-rank
    stage_noise: Tuple[float, ...] = (2.0, 1.4, 0.9, 0.5)
    position_decay: float = 0.35
    format_effect: Tuple[float, ...] = (0.75, 1.0, 0.9)
    seconds_between_requests: int = 30
    # Testbed knobs (the module docstring): "default" leaves them all off, "hard" turns them on. A
    # knob left None takes the preset's value (`PRESET_KNOBS`); one given explicitly wins.
    preset: str = "default"
    cross_strength: Optional[float] = None
    num_crosses: Optional[int] = None
    position_by_relevance: Optional[bool] = None
    randomized_eval_fraction: Optional[float] = None
    ctr_scale: Optional[float] = None
    item_zipf: Optional[float] = None
    user_zipf: Optional[float] = None

    def __post_init__(self):
        self.validate()  # a config that exists is valid (`models.config`)

    def validate(self) -> None:
        if self.num_requests <= 0:
            raise InputError(f"num_requests must be positive, got {self.num_requests}")
        if self.seed < 0:
            raise InputError(f"seed must be >= 0, got {self.seed}")

        per_tier = F.CANDIDATES_PER_TIER
        keep = (self.pool_size,) + tuple(self.stage_keep)
        if len(self.stage_keep) != 4 or len(self.stage_noise) != 4:
            raise InputError("stage_keep and stage_noise need one entry per stage (4)")
        if any(a - b < per_tier for a, b in zip(keep[:-1], keep[1:])) or keep[-1] != per_tier:
            raise InputError(f"each stage must drop >= {per_tier} items and the last keep {per_tier}: {keep}")
        if self.num_items < self.pool_size:
            raise InputError(f"num_items ({self.num_items}) must be >= pool_size ({self.pool_size})")
        self._validate_knobs()

    def _validate_knobs(self) -> None:
        if self.preset not in PRESETS:
            raise InputError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        k = self.knobs

        def number(name, low, high):
            value = getattr(k, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise InputError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")

        number("cross_strength", 0.0, 10.0)
        number("randomized_eval_fraction", 0.0, 1.0)
        number("item_zipf", 0.0, 3.0)
        number("user_zipf", 0.0, 3.0)
        if isinstance(k.ctr_scale, bool) or not isinstance(k.ctr_scale, (int, float)) or not 0.0 < k.ctr_scale <= 1.0:
            raise InputError(f"ctr_scale must be a number in (0, 1], got {k.ctr_scale!r}")
        pairs = CROSS_ITEM_VALUES * CROSS_REQUEST_VALUES
        if isinstance(k.num_crosses, bool) or not isinstance(k.num_crosses, int) or not 1 <= k.num_crosses <= pairs:
            raise InputError(f"num_crosses must be an int in [1, {pairs}], got {k.num_crosses!r}")
        if not isinstance(k.position_by_relevance, bool):
            raise InputError(f"position_by_relevance must be true or false, got {k.position_by_relevance!r}")

    @property
    def knobs(self) -> TestbedKnobs:
        """The effective testbed knobs: the preset's, with every knob this config sets (not None)."""
        base = PRESET_KNOBS.get(self.preset, PRESET_KNOBS["default"])
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(TestbedKnobs)
                 if getattr(self, f.name) is not None}
        return dataclasses.replace(base, **given)


MAX_DRIFT = 10.0


def check_drift(drift: float) -> None:
    if not 0.0 <= drift <= MAX_DRIFT:
        raise InputError(f"drift must be in [0, {MAX_DRIFT:g}], got {drift}")


def exam_probability(position: np.ndarray, decay: float) -> np.ndarray:
    """Position bias: the probability that position p (1-based) is examined."""
    return 1.0 / (1.0 + decay * (position - 1.0))


class World:
    """Users, items and query tokens, fixed by the seed."""

    def __init__(self, config: SyntheticConfig):
        c = config
        rng = np.random.default_rng([c.seed, _WORLD_STREAM])
        d = c.latent_dim
        self.config = c
        # Items.
        knobs = c.knobs
        item_pop = 1.0 / np.arange(1, c.num_items + 1) ** knobs.item_zipf
        rng.shuffle(item_pop)
        self.item_popularity = item_pop / item_pop.sum()
        log_pop = np.log(self.item_popularity)
        pop_z = (log_pop - log_pop.mean()) / log_pop.std()
        self.item_dense = np.concatenate([rng.normal(size=(c.num_items, 3)), pop_z[:, None]], axis=1).astype(np.float32)
        item_proj = rng.normal(size=(d, 4)) / 2.0
        self.item_latent = self.item_dense @ item_proj.T + c.id_noise * rng.normal(size=(c.num_items, d))
        cat_proj = rng.normal(size=(c.num_categories, d))
        self.item_category = np.argmax(
            self.item_latent @ cat_proj.T + rng.gumbel(size=(c.num_items, c.num_categories)), axis=1
        )
        tags_per_category = c.num_item_tags // c.num_categories
        n_tags = rng.integers(1, 4, size=c.num_items)
        self.item_tags: List[np.ndarray] = []
        for i in range(c.num_items):
            own = 1 + self.item_category[i] * tags_per_category + rng.integers(0, tags_per_category, size=n_tags[i])
            if rng.random() < 0.3:  # some tags cross categories
                own[-1] = rng.integers(1, c.num_item_tags + 1)
            self.item_tags.append(np.unique(own))
        # Users.
        act = 1.0 / np.arange(1, c.num_users + 1) ** knobs.user_zipf
        rng.shuffle(act)
        self.user_activity = act / act.sum()
        self.user_dense = rng.normal(size=(c.num_users, 4)).astype(np.float32)
        user_proj = rng.normal(size=(d, 4)) / 2.0
        self.user_latent = self.user_dense @ user_proj.T + c.id_noise * rng.normal(size=(c.num_users, d))
        # Query tokens: each user leans to a few topics, a topic is a block of tokens.
        self.token_embedding = rng.normal(size=(c.num_query_tokens + 1, d)) * 0.8
        self.user_topic = rng.integers(0, c.num_query_tokens // 50, size=c.num_users)
        self.pop_z = pop_z
        self.position_decay = c.position_decay
        # Explicit crosses (testbed knob): ρ += a(i)ᵀ·W·b(r), W holding ±c/√K at K (item, request)
        # value pairs, drawn from the testbed's own generator (the draws above stay as they were).
        self.knobs = knobs
        self.cross_matrix = None
        if knobs.cross_strength > 0:
            testbed = np.random.default_rng([c.seed, _TESTBED_STREAM])
            pairs = testbed.choice(CROSS_ITEM_VALUES * CROSS_REQUEST_VALUES, size=knobs.num_crosses, replace=False)
            signs = testbed.choice([-1.0, 1.0], size=knobs.num_crosses)
            cross = np.zeros(CROSS_ITEM_VALUES * CROSS_REQUEST_VALUES)
            cross[pairs] = signs * knobs.cross_strength / np.sqrt(knobs.num_crosses)
            self.cross_matrix = cross.reshape(CROSS_ITEM_VALUES, CROSS_REQUEST_VALUES)

    def drifted(self, steps: int, drift: float) -> "World":
        """This world `steps` spans later (the module docstring's drift, d = `drift`): item
        popularity and user tastes take `steps` random-walk steps, each from its own generator
        seeded by (seed, step), and the position decay grows by (1 + d) a step. The same world
        for steps = 0 or d = 0."""
        c = self.config
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        check_drift(drift)
        if steps == 0 or drift == 0.0:
            return self
        world = copy.copy(self)
        log_pop = np.log(self.item_popularity)
        scale, taste_scale = log_pop.std(), self.user_latent.std()
        user_latent = self.user_latent
        for step in range(1, steps + 1):
            rng = np.random.default_rng([c.seed, _DRIFT_STREAM, step])
            log_pop = log_pop + drift * scale * rng.normal(size=log_pop.size)
            user_latent = user_latent + drift * taste_scale * rng.normal(size=user_latent.shape)
        popularity = np.exp(log_pop - log_pop.max())
        world.item_popularity = popularity / popularity.sum()
        log_pop = np.log(world.item_popularity)
        world.pop_z = (log_pop - log_pop.mean()) / log_pop.std()
        world.item_dense = self.item_dense.copy()
        world.item_dense[:, 3] = world.pop_z
        world.user_latent = user_latent
        world.position_decay = c.position_decay * (1.0 + drift) ** steps
        return world

    def request_values(self, user: int, hour: int, device: int) -> np.ndarray:
        """b(r) of the explicit crosses: the user's dense features, the device and the hour of day,
        each of about unit variance (the module docstring)."""
        angle = 2.0 * np.pi * hour / 24.0
        context = [np.sqrt(1.5) * (device - 1.0), np.sqrt(2.0) * np.cos(angle), np.sqrt(2.0) * np.sin(angle)]
        return np.concatenate([self.user_dense[user].astype(np.float64), context])

    def cross_term(self, user: int, items: np.ndarray, hour: int, device: int) -> np.ndarray:
        """The explicit crosses' share of the relevance logit, a(i)ᵀ·W·b(r) (0 without crosses)."""
        if self.cross_matrix is None:
            return np.zeros(np.shape(items))
        item_values = self.item_dense[items, :CROSS_ITEM_VALUES].astype(np.float64)
        return item_values @ (self.cross_matrix @ self.request_values(user, hour, device))

    def relevance(self, user: int, query_tokens: np.ndarray, items: np.ndarray,
                  hour: Optional[int] = None, device: Optional[int] = None) -> np.ndarray:
        """The true relevance logit ρ of `items` for the request (the module docstring). With
        explicit crosses (cross_strength > 0) it needs the request's hour and device."""
        c = self.config
        context = self.user_latent[user] + self.token_embedding[query_tokens].mean(axis=0)
        rho = (
            c.relevance_scale * (self.item_latent[items] @ context) / np.sqrt(c.latent_dim)
            + c.popularity_weight * self.pop_z[items]
            + c.relevance_bias
        )
        if self.cross_matrix is not None:
            if hour is None or device is None:
                raise ValueError("relevance with explicit crosses (cross_strength > 0) needs the request's "
                                 "hour and device")
            rho = rho + self.cross_term(user, items, hour, device)
        return rho

    def true_ctr(self, relevance: np.ndarray, position: np.ndarray, ui_format: np.ndarray) -> np.ndarray:
        c = self.config
        fmt = np.asarray(c.format_effect)[ui_format]
        ctr = 1.0 / (1.0 + np.exp(-relevance)) * exam_probability(position, self.position_decay) * fmt
        if self.knobs.ctr_scale != 1.0:
            ctr = self.knobs.ctr_scale * ctr
        return ctr


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first (deterministic: stable tie order)."""
    idx = np.argpartition(-scores, k - 1)[:k]
    return idx[np.argsort(-scores[idx], kind="stable")]


def generate_request(world: World, request_index: int) -> Dict[str, Any]:
    """The 50 candidate rows of one request, in a shuffled order, as columns.

    Returns feature name → numpy array with one entry per row ([50] or [50, k]), or a list of
    per-row id arrays for the multivalent features.
    """
    c = world.config
    rng = np.random.default_rng([c.seed, request_index])
    per_tier = F.CANDIDATES_PER_TIER
    user = int(rng.choice(c.num_users, p=world.user_activity))
    topic = world.user_topic[user] if rng.random() < 0.7 else rng.integers(0, c.num_query_tokens // 50)
    n_tokens = int(rng.integers(1, 6))
    query_tokens = np.unique(1 + topic * 50 + rng.integers(0, 50, size=n_tokens))
    request_time = START_TIME + request_index * c.seconds_between_requests + int(rng.integers(0, c.seconds_between_requests))
    hour = (request_time // 3600) % 24
    device = int(rng.integers(0, 3))

    # Retrieval pool by popularity (Gumbel top-k = sampling without replacement ∝ popularity).
    pool = _top_k(np.log(world.item_popularity) + rng.gumbel(size=c.num_items), c.pool_size)
    relevance = world.relevance(user, query_tokens, pool, hour, device)
    alive = np.arange(c.pool_size)  # indices into pool of the survivors
    tiers = {}
    dropped_tier_names = ("prerank_neg", "coarse_neg", "rank_neg", "rerank_neg")
    for keep, noise, tier in zip(c.stage_keep, c.stage_noise, dropped_tier_names):
        scores = relevance[alive] + noise * rng.normal(size=alive.size)
        order = _top_k(scores, alive.size)
        kept, dropped = alive[order[:keep]], alive[order[keep:]]
        tiers[tier] = rng.choice(dropped, size=per_tier, replace=False) if dropped.size > per_tier else dropped
        alive = kept  # best first by this stage's score
    tiers["rerank_pos"] = alive

    # Shown items (the ground truth) get positions in re-rank order and random formats. Testbed
    # knobs: position_by_relevance puts them in true-relevance order (the best on top); a request
    # of the randomised slice shows them at a random permutation of the positions, drawn from the
    # request's own testbed generator (the draws of `rng` stay those of the default log).
    knobs = world.knobs
    if knobs.position_by_relevance:
        tiers["rerank_pos"] = alive[np.argsort(-relevance[alive], kind="stable")]
    shown = tiers[F.GROUND_TRUTH_TIER]
    shown_positions = np.arange(1, shown.size + 1)
    if knobs.randomized_eval_fraction > 0 and is_randomized(c, request_index):
        testbed = np.random.default_rng([c.seed, request_index, _TESTBED_STREAM])
        shown_positions = testbed.permutation(shown.size) + 1
    shown_formats = rng.integers(0, len(c.format_effect), size=shown.size)
    shown_ctr = world.true_ctr(relevance[shown], shown_positions, shown_formats)
    shown_clicks = (rng.random(shown.size) < shown_ctr).astype(np.int64)

    members = np.concatenate([tiers[t] for t in F.STAGE_TIERS])
    n = members.size
    zeros = np.zeros(n - shown.size, dtype=np.int64)
    order = rng.permutation(n)
    items = pool[members][order]
    return {
        "request_id": np.full(n, request_index, dtype=np.int64),
        "request_time": np.full(n, request_time, dtype=np.int64),
        "user_id": np.full(n, user, dtype=np.int64),
        "user_dense": np.repeat(world.user_dense[user][None, :], n, axis=0),
        "query_tokens": [query_tokens] * n,
        "hour": np.full(n, hour, dtype=np.int64),
        "device": np.full(n, device, dtype=np.int64),
        "item_id": items.astype(np.int64),
        "item_category": world.item_category[items].astype(np.int64),
        "item_tags": [world.item_tags[i] for i in items],
        "item_dense": world.item_dense[items],
        "ui_position": np.concatenate([shown_positions, zeros])[order],
        "ui_format": np.concatenate([shown_formats, zeros])[order],
        "click": np.concatenate([shown_clicks, zeros])[order],
        "stage": np.repeat(np.array([t.encode() for t in F.STAGE_TIERS], dtype=object), [tiers[t].size for t in F.STAGE_TIERS])[order],
        "true_ctr": np.concatenate([shown_ctr, zeros]).astype(np.float32)[order],
    }


def encode_requests(requests: List[Dict[str, Any]]) -> List[bytes]:
    """Serialized tf.Examples of generated requests' rows, in order, with one vectorised pass
    (`datasources.example_wire`: the bytes of `SerializeToString(deterministic=True)`, so the same
    seed gives the same bytes)."""
    if not requests:
        return []
    columns = {}
    for name, first in requests[0].items():
        if isinstance(first, list):  # ragged: one id array per row
            columns[name] = example_wire.ragged_int64_column([row for r in requests for row in r[name]])
        else:
            columns[name] = example_wire.dense_column(np.concatenate([r[name] for r in requests]))
    return example_wire.serialize_columns(columns)


ENCODE_CHUNK_REQUESTS = 250  # requests serialized per vectorised pass


def generate_serialized(config: SyntheticConfig, start: int = 0, stop: int = None) -> Iterator[bytes]:
    """Serialized tf.Examples of requests [start, stop) in request order, 50 per request."""
    config.validate()
    stop = config.num_requests if stop is None else stop
    world = World(config)
    for chunk in range(start, stop, ENCODE_CHUNK_REQUESTS):
        yield from encode_requests([generate_request(world, r) for r in range(chunk, min(chunk + ENCODE_CHUNK_REQUESTS, stop))])


def generate_examples(config: SyntheticConfig, start: int = 0, stop: int = None) -> Iterator[tf.train.Example]:
    """The same rows as `generate_serialized`, parsed into tf.train.Example protos."""
    for raw in generate_serialized(config, start, stop):
        yield tf.train.Example.FromString(raw)


def request_split(request_id: int, split_buckets: Tuple[Tuple[str, int], ...]) -> str:
    """Deterministic split of a request by a hash of its id (the same for all its candidates)."""
    total = sum(b for _, b in split_buckets)
    bucket = int(hashlib.sha256(str(request_id).encode()).hexdigest(), 16) % total
    for name, b in split_buckets:
        if bucket < b:
            return name
        bucket -= b
    raise AssertionError("unreachable")


def _randomized_draw(seed: int, request_id: int) -> float:
    """u(seed, request id) ∈ [0, 1): the draw that puts an eval request in the randomised slice."""
    digest = hashlib.sha256(f"{seed}:{request_id}:{_RANDOMIZED_STREAM}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def is_randomized(config: SyntheticConfig, request_id: int) -> bool:
    """Whether request `request_id` is in the randomised slice (testbed knob
    randomized_eval_fraction f): an eval request (`request_split` with DEFAULT_SPLIT_BUCKETS) whose
    draw u(seed, request id) < f, shown at a uniformly random permutation of positions 1..10.
    Deterministic in (seed, request id, f): any consumer of the log can tell which requests they are.
    Never a train request of the default split."""
    fraction = config.knobs.randomized_eval_fraction
    if fraction <= 0.0:
        return False
    request_id = int(request_id)
    return (request_split(request_id, DEFAULT_SPLIT_BUCKETS) == "eval"
            and _randomized_draw(config.seed, request_id) < fraction)


def randomized_requests(config: SyntheticConfig, request_ids: Sequence[int]) -> np.ndarray:
    """`is_randomized` of each of `request_ids`, as a bool array (e.g. a mask over the request_id
    column of eval rows)."""
    ids = np.asarray(request_ids).ravel()
    if config.knobs.randomized_eval_fraction <= 0.0:
        return np.zeros(ids.shape, dtype=bool)
    unique, inverse = np.unique(ids, return_inverse=True)
    return np.array([is_randomized(config, r) for r in unique], dtype=bool)[inverse].reshape(np.shape(request_ids))


def split_requests(world: World, start: int, stop: int,
                   split_buckets: Tuple[Tuple[str, int], ...]) -> Dict[str, List[Dict[str, Any]]]:
    """The generated requests [start, stop), grouped by split (`request_split`), in request order."""
    by_split: Dict[str, List[Dict[str, Any]]] = {name: [] for name, _ in split_buckets}
    for r in range(start, stop):
        by_split[request_split(r, split_buckets)].append(generate_request(world, r))
    return by_split


def _write_requests(world: World, start: int, stop: int, split_buckets: Tuple[Tuple[str, int], ...],
                    root: str) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Writes requests [start, stop) of `world` into `root`'s Split-<name>/ files; returns the rows
    and the requests per split."""
    requests = {name: 0 for name, _ in split_buckets}
    with SplitWriter(root, [name for name, _ in split_buckets]) as writer:
        for chunk in range(start, stop, ENCODE_CHUNK_REQUESTS):
            by_split = split_requests(world, chunk, min(chunk + ENCODE_CHUNK_REQUESTS, stop), split_buckets)
            for split, generated in by_split.items():
                requests[split] += len(generated)
                for raw in encode_requests(generated):
                    writer.write(split, raw)
    return writer.counts, requests


def write_dataset(
    config: SyntheticConfig,
    out_dir: str,
    split_buckets: Tuple[Tuple[str, int], ...] = DEFAULT_SPLIT_BUCKETS,
    overwrite: bool = False,
) -> dict:
    """Writes the generated rows as an Examples directory (Split-<name>/ gz TFRecords), atomically.

    Single process, requests in order: the same config gives the same bytes.
    """
    config.validate()
    with atomic_output_dir(out_dir, overwrite) as tmp:
        rows, requests = _write_requests(World(config), 0, config.num_requests, split_buckets, tmp)
        report = {"source": "synthetic", "config": dataclasses.asdict(config),
                  "knobs": dataclasses.asdict(config.knobs), "rows": rows, "requests": requests}
        write_report(tmp, report)
    return report


def write_spans(
    config: SyntheticConfig,
    out_dir: str,
    spans: int,
    drift: float = 0.0,
    split_buckets: Tuple[Tuple[str, int], ...] = DEFAULT_SPLIT_BUCKETS,
    overwrite: bool = False,
) -> dict:
    """Writes `spans` spans of `config.num_requests` requests each, `out_dir/span-<k>/Split-<name>/`
    for k = 1..spans (TFX's span convention, `datasources.spans`), atomically: span k holds requests
    [(k−1)·N, k·N) of the world after k−1 drift steps of size `drift` (`World.drifted`, the module
    docstring).
    Each span also gets its own report.json; the top one lists them all."""
    config.validate()
    check_drift(drift)
    if spans < 1:
        raise InputError(f"spans must be >= 1, got {spans}")
    from cascade_ranking.datasources.spans import span_dir_name

    n = config.num_requests
    with atomic_output_dir(out_dir, overwrite) as tmp:
        world = World(config)
        per_span = {}
        for k in range(1, spans + 1):
            root = os.path.join(tmp, span_dir_name(k))
            rows, requests = _write_requests(world.drifted(k - 1, drift), (k - 1) * n, k * n, split_buckets, root)
            per_span[k] = {"rows": rows, "requests": requests, "request_ids": [(k - 1) * n, k * n]}
            write_report(root, {"source": "synthetic", "span": k, "drift": drift, "config": dataclasses.asdict(config),
                                **per_span[k]})
        report = {"source": "synthetic", "drift": drift, "config": dataclasses.asdict(config),
                  "knobs": dataclasses.asdict(config.knobs), "spans": per_span}
        write_report(tmp, report)
    return report
