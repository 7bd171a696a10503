"""A log of another shape than the package's own, for the tests of the feature registry: its own
feature names, string ids, a dense feature of width 7, a multivalent feature of up to 20 values,
requests of `candidates` rows, and (by default) no tiers and no ui_position: an impression and
click log, every logged row shown, the ground truth its clicks.

    request side   visitor (string), region (string), context (float ×3)
    item side      sku (string: the item id), brand (string), keywords (int64, 1..20 values),
                   vector (float ×7)
    UI             slot (int64, 0..3)
    keys, labels   request_id, request_time, click (and stage, ui_position with `tiers=True`); with
                   `own_keys`: session (string), ts, clicked instead

Clicks follow a hidden affinity (visitor × brand, keywords, the vector and the slot), so a model
that reads the features can learn something.
"""
import os
from typing import Callable, Dict, Optional

import numpy as np

from cascade_ranking.datasources.example_io import SplitWriter, make_example
from cascade_ranking.schema import features as F


def registry(buckets: int = 4096) -> F.FeatureConfig:
    """The feature registry a user would write (or `cascade init` infer) for this log."""
    return F.FeatureConfig(inputs=(
        F.InputFeature("visitor", "query", "id", "string", buckets=buckets),
        F.InputFeature("region", "query", "id", "string", buckets=64),
        F.InputFeature("context", "query", "dense", "float32", width=3),
        F.InputFeature("sku", "item", "id", "string", buckets=buckets),
        F.InputFeature("brand", "item", "id", "string", buckets=256),
        F.InputFeature("keywords", "item", "ids", "int64", width=20, buckets=1024),
        F.InputFeature("vector", "item", "dense", "float32", width=7),
        F.InputFeature("slot", "ui", "id", "int64", buckets=4),
    ), item_key="sku")


def rows(num_requests: int, candidates: int = 100, seed: int = 0, tiers: bool = False,
         first_request: int = 0, own_keys: bool = False) -> list:
    """Candidate rows (feature dicts) of `num_requests` requests of `candidates` rows each. With
    `own_keys` the keys have the log's own names: `session` (a string), `clicked`, `ts`."""
    rng = np.random.default_rng(seed)
    num_items, num_visitors, num_brands = 400, 60, 12
    brand_of = rng.integers(0, num_brands, num_items)
    vector_of = rng.normal(size=(num_items, 7)).astype(np.float32)
    taste = rng.normal(size=(num_visitors, num_brands))
    weights = rng.normal(size=7)
    out = []
    for r in range(num_requests):
        request_id = first_request + r
        visitor = int(rng.integers(0, num_visitors))
        region = f"region-{visitor % 5}"
        context = rng.normal(size=3).astype(np.float32)
        items = rng.choice(num_items, candidates, replace=False)
        affinity = taste[visitor, brand_of[items]] + 0.5 * vector_of[items] @ weights
        slots = rng.integers(0, 4, candidates)
        logit = affinity - 2.5 - 0.3 * slots
        clicks = (rng.random(candidates) < 1 / (1 + np.exp(-logit))).astype(np.int64)
        for j, item in enumerate(items.tolist()):
            keywords = rng.integers(1, 1000, int(rng.integers(1, 21))).tolist()
            row: Dict[str, object] = {
                "request_id": [request_id], "request_time": [1_000 + request_id],
                "visitor": [f"visitor-{visitor}".encode()], "region": [region.encode()],
                "context": context.tolist(),
                "sku": [f"sku-{item:05d}".encode()], "brand": [f"brand-{brand_of[item]}".encode()],
                "keywords": keywords, "vector": vector_of[item].tolist(),
                "slot": [int(slots[j])], "click": [int(clicks[j])],
            }
            if own_keys:
                row["session"] = [f"session-{request_id:06d}".encode()]
                row["clicked"] = row.pop("click")
                row["ts"] = row.pop("request_time")
                del row["request_id"]
            if tiers:
                row["stage"] = [F.tier_without_stage(clicks[j]).encode()]
                row[F.SHOWN_KEY] = [F.SHOWN_WITHOUT_POSITION]
            out.append(row)
    return out


def write(root: str, train_requests: int = 24, eval_requests: int = 8, candidates: int = 100,
          seed: int = 0, tiers: bool = False, extra: Optional[Callable[[dict], Dict[str, object]]] = None,
          own_keys: bool = False) -> str:
    """An Examples directory (Split-train/, Split-eval/) of this log. `extra(row)` adds features to
    each row (the "add a feature" test)."""
    splits = {"train": rows(train_requests, candidates, seed, tiers, own_keys=own_keys),
              "eval": rows(eval_requests, candidates, seed + 1, tiers, first_request=train_requests, own_keys=own_keys)}
    os.makedirs(root, exist_ok=True)
    with SplitWriter(root, splits) as writer:
        for name, split_rows in splits.items():
            for row in split_rows:
                added = extra(row) if extra else {}
                writer.write(name, make_example({**row, **added}).SerializeToString(deterministic=True))
    return root
