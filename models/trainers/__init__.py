"""TFX Trainer modules (`run_fn(fn_args)`, GenericExecutor), one per stage model.

The pipeline names them by dotted path, e.g. `run_fn='cascade_ranking.models.trainers.cascade.run_fn'`, and passes
the stage's configuration as JSON in `custom_config`.
"""
