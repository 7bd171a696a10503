"""AnomalyGate: stops the pipeline before training when ExampleValidator found anomalies.

TFX's ExampleValidator records anomalies but lets downstream components run. This component
reads its ExampleAnomalies artifact (the `SchemaDiff.pb` of each split) and fails the run with a
message that names every anomalous feature, its short description and its split. Trainers are
made to depend on it, so bad data never reaches training.
"""
import os
from typing import List

from tensorflow_metadata.proto.v0 import anomalies_pb2
from tfx.dsl.component.experimental.annotations import InputArtifact
from tfx.dsl.component.experimental.decorators import component
from tfx.dsl.io import fileio
from tfx.types import artifact_utils, standard_artifacts

ANOMALIES_FILE = "SchemaDiff.pb"


class DataAnomaliesError(RuntimeError):
    """The data does not match the schema."""


def describe_anomalies(anomalies_artifact) -> List[str]:
    """One line per anomaly: `split: feature: short description`."""
    lines = []
    for split in artifact_utils.decode_split_names(anomalies_artifact.split_names):
        path = os.path.join(artifact_utils.get_split_uri([anomalies_artifact], split), ANOMALIES_FILE)
        anomalies = anomalies_pb2.Anomalies()
        with fileio.open(path, "rb") as f:
            anomalies.ParseFromString(f.read())
        for feature, info in sorted(anomalies.anomaly_info.items()):
            lines.append(f"{split}: {feature}: {info.short_description} ({info.description})")
        if anomalies.HasField("dataset_anomaly_info"):
            lines.append(f"{split}: <dataset>: {anomalies.dataset_anomaly_info.description}")
    return lines


@component
def AnomalyGate(anomalies: InputArtifact[standard_artifacts.ExampleAnomalies]) -> None:
    """Raises DataAnomaliesError naming the anomalies, if there are any."""
    lines = describe_anomalies(anomalies)
    if lines:
        raise DataAnomaliesError("data anomalies, training stopped: " + "; ".join(lines))
