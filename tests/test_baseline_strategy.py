"""`pipelines.baseline_strategy.BaselineBeforeCandidateStrategy` on an in-memory MLMD store: the
latest blessed model older than the candidate, whatever is newer or unblessed."""
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2
from tfx.types import standard_artifacts

from cascade_ranking.pipelines.baseline_strategy import BLESSING_KEY, MODEL_KEY, BaselineBeforeCandidateStrategy


def _store():
    config = metadata_store_pb2.ConnectionConfig()
    config.fake_database.SetInParent()
    return metadata_store.MetadataStore(config)


def _put(store, artifact):
    [artifact.id] = store.put_artifacts([artifact.mlmd_artifact])
    return artifact


def _model(store, uri):
    model = standard_artifacts.Model()
    model.uri = uri
    type_id = store.put_artifact_type(model.artifact_type)
    model.type_id = type_id
    model.artifact_type.id = type_id
    return _put(store, model)


def _blessing(store, model_id, blessed):
    blessing = standard_artifacts.ModelBlessing()
    blessing.uri = f"/blessing/{model_id}"
    blessing.type_id = store.put_artifact_type(blessing.artifact_type)
    blessing.set_int_custom_property("current_model_id", model_id)
    blessing.set_int_custom_property("blessed", int(blessed))
    return _put(store, blessing)


def test_the_baseline_is_the_latest_blessed_model_older_than_the_candidate():
    store = _store()
    m1, m2, m3, m4 = (_model(store, f"/model/{i}") for i in range(1, 5))
    blessings = [_blessing(store, m1.id, True), _blessing(store, m2.id, True), _blessing(store, m3.id, False),
                 _blessing(store, m4.id, True)]
    strategy = BaselineBeforeCandidateStrategy()

    def baseline(candidate):
        result = strategy.resolve_artifacts(store, {MODEL_KEY: [candidate], BLESSING_KEY: blessings})
        assert len(result[MODEL_KEY]) == len(result[BLESSING_KEY]) <= 1
        return (result[MODEL_KEY][0].uri, result[BLESSING_KEY][0].uri) if result[MODEL_KEY] else None

    assert baseline(m4) == ("/model/2", f"/blessing/{m2.id}")  # m3 is not blessed
    assert baseline(m3) == ("/model/2", f"/blessing/{m2.id}")
    assert baseline(m2) == ("/model/1", f"/blessing/{m1.id}")  # a cached m2 keeps its first baseline
    assert baseline(m1) is None  # the first model has none, even though later ones were blessed
    empty = strategy.resolve_artifacts(store, {MODEL_KEY: [], BLESSING_KEY: blessings})
    assert empty == {MODEL_KEY: [], BLESSING_KEY: []}
