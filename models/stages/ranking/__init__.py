"""Ranking: the Factory Floor ranker (`models.ranker`, `models.ranking_stage`), trained with the
pre-ranker as one network by `models.trainers.cascade`; it orders by its cascade score and predicts
the CTR, which the TFMA Evaluator gates. Every cascade has it."""
from cascade_ranking.models.stages import Stage, StageTrainer

CASCADE_TRAINER = StageTrainer("cascade", "cascade_ranking.models.trainers.cascade.run_fn",
                               config_fields=("cascade", "ranker"))

STAGE = Stage(
    name="ranking", order=30, label="ranking", model_input="model", blessing_output="blessing",
    trainer=CASCADE_TRAINER, ctr=True, optional=False,
)
