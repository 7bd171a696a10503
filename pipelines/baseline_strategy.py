"""The baseline each stage's candidate is evaluated against: the latest blessed model of the stage
that was trained *before* the candidate (a TFX `ResolverStrategy`).

TFX's `LatestBlessedModelStrategy` returns the latest blessed model, whatever the candidate is.
When a rerun takes the Trainer from the cache, its candidate is the model the previous run
blessed, so that strategy hands the Evaluators the candidate itself as the baseline: their inputs
are new, TFX runs them again (the candidate against itself), and the Pushers push it again. Here
the baseline is a function of the candidate (the latest blessed model whose MLMD id is below every
candidate's): a new candidate gets the same baseline as under `LatestBlessedModelStrategy`, and a
cached one gets the baseline it was first evaluated against, so the whole rerun is a cache hit.

Written by hand: TFX has no strategy that relates the baseline to the candidate. Kubeflow V2
compiles only TFX's two stock strategies, so `pipelines.pipeline.latest_blessed` uses this one for
the local runners and `LatestBlessedModelStrategy` for the Kubeflow compile.
"""
from typing import Dict, List, Optional

from tfx import types
from tfx.dsl.components.common import resolver
from tfx.types import artifact_utils

MODEL_KEY, BLESSING_KEY = "model", "model_blessing"
_CURRENT_MODEL_ID, _BLESSED = "current_model_id", "blessed"  # the Evaluators' blessing properties


class BaselineBeforeCandidateStrategy(resolver.ResolverStrategy):
    """Inputs `model` (the candidate: the model this run evaluates) and `model_blessing` (every
    blessing of the stage); outputs as `model` the latest model older than the candidate that a
    blessing blessed, and that blessing as `model_blessing` (both empty when there is none).

    The models are found through the blessings' `current_model_id` (read from MLMD by id), so the
    Resolver needs no channel of all the stage's models beside the candidate's: two channels of one
    producer output confuse TFX's input graph."""

    def resolve_artifacts(self, store, input_dict: Dict[str, List[types.Artifact]]
                          ) -> Optional[Dict[str, List[types.Artifact]]]:
        none = {MODEL_KEY: [], BLESSING_KEY: []}
        candidates = list(input_dict.get(MODEL_KEY, []))
        if not candidates:
            return none
        first = min(a.id for a in candidates)
        blessed = {b.get_int_custom_property(_CURRENT_MODEL_ID): b for b in input_dict.get(BLESSING_KEY, [])
                   if b.get_int_custom_property(_BLESSED) == 1}
        older = sorted((i for i in blessed if 0 < i < first), reverse=True)
        if not older:
            return none
        [model] = store.get_artifacts_by_id([older[0]])
        [model_type] = store.get_artifact_types_by_id([model.type_id])
        return {MODEL_KEY: [artifact_utils.deserialize_artifact(model_type, model)],
                BLESSING_KEY: [blessed[older[0]]]}
