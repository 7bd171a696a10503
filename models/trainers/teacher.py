"""Trainer module of the teacher: the Factory Floor ranker made wider and deeper
(`RankerConfig.teacher()`), whose predictions TeacherInference records for two-pass distillation
(Factory Floor §4.1.2).

It trains on ExampleGen's candidate rows, before the NegativeSampler groups them into request
lists, so it reads rows in any order (files and rows shuffled) and has no per-request loss: its
default `rank_loss` is "none", and a config that turns a rank loss on is refused (the rows of a
request are not together here; DESIGN §11 "request grouping"). Its job is the soft label
σ(teacher_logit) of every shown row, which the logistic loss learns; the shown rows
(ui_position > 0) are its training data, `batch_size` rows a batch.

custom_config: {"ranker": RankerConfig JSON} overrides the teacher defaults. The pipeline's Schema
artifact (`fn_args.schema_path`) gives the parse spec and the serving signatures. Exports
`serving_default`, `quality`, `ui` and `score_ui_grid` with a warmup file (`models.ranker_export`).
"""
import json

import tensorflow as tf
from absl import logging

from cascade_ranking.models import inputs, ranker, ranker_export
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.models.trainers import common, distribute, warm_start
from cascade_ranking.models.trainers.epoch_progress import EpochProgress
from cascade_ranking.schema import features as F

CONFIG_KEY = "ranker"
# The strategies it trains under on a training cluster (`models.trainers.distribute`): rows in any
# order, so both (the duals, the curriculum step and the cross ramp are checked in tests/test_distribute.py).
DISTRIBUTE_STRATEGIES = (distribute.MIRRORED, distribute.PARAMETER_SERVER)


def run_fn(fn_args) -> None:
    """Called by the TFX Trainer (GenericExecutor)."""
    config = RankerConfig.from_dict({**RankerConfig.teacher().to_dict(), **common.config_json(fn_args, CONFIG_KEY)})
    if config.rank_loss != "none":
        raise ValueError("the teacher trains on candidate rows in any order: it has no per-request rank loss "
                         f"(rank_loss must be 'none', got {config.rank_loss!r})")
    schema, schema_path = common.pipeline_schema(fn_args)
    logging.info("Training the teacher with %s (schema %s)", config, schema_path)
    tf.keras.utils.set_random_seed(config.lspr_seed)
    cluster = distribute.cluster_config(fn_args)
    strategy = distribute.strategy_for("teacher", DISTRIBUTE_STRATEGIES, cluster.min_shard_bytes)
    cache = inputs.cache_fits(fn_args.train_files, config.cache_train_mb)
    logging.info("Teacher input: %d shown rows a batch; parsed rows cached in memory: %s", config.batch_size, cache)

    def train():
        return inputs.shown_row_batches(fn_args.train_files, config.batch_size, parse_spec=F.training_parse_spec(schema),
                                        shuffle_seed=0, cache=cache)

    with distribute.scope(strategy):
        model = ranker.FactoryFloorRanker(config, common.feature_config(fn_args))
        # The dense normalisers adapt on the first rows in file order (a pipeline of their own: adapting on
        # `train` would fill its shuffle buffer and leave a partial cache).
        model.adapt(inputs.shown_row_batches(fn_args.train_files, 128, parse_spec=F.training_parse_spec(schema)))
        model.compile()
        first = inputs.shown_row_batches(fn_args.train_files, config.batch_size, parse_spec=F.training_parse_spec(schema))
        model.build_train_step(next(iter(first)))  # so that fit traces its step once
        warm = warm_start.restore(model, fn_args, "Trainer.teacher")
    distribute.fit(model, train, strategy, epochs=warm_start.epochs(fn_args, config.epochs, warm),
                   callbacks=common.callbacks(fn_args) + [EpochProgress("teacher", ("loss", "logistic"))])
    warmup = common.warmup_examples(fn_args.eval_files)
    if distribute.is_chief():  # only the chief evaluates
        result = common.evaluate_ctr_model(model, fn_args.eval_files, schema)
        result["schema_path"] = schema_path
        logging.info("Eval metrics: %s", json.dumps(result))
        common.write_eval_metrics(fn_args.model_run_dir, result)
    with distribute.chief_outputs(fn_args) as outputs:  # only the chief's export is kept
        ranker_export.export_ranker(model, outputs.serving_model_dir, warmup, schema=schema)
        warm_start.save(model, outputs)
