"""Request-list data and export helpers shared by the list-based Trainer modules (retrieval,
pre-ranking, joint cascade): request-list TFRecords into numpy, serialized candidate rows for
warmup files, candidate rows as one-candidate lists for the stage layers, and an atomic save.
"""
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from cascade_ranking.datasources.example_io import make_example
from cascade_ranking.models import export as export_lib
from cascade_ranking.models import list_inputs as LI
from cascade_ranking.schema import features as F
from cascade_ranking.schema import request_list as RL


def list_size_of_splits(fn_args) -> int:
    """The list size of a Trainer's request lists (`models.list_inputs.list_size_in`), the same in
    its train and eval files, or a ValueError naming both."""
    train, evals = LI.list_size_in(fn_args.train_files), LI.list_size_in(fn_args.eval_files)
    if train != evals:
        raise ValueError(f"train lists have {train} slots and eval lists {evals}: "
                         f"{fn_args.train_files} / {fn_args.eval_files}")
    return train


ADAPT_LISTS = 4096  # the first lists of a train split that the dense normalisers are fitted on


def iterate_lists(file_patterns, list_size: int, batch_size: int = 1024, features: F.FeatureConfig = F.DEFAULT,
                  max_lists: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
    """Request-list TFRecords → batches of numpy lists, one at a time (the layout of
    `models.list_inputs`: query-side multivalent inputs padded to [R, width]); with `max_lists`,
    only about the first that many (whole batches of `batch_size`)."""
    multivalent = {f.name: f for f in RL.query_inputs(features) if f.multivalent}
    batches = LI.request_list_dataset(file_patterns, batch_size, list_size, features=features)
    if max_lists is not None:
        batches = batches.take(-(-max_lists // batch_size))
    for batch in batches:
        yield {name: (LI.padded(value, multivalent[name]) if name in multivalent else value).numpy()
               for name, value in batch.items()}


def load_lists(file_patterns, list_size: int, batch_size: int = 1024,
               features: F.FeatureConfig = F.DEFAULT, max_lists: Optional[int] = None) -> Dict[str, np.ndarray]:
    """`iterate_lists` as one set of numpy lists: the whole split in memory, for eval splits and
    samples (the Trainers stream their train splits)."""
    return concatenate_batches(list(iterate_lists(file_patterns, list_size, batch_size, features, max_lists)), file_patterns)


def concatenate_batches(batches: Sequence[Mapping[str, np.ndarray]], file_patterns) -> Dict[str, np.ndarray]:
    """Batches of numpy columns (lists, or what a reader kept of them) as one set, column by column,
    or a ValueError naming the files when there is no batch."""
    if not batches:
        raise ValueError(f"no request lists in {file_patterns}")
    return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}


def scan_train_split(file_patterns, list_size: int, visit: Callable[[Dict[str, np.ndarray]], None],
                     features: F.FeatureConfig = F.DEFAULT, batch_size: int = 1024) -> Dict[str, np.ndarray]:
    """Reads a train split once, `batch_size` lists at a time: calls `visit` on every batch and
    returns the first `ADAPT_LISTS` lists (`adaptation_lists`' sample, without a second read)."""
    sample, kept = [], 0
    for batch in iterate_lists(file_patterns, list_size, batch_size, features):
        visit(batch)
        if kept < ADAPT_LISTS:
            sample.append(batch)
            kept += len(batch["mask"])
    return concatenate_batches(sample, file_patterns)


def adaptation_lists(file_patterns, list_size: int, features: F.FeatureConfig = F.DEFAULT) -> Dict[str, np.ndarray]:
    """The first `ADAPT_LISTS` lists of a train split (`load_lists`), for the towers' and the
    ranker's dense normalisers (a mean and a variance per feature): the Trainers stream their
    training data and hold this sample only, so their memory does not grow with the split."""
    return load_lists(file_patterns, list_size, features=features, max_lists=ADAPT_LISTS)


def _real(values: np.ndarray, f: F.InputFeature) -> list:
    """A row's values of `f` without the padding of a multivalent feature (one pad value kept when
    the row has none: a tf.Example feature needs a value)."""
    values = np.asarray(values).reshape(-1)
    if f.multivalent:
        real = values[values != f.pad_value]
        values = real if real.size else values[:1]
    return [v if isinstance(v, bytes) else v.item() for v in values]


def candidate_examples(lists: Mapping[str, np.ndarray], count: int = 8,
                       features: F.FeatureConfig = F.DEFAULT) -> list:
    """Up to `count` real candidates of the lists as serialized candidate-row tf.Examples (the
    serving features: the registry's inputs), for warmup files and tests."""
    size = LI.list_size_of(lists)
    out = []
    for r, j in zip(*np.nonzero(np.asarray(lists["mask"]) > 0)):
        row = {}
        for f in features.resolved():
            if f.role == "query":
                row[f.name] = _real(lists[f.name][r], f)
            else:
                row[f.name] = _real(np.asarray(lists[f.name]).reshape(-1, size, f.width)[r, j], f)
        out.append(make_example(row).SerializeToString(deterministic=True))
        if len(out) >= count:
            break
    if not out:
        raise ValueError("the lists have no real candidate")
    return out


def candidate_parse_spec(schema=None, features: F.FeatureConfig = F.DEFAULT) -> Dict:
    """Serving parse spec of the registry's inputs, from `schema` (default: the packaged one)."""
    spec = F.serving_parse_spec(schema, features)
    return {name: spec[name] for name in features.model_inputs if name in spec}


def candidate_lists(examples: tf.Tensor, spec: Dict = None, schema=None,
                    features: F.FeatureConfig = F.DEFAULT) -> Dict[str, tf.Tensor]:
    """Serialized candidate-row tf.Examples [N] → N request lists of one candidate each (mask
    [N, 1]), the input every stage layer reads; its [N, 1] scores are the candidates' scores.
    `spec`: `candidate_parse_spec(schema, features)` (default: of the packaged schema). Parsed by
    `models.export.parse_examples`, so serving rejects values outside the schema's domains."""
    parsed = export_lib.parse_examples(examples, spec or candidate_parse_spec(schema, features), schema)
    lists = dict(parsed)
    for f in RL.candidate_inputs(features):
        lists[f.name] = LI.padded(parsed[f.name], f) if f.multivalent else parsed[f.name]
    lists["mask"] = tf.ones_like(parsed[features.item_key], dtype=tf.int64)
    return lists


def save_with_warmup(module, export_dir: str, signatures: Dict, warmup: Sequence[bytes]) -> str:
    """`models.export.save_atomically` with `serving_default` warmup requests from `warmup`."""
    return export_lib.save_atomically(module, export_dir, signatures,
                                      lambda tmp: export_lib.write_warmup_requests(tmp, list(warmup)))
