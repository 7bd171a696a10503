"""Request-list data and export helpers shared by the list-based Trainer modules (retrieval,
pre-ranking, joint cascade): request-list TFRecords into numpy, serialized candidate rows for
warmup files, candidate rows as one-candidate lists for the stage layers, and an atomic save.
"""
from typing import Dict, Mapping, Sequence

import numpy as np
import tensorflow as tf

from datasources.example_io import make_example
from models import export as export_lib
from models import list_inputs as LI
from schema import features as F
from schema import request_list as RL

CANDIDATE_FEATURES = LI.QUERY_FEATURES + LI.ITEM_FEATURES + ("ui_position", "ui_format")


def list_size_of_splits(fn_args) -> int:
    """The list size of a Trainer's request lists (`models.list_inputs.list_size_in`), the same in
    its train and eval files, or a ValueError naming both."""
    train, evals = LI.list_size_in(fn_args.train_files), LI.list_size_in(fn_args.eval_files)
    if train != evals:
        raise ValueError(f"train lists have {train} slots and eval lists {evals}: "
                         f"{fn_args.train_files} / {fn_args.eval_files}")
    return train


def load_lists(file_patterns, list_size: int, batch_size: int = 1024) -> Dict[str, np.ndarray]:
    """Request-list TFRecords → numpy lists (the layout of `models.list_inputs`, query_tokens
    0-padded to [R, 8])."""
    parts: Dict[str, list] = {}
    for batch in LI.request_list_dataset(file_patterns, batch_size, list_size):
        for name, value in batch.items():
            if isinstance(value, tf.RaggedTensor):
                value = value.to_tensor(default_value=0, shape=[None, LI.MAX_QUERY_TOKENS])
            parts.setdefault(name, []).append(value.numpy())
    if not parts:
        raise ValueError(f"no request lists in {file_patterns}")
    return {k: np.concatenate(v) for k, v in parts.items()}


def candidate_examples(lists: Mapping[str, np.ndarray], count: int = 8) -> list:
    """Up to `count` real candidates of the lists as serialized candidate-row tf.Examples (the
    serving features: request + item + UI features), for warmup files and tests."""
    size = LI.list_size_of(lists)
    tags = np.asarray(lists["item_tags"]).reshape(-1, size, RL.MAX_ITEM_TAGS)
    dense = np.asarray(lists["item_dense"]).reshape(-1, size, RL.ITEM_DENSE_SIZE)
    out = []
    for r, j in zip(*np.nonzero(np.asarray(lists["mask"]) > 0)):
        tokens = np.asarray(lists["query_tokens"][r]).reshape(-1)
        t = tags[r, j][tags[r, j] != 0]
        row = {name: [int(np.asarray(lists[name][r]).reshape(-1)[0])] for name in ("user_id", "hour", "device")}
        row.update(
            user_dense=[float(v) for v in lists["user_dense"][r]],
            query_tokens=[int(v) for v in (tokens[tokens != 0] if np.any(tokens != 0) else tokens[:1])],
            item_id=[int(lists["item_id"][r, j])], item_category=[int(lists["item_category"][r, j])],
            item_tags=[int(v) for v in (t if t.size else tags[r, j][:1])],
            item_dense=[float(v) for v in dense[r, j]],
            ui_position=[int(lists["ui_position"][r, j])], ui_format=[int(lists["ui_format"][r, j])],
        )
        out.append(make_example(row).SerializeToString(deterministic=True))
        if len(out) >= count:
            break
    if not out:
        raise ValueError("the lists have no real candidate")
    return out


def candidate_parse_spec(schema=None) -> Dict:
    """Serving parse spec of the candidate features, from `schema` (default: the packaged one)."""
    spec = F.serving_parse_spec(schema)
    return {name: spec[name] for name in CANDIDATE_FEATURES if name in spec}


def candidate_lists(examples: tf.Tensor, spec: Dict = None, schema=None) -> Dict[str, tf.Tensor]:
    """Serialized candidate-row tf.Examples [N] → N request lists of one candidate each (mask
    [N, 1]), the input every stage layer reads; its [N, 1] scores are the candidates' scores.
    `spec`: `candidate_parse_spec(schema)` (default: of the packaged schema). Parsed by
    `models.export.parse_examples`, so serving rejects values outside the schema's domains."""
    parsed = export_lib.parse_examples(examples, spec or candidate_parse_spec(schema), schema)
    lists = dict(parsed)
    tags = parsed["item_tags"]
    if isinstance(tags, tf.RaggedTensor):
        tags = tags[:, :RL.MAX_ITEM_TAGS].to_tensor(default_value=0, shape=[None, RL.MAX_ITEM_TAGS])
    lists["item_tags"] = tags
    lists["mask"] = tf.ones_like(parsed["item_id"])
    return lists


def save_with_warmup(module, export_dir: str, signatures: Dict, warmup: Sequence[bytes]) -> str:
    """`models.export.save_atomically` with `serving_default` warmup requests from `warmup`."""
    return export_lib.save_atomically(module, export_dir, signatures,
                                      lambda tmp: export_lib.write_warmup_requests(tmp, list(warmup)))
