"""Retrieval: the two-tower model over the whole catalogue (`models.retrieval`, trained by
`models.trainers.retrieval`); scored per candidate by its `score` signature (u·v), since its
serving_default returns the top-K of the corpus. Optional: a 2-stage cascade leaves it out."""
from cascade_ranking.models.stages import Stage, StageTrainer

STAGE = Stage(
    name="retrieval", order=10, label="retrieval", model_input="retrieval_model",
    blessing_output="retrieval_blessing",
    trainer=StageTrainer("retrieval", "cascade_ranking.models.trainers.retrieval.run_fn", config_fields=("retrieval",)),
    score_output=("score", "score"),
)
