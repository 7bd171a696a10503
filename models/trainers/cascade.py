"""Trainer module of the joint cascade (`models.cascade_model`): retrieval → pre-ranking → ranking
stages trained together with LCRON (or the "bce" / "icc" baselines).

Input: the NegativeSampler's request-list Examples, trained on as tf.data
(`models.list_inputs.request_list_dataset`); the train lists are also read once into numpy to
fit the dense normalisers, and the eval lists for the metrics.

custom_config: {"cascade": JSON object}, keys and defaults in `CascadeTrainerConfig`:
    method "lcron" ("bce", "icc", "hap"), list_size 60, epochs 3, batch_size 64 (request lists),
    learning_rate 2e-3 (Adam), quota 10 (LCRON's training quota, an int or one per stage),
    tau 50.0, with_retrieval true (stages retrieval, prerank, rank; false: prerank, rank),
    embedding_dim 16, label "gt" ("click"), eval_quotas [40, 30, 20] (the cascade quotas of the
    e2e recall, DESIGN §8; the last len(stages) are used), seed 0, distill_weight 0.0 (λ of the
    distillation term of `CascadeModel`: the last stage's logit against sigmoid(teacher_logit),
    BCE over the real candidates with a finite teacher_logit; 0 = off; needs the TeacherInference
    output's `teacher_logit`).

Training: Keras `fit` of `CascadeModel` (its train_step) with TensorBoard + BackupAndRestore.
(No per-epoch best-weights selection as `train_cascade(valid_lists=…)` does: the eval split is
for reporting.)
eval_metrics.json (`evaluate_cascade` on the eval lists): e2e_recall, recall_<stage>@<q> per
stage, ndcg@10_<last stage>, requests and requests_without_gt (lists without a real GT
candidate, left out of every recall), plus method, distill_weight and the quotas.
Export (SavedModel + warmup file): serving_default on serialized candidate-row tf.Examples
(input `examples`) → {score/<stage> [N] for every stage, score [N] = the last stage's}. The
cascade's cut (each stage keeps its top q_i of a request) is done by the caller.
"""
import dataclasses
import json
from typing import Tuple, Union

import tensorflow as tf
from absl import logging

from models import export as export_lib
from models import lcron
from models import list_inputs as LI
from models.cascade_model import CascadeModel, default_stages, evaluate_cascade
from models.trainers import common
from models.trainers.list_data import candidate_examples, candidate_lists, load_lists, save_with_warmup
from schema import request_list as RL

CONFIG_KEY = "cascade"


@dataclasses.dataclass
class CascadeTrainerConfig:
    method: str = "lcron"
    list_size: int = RL.LIST_SIZE
    epochs: int = 3
    batch_size: int = 64
    learning_rate: float = 2e-3
    quota: Union[int, Tuple[int, ...]] = lcron.DEFAULT_QUOTA
    tau: float = lcron.DEFAULT_TAU
    with_retrieval: bool = True
    embedding_dim: int = 16
    label: str = "gt"
    eval_quotas: Tuple[int, ...] = (40, 30, 20)
    seed: int = 0
    distill_weight: float = 0.0


class CascadeServing(tf.Module):
    def __init__(self, model: CascadeModel):
        super().__init__()
        self.stage_names = model.stage_names
        self.stages = list(model.stage_models)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=export_lib.SERVING_INPUT_KEY)])
    def serve(self, examples):
        lists = candidate_lists(examples)
        out = {}
        for name, stage in zip(self.stage_names, self.stages):
            out[f"score/{name}"] = tf.reshape(stage(lists, training=False), [-1])
        out["score"] = out[f"score/{self.stage_names[-1]}"]
        return out


def build_model(config: CascadeTrainerConfig) -> Tuple[CascadeModel, Tuple[int, ...]]:
    """(the CascadeModel of `config`, the eval quotas of its stages); seeds TF first."""
    tf.keras.utils.set_random_seed(config.seed)
    stages = default_stages(config.with_retrieval, config.embedding_dim)
    if len(config.eval_quotas) < len(stages):
        raise ValueError(f"eval_quotas {config.eval_quotas} give fewer quotas than the {len(stages)} stages")
    quotas = tuple(int(q) for q in config.eval_quotas)[-len(stages):]
    model = CascadeModel(stages, method=config.method, quota=config.quota, tau=config.tau, label=config.label,
                         distill_weight=config.distill_weight)
    return model, quotas


def run_fn(fn_args) -> None:
    """Called by the TFX Trainer (GenericExecutor)."""
    config = common.config_from(fn_args, CONFIG_KEY, CascadeTrainerConfig)
    logging.info("Training the cascade with %s", config)
    model, quotas = build_model(config)
    model.adapt(load_lists(fn_args.train_files, config.list_size))
    model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))
    train = LI.request_list_dataset(fn_args.train_files, config.batch_size, config.list_size, shuffle_seed=config.seed)
    model.fit(train, epochs=config.epochs, callbacks=common.callbacks(fn_args), verbose=2)
    evals = load_lists(fn_args.eval_files, config.list_size)
    result = evaluate_cascade(model.predict_stage_scores(evals), evals, quotas, model.stage_names, config.label)
    result.update(method=config.method, distill_weight=config.distill_weight,
                  quotas={n: int(q) for n, q in zip(model.stage_names, quotas)})
    logging.info("Eval metrics: %s", json.dumps(result))
    common.write_eval_metrics(fn_args.model_run_dir, result)
    module = CascadeServing(model)
    save_with_warmup(module, fn_args.serving_model_dir, {"serving_default": module.serve}, candidate_examples(evals))
