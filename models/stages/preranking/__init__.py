"""Pre-ranking: the light HAP pre-ranker (`models.preranking`), trained with the ranker as one
network (`models.trainers.cascade`, LCRON) and served on its own: the cascade Trainer's Model holds
it at `stages/preranking`, which `StageModel.preranking` publishes."""
from cascade_ranking.models.stages import Stage
from cascade_ranking.models.stages.ranking import CASCADE_TRAINER

STAGE = Stage(
    name="preranking", order=20, label="pre-ranking", model_input="preranking_model",
    blessing_output="preranking_blessing", trainer=CASCADE_TRAINER, extracted=True,
)
