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

A candidate the sampling takes out stays in its request list with `sample_weight` 0: the sampling
thins the rows the ranker learns CTR from (`models.ranking_stage` trains its CTR losses on the shown
rows of weight > 0), not the candidates of the cascade losses, which need every candidate of a
request — a shown non-click is a ground-truth candidate of the cascade. (Taking the rows out of the
lists, as this module first did, cost the served cascade 0.028 e2e recall at keep rates 0.5 and
0.25 on the synthetic demo: BENCHMARKS.md §0.) Counters: `candidates_kept` (written to the lists),
`candidates_sampled_out` and `sampled_out_<purpose>` (weight 0), `candidates_reweighted` (1/rate).

Random negatives (for retrieval's log-q correction) are drawn from the item corpus in proportion
to item frequency q(i) = count(i)/Σ count, by a generator seeded with (seed, request_id); every
candidate of a list records q(i) as `sampling_probability`.

Two implementations of one request's sampling, which give the same lists byte for byte (tested):
`sample_request` on row dicts (the readable reference), and `sample_request_columns` on numpy
columns, which packs the request list directly and is what the NegativeSampler runs.
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

    def __post_init__(self):
        self.validate()  # a config that exists is valid (`models.config`)

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
    """Items with their frequency and features, for drawing random negatives.

    `features` (item id → feature dict) serves the row-based reference path (`sample_request`);
    the columnar path (`sample_request_columns`, used by the NegativeSampler) reads the compact
    arrays `item_category` [I], `item_tags` [I, MAX_ITEM_TAGS] (0-padded, truncated as request
    lists store them) and `item_dense` [I, ITEM_DENSE_SIZE], aligned with `item_ids`. A corpus
    built with `keep_features=False` is only numpy arrays: cheap to pickle as a Beam side input.
    """

    item_ids: np.ndarray
    probabilities: np.ndarray
    features: Dict[int, Dict[str, object]] = dataclasses.field(default_factory=dict)
    item_category: Optional[np.ndarray] = None
    item_tags: Optional[np.ndarray] = None
    item_dense: Optional[np.ndarray] = None

    def __post_init__(self):
        self._cdf = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cdf"] = None  # rebuilt on first use
        return state

    @classmethod
    def from_items(cls, items: Sequence[Tuple[int, int, Dict[str, object]]], keep_features: bool = True) -> "ItemCorpus":
        """From (item_id, count, item features) triples; sorted by id so the result is deterministic.
        The compact arrays are filled when every item has the three item features."""
        items = sorted(items, key=lambda t: t[0])
        ids = np.array([i for i, _, _ in items], dtype=np.int64)
        counts = np.array([c for _, c, _ in items], dtype=np.float64)
        category = tags = dense = None
        if items and all(all(name in f for name in ITEM_FEATURES) for _, _, f in items):
            category = np.array([int(f["item_category"]) for _, _, f in items], dtype=np.int64)
            tags = np.zeros((len(items), RL.MAX_ITEM_TAGS), dtype=np.int64)
            dense = np.zeros((len(items), RL.ITEM_DENSE_SIZE), dtype=np.float32)
            for k, (_, _, f) in enumerate(items):
                t = np.asarray(f["item_tags"], dtype=np.int64).reshape(-1)[:RL.MAX_ITEM_TAGS]
                tags[k, :t.size] = t
                dense[k] = np.asarray(f["item_dense"], dtype=np.float32).reshape(-1)
        features = {i: f for i, _, f in items} if keep_features else {}
        return cls(ids, counts / counts.sum(), features, category, tags, dense)

    def index_of(self, item_ids: np.ndarray) -> np.ndarray:
        """Positions of `item_ids` in the corpus, −1 for unknown items."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        index = np.searchsorted(self.item_ids, item_ids)
        clipped = np.minimum(index, max(self.item_ids.size - 1, 0))
        found = (index < self.item_ids.size) & (self.item_ids[clipped] == item_ids) if self.item_ids.size else \
            np.zeros(item_ids.shape, dtype=bool)
        return np.where(found, clipped, -1)

    def probability(self, item_id: int) -> float:
        index = np.searchsorted(self.item_ids, item_id)
        if index < self.item_ids.size and self.item_ids[index] == item_id:
            return float(self.probabilities[index])
        return 0.0

    def probabilities_of(self, item_ids: np.ndarray) -> np.ndarray:
        """q(i) of each item (0 for items not in the corpus), as float64."""
        index = self.index_of(item_ids)
        return np.where(index >= 0, self.probabilities[np.maximum(index, 0)] if self.item_ids.size else 0.0, 0.0)

    def _choice(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """`rng.choice(self.item_ids, size, p=self.probabilities)`, with the cumulative
        distribution computed once instead of per call (the same steps as numpy's Generator.choice,
        so the same items; a test checks it)."""
        if self._cdf is None:
            cdf = np.asarray(self.probabilities, dtype=np.float64).cumsum()
            cdf /= cdf[-1]
            self._cdf = cdf
        return self.item_ids[self._cdf.searchsorted(rng.random(size), side="right")]

    def draw(self, request_id: int, count: int, exclude: set, seed: int) -> List[int]:
        """`count` distinct items ∝ frequency, none of them in `exclude`, seeded by the request."""
        if count <= 0 or self.item_ids.size == 0:
            return []
        rng = np.random.default_rng([seed, request_id])
        chosen: List[int] = []
        for _ in range(8):  # rejection rounds; a popular excluded item is simply drawn again
            for item in self._choice(rng, 4 * count).tolist():
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
    then item id, then the random negatives); a sampled-out row has sample_weight 0. `counts`
    accumulates what was kept, sampled out and reweighted.
    """
    counts = counts if counts is not None else {}

    def bump(name, n=1):
        counts[name] = counts.get(name, 0) + n

    kept = []
    for row in sorted(rows, key=lambda r: (RL.TIER_INDEX[r["stage"]], int(r["item_id"]))):
        keep, multiplier, dropped = sampling_decision(row, config)
        for purpose in dropped:
            bump(f"sampled_out_{purpose}")
        if not keep:
            bump("candidates_sampled_out")
            multiplier = 0.0
        elif multiplier != 1.0:
            bump("candidates_reweighted")
        row = dict(row)
        row["sample_weight"] = float(row.get("sample_weight", 1.0)) * multiplier
        row["sampling_probability"] = corpus.probability(int(row["item_id"]))
        kept.append(row)
    bump("candidates_kept", len(kept))
    room = config.list_size - len(kept)
    wanted = max(0, min(config.random_negatives, room))
    oracle_known = all(float(r.get("true_ctr", -1.0)) >= 0 for r in rows)
    exclude = {int(r["item_id"]) for r in rows}
    request_id = int(rows[0]["request_id"])
    for item in corpus.draw(request_id, wanted, exclude, config.seed):
        kept.append(random_negative_row(rows[0], item, corpus.features[item], corpus.probability(item), oracle_known))
        bump("random_negatives_added")
    return kept


# ---------------------------------------------------------------------------------------------
# Columnar path: one request as numpy columns → its packed request list (what the NegativeSampler
# runs). It makes the same decisions, in the same order, with the same float arithmetic as
# `build_request_list(sample_request(rows))`, so its lists are the same bytes (a test checks it);
# only the ~10 shown non-clicks of a request go through the per-row python `sampling_decision`.
# ---------------------------------------------------------------------------------------------
REQUEST_COLUMNS = RL.REQUEST_INT_FEATURES  # int64 [n] each; plus user_dense [n, 4] float32 and
# query_tokens (query_tokens_values int64, query_tokens_offsets int64 [n + 1])
CANDIDATE_COLUMNS = ("item_id", "item_category", "ui_position", "ui_format", "click", "tier")  # int64 [n]
FLOAT_COLUMNS = ("true_ctr", "teacher_logit", "sample_weight")  # float64 [n], absent = their default
# plus item_tags (item_tags_values, item_tags_offsets) and item_dense [n, ITEM_DENSE_SIZE] float32
ROW_DEFAULTS = {"true_ctr": -1.0, "teacher_logit": math.nan, "sample_weight": 1.0}


def sample_request_columns(cols: Mapping[str, np.ndarray], corpus: ItemCorpus, config: SamplerConfig,
                           counts: Optional[Dict[str, int]] = None) -> Dict[str, List]:
    """One request's candidate rows as columns (`tier` = stage tier index; rows in a
    deterministic input order) → the request-list feature values of `RL.build_request_list`.

    Applies the sampling decisions (a sampled-out row keeps its slot with weight 0), adds the random
    negatives (drawn as `sample_request` draws them) and packs the list. Raises ValueError, as `build_request_list` does, when the list would
    be empty or longer than `config.list_size`. `counts` accumulates kept/dropped counts.
    """
    counts = counts if counts is not None else {}

    def bump(name, n=1):
        counts[name] = counts.get(name, 0) + n

    item_id, tier = cols["item_id"], cols["tier"]
    request_id = int(cols["request_id"][0])
    order = np.lexsort((item_id, tier))  # by tier, then item id; stable, like sorted()
    position, click = cols["ui_position"][order], cols["click"][order]
    multiplier = np.ones(order.size, dtype=np.float64)  # 0 for a sampled-out row (module docstring)
    teacher = cols["teacher_logit"]
    for k in np.flatnonzero((position > 0) & (click != 1)).tolist():
        i = order[k]
        row = {"request_id": request_id, "item_id": int(item_id[i]), "ui_position": int(position[k]),
               "click": int(click[k])}
        if not math.isnan(teacher[i]):
            row["teacher_logit"] = float(teacher[i])
        kept_row, weight, dropped = sampling_decision(row, config)
        for purpose in dropped:
            bump(f"sampled_out_{purpose}")
        if not kept_row:
            bump("candidates_sampled_out")
            multiplier[k] = 0.0
            continue
        if weight != 1.0:
            bump("candidates_reweighted")
        multiplier[k] = weight
    kept = order
    bump("candidates_kept", int(kept.size))
    wanted = max(0, min(config.random_negatives, config.list_size - int(kept.size)))
    oracle_known = bool(np.all(cols["true_ctr"] >= 0))
    randoms = corpus.draw(request_id, wanted, set(item_id.tolist()), config.seed)
    if randoms:
        bump("random_negatives_added", len(randoms))
    return pack_request_list(cols, kept, multiplier, randoms, corpus, oracle_known, config.list_size)


def pack_request_list(cols: Mapping[str, np.ndarray], kept: np.ndarray, multiplier: np.ndarray, randoms: List[int],
                      corpus: ItemCorpus, oracle_known: bool, list_size: int) -> Dict[str, List]:
    """The request-list features of the rows `kept` (indices into `cols`, in list order, with their
    weight multipliers) followed by the random negatives `randoms`, padded to `list_size`."""
    n_kept, n_random = int(kept.size), len(randoms)
    total = n_kept + n_random
    if total == 0:
        raise ValueError("a request list needs at least one candidate")
    if total > list_size:
        raise ValueError(f"{total} candidates do not fit a list of size {list_size}")
    pad = list_size - total
    first = int(kept[0]) if n_kept else 0  # the list's first row carries the request features
    out: Dict[str, List] = {name: [int(cols[name][first])] for name in RL.REQUEST_INT_FEATURES}
    out["user_dense"] = cols["user_dense"][first].tolist()
    offsets = cols["query_tokens_offsets"]
    out["query_tokens"] = cols["query_tokens_values"][offsets[first]:offsets[first + 1]].tolist()
    index = corpus.index_of(np.asarray(randoms, dtype=np.int64)) if n_random else np.zeros(0, dtype=np.int64)
    if n_random and (index < 0).any():
        raise ValueError("a random negative is not in the item corpus")
    zeros = [0] * (n_random + pad)
    out["item_id"] = cols["item_id"][kept].tolist() + list(randoms) + [0] * pad
    out["item_category"] = cols["item_category"][kept].tolist() + corpus.item_category[index].tolist() + [0] * pad
    for name in ("ui_position", "ui_format", "click"):
        out[name] = cols[name][kept].tolist() + zeros
    out["stage"] = cols["tier"][kept].tolist() + [RL.TIER_INDEX[RL.RANDOM_NEG_TIER]] * n_random + [RL.PAD_STAGE] * pad
    out["mask"] = [1] * total + [0] * pad
    out["true_ctr"] = (cols["true_ctr"][kept].tolist() + [0.0 if oracle_known else -1.0] * n_random
                       + [RL.FLOAT_PADDING["true_ctr"]] * pad)
    out["teacher_logit"] = (cols["teacher_logit"][kept].tolist() + [ROW_DEFAULTS["teacher_logit"]] * n_random
                            + [RL.FLOAT_PADDING["teacher_logit"]] * pad)
    out["sample_weight"] = ((cols["sample_weight"][kept] * multiplier).tolist() + [ROW_DEFAULTS["sample_weight"]] * n_random
                            + [RL.FLOAT_PADDING["sample_weight"]] * pad)
    out["sampling_probability"] = (corpus.probabilities_of(cols["item_id"][kept]).tolist()
                                   + corpus.probabilities[index].tolist() + [RL.FLOAT_PADDING["sampling_probability"]] * pad)
    tags = np.zeros((list_size, RL.MAX_ITEM_TAGS), dtype=np.int64)
    tag_values, tag_offsets = cols["item_tags_values"], cols["item_tags_offsets"]
    for slot, i in enumerate(kept.tolist()):
        t = tag_values[tag_offsets[i]:tag_offsets[i + 1]][:RL.MAX_ITEM_TAGS]
        tags[slot, :t.size] = t
    dense = np.zeros((list_size, RL.ITEM_DENSE_SIZE), dtype=np.float32)
    dense[:n_kept] = cols["item_dense"][kept]
    if n_random:
        tags[n_kept:total] = corpus.item_tags[index]
        dense[n_kept:total] = corpus.item_dense[index]
    out["item_tags"] = tags.reshape(-1).tolist()
    out["item_dense"] = dense.reshape(-1).tolist()
    return out
