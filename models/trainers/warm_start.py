"""Warm start: a Trainer continues from the model its stage trained on the span before
(Factory Floor §2.1, single-pass online training, in TFX terms).

The paper's model trains online: one pass over time-ordered logs, never restarted. In a TFX pipeline
the logs arrive as spans (`datasources.spans`), and the pipeline hands each Trainer the newest model
its stage trained on an older span as `base_model` (`pipelines.warm_start_strategy`). This module is
the Trainer side:

  * `save(model, fn_args)` writes a training checkpoint beside the served model,
    `<model>/checkpoint/`: a `tf.train.Checkpoint` of the Keras model, which tracks every layer's
    weights, every optimizer with its step counter and slots (Adagrad accumulators, Adam moments,
    the EMA of the served weights), the bias-constraint duals (a `tf.Module` on the ranker) and
    the cross stack's ramp step, the dense normalisers' statistics; plus `warm_start.json`: the architecture's fingerprint (dtype and
    shape of every variable, in order, optimizers' included) and the Trainer's `span`.
  * `restore(model, fn_args)` is called once the model and its train step's variables exist
    (`build_train_step`): with a base model whose fingerprint matches, every variable takes the
    base model's value, so the step counter, and with it the curriculum's ramps (`models.curriculum`
    reads `optimizer.iterations`), continue where they stopped, the duals keep their values, and the
    dense features are normalised with the base model's statistics (`refresh_adapted_layers`).
    A base model of another architecture (a changed config), with other vocabularies (`lookup:
    vocabulary` features: each span's Transform ranks the ids anew, so a table row belongs to another
    id; `vocabularies`), or without a checkpoint (written before warm starts existed), is not used:
    the Trainer trains afresh and says why, in one line. Remapping the rows of a changed vocabulary
    (as `tf.compat.v1.train.warm_start`'s VocabInfo did) is not done: hashed ids warm-start.

Written by hand: TFX's Trainer passes `base_model` to the run_fn and leaves the rest to it, and
Keras' `BackupAndRestore` (`common.callbacks`) resumes a killed run of the same inputs, not a
new run on new data.
"""
import hashlib
import json
import os
from typing import Optional

import tensorflow as tf
from absl import logging

CHECKPOINT_DIR = "checkpoint"
INFO_FILE = "warm_start.json"
INFO_PATH = os.path.join(CHECKPOINT_DIR, INFO_FILE)  # under a Model artifact's uri
_PREFIX = "ckpt"


def model_root(serving_model_dir: str) -> str:
    """The Model artifact's directory of a Trainer's `serving_model_dir` (`<model>/Format-Serving`)."""
    return os.path.dirname(serving_model_dir.rstrip("/"))


def fingerprint(model: tf.keras.Model) -> str:
    """The architecture of a built model: a hash of the dtype and shape of each of its trainable
    variables and its optimizers' variables, in creation order (names are left out: Keras numbers
    layers per process; metric variables are left out: Keras creates them in the first step)."""
    optimizers = [model.optimizer] + [getattr(layer, "optimizer", None) for layer in model.submodules
                                      if getattr(layer, "optimizer", None) is not model.optimizer]
    seen, shapes = set(), []
    for variable in list(model.trainable_variables) + [v for o in optimizers if o is not None for v in o.variables]:
        if id(variable) not in seen:
            seen.add(id(variable))
            shapes.append(f"{variable.dtype.name}{list(variable.shape)}")
    return hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]


def vocabularies(model: tf.keras.Model) -> dict:
    """feature → a hash of its vocabulary, for every `lookup: vocabulary` feature of the model's
    embedding layers (Keras `StringLookup`/`IntegerLookup`, `models.embedding`); {} with hashed ids.
    A table's row i belongs to the vocabulary's i-th id, so a base model whose vocabulary differs
    (each span's Transform ranks the ids anew) cannot lend its rows, even when the table sizes
    match (a `max_tokens` cap)."""
    digests = {}
    for layer in model.submodules:
        for name, lookup in (getattr(layer, "lookups", None) or {}).items():
            tokens = [t.decode() if isinstance(t, bytes) else str(t) for t in lookup.get_vocabulary()]
            digests[name] = hashlib.sha256("\n".join(tokens).encode()).hexdigest()[:16]
    return dict(sorted(digests.items()))


def save(model: tf.keras.Model, fn_args) -> str:
    """Writes `<model>/checkpoint/` (the module docstring) for the next span's warm start, with the
    run's span (`settings`); returns its directory. Written under a temporary name and renamed."""
    span = settings(fn_args).get("span")
    directory = os.path.join(model_root(fn_args.serving_model_dir), CHECKPOINT_DIR)
    tmp = f"{directory}.tmp-{os.getpid()}"
    if tf.io.gfile.exists(tmp):
        tf.io.gfile.rmtree(tmp)
    tf.train.Checkpoint(model=model).write(os.path.join(tmp, _PREFIX))
    with tf.io.gfile.GFile(os.path.join(tmp, INFO_FILE), "w") as f:
        json.dump({"fingerprint": fingerprint(model), "span": span, "vocabularies": vocabularies(model),
                   "optimizer_steps": int(model.optimizer.iterations.numpy())}, f, sort_keys=True)
    if tf.io.gfile.exists(directory):
        tf.io.gfile.rmtree(directory)
    tf.io.gfile.rename(tmp, directory)
    return directory


def read_info(model_uri: str) -> Optional[dict]:
    """The warm-start record (`warm_start.json`: fingerprint, span, optimizer steps) of the Model
    artifact at `model_uri`, None when it has none."""
    path = os.path.join(model_uri, INFO_PATH)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def trained_span(model_uri: str) -> Optional[int]:
    """The span the Model artifact at `model_uri` was trained on (its warm-start record), None when
    it has no record (trained on data without spans, or before warm starts existed)."""
    info = read_info(model_uri)
    return None if info is None else info.get("span")


def base_checkpoint(fn_args) -> Optional[str]:
    """The checkpoint directory of the Trainer's base model, None when it has none."""
    base = getattr(fn_args, "base_model", None)
    return os.path.join(model_root(base), CHECKPOINT_DIR) if base else None


def refresh_adapted_layers(model: tf.keras.Model) -> int:
    """Recomputes the statistics of every adapted Keras `Normalization` layer of `model` from its
    state variables (`finalize_state`); returns how many. Keras keeps an adapted layer's mean and
    variance as tensors derived from those variables, so a restore alone would leave the layer
    normalising with the statistics `adapt` just fit on the new span, not the base model's."""
    layers = [layer for layer in model.submodules
              if isinstance(layer, tf.keras.layers.Normalization) and layer.is_adapted]
    for layer in layers:
        layer.finalize_state()
    return len(layers)


WARM_START_KEY = "warm_start"  # custom_config: {"span": the run's span, "epochs": epochs of a warm start}


def settings(fn_args) -> dict:
    """The Trainer's custom_config "warm_start" ({} when the run reads no span)."""
    custom = fn_args.custom_config or {}
    return json.loads(custom[WARM_START_KEY]) if WARM_START_KEY in custom else {}


def epochs(fn_args, fresh_epochs: int, warm: bool) -> int:
    """The epochs to train: the config's `warm_start.epochs` (one pass over the new span by
    default) after a warm start, else `fresh_epochs`."""
    return int(settings(fn_args).get("epochs", fresh_epochs)) if warm else fresh_epochs


def restore(model: tf.keras.Model, fn_args, name: str) -> bool:
    """Loads the base model's checkpoint into `model` (built, with its train step's variables);
    True when it did. Without a base model, False and nothing said; with one it cannot use (another
    architecture, no checkpoint), False and one line saying so ("… trained afresh: …"), printed and
    logged, as is the "… warm start from …" line."""
    directory = base_checkpoint(fn_args)
    if directory is None:
        return False
    base = model_root(fn_args.base_model)
    info = read_info(base)
    restored = False
    if info is None:
        message = f"{name}: trained afresh: the base model {base} has no warm-start checkpoint"
    else:
        changed = sorted(k for k, v in vocabularies(model).items() if info.get("vocabularies", {}).get(k) != v)
        if info["fingerprint"] != fingerprint(model):
            message = (f"{name}: trained afresh: the base model {base} has another architecture (its variables' "
                       f"shapes differ: the config changed, or a vocabulary's size)")
        elif changed:
            message = (f"{name}: trained afresh: the vocabularies of {', '.join(changed)} differ from the base model's "
                       f"{base} (their embedding rows belong to other ids; hashed ids warm-start)")
        else:
            tf.train.Checkpoint(model=model).read(os.path.join(directory, _PREFIX)).assert_existing_objects_matched()
            refresh_adapted_layers(model)
            span = info.get("span")
            message = (f"{name}: warm start from {base}{f' (span {span})' if span is not None else ''} at "
                       f"optimizer step {int(model.optimizer.iterations.numpy())}")
            restored = True
    logging.info(message)
    print(message, flush=True)
    return restored
