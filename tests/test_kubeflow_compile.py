"""The Kubeflow V2 compile: the KFP JSON names every component and our executors' classes."""
import json

from pipelines import kubeflow_v2_runner
from pipelines.config import PipelineConfig
from pipelines.pipeline import create_pipeline


def test_compiled_spec_names_every_component_and_custom_executor(tmp_path):
    config = PipelineConfig(output_dir="gs://bucket/cascade", schema_file="/pipeline/schema/schema.pbtxt")
    path = kubeflow_v2_runner.compile_pipeline(config, str(tmp_path / "pipeline.json"), image="gcr.io/p/cascade:1",
                                               project="p", region="europe-west4")
    spec = json.load(open(path))["pipelineSpec"]
    executors = spec["deploymentSpec"]["executors"]
    node_ids = {c.id for c in create_pipeline(config).components}
    assert {f"{n}_executor" for n in node_ids} == set(executors)
    args = {name: e["container"]["args"] for name, e in executors.items()}
    assert args["SyntheticExampleGen_executor"][:2] == ["--executor_class_path", "components.synthetic_example_gen.Executor"]
    assert "components.anomaly_gate.AnomalyGate_Executor" in args["AnomalyGate_executor"]
    for node, executor_class in (("NegativeSampler", "components.negative_sampler.Executor"),
                                 ("TeacherInference", "components.teacher_inference.Executor"),
                                 ("CascadeEvaluator", "components.cascade_evaluator.Executor")):
        assert args[f"{node}_executor"][:2] == ["--executor_class_path", executor_class], node
        assert "--runner=DataflowRunner" in args[f"{node}_executor"], node
    # Each stage's Trainer runs its own module's run_fn.
    tasks = spec["root"]["dag"]["tasks"]
    for stage in ("teacher", "ranking", "retrieval", "cascade"):
        run_fn = tasks[f"Trainer.{stage}"]["inputs"]["parameters"]["run_fn"]["runtimeValue"]["constantValue"]
        assert run_fn["stringValue"] == f"models.trainers.{stage}.run_fn", stage
    assert {"Pusher.retrieval_executor", "Pusher.preranking_executor", "Pusher.ranking_executor"} <= set(executors)
    for name, a in args.items():
        assert executors[name]["container"]["image"] == "gcr.io/p/cascade:1"
    beam = args["StatisticsGen_executor"]
    assert "--runner=DataflowRunner" in beam and "--sdk_container_image=gcr.io/p/cascade:1" in beam
    assert "--region=europe-west4" in beam
    assert json.load(open(path))["runtimeConfig"]["gcsOutputDirectory"] == "gs://bucket/cascade/pipeline_root"
