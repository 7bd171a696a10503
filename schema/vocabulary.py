"""Vocabularies of the `lookup: vocabulary` id features, computed by TFX `Transform` with TFT.

The pipeline adds a standard `tfx.components.Transform` (analyze the train split only, no
materialized examples) when some feature of the registry (`schema.features.FeatureConfig`) has
`lookup: vocabulary`; its `preprocessing_fn` below calls `tft.vocabulary` once per such feature,
with `vocab_filename` = the feature's name, `top_k` = its `max_tokens` and `frequency_threshold` =
its `min_count` (0 = no limit). TFT orders a vocabulary by descending frequency; a multivalent
(`kind: ids`) feature counts every value of every list. The registry reaches the function through
Transform's `custom_config` ({"features": the registry as JSON}, the same JSON every Trainer gets).

Request lists (NegativeSampler) carry the same id values as the examples, so one vocabulary per
feature serves every stage: each Trainer reads the files from the Transform output
(`resolve`, `tft.TFTransformOutput.vocabulary_file_by_name`) into the FeatureConfig its towers get,
and `models.embedding.FeatureEmbedding` looks ids up in them (Keras `StringLookup`/`IntegerLookup`,
saved with the model as assets). Nothing here is written by hand but the registry plumbing.
"""
import json
from typing import Any, Dict, Optional, Tuple

import tensorflow as tf
import tensorflow_transform as tft

from cascade_ranking.schema import features as F

FEATURES_KEY = "features"  # custom_config key of the registry (JSON), as for the Trainers
PREPROCESSING_FN = "cascade_ranking.schema.vocabulary.preprocessing_fn"


def registry_from(custom_config: Optional[Dict[str, Any]]) -> F.FeatureConfig:
    """The FeatureConfig of Transform's custom_config (the package defaults when absent)."""
    from cascade_ranking.models.config import config_from_dict  # the config parser of every Trainer

    text = (custom_config or {}).get(FEATURES_KEY)
    return config_from_dict(F.FeatureConfig, json.loads(text) if text else {})


def preprocessing_fn(inputs: Dict[str, Any], custom_config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """TFT preprocessing_fn: one `tft.vocabulary` analyzer per vocabulary feature of the registry.

    Returns each feature's ids mapped through its vocabulary (`tft.apply_vocabulary`); the pipeline
    does not materialize them, it reads only the vocabulary assets of the transform graph."""
    features = registry_from(custom_config)
    vocabulary_features = features.vocabulary_features()
    if not vocabulary_features:
        raise ValueError("preprocessing_fn: no feature of the registry has lookup vocabulary")
    outputs = {}
    for f in vocabulary_features:
        if f.name not in inputs:
            raise ValueError(f"preprocessing_fn: feature {f.name} (lookup vocabulary) is not in the examples' schema")
        ids = inputs[f.name]
        path = tft.vocabulary(ids, top_k=f.max_tokens or None, frequency_threshold=f.min_count or None,
                              vocab_filename=f.name, name=f"vocabulary_{f.name}")
        outputs[f.name] = tft.apply_vocabulary(ids, path, num_oov_buckets=f.oov_buckets)
    return outputs


def vocabularies(transform_graph_path: str, features: F.FeatureConfig) -> Dict[str, Tuple[str, int]]:
    """name → (vocabulary file, vocabulary size) of each vocabulary feature, from a Transform output."""
    output = tft.TFTransformOutput(transform_graph_path)
    found = {}
    for f in features.vocabulary_features():
        path = output.vocabulary_file_by_name(f.name)
        if not path or not tf.io.gfile.exists(path):
            raise ValueError(f"feature {f.name}: the Transform output {transform_graph_path} has no vocabulary "
                             f"named {f.name}")
        found[f.name] = (path, output.vocabulary_size_by_name(f.name))
    return found


def resolve(features: F.FeatureConfig, transform_graph_path: Optional[str]) -> F.FeatureConfig:
    """`features` with its vocabulary features' files and sizes filled in (a no-op without any);
    a vocabulary feature without a Transform output is a one-line error."""
    if not features.vocabulary_features():
        return features
    if not transform_graph_path:
        names = ", ".join(f.name for f in features.vocabulary_features())
        raise ValueError(f"features {names} have lookup vocabulary but the Trainer got no transform_graph "
                         f"(the pipeline's Transform output)")
    return features.with_vocabularies(vocabularies(transform_graph_path, features))


def out_of_vocabulary(lists: Dict[str, Any], features: F.FeatureConfig) -> Dict[str, Dict[str, int]]:
    """Per vocabulary feature of a resolved registry: how many id values of the request lists
    `lists` (numpy, the layout of `models.list_inputs`, e.g. the eval lists) are not in its
    vocabulary, {"ids": out of vocabulary, "of": values read, "vocabulary_size": ...}. Such ids
    are not lost: they share the feature's OOV rows (`oov_buckets`); the count says how many do.
    Candidates outside a list's mask and the padding of multivalent features are not counted."""
    import numpy as np

    mask = np.asarray(lists["mask"]) > 0
    size = mask.shape[1]
    files = {s.name: s.vocabulary_file for s in features.sparse_features()}  # the resolved files
    out = {}
    for f in features.vocabulary_features():
        if f.name not in lists:
            continue
        with tf.io.gfile.GFile(files[f.name], "rb") as handle:
            tokens = [line.rstrip(b"\n") for line in handle]
        vocabulary = set(tokens) if f.is_string else {int(t) for t in tokens if t.strip()}
        values = np.asarray(lists[f.name])
        if f.role == "query":
            real = values.reshape(values.shape[0], -1)[mask.any(axis=1)]
        else:
            real = values.reshape(mask.shape[0], size, -1)[mask]
        if f.multivalent:
            real = real[real != f.pad_value]
        real = real.reshape(-1)
        known = np.fromiter((v in vocabulary for v in (real if f.is_string else real.tolist())), bool, real.size)
        out[f.name] = {"ids": int((~known).sum()), "of": int(real.size), "vocabulary_size": len(vocabulary)}
    return out
