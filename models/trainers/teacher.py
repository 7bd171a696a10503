"""Trainer module of the teacher: the ranker made wider and deeper (`RankerConfig.teacher()`),
whose predictions TeacherInference records for two-pass distillation (Factory Floor §4.1.2).

custom_config: {"ranker": RankerConfig JSON} overrides the teacher defaults.
"""
from models.ranker_config import RankerConfig
from models.trainers import ranking


def run_fn(fn_args) -> None:
    """Called by the TFX Trainer (GenericExecutor)."""
    ranking.train_and_export(fn_args, RankerConfig.teacher())
