"""The base model a Trainer warm-starts from: the newest model of that Trainer trained on an older
span than the one this run reads (a TFX `ResolverStrategy`, `config={"span": N}`).

TFX's `LatestArtifactStrategy` returns the newest model whatever it was trained on. A rerun of the
same span would then start from the model that span already produced: its Trainer input changes,
the cache cannot answer, and the span is trained twice. Here the base model is a function of the
span: each model's span is the one its Trainer recorded in its warm-start checkpoint
(`models.trainers.warm_start`, `<model>/checkpoint/warm_start.json`), and the newest model of a span
below the run's is taken. A rerun of a span gets the base its first run had (the whole rerun is a
cache hit), and span t always continues from the model of span t−1 or earlier. A model without a
checkpoint (written before warm starts existed) is skipped.

Written by hand: TFX has no strategy that relates a model to the span of the run. Kubeflow V2
compiles only TFX's stock strategies, so the Kubeflow compile has no warm start.
"""
from typing import Dict, List, Optional

from tfx import types
from tfx.dsl.components.common import resolver

from cascade_ranking.models.trainers import warm_start

MODEL_KEY = "model"
INFO_PATH = warm_start.INFO_PATH  # the Trainers' warm-start record, under a Model's uri


def model_span(model: types.Artifact) -> Optional[int]:
    """The span a model was trained on (its warm-start record), None when it has no record."""
    return warm_start.trained_span(model.uri)


class WarmStartStrategy(resolver.ResolverStrategy):
    """Input `model`: every model of one Trainer; output `model`: the newest one trained on a span
    below `span` (empty when there is none: the Trainer trains afresh)."""

    def __init__(self, span: int):
        self._span = int(span)

    def resolve_artifacts(self, store, input_dict: Dict[str, List[types.Artifact]]
                          ) -> Optional[Dict[str, List[types.Artifact]]]:
        older = []
        for model in input_dict.get(MODEL_KEY, []):
            span = model_span(model)
            if span is not None and span < self._span:
                older.append((span, model.id, model))
        return {MODEL_KEY: [max(older, key=lambda t: (t[0], t[1]))[2]] if older else []}
