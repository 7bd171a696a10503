"""The Kubeflow V2 compile: the KFP JSON names every component and our executors' classes, and it
carries the technique flags of `cascade compile-kubeflow` (the same flags as `cascade run`)."""
import json

from cascade_ranking.pipelines import kubeflow_v2_runner
from cascade_ranking.pipelines.config import PipelineConfig
from cascade_ranking.pipelines.pipeline import create_pipeline


def test_compiled_spec_names_every_component_and_custom_executor(tmp_path):
    config = PipelineConfig(output_dir="gs://bucket/cascade", schema_file="/pipeline/schema/schema.pbtxt")
    path = kubeflow_v2_runner.compile_pipeline(config, str(tmp_path / "pipeline.json"), image="gcr.io/p/cascade:1",
                                               project="p", region="europe-west4")
    spec = json.load(open(path))["pipelineSpec"]
    executors = spec["deploymentSpec"]["executors"]
    node_ids = {c.id for c in create_pipeline(config).components}
    resolvers = {n for n in node_ids if n.startswith("LatestBlessed.")}
    # KFP v2 compiles each LatestBlessedModelStrategy Resolver into two queries (blessing, then model).
    assert {f"{n}_executor" for n in node_ids - resolvers} | {
        f"{n}-{part}-resolver_executor" for n in resolvers for part in ("model", "model-blessing")} == set(executors)
    args = {name: e["container"]["args"] for name, e in executors.items() if "container" in e}
    assert args["SyntheticExampleGen_executor"][:2] == ["--executor_class_path", "cascade_ranking.components.synthetic_example_gen.Executor"]
    assert "cascade_ranking.components.anomaly_gate.AnomalyGate_Executor" in args["AnomalyGate_executor"]
    for node, executor_class in (("NegativeSampler", "cascade_ranking.components.negative_sampler.Executor"),
                                 ("TeacherInference", "cascade_ranking.components.teacher_inference.Executor"),
                                 ("CascadeEvaluator", "cascade_ranking.components.cascade_evaluator.Executor")):
        assert args[f"{node}_executor"][:2] == ["--executor_class_path", executor_class], node
        assert "--runner=DataflowRunner" in args[f"{node}_executor"], node
    # Each stage's Trainer runs its own module's run_fn.
    tasks = spec["root"]["dag"]["tasks"]
    for stage in ("teacher", "retrieval", "cascade"):
        run_fn = tasks[f"Trainer.{stage}"]["inputs"]["parameters"]["run_fn"]["runtimeValue"]["constantValue"]
        assert run_fn["stringValue"] == f"cascade_ranking.models.trainers.{stage}.run_fn", stage
    assert {"Pusher.retrieval_executor", "Pusher.preranking_executor", "Pusher.ranking_executor"} <= set(executors)
    for name, a in args.items():
        assert executors[name]["container"]["image"] == "gcr.io/p/cascade:1"
    for n in resolvers:  # each stage's baseline: the latest blessed ModelBlessing, then its model
        assert "blessed.number_value=1" in json.dumps(executors[f"{n}-model-blessing-resolver_executor"])
    beam = args["StatisticsGen_executor"]
    assert "--runner=DataflowRunner" in beam and "--sdk_container_image=gcr.io/p/cascade:1" in beam
    assert "--region=europe-west4" in beam
    assert json.load(open(path))["runtimeConfig"]["gcsOutputDirectory"] == "gs://bucket/cascade/pipeline_root"


def test_compile_kubeflow_carries_the_technique_flags_into_the_trainers_custom_config(tmp_path):
    from cascade_ranking.pipelines import cli

    out = tmp_path / "pipeline.json"
    assert cli.main(["compile-kubeflow", "--out", str(out), "--rank-loss", "multi_task", "--cascade-method", "icc",
                     "--nonclick-keep-rate", "0.5"]) == 0
    tasks = json.load(open(out))["pipelineSpec"]["root"]["dag"]["tasks"]
    value = tasks["Trainer.cascade"]["inputs"]["parameters"]["custom_config"]["runtimeValue"]["constantValue"]
    custom_config = json.loads(value["stringValue"])
    assert json.loads(custom_config["ranker"])["rank_loss"] == "multi_task"
    assert json.loads(custom_config["cascade"])["method"] == "icc"
    sampler = json.loads(tasks["NegativeSampler"]["inputs"]["parameters"]["config"]["runtimeValue"]["constantValue"]["stringValue"])
    assert sampler["nonclick_keep_rate"] == 0.5


def test_compile_kubeflow_with_vocabulary_features_adds_the_transform_and_feeds_every_trainer(tmp_path):
    """A registry with `lookup: vocabulary` features compiles with the standard Transform (the
    vocabulary preprocessing_fn, analyze on train, nothing materialized) whose transform_graph every
    Trainer reads; the same config with hashed ids has no Transform."""
    import dataclasses

    from cascade_ranking.schema import features as F
    from cascade_ranking.schema import vocabulary

    hashed = PipelineConfig(output_dir="gs://bucket/cascade", schema_file="/pipeline/schema/schema.pbtxt")
    inputs = tuple(dataclasses.replace(f, lookup="vocabulary", buckets=0) if f.name in ("item_id", "user_id") else f
                   for f in hashed.features.inputs)
    config = hashed.replace(features=dataclasses.replace(hashed.features, inputs=inputs))
    tasks = {}
    for name, c in (("hashed", hashed), ("vocabulary", config)):
        path = kubeflow_v2_runner.compile_pipeline(c, str(tmp_path / f"{name}.json"), image="gcr.io/p/cascade:1")
        tasks[name] = json.load(open(path))["pipelineSpec"]["root"]["dag"]["tasks"]
    assert "Transform" not in tasks["hashed"]
    transform = tasks["vocabulary"]["Transform"]["inputs"]["parameters"]
    constant = lambda p: p["runtimeValue"]["constantValue"]
    assert constant(transform["preprocessing_fn"])["stringValue"] == vocabulary.PREPROCESSING_FN
    custom = json.loads(constant(transform["custom_config"])["stringValue"])
    looked_up = {f["name"] for f in json.loads(custom[vocabulary.FEATURES_KEY])["inputs"] if f.get("lookup") == "vocabulary"}
    assert looked_up == {"item_id", "user_id"}
    assert json.loads(constant(transform["splits_config"])["stringValue"]) == {"analyze": ["train"]}
    trainers = [name for name in tasks["vocabulary"] if name.startswith("Trainer.")]
    assert sorted(trainers) == ["Trainer.cascade", "Trainer.retrieval", "Trainer.teacher"]
    for name in trainers:
        graph = tasks["vocabulary"][name]["inputs"]["artifacts"]["transform_graph"]["taskOutputArtifact"]
        assert graph == {"outputArtifactKey": "transform_graph", "producerTask": "Transform"}, name


def _trainer_tasks_and_executors(path):
    spec = json.load(open(path))["pipelineSpec"]
    tasks = spec["root"]["dag"]["tasks"]
    custom = {name: json.loads(t["inputs"]["parameters"]["custom_config"]["runtimeValue"]["constantValue"]["stringValue"])
              for name, t in tasks.items() if name.startswith("Trainer.")}
    executor_classes = {name: spec["deploymentSpec"]["executors"][f"{name}_executor"]["container"]["args"][1]
                        for name in custom}
    return custom, executor_classes


def test_compile_kubeflow_runs_the_cluster_trainers_as_vertex_jobs_with_chief_worker_and_ps_pools(tmp_path):
    """`--set training_cluster...`: the listed Trainers become TFX's Vertex AI Trainer, whose
    custom_config carries the CustomJob of the cluster's worker pools (chief, workers, parameter
    servers) in the compile's image, project and region, beside our own keys; the other Trainer
    stays the plain GenericExecutor Trainer."""
    from tfx.extensions.google_cloud_ai_platform import constants
    from tfx.extensions.google_cloud_ai_platform.trainer import executor as vertex_executor

    from cascade_ranking.models.trainers.distribute import CLUSTER_KEY
    from cascade_ranking.pipelines import cli

    out = tmp_path / "pipeline.json"
    sets = ["--set", "training_cluster.workers=2", "--set", "training_cluster.parameter_servers=1",
            "--set", "training_cluster.trainers=[cascade, teacher]",
            "--set", "training_cluster.parameter_server_machine_type=n1-highmem-16"]
    assert cli.main(["compile-kubeflow", "--out", str(out), "--image", "gcr.io/p/cascade:7", "--project", "p7",
                     "--region", "europe-west4", *sets]) == 0
    config = cli.compile_config(cli.build_parser().parse_args(["compile-kubeflow", "--out", str(out), *sets]))
    cluster = config.training_cluster
    assert (cluster.workers, cluster.parameter_servers, cluster.parameter_server_machine_type) == (2, 1, "n1-highmem-16")
    custom, executor_classes = _trainer_tasks_and_executors(out)
    vertex_class = f"{vertex_executor.GenericExecutor.__module__}.{vertex_executor.GenericExecutor.__name__}"
    for name in ("Trainer.cascade", "Trainer.teacher"):
        assert executor_classes[name] == vertex_class, name
        c = custom[name]
        assert c[constants.ENABLE_VERTEX_KEY] is True
        assert c[constants.VERTEX_REGION_KEY] == "europe-west4"
        job = c[vertex_executor.TRAINING_ARGS_KEY]
        assert job["project"] == "p7"
        pools = job["job_spec"]["worker_pool_specs"]
        assert [(p["machine_spec"]["machine_type"], p["replica_count"]) for p in pools] == [
            (cluster.machine_type, 1), (cluster.machine_type, cluster.workers),
            (cluster.parameter_server_machine_type, cluster.parameter_servers)]
        assert {p["container_spec"]["image_uri"] for p in pools} == {"gcr.io/p/cascade:7"}
        assert all("command" not in p["container_spec"] for p in pools)  # TFX sets run_executor
        # Our own keys travel with the Vertex ones to every replica's GenericExecutor.
        sent = json.loads(c[CLUSTER_KEY])
        assert (sent["workers"], sent["parameter_servers"]) == (cluster.workers, cluster.parameter_servers)
        assert (sent["image"], sent["vertex_project"], sent["vertex_region"]) == ("gcr.io/p/cascade:7", "p7", "europe-west4")
        assert "features" in c
    assert json.loads(custom["Trainer.cascade"]["ranker"])["rank_loss"] == config.ranker.rank_loss
    assert executor_classes["Trainer.retrieval"] == "tfx.components.trainer.executor.GenericExecutor"
    assert CLUSTER_KEY not in custom["Trainer.retrieval"]
    assert not any(k.startswith("ai_platform") for k in custom["Trainer.retrieval"])


def test_compile_kubeflow_multi_worker_mirrored_cluster_has_chief_and_worker_pools_only(tmp_path):
    """workers 3, no parameter servers: a chief and 2 workers (MultiWorkerMirroredStrategy), no ps
    pool; the config's own vertex_region and image win over the compile's."""
    from tfx.extensions.google_cloud_ai_platform import constants
    from tfx.extensions.google_cloud_ai_platform.trainer import executor as vertex_executor

    from cascade_ranking.models.trainers.distribute import ClusterConfig

    cluster = ClusterConfig(workers=3, trainers=("cascade",), machine_type="n1-standard-16",
                            vertex_region="asia-east1", image="gcr.io/p/trainer:3")
    config = PipelineConfig(output_dir="gs://bucket/cascade", schema_file="/pipeline/schema/schema.pbtxt",
                            training_cluster=cluster)
    path = kubeflow_v2_runner.compile_pipeline(config, str(tmp_path / "pipeline.json"), image="gcr.io/p/cascade:1",
                                               project="p", region="europe-west4")
    custom, executor_classes = _trainer_tasks_and_executors(path)
    assert executor_classes["Trainer.cascade"] == "tfx.extensions.google_cloud_ai_platform.trainer.executor.GenericExecutor"
    c = custom["Trainer.cascade"]
    assert c[constants.VERTEX_REGION_KEY] == cluster.vertex_region
    job = c[vertex_executor.TRAINING_ARGS_KEY]
    assert job["project"] == "p"
    assert job["job_spec"]["worker_pool_specs"] == [
        {"machine_spec": {"machine_type": cluster.machine_type}, "replica_count": 1,
         "container_spec": {"image_uri": cluster.image}},
        {"machine_spec": {"machine_type": cluster.machine_type}, "replica_count": cluster.workers - 1,
         "container_spec": {"image_uri": cluster.image}},
    ]
    for name in ("Trainer.teacher", "Trainer.retrieval"):
        assert executor_classes[name] == "tfx.components.trainer.executor.GenericExecutor", name
        assert not any(k.startswith("ai_platform") for k in custom[name]), name


def test_vertex_training_job_needs_an_image_project_and_region():
    import pytest

    from cascade_ranking.models.config import ConfigError
    from cascade_ranking.models.trainers.distribute import ClusterConfig
    from cascade_ranking.pipelines import vertex_training

    cluster = ClusterConfig(workers=2, vertex_project="p", vertex_region="us-central1")
    with pytest.raises(ConfigError, match="training_cluster.image not set"):
        vertex_training.vertex_custom_config(cluster)
    filled = vertex_training.with_compile_defaults(cluster, project="other", region="europe-west4", image="gcr.io/p/c:1")
    assert (filled.vertex_project, filled.vertex_region, filled.image) == ("p", "us-central1", "gcr.io/p/c:1")
    assert len(vertex_training.vertex_custom_config(filled)["ai_platform_training_args"]["job_spec"]["worker_pool_specs"]) == 2
