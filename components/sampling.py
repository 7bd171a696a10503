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

Every model-input column derives from the run's feature registry (`schema.features.FeatureConfig`,
the `features` argument, default `F.DEFAULT`): the request-level columns are its query-side inputs,
the candidate columns its item-side and UI inputs, the item id is `features.item_key` (int64, or a
string: bytes), and a random negative takes its item-side features from the corpus, the pad value
for its UI features and ui_position 0 (not shown). The decisions read `ui_position`
(`F.SHOWN_KEY`: > 0 = shown), `click` and `teacher_logit` by name.
"""
import dataclasses
import functools
import hashlib
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from cascade_ranking.schema import features as F
from cascade_ranking.schema import request_list as RL


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


def id_value(value):
    """An id as the sampler keys and hashes it: an int, or bytes for a string id (str is encoded)."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value)
    return int(value)


def _key_text(key) -> str:
    """An int key as its decimal digits (the hashes of int ids are those of the default registry);
    a bytes (or str) key as "b" + its hex digits, which no int key and no other bytes key spells."""
    if isinstance(key, (bytes, str)):  # np.bytes_ is bytes
        return "b" + id_value(key).hex()
    return str(key)


def uniform_hash(seed: int, purpose: str, *keys) -> float:
    """A deterministic number in [0, 1) from the seed, the decision's purpose and the keys (ints,
    or bytes: string item ids)."""
    digest = hashlib.blake2b(f"{seed}|{purpose}|{'|'.join(map(_key_text, keys))}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def teacher_log_loss(teacher_logit: float, click: int) -> float:
    """The teacher's log loss on a candidate: −log σ(z) for a click, −log(1 − σ(z)) otherwise."""
    z = teacher_logit if click else -teacher_logit
    return math.log1p(math.exp(-z)) if z > -30 else -z


def sampling_decision(row: Mapping, config: SamplerConfig,
                      item_key: str = F.ITEM_KEY) -> Tuple[bool, float, List[str]]:
    """(keep, weight multiplier, names of the decisions that dropped it) for one candidate row;
    `item_key` names its item id (`FeatureConfig.item_key`)."""
    shown = int(row[F.SHOWN_KEY]) > 0
    if not shown or int(row["click"]) == 1:
        return True, 1.0, []
    request_id, item_id = int(row["request_id"]), id_value(row[item_key])
    weight, dropped = 1.0, []
    tests = []
    if config.unseen_position_from and int(row[F.SHOWN_KEY]) >= config.unseen_position_from:
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


def item_features(features: F.FeatureConfig = F.DEFAULT) -> Tuple[F.InputFeature, ...]:
    """The registry's item-side inputs besides the item id: what the item corpus stores per item."""
    return tuple(f for f in features.of_role("item") if f.name != features.item_key)


def item_key_dtype(features: F.FeatureConfig = F.DEFAULT):
    """numpy dtype of an item-id array: int64, or object (bytes) for a string item key."""
    return object if features.item_key_is_string else np.int64


@dataclasses.dataclass
class ItemCorpus:
    """Items with their frequency and features, for drawing random negatives.

    `item_ids` are sorted: int64, or an object array of bytes for a string item key. `features`
    (item id → feature dict) serves the row-based reference path (`sample_request`); the columnar
    path (`sample_request_columns`, used by the NegativeSampler) reads the compact arrays
    `columns`, one per item-side input of the registry besides the item id (`item_features`),
    aligned with `item_ids`: id [I], ids [I, width] (cut and padded as request lists store them),
    dense [I, width] float32. A corpus built with `keep_features=False` is only numpy arrays:
    cheap to pickle as a Beam side input.
    """

    item_ids: np.ndarray
    probabilities: np.ndarray
    features: Dict[object, Dict[str, object]] = dataclasses.field(default_factory=dict)
    columns: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self._cdf = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cdf"] = None  # rebuilt on first use
        return state

    @classmethod
    def from_items(cls, items: Sequence[Tuple[object, int, Dict[str, object]]], keep_features: bool = True,
                   features: F.FeatureConfig = F.DEFAULT) -> "ItemCorpus":
        """From (item_id, count, item features) triples (ids int, or str/bytes for a string item
        key of `features`); sorted by id so the result is deterministic. The compact `columns` are
        filled when every item has every item-side feature of `features`."""
        items = sorted(((id_value(i), c, f) for i, c, f in items), key=lambda t: t[0])
        ids = np.array([i for i, _, _ in items], dtype=item_key_dtype(features))
        counts = np.array([c for _, c, _ in items], dtype=np.float64)
        columns = {}
        wanted = item_features(features)
        if items and all(all(f.name in values for f in wanted) for _, _, values in items):
            for f in wanted:
                column = np.empty((len(items), f.width), dtype=f.np_dtype)
                for k, (_, _, values) in enumerate(items):
                    column[k] = RL.fixed_width(f, values[f.name])
                columns[f.name] = column[:, 0] if f.kind == "id" else column
        kept = {i: f for i, _, f in items} if keep_features else {}
        return cls(ids, counts / counts.sum(), kept, columns)

    def index_of(self, item_ids) -> np.ndarray:
        """Positions of `item_ids` in the corpus, −1 for unknown items."""
        item_ids = np.asarray(item_ids, dtype=self.item_ids.dtype)
        if not self.item_ids.size:
            return np.full(item_ids.shape, -1, dtype=np.int64)
        index = np.searchsorted(self.item_ids, item_ids)
        clipped = np.minimum(index, self.item_ids.size - 1)
        found = (index < self.item_ids.size) & (self.item_ids[clipped] == item_ids)
        return np.where(found, clipped, -1)

    def probability(self, item_id) -> float:
        index = int(self.index_of([item_id])[0])
        return float(self.probabilities[index]) if index >= 0 else 0.0

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

    def draw(self, request_id: int, count: int, exclude: set, seed: int) -> List:
        """`count` distinct items ∝ frequency, none of them in `exclude`, seeded by the request."""
        if count <= 0 or self.item_ids.size == 0:
            return []
        rng = np.random.default_rng([seed, request_id])
        chosen: List = []
        for _ in range(8):  # rejection rounds; a popular excluded item is simply drawn again
            for item in self._choice(rng, 4 * count).tolist():
                if item not in exclude and item not in chosen:
                    chosen.append(item)
                    if len(chosen) == count:
                        return chosen
        return chosen


ITEM_FEATURES = tuple(f.name for f in item_features(F.DEFAULT))  # the default registry's corpus features


def random_negative_row(request_row: Mapping, item_id, item_features: Mapping, probability: float,
                        oracle_known: bool, features: F.FeatureConfig = F.DEFAULT) -> Dict[str, object]:
    """A random negative's candidate row: the request's keys and query-side inputs, the item's
    features, the pad value for each UI input, not shown (ui_position 0), no click."""
    row = {k: request_row[k] for k in RL.REQUEST_KEYS + features.query_names}
    row.update(item_features)
    row.update({f.name: [f.pad_value] * f.width for f in features.of_role("ui")})
    row.update({features.item_key: item_id, F.SHOWN_KEY: F.NOT_SHOWN_POSITION, "click": 0,
                "stage": RL.RANDOM_NEG_TIER, "sampling_probability": probability,
                "true_ctr": 0.0 if oracle_known else -1.0})
    return row


def request_split_by_hash(request_id: int, eval_fraction: float, seed: int) -> str:
    return "eval" if uniform_hash(seed, "split", request_id) < eval_fraction else "train"


def sample_request(rows: Sequence[Dict], corpus: ItemCorpus, config: SamplerConfig,
                   counts: Optional[Dict[str, int]] = None, features: F.FeatureConfig = F.DEFAULT) -> List[Dict]:
    """Applies the sampling decisions to one request's candidate rows and adds random negatives.

    Returns the rows of the request list (for `RL.build_request_list(rows, list_size, features)`),
    in a deterministic order (logged candidates by tier then item id, then the random negatives);
    a sampled-out row has sample_weight 0. `counts` accumulates what was kept, sampled out and
    reweighted. The corpus must be built with the same `features` (`ItemCorpus.from_items`).
    """
    counts = counts if counts is not None else {}
    key = features.item_key

    def bump(name, n=1):
        counts[name] = counts.get(name, 0) + n

    kept = []
    for row in sorted(rows, key=lambda r: (RL.TIER_INDEX[r["stage"]], id_value(r[key]))):
        keep, multiplier, dropped = sampling_decision(row, config, key)
        for purpose in dropped:
            bump(f"sampled_out_{purpose}")
        if not keep:
            bump("candidates_sampled_out")
            multiplier = 0.0
        elif multiplier != 1.0:
            bump("candidates_reweighted")
        row = dict(row)
        row["sample_weight"] = float(row.get("sample_weight", 1.0)) * multiplier
        row["sampling_probability"] = corpus.probability(id_value(row[key]))
        kept.append(row)
    bump("candidates_kept", len(kept))
    room = config.list_size - len(kept)
    wanted = max(0, min(config.random_negatives, room))
    oracle_known = all(float(r.get("true_ctr", -1.0)) >= 0 for r in rows)
    exclude = {id_value(r[key]) for r in rows}
    request_id = int(rows[0]["request_id"])
    for item in corpus.draw(request_id, wanted, exclude, config.seed):
        kept.append(random_negative_row(rows[0], item, corpus.features[item], corpus.probability(item), oracle_known,
                                        features))
        bump("random_negatives_added")
    return kept


# ---------------------------------------------------------------------------------------------
# Columnar path: one request as numpy columns → its packed request list (what the NegativeSampler
# runs). It makes the same decisions, in the same order, with the same float arithmetic as
# `build_request_list(sample_request(rows))`, so its lists are the same bytes (a test checks it);
# only the ~10 shown non-clicks of a request go through the per-row python `sampling_decision`.
#
# Columns of n candidate rows (`cascade_ranking.components.negative_sampler.CandidateDecoder` decodes them), from
# the registry `features`: request_id, request_time int64 [n]; per input (any role) an id
# [n] (int64, or object: bytes), dense [n, width] float32, or ids as `<name>_values` (int64 or
# bytes) and `<name>_offsets` int64 [n + 1]; ui_position (when not an input), click and `tier`
# (the stage's tier index) int64 [n]; FLOAT_COLUMNS float64 [n].
# ---------------------------------------------------------------------------------------------
FLOAT_COLUMNS = ("true_ctr", "teacher_logit", "sample_weight")  # float64 [n], absent = their default
ROW_DEFAULTS = {"true_ctr": -1.0, "teacher_logit": math.nan, "sample_weight": 1.0}


def sample_request_columns(cols: Mapping[str, np.ndarray], corpus: ItemCorpus, config: SamplerConfig,
                           counts: Optional[Dict[str, int]] = None,
                           features: F.FeatureConfig = F.DEFAULT) -> Dict[str, List]:
    """One request's candidate rows as columns (`tier` = stage tier index; rows in a
    deterministic input order) → the request-list feature values of
    `RL.build_request_list(rows, config.list_size, features)`.

    Applies the sampling decisions (a sampled-out row keeps its slot with weight 0), adds the random
    negatives (drawn as `sample_request` draws them) and packs the list. Raises ValueError, as
    `build_request_list` does, when the list would be empty or longer than `config.list_size`.
    `counts` accumulates kept/dropped counts.
    """
    counts = counts if counts is not None else {}

    def bump(name, n=1):
        counts[name] = counts.get(name, 0) + n

    key = features.item_key
    item_id, tier = cols[key], cols["tier"]
    request_id = int(cols["request_id"][0])
    order = np.lexsort((item_id, tier))  # by tier, then item id; stable, like sorted()
    position, click = cols[F.SHOWN_KEY][order], cols["click"][order]
    multiplier = np.ones(order.size, dtype=np.float64)  # 0 for a sampled-out row (module docstring)
    teacher = cols["teacher_logit"]
    for k in np.flatnonzero((position > 0) & (click != 1)).tolist():
        i = order[k]
        row = {"request_id": request_id, key: item_id[i], F.SHOWN_KEY: int(position[k]), "click": int(click[k])}
        if not math.isnan(teacher[i]):
            row["teacher_logit"] = float(teacher[i])
        kept_row, weight, dropped = sampling_decision(row, config, key)
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
    return pack_request_list(cols, kept, multiplier, randoms, corpus, oracle_known, config.list_size, features)


@functools.lru_cache(maxsize=None)
def _layout(features: F.FeatureConfig):
    """(query inputs, candidate inputs, candidate int keys) of the registry's request lists."""
    return RL.query_inputs(features), RL.candidate_inputs(features), RL.candidate_int_keys(features)


def pack_request_list(cols: Mapping[str, np.ndarray], kept: np.ndarray, multiplier: np.ndarray, randoms: List,
                      corpus: ItemCorpus, oracle_known: bool, list_size: int,
                      features: F.FeatureConfig = F.DEFAULT) -> Dict[str, List]:
    """The request-list features of the rows `kept` (indices into `cols`, in list order, with their
    weight multipliers) followed by the random negatives `randoms` (item ids of the corpus), padded
    to `list_size`: the layout of `RL.build_request_list(rows, list_size, features)`."""
    n_kept, n_random = int(kept.size), len(randoms)
    total = n_kept + n_random
    if total == 0:
        raise ValueError("a request list needs at least one candidate")
    if total > list_size:
        raise ValueError(f"{total} candidates do not fit a list of size {list_size}")
    pad = list_size - total
    first = int(kept[0]) if n_kept else 0  # the list's first row carries the request features
    query_inputs, candidate_inputs, int_keys = _layout(features)
    out: Dict[str, List] = {name: [int(cols[name][first])] for name in RL.REQUEST_KEYS}
    for f in query_inputs:
        if f.multivalent:  # var-len: cut to its width, not padded
            offsets = cols[f"{f.name}_offsets"]
            out[f.name] = cols[f"{f.name}_values"][offsets[first]:offsets[first + 1]][:f.width].tolist()
        elif f.is_dense:
            out[f.name] = cols[f.name][first].tolist()
        else:
            out[f.name] = cols[f.name][first:first + 1].tolist()
    index = corpus.index_of(randoms) if n_random else np.zeros(0, dtype=np.int64)
    if n_random and (index < 0).any():
        raise ValueError("a random negative is not in the item corpus")
    for f in candidate_inputs:
        from_corpus = n_random and f.role == "item" and f.name != features.item_key
        if f.name == features.item_key:
            out[f.name] = cols[f.name][kept].tolist() + list(randoms) + [f.pad_value] * pad
        elif f.kind == "id":
            randoms_part = corpus.columns[f.name][index].tolist() if from_corpus else [f.pad_value] * n_random
            out[f.name] = cols[f.name][kept].tolist() + randoms_part + [f.pad_value] * pad
        else:
            slots = (np.full((list_size, f.width), f.pad_value, dtype=object) if f.is_string
                     else np.zeros((list_size, f.width), dtype=f.np_dtype))
            if f.is_dense:
                slots[:n_kept] = cols[f.name][kept]
            else:
                values, offsets = cols[f"{f.name}_values"], cols[f"{f.name}_offsets"]
                for slot, i in enumerate(kept.tolist()):
                    v = values[offsets[i]:offsets[i + 1]][:f.width]
                    slots[slot, :v.size] = v
            if from_corpus:
                slots[n_kept:total] = corpus.columns[f.name][index]
            out[f.name] = slots.reshape(-1).tolist()
    for name in int_keys:
        if name == F.STAGE_KEY:
            out[name] = (cols["tier"][kept].tolist() + [RL.TIER_INDEX[RL.RANDOM_NEG_TIER]] * n_random
                         + [RL.PAD_STAGE] * pad)
        elif name == F.MASK_KEY:
            out[name] = [1] * total + [0] * pad
        else:  # ui_position (not an input), click: 0 for a random negative
            out[name] = cols[name][kept].tolist() + [0] * (n_random + pad)
    out["true_ctr"] = (cols["true_ctr"][kept].tolist() + [0.0 if oracle_known else -1.0] * n_random
                       + [RL.FLOAT_PADDING["true_ctr"]] * pad)
    out["teacher_logit"] = (cols["teacher_logit"][kept].tolist() + [ROW_DEFAULTS["teacher_logit"]] * n_random
                            + [RL.FLOAT_PADDING["teacher_logit"]] * pad)
    out["sample_weight"] = ((cols["sample_weight"][kept] * multiplier).tolist() + [ROW_DEFAULTS["sample_weight"]] * n_random
                            + [RL.FLOAT_PADDING["sample_weight"]] * pad)
    out["sampling_probability"] = (corpus.probabilities_of(cols[features.item_key][kept]).tolist()
                                   + corpus.probabilities[index].tolist() + [RL.FLOAT_PADDING["sampling_probability"]] * pad)
    return out
