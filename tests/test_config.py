"""The one config system: the codec (models/config.py) and the config file, --set and
`cascade config` (pipelines/config.py, pipelines/cli.py)."""
import json
import re

import pytest

from cascade_ranking.components.evaluation import EvaluatorConfig
from cascade_ranking.models.config import ConfigError, config_from_dict, merge, to_dict
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.pipelines import cli
from cascade_ranking.pipelines.config import PipelineConfig, dump_config, load_config, parse_override
from tests.cli_runner import run_cli


_main = run_cli


# ---- the codec ----------------------------------------------------------------------------------
def test_every_config_round_trips_through_plain_values():
    config = PipelineConfig().replace(ranker=RankerConfig.cascade_stage(hidden_units=(8, 4)), evaluator=EvaluatorConfig(
        thresholds=(("ranking", "recall_lift", "min", 0.3),), tfma_calibration_range=(0.5, 2.0)))
    plain = to_dict(config)
    assert json.loads(json.dumps(plain)) == plain  # plain JSON values only
    assert plain["ranker"]["hidden_units"] == [8, 4]
    assert plain["evaluator"]["thresholds"] == [["ranking", "recall_lift", "min", 0.3]]
    assert config_from_dict(PipelineConfig, plain) == config


def test_merge_keeps_what_it_does_not_name_and_checks_each_type():
    teacher = merge(RankerConfig.teacher(), {"epochs": 9})
    assert teacher == RankerConfig.teacher().replace(epochs=9)  # the preset's other fields stay
    assert isinstance(merge(RankerConfig(), {"learning_rate": 1}).learning_rate, float)
    for values, named in (
        ({"epochz": 1}, r"unknown RankerConfig field\(s\) x.epochz"),
        ({"epochs": "three"}, r"x.epochs: expected an int, got 'three'"),
        ({"epochs": True}, r"x.epochs: expected an int, got True"),
        ({"hidden_units": 64}, r"x.hidden_units: expected a list, got 64"),
        ({"hidden_units": [64, "a"]}, r"x.hidden_units\[1\]: expected an int"),
        ({"lspr": "yes"}, r"x.lspr: expected a bool"),
        ({"rank_loss": "listwise"}, r"x: rank_loss must be one of"),  # the dataclass's own check
    ):
        with pytest.raises(ConfigError, match=named):
            merge(RankerConfig(), values, "x")


def test_a_union_field_takes_the_first_type_its_value_fits():
    assert merge(PipelineConfig(), {"cascade": {"quota": [50, 30]}}).cascade.quota == (50, 30)
    assert merge(PipelineConfig(), {"cascade": {"quota": 30}}).cascade.quota == 30
    with pytest.raises(ConfigError, match=r"cascade.quota: expected an int, got 'x' or cascade.quota: expected a list"):
        merge(PipelineConfig(), {"cascade": {"quota": "x"}})


def test_a_fixed_length_tuple_needs_its_length():
    with pytest.raises(ConfigError, match=r"evaluator.tfma_calibration_range: expected 2 values, got 3"):
        merge(PipelineConfig(), {"evaluator": {"tfma_calibration_range": [0.1, 2.0, 3.0]}})


# ---- the config file and --set ------------------------------------------------------------------
def test_defaults_then_file_then_set_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("ranker:\n  epochs: 5\n  rank_loss: multi_task\nteacher:\n  epochs: 2\n"
                    "sampler: {list_size: 80, nonclick_keep_rate: 0.5}\ncascade:\n  epochs: 4\n")
    config = load_config(str(path), ["ranker.epochs=7", "cascade.eval_quotas=[40, 25]"])
    assert config.ranker.epochs == 7 and config.ranker.rank_loss == "multi_task"
    assert config.teacher == RankerConfig.teacher().replace(epochs=2)
    assert config.sampler.list_size == 80 and config.cascade.epochs == 4 and config.cascade.eval_quotas == (40, 25)
    args = cli.build_parser().parse_args(["run", "--config", str(path), "--set", "ranker.epochs=7",
                                          "--rank-loss", "none", "--nonclick-keep-rate", "0.25"])
    flagged = cli.run_config(args)
    assert (flagged.ranker.epochs, flagged.ranker.rank_loss) == (7, "none")  # the flag beats the file
    assert (flagged.sampler.nonclick_keep_rate, flagged.sampler.list_size) == (0.25, 80)
    assert flagged.cascade.epochs == 4  # no --epochs flag: the file's value stays


def test_json_config_files_work_too(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"source": "synthetic", "synthetic": {"num_requests": 123}}))
    assert load_config(str(path)).synthetic.num_requests == 123


def test_parse_override_reads_the_value_as_yaml():
    assert parse_override("ranker.hidden_units=[64, 32]") == {"ranker": {"hidden_units": [64, 32]}}
    assert parse_override("ranker.lspr=true") == {"ranker": {"lspr": True}}
    assert parse_override("output_dir=out") == {"output_dir": "out"}


def test_cascade_config_prints_a_config_that_reads_back_to_the_same_run(tmp_path, capsys):
    code, out, _ = _main(capsys, "config", "--set", "ranker.epochs=2", "--requests", "300", "--lspr",
                         "--output-dir", str(tmp_path / "o"))
    assert code == 0
    path = tmp_path / "shown.yaml"
    path.write_text(out)
    expected = cli.run_config(cli.build_parser().parse_args(
        ["run", "--set", "ranker.epochs=2", "--requests", "300", "--lspr", "--output-dir", str(tmp_path / "o")]))
    assert load_config(str(path)) == expected
    assert expected.ranker.epochs == 2 and expected.ranker.lspr and expected.synthetic.num_requests == 300
    assert dump_config(expected) == out


@pytest.mark.parametrize("content,argv,named", [
    ("ranker:\n  epochz: 2\n", (), r"config file .*bad.yaml: unknown RankerConfig field\(s\) ranker.epochz"),
    ("ranker: {epochs: two}\n", (), r"config file .*bad.yaml: ranker.epochs: expected an int, got 'two'"),
    ("ranker: [epochs\n", (), r"config file .*bad.yaml is not YAML or JSON"),
    ("- 1\n- 2\n", (), r"PipelineConfig: expected a mapping"),
    ("", ("--set", "ranker.epochs"), r"--set 'ranker.epochs': expected KEY=VALUE"),
    ("", ("--set", "sampler.list_sise=3"), r"--set sampler.list_sise=3: unknown SamplerConfig field\(s\) sampler.list_sise"),
    ("sampler: {nonclick_keep_rate: 2.0}\n", (), r"sampler: nonclick_keep_rate must be in \(0, 1\], got 2.0"),
    ("cascade: {method: lcronn}\n", (), r"cascade: method must be one of"),
    ("", ("--set", "retrieval.epochs=0"), r"retrieval: epochs must be > 0, got 0"),
    ("synthetic: {num_requests: -3}\n", (), r"synthetic: num_requests must be positive"),
    ("span: 2\n", (), r"span 2: only source 'examples' reads spans"),
    ("span: two\n", (), r"span: expected an int, got 'two'"),
])
def test_a_bad_config_is_one_line_naming_the_file_or_override_and_the_key(tmp_path, capsys, content, argv, named):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    for command in ("run", "config"):
        code, out, err = _main(capsys, command, "--config", str(path), *argv, "--output-dir", str(tmp_path / "out"))
        assert code == 2, (command, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"cascade {command}: error:"), err
        assert re.search(named, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    code, _, err = _main(capsys, "config", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "config file" in err and "nope.yaml does not exist" in err


def test_compile_kubeflow_reads_the_same_config_file(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("ranker: {rank_loss: multi_task}\nsampler: {low_loss_keep_rate: 0.5}\n")
    out = tmp_path / "pipeline.json"
    code, _, err = _main(capsys, "compile-kubeflow", "--out", str(out), "--config", str(path), "--set", "cascade.epochs=3")
    assert code == 0, err
    tasks = json.load(open(out))["pipelineSpec"]["root"]["dag"]["tasks"]
    value = tasks["Trainer.cascade"]["inputs"]["parameters"]["custom_config"]["runtimeValue"]["constantValue"]
    custom_config = json.loads(value["stringValue"])
    assert json.loads(custom_config["ranker"])["rank_loss"] == "multi_task"
    assert json.loads(custom_config["cascade"])["epochs"] == 3
    sampler = json.loads(tasks["NegativeSampler"]["inputs"]["parameters"]["config"]["runtimeValue"]["constantValue"]["stringValue"])
    assert sampler["low_loss_keep_rate"] == 0.5


# ---- cross-field rules --------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,named", [
    (["evaluator.quotas=[40, 20, 30]"], r"evaluator.quotas \[40, 20, 30\]: need one positive quota per stage"),
    (["evaluator.quotas=[50, 30, 20]"], r"retrieval.eval_quota 40 must be the retrieval quota of evaluator.quotas \[50, 30, 20\]: 50"),
    (["evaluator.quotas=[40, 25, 20]"], r"cascade.eval_quotas \[30, 20\] must be the pre-ranking and ranking quotas"),
    (["cascade.quota=70"], r"cascade.quota 70 must be positive and below sampler.list_size 60"),
])
def test_sizes_and_quotas_that_do_not_fit_are_one_line_naming_the_fields(overrides, named):
    with pytest.raises(ConfigError, match=named):
        load_config(None, overrides).validate()


def test_quotas_and_list_size_that_fit_together_validate():
    load_config(None, ["evaluator.quotas=[50, 25, 10]", "retrieval.eval_quota=50", "cascade.eval_quotas=[25, 10]",
                       "sampler.list_size=80", "cascade.quota=70"]).validate()


def test_a_dumped_config_reads_back_equal_as_yaml_and_as_json(tmp_path):
    """Every default round-trips through `cascade config`'s YAML and through JSON, including a float
    in exponent form without a dot (ranker.shampoo_epsilon 1e-06), which PyYAML reads as a string."""
    config = PipelineConfig()
    assert config.ranker.shampoo_epsilon == 1e-6
    as_yaml, as_json = tmp_path / "run.yaml", tmp_path / "run.json"
    as_yaml.write_text(dump_config(config))
    as_json.write_text(json.dumps(to_dict(config)))
    assert load_config(str(as_yaml)) == config and load_config(str(as_json)) == config
    assert load_config(None, ["ranker.shampoo_epsilon=5E-3"]).ranker.shampoo_epsilon == 0.005
    with pytest.raises(ConfigError, match="ranker.shampoo_epsilon: expected a number, got 'small'"):
        load_config(None, ["ranker.shampoo_epsilon=small"])
