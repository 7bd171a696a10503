"""StageModel: one stage of a jointly trained cascade published as its own Model artifact.

The joint cascade Trainer (`cascade_ranking.models.trainers.cascade`) trains pre-ranking and ranking as one
network but serves them apart: its Model artifact holds the ranker in `Format-Serving` and the
pre-ranker in `stages/preranking` (`models.export.stage_model_dir`). A TFX Model artifact has one
serving model, and each stage needs its own evaluation, blessing, baseline (`Resolver` with
`LatestBlessedModelStrategy`) and Pusher; this component copies the stage's SavedModel into a new
Model artifact's `Format-Serving`, so every downstream standard component treats it as any
Trainer's model. Files go through `tfx.dsl.io.fileio` (GCS and S3 work). Written by hand: TFX has
no component that splits a Model artifact.
"""
import os

from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.dsl.io import fileio
from tfx.types import standard_artifacts
from tfx.utils import path_utils

from cascade_ranking.models import export as export_lib


class StageModelMissingError(FileNotFoundError):
    """The Model artifact has no SavedModel for the requested stage."""


def copy_tree(source: str, destination: str) -> int:
    """Copies a directory tree with fileio; returns the number of files copied."""
    count = 0
    fileio.makedirs(destination)
    for name in fileio.listdir(source):
        src, dst = os.path.join(source, name.rstrip("/")), os.path.join(destination, name.rstrip("/"))
        if fileio.isdir(src):
            count += copy_tree(src, dst)
        else:
            fileio.copy(src, dst, overwrite=True)
            count += 1
    return count


@component
def StageModel(model: InputArtifact[standard_artifacts.Model],
               stage_model: OutputArtifact[standard_artifacts.Model],
               stage: Parameter[str]) -> None:
    """Copies `<model>/stages/<stage>` to `<stage_model>/Format-Serving`."""
    source = export_lib.stage_model_dir(path_utils.serving_model_dir(model.uri), stage)
    if not fileio.exists(os.path.join(source, "saved_model.pb")):
        raise StageModelMissingError(f"Model artifact {model.uri} has no SavedModel for stage {stage!r} at {source}")
    copy_tree(source, path_utils.serving_model_dir(stage_model.uri))
    stage_model.set_string_custom_property("stage", stage)
    stage_model.set_string_custom_property("source_model_uri", model.uri)
