"""Deterministic data sampling with importance weights (Factory Floor §3.3), per request.

For a shown, non-clicked candidate (the bulk of impression logs) three independent keep/drop
decisions may apply, each with its own keep rate and each made by a deterministic hash of
(seed, purpose, request_id, item_id) — so every model and every runner sees the same data:

    class rebalancing     keep with rate r                                  weight × 1/r
    teacher-loss based    if ℓ_teacher = −log(1 − σ(teacher_logit)) < τ_ℓ,
                          keep with rate r_low                              weight × 1/r_low
    position based        if ui_position ≥ P (unlikely to have been seen),
                          keep with rate r_pos                              weight × 1/r_pos

A kept candidate's `sample_weight` is multiplied by the product of the inverse rates that applied,
so E[Σ w·y] and E[Σ w] are those of the full data: weighted label means stay unbiased.
Clicked candidates and candidates that were not shown (the cascade's negative tiers) are always
kept with weight 1. Written by hand: neither TFX nor Beam has importance-weighted sampling.

Random negatives (for retrieval's log-q correction) are drawn from the item corpus in proportion
to item frequency q(i) = count(i)/Σ count, by a generator seeded with (seed, request_id); every
candidate of a list records q(i) as `sampling_probability`.
"""
import dataclasses
import hashlib
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from schema import request_list as RL


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Switches of the NegativeSampler, with their defaults (1.0 keep rates = off)."""

    list_size: int = RL.LIST_SIZE
    random_negatives: int = 10
    nonclick_keep_rate: float = 1.0
    low_loss_keep_rate: float = 1.0
    low_loss_threshold: float = 0.05  # teacher log loss of a non-click below which it is "easy"
    unseen_position_from: int = 0  # 0 = off; shown positions ≥ this are "unlikely seen"
    unseen_position_keep_rate: float = 1.0
    split: str = "keep"  # "keep" the input splits, or re-split by "hash" of request_id or by "time"
    eval_fraction: float = 0.2
    seed: int = 0
    max_bad_fraction: float = 0.01

    def validate(self) -> None:
        for name in ("nonclick_keep_rate", "low_loss_keep_rate", "unseen_position_keep_rate"):
            rate = getattr(self, name)
            if not 0.0 < rate <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {rate}")
        if self.split not in ("keep", "hash", "time"):
            raise ValueError(f"split must be keep, hash or time, got {self.split!r}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.random_negatives < 0 or self.random_negatives >= self.list_size:
            raise ValueError(f"random_negatives must be in [0, list_size), got {self.random_negatives}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")


def uniform_hash(seed: int, purpose: str, *keys: int) -> float:
    """A deterministic number in [0, 1) from the seed, the decision's purpose and the keys."""
    digest = hashlib.blake2b(f"{seed}|{purpose}|{'|'.join(map(str, keys))}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def teacher_log_loss(teacher_logit: float, click: int) -> float:
    """The teacher's log loss on a candidate: −log σ(z) for a click, −log(1 − σ(z)) otherwise."""
    z = teacher_logit if click else -teacher_logit
    return math.log1p(math.exp(-z)) if z > -30 else -z


def sampling_decision(row: Mapping, config: SamplerConfig) -> Tuple[bool, float, List[str]]:
    """(keep, weight multiplier, names of the decisions that dropped it) for one candidate row."""
    shown = int(row["ui_position"]) > 0
    if not shown or int(row["click"]) == 1:
        return True, 1.0, []
    request_id, item_id = int(row["request_id"]), int(row["item_id"])
    weight, dropped = 1.0, []
    tests = []
    if config.unseen_position_from and int(row["ui_position"]) >= config.unseen_position_from:
        tests.append(("position", config.unseen_position_keep_rate))
    teacher = row.get("teacher_logit")
    if teacher is not None and not math.isnan(teacher) and teacher_log_loss(teacher, 0) < config.low_loss_threshold:
        tests.append(("low_loss", config.low_loss_keep_rate))
    tests.append(("class", config.nonclick_keep_rate))
    for purpose, rate in tests:
        if rate >= 1.0:
            continue
        if uniform_hash(config.seed, purpose, request_id, item_id) < rate:
            weight /= rate
        else:
            dropped.append(purpose)
    return not dropped, weight, dropped


@dataclasses.dataclass
class ItemCorpus:
    """Items with their frequency and features, for drawing random negatives."""

    item_ids: np.ndarray
    probabilities: np.ndarray
    features: Dict[int, Dict[str, object]]

    @classmethod
    def from_items(cls, items: Sequence[Tuple[int, int, Dict[str, object]]]) -> "ItemCorpus":
        """From (item_id, count, item features) triples; sorted by id so the result is deterministic."""
        items = sorted(items, key=lambda t: t[0])
        ids = np.array([i for i, _, _ in items], dtype=np.int64)
        counts = np.array([c for _, c, _ in items], dtype=np.float64)
        return cls(ids, counts / counts.sum(), {i: f for i, _, f in items})

    def probability(self, item_id: int) -> float:
        index = np.searchsorted(self.item_ids, item_id)
        if index < self.item_ids.size and self.item_ids[index] == item_id:
            return float(self.probabilities[index])
        return 0.0

    def draw(self, request_id: int, count: int, exclude: set, seed: int) -> List[int]:
        """`count` distinct items ∝ frequency, none of them in `exclude`, seeded by the request."""
        if count == 0:
            return []
        rng = np.random.default_rng([seed, request_id])
        chosen: List[int] = []
        for _ in range(8):  # rejection rounds; a popular excluded item is simply drawn again
            for item in rng.choice(self.item_ids, size=4 * count, p=self.probabilities):
                item = int(item)
                if item not in exclude and item not in chosen:
                    chosen.append(item)
                    if len(chosen) == count:
                        return chosen
        return chosen


ITEM_FEATURES = ("item_category", "item_tags", "item_dense")
REQUEST_FEATURES = ("request_id", "request_time", "user_id", "user_dense", "query_tokens", "hour", "device")


def random_negative_row(request_row: Mapping, item_id: int, item_features: Mapping, probability: float,
                        oracle_known: bool) -> Dict[str, object]:
    row = {k: request_row[k] for k in REQUEST_FEATURES}
    row.update(item_features)
    row.update(item_id=item_id, ui_position=0, ui_format=0, click=0, stage=RL.RANDOM_NEG_TIER,
               sampling_probability=probability, true_ctr=0.0 if oracle_known else -1.0)
    return row


def request_split_by_hash(request_id: int, eval_fraction: float, seed: int) -> str:
    return "eval" if uniform_hash(seed, "split", request_id) < eval_fraction else "train"


def sample_request(rows: Sequence[Dict], corpus: ItemCorpus, config: SamplerConfig,
                   counts: Optional[Dict[str, int]] = None) -> List[Dict]:
    """Applies the sampling decisions to one request's candidate rows and adds random negatives.

    Returns the rows of the request list, in a deterministic order (logged candidates by tier
    then item id, then the random negatives). `counts` accumulates what was kept and dropped.
    """
    counts = counts if counts is not None else {}

    def bump(name, n=1):
        counts[name] = counts.get(name, 0) + n

    kept = []
    for row in sorted(rows, key=lambda r: (RL.TIER_INDEX[r["stage"]], int(r["item_id"]))):
        keep, multiplier, dropped = sampling_decision(row, config)
        for purpose in dropped:
            bump(f"dropped_{purpose}")
        if not keep:
            bump("candidates_dropped")
            continue
        if multiplier != 1.0:
            bump("candidates_reweighted")
        row = dict(row)
        row["sample_weight"] = float(row.get("sample_weight", 1.0)) * multiplier
        row["sampling_probability"] = corpus.probability(int(row["item_id"]))
        kept.append(row)
    bump("candidates_kept", len(kept))
    room = config.list_size - len(kept)
    wanted = min(config.random_negatives, room)
    oracle_known = all(float(r.get("true_ctr", -1.0)) >= 0 for r in rows)
    exclude = {int(r["item_id"]) for r in rows}
    request_id = int(rows[0]["request_id"])
    for item in corpus.draw(request_id, wanted, exclude, config.seed):
        kept.append(random_negative_row(rows[0], item, corpus.features[item], corpus.probability(item), oracle_known))
        bump("random_negatives_added")
    return kept
