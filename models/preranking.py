"""HAP pre-ranking: heterogeneous negative groups, a light model for all candidates, a strong one
for the hard groups and the top of the light model's list (Toutiao, 2026; DESIGN §5 "HAP").

Negative sources, hardest first, read from a request list (`schema.request_list`):
    g0 exposed_nonclick   shown (ui_position > 0) and not clicked
    g1 rank_neg           not shown, dropped by the ranking stages (tiers rerank_neg, rank_neg)
    g2 prerank_neg        dropped by the pre-ranking stages (tiers coarse_neg, prerank_neg)
    g3 random_neg         random negatives (tier random_neg)
The positives are the clicked candidates (shown and click = 1).

Group-wise loss: each group is contrasted with the positive in its own term, so hard and easy
negatives stop competing in one softmax. For a positive p of a request and a group g with
negatives N_g (both non-empty in that request), with scores s:
    softmax   ℓ(p, g) = −log( e^{s_p} / (e^{s_p} + Σ_{n∈N_g} e^{s_n}) ) = softplus(LSE_{n∈N_g} s_n − s_p)
    pairwise  ℓ(p, g) = (1/|N_g|) Σ_{n∈N_g} log(1 + e^{−(s_p − s_n)})
    L = Σ_g w_g · mean_{(request, p): N_g non-empty} ℓ(p, g)
The light model trains on all groups, the strong model on the hard ones (g0, g1) only.

Models:
    light    u = Q(request), v = V(item)  (two towers, `models.retrieval.Tower`),
             s = MLP([u, v, u ⊙ v])       (a small head)
    strong   x0 = [embeddings of the request and item features], DCNv2 low-rank cross stack
             (`models.cross.CrossStack`), then an MLP: s = MLP(Cross(x0))
Routing: the light model scores every candidate; the strong model rescores the light top M, and
the final order is those M by the strong score, then the rest by the light score.

FLOPs per candidate (`LightPreranker.flops`, `StrongRanker.flops`) are counted analytically from
the layer shapes, in tf.profiler's convention (a matmul 2·m·k·n, a bias add or an element-wise op
one per element, ReLU 0), from the concatenated embeddings up (lookups and pooling not counted).
The light model's query tower runs once per request and is reported apart; its item tower is
counted per candidate although a server may cache item vectors.

The group construction, the group-wise losses, routing and FLOP counts are written here (no
library has them); the layers are Keras / TFRS (`tfrs.layers.dcn.Cross` inside `CrossStack`).
`GroupWiseLoss` (registry name "hap_group_wise", `models.losses.get`) is the group-wise loss as a
Keras Loss: y_true = positives [B, L], y_pred = scores [B, L], `groups=` [B, L, G].
"""
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from cascade_ranking.models import list_inputs as LI
from cascade_ranking.models import losses as losses_lib
from cascade_ranking.models.cross import CrossStack, cross_stack_flops
from cascade_ranking.models.embedding import FeatureEmbedding
from cascade_ranking.models.retrieval import Tower, build_mlp, dense_flops
from cascade_ranking.models.tasks import HAPTask, StageModel
from cascade_ranking.schema import features as F
from cascade_ranking.schema import request_list as RL

GROUPS = ("exposed_nonclick", "rank_neg", "prerank_neg", "random_neg")
HARD_GROUPS = ("exposed_nonclick", "rank_neg")
_GROUP_TIERS = {
    "rank_neg": ("rerank_neg", "rank_neg"),
    "prerank_neg": ("coarse_neg", "prerank_neg"),
    "random_neg": (RL.RANDOM_NEG_TIER,),
}


def hap_groups(lists: Mapping[str, tf.Tensor], label: str = "click") -> Tuple[tf.Tensor, tf.Tensor]:
    """(positives [B, L] bool, groups [B, L, 4] bool) of a batch of request lists.

    label="click" (HAP's own setting): positives are the shown and clicked candidates, g0 the
    shown and not clicked ones. label="gt": positives are the GT tier `rerank_pos` (the cascade's
    label, `models.cascade_model.cascade_labels`), g0 the shown candidates that are not GT (on
    MovieLens the shown movies rated < 4; empty on synthetic data, where every shown item is GT).
    g1..g3 are the same for both (never shown, by tier) and never hold a positive.
    """
    real = tf.convert_to_tensor(lists["mask"]) > 0
    exposed = tf.convert_to_tensor(lists["ui_position"]) > F.NOT_SHOWN_POSITION
    stage = tf.convert_to_tensor(lists["stage"])
    if label == "click":
        positive = exposed & (tf.convert_to_tensor(lists["click"]) > 0)
    elif label == "gt":
        positive = tf.equal(stage, RL.TIER_INDEX[F.GROUND_TRUTH_TIER])
    else:
        raise ValueError(f"label must be 'click' or 'gt', got {label!r}")
    positives = real & positive
    groups = [real & exposed & ~positive]
    for name in GROUPS[1:]:
        in_tiers = tf.reduce_any(tf.stack([tf.equal(stage, RL.TIER_INDEX[t]) for t in _GROUP_TIERS[name]]), axis=0)
        groups.append(real & ~exposed & in_tiers & ~positive)
    return positives, tf.stack(groups, axis=-1)


def group_wise_loss(scores, positives, groups, kind: str = "softmax",
                    group_weights: Optional[Sequence[float]] = None) -> Tuple[tf.Tensor, tf.Tensor]:
    """(L, per-group terms [G]) of the HAP group-wise loss (module docstring).

    Args:
        scores: [B, L] logits. positives: [B, L] bool. groups: [B, L, G] bool.
        kind: "softmax" or "pairwise".
        group_weights: w_g (default 1 for every group); 0 leaves a group out.
    """
    s = tf.cast(tf.convert_to_tensor(scores), tf.float32)
    pos = tf.cast(tf.convert_to_tensor(positives), tf.bool)
    grp = tf.cast(tf.convert_to_tensor(groups), tf.bool)
    if s.shape.rank != 2 or not s.shape.is_compatible_with(pos.shape) or not s.shape.is_compatible_with(grp.shape[:2]):
        raise ValueError(f"scores {s.shape}, positives {pos.shape} and groups {grp.shape} do not match")
    num_groups = grp.shape[-1]
    weights = tf.constant([1.0] * num_groups if group_weights is None else list(group_weights), tf.float32)
    if weights.shape[0] != num_groups:
        raise ValueError(f"{weights.shape[0]} group weights for {num_groups} groups")
    grp_f = tf.cast(grp, tf.float32)
    count = tf.reduce_sum(grp_f, axis=1)  # [B, G]
    nonempty = count > 0
    if kind == "softmax":
        masked = tf.where(grp, s[:, :, None], tf.fill(tf.shape(grp), -np.inf))
        lse = tf.reduce_logsumexp(masked, axis=1)  # [B, G]
        lse = tf.where(nonempty, lse, tf.zeros_like(lse))
        per = tf.nn.softplus(lse[:, None, :] - s[:, :, None])  # [B, P, G]
    elif kind == "pairwise":
        pair = tf.nn.softplus(s[:, None, :] - s[:, :, None])  # [B, P, N]: log(1 + e^{s_n − s_p})
        per = tf.math.divide_no_nan(tf.einsum("bpn,bng->bpg", pair, grp_f), count[:, None, :])
    else:
        raise ValueError(f"kind must be 'softmax' or 'pairwise', got {kind!r}")
    valid = tf.cast(pos[:, :, None] & nonempty[:, None, :], tf.float32)  # [B, P, G]
    per = tf.where(valid > 0, per, tf.zeros_like(per))
    terms = tf.math.divide_no_nan(tf.reduce_sum(per, axis=[0, 1]), tf.reduce_sum(valid, axis=[0, 1]))
    return tf.reduce_sum(weights * terms), terms


def hard_group_weights() -> Tuple[float, ...]:
    return tuple(1.0 if g in HARD_GROUPS else 0.0 for g in GROUPS)


@losses_lib.register("hap_group_wise")
class GroupWiseLoss(losses_lib.ExplicitLoss):
    """`group_wise_loss` as a Keras Loss (module docstring): y_true = positives [B, L] (bool or
    0/1), y_pred = scores [B, L], `groups` [B, L, G] bool. `terms` also gives the per-group [G]."""

    def __init__(self, kind: str = "softmax", group_weights: Optional[Sequence[float]] = None, name=None, **kwargs):
        if kind not in ("softmax", "pairwise"):
            raise ValueError(f"kind must be 'softmax' or 'pairwise', got {kind!r}")
        super().__init__(name=name, **kwargs)
        self.kind = kind
        self.group_weights = None if group_weights is None else tuple(float(w) for w in group_weights)

    def terms(self, y_true, y_pred, groups) -> Tuple[tf.Tensor, tf.Tensor]:
        """(L, per-group terms [G])."""
        return group_wise_loss(y_pred, tf.cast(y_true, tf.bool), groups, self.kind, self.group_weights)

    def compute(self, y_true, y_pred, sample_weight=None, groups=None):
        if groups is None or sample_weight is not None:
            raise ValueError("the group-wise loss needs groups= and takes no sample_weight")
        return self.terms(y_true, y_pred, groups)[0]

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "group_weights": self.group_weights}


# ---------------------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------------------
class LightPreranker(tf.keras.layers.Layer):
    """Two towers plus a small MLP head on [u, v, u ⊙ v]; scores [B, L]."""

    def __init__(self, embedding_dim: int = 16, tower_units: Sequence[int] = (64,), output_dim: int = 32,
                 head_units: Sequence[int] = (32,), features: F.FeatureConfig = F.DEFAULT,
                 **kwargs):
        super().__init__(**kwargs)
        self.output_dim = output_dim
        self.features = features
        self.query_tower = Tower(features.query_names, embedding_dim, tower_units, output_dim, features,
                                 name="query_tower")
        self.item_tower = Tower(features.item_names, embedding_dim, tower_units, output_dim, features,
                                name="item_tower")
        self.head_units = tuple(head_units) + (1,)
        self.head = build_mlp(self.head_units, name="head")

    def score_candidates(self, u: tf.Tensor, item_input: tf.Tensor, training=None) -> tf.Tensor:
        """Per-candidate part: u [N, d] (the request's vector), item_input [N, D_item] → [N]."""
        v = self.item_tower.mlp(item_input, training=training)
        return tf.squeeze(self.head(tf.concat([u, v, u * v], axis=-1), training=training), -1)

    def call(self, lists: Mapping[str, tf.Tensor], training=None) -> tf.Tensor:
        size = tf.shape(lists["mask"])[1]
        u = self.query_tower(LI.request_features(lists, self.features), training=training)
        item_input = self.item_tower.embed(LI.candidate_features(lists, self.features), training=training)
        scores = self.score_candidates(LI.repeat_per_candidate(u, size), item_input, training)
        return tf.reshape(scores, [-1, size])

    def towers(self):
        return [self.query_tower, self.item_tower]

    def flops(self) -> Dict[str, int]:
        """{'per_candidate': item tower + u ⊙ v + head, 'per_request': query tower}."""
        d = self.output_dim
        return {
            "per_candidate": self.item_tower.flops() + d + dense_flops((3 * d,) + self.head_units),
            "per_request": self.query_tower.flops(),
        }


class StrongRanker(tf.keras.layers.Layer):
    """DCNv2: embeddings of the request and item features → CrossStack → MLP; scores [B, L]."""

    def __init__(self, embedding_dim: int = 16, num_cross_layers: int = 2, projection_dim: int = 16,
                 hidden_units: Sequence[int] = (128, 64), features: F.FeatureConfig = F.DEFAULT,
                 **kwargs):
        super().__init__(**kwargs)
        self.features = features
        names = features.query_names + features.item_names
        sparse = [f for f in features.sparse_features() if f.name in names]
        dense = [f for f in features.dense_features() if f.name in names]
        self.query_names = features.query_names
        self.embedding = FeatureEmbedding(embedding_dim, sparse, dense, name="embedding")
        self.input_dim = embedding_dim * len(sparse) + sum(f.size for f in dense)
        self.num_cross_layers = num_cross_layers
        self.projection_dim = projection_dim
        self.cross = CrossStack(num_cross_layers, projection_dim=projection_dim, ramp_steps=0, name="cross")
        self.units = tuple(hidden_units) + (1,)
        self.mlp = build_mlp(self.units, name="mlp")

    def score_candidates(self, x0: tf.Tensor, training=None) -> tf.Tensor:
        """Per-candidate part: x0 [N, D] → [N]."""
        return tf.squeeze(self.mlp(self.cross(x0, training=training), training=training), -1)

    def call(self, lists: Mapping[str, tf.Tensor], training=None) -> tf.Tensor:
        size = tf.shape(lists["mask"])[1]
        request = self.embedding(LI.request_features(lists, self.features), names=self.query_names, training=training)
        item = self.embedding(LI.candidate_features(lists, self.features), names=self.features.item_names, training=training)
        parts = {**{k: LI.repeat_per_candidate(v, size) for k, v in request.items()}, **item}
        x0 = tf.concat([parts[n] for n in sorted(parts)], axis=-1)
        return tf.reshape(self.score_candidates(x0, training), [-1, size])

    def flops(self) -> Dict[str, int]:
        """{'per_candidate': cross layers + MLP}; the cross stack's count is
        `models.cross.cross_stack_flops` (L · (4·D·k + 3·D) + D at rank k)."""
        d, k = self.input_dim, self.projection_dim
        cross = cross_stack_flops(self.num_cross_layers, d, k)
        return {"per_candidate": cross + dense_flops((d,) + self.units), "per_request": 0}


def route(light_scores, strong_scores, top_m: int, mask=None) -> tf.Tensor:
    """Final scores [B, L]: the light model's top M (of the real candidates) ordered by the strong
    score and placed above the rest, which keep the light order. Padded slots keep their light
    score (mask them downstream). Ties at the M-th light score are all kept."""
    light = tf.cast(tf.convert_to_tensor(light_scores), tf.float32)
    strong = tf.cast(tf.convert_to_tensor(strong_scores), tf.float32)
    if top_m < 1:
        raise ValueError(f"top_m must be >= 1, got {top_m}")
    real = tf.ones_like(light, tf.bool) if mask is None else tf.convert_to_tensor(mask) > 0
    ranked = tf.where(real, light, tf.fill(tf.shape(light), -np.inf))
    m = tf.minimum(top_m, tf.shape(light)[1])
    threshold = tf.math.top_k(ranked, k=m).values[:, -1:]
    top = real & (ranked >= threshold)
    high = tf.reduce_max(tf.where(real, light, tf.fill(tf.shape(light), -np.inf)), axis=1, keepdims=True)
    low = tf.reduce_min(tf.where(top, strong, tf.fill(tf.shape(strong), np.inf)), axis=1, keepdims=True)
    return tf.where(top, strong - low + high + 1.0, light)


def hap_flops(light: LightPreranker, strong: StrongRanker, top_m: int, candidates: int) -> Dict[str, int]:
    """FLOPs (tf.profiler convention, module docstring) of HAP serving one request:

        light_per_candidate, light_per_request (query tower, once), strong_per_candidate,
        light_per_candidate_cached_items = u ⊙ v + head (the item vectors v precomputed, as a
            server caches them; the item tower then costs nothing per request),
        routed_per_request = light_per_request + n·light_per_candidate + min(M, n)·strong_per_candidate
        routed_per_request_cached_items = the same with light_per_candidate_cached_items
        strong_only_per_request = n·strong_per_candidate    (the strong model on every candidate)
    for n = `candidates` and M = `top_m`.
    """
    if top_m < 1 or candidates < 1:
        raise ValueError(f"top_m and candidates must be >= 1, got {top_m}, {candidates}")
    lf, sf = light.flops(), strong.flops()
    n, m = int(candidates), min(int(top_m), int(candidates))
    cached = lf["per_candidate"] - light.item_tower.flops()
    return {
        "light_per_candidate": lf["per_candidate"],
        "light_per_candidate_cached_items": cached,
        "light_per_request": lf["per_request"],
        "strong_per_candidate": sf["per_candidate"],
        "routed_per_request": lf["per_request"] + n * lf["per_candidate"] + m * sf["per_candidate"],
        "routed_per_request_cached_items": lf["per_request"] + n * cached + m * sf["per_candidate"],
        "strong_only_per_request": n * sf["per_candidate"],
    }


class HAPPreranker(StageModel):
    """Light + strong model trained with the group-wise losses; `call` returns the routed scores.

    Losses per batch (`models.tasks.HAPTask`): L_light = group_wise_loss(light, all groups),
    L_strong = the same on the strong scores with the hard groups only; the two models share no
    weights, so the sum trains each on its own loss. Trained by the shared
    `models.tasks.StageModel.train_step`; logs loss, light_loss, strong_loss, light_<group>.
    """

    def __init__(self, light: Optional[LightPreranker] = None, strong: Optional[StrongRanker] = None,
                 top_m: int = 20, kind: str = "softmax", **kwargs):
        super().__init__(**kwargs)
        self.light = light or LightPreranker()
        self.strong = strong or StrongRanker()
        self.top_m = int(top_m)
        self.kind = kind
        self.task = HAPTask(kind, name="task")

    def call(self, lists, training=None):
        light = self.light(lists, training=training)
        strong = self.strong(lists, training=training)
        return route(light, strong, self.top_m, lists["mask"])

    def compute_terms(self, lists, training: bool = False) -> Dict[str, tf.Tensor]:
        positives, groups = hap_groups(lists)
        return self.task(self.light(lists, training=training), self.strong(lists, training=training), positives,
                         groups)
