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
