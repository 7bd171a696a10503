"""`cascade` command line: good runs and one-line exit-2 errors for bad arguments."""
import pytest

from datasources import example_io
from pipelines import cli


def _run(capsys, *argv):
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse exits on its own errors and --help
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv, names",
    [
        (["generate", "--out", "OUT", "--requests", "-5"], "--requests"),
        (["generate", "--out", "OUT", "--requests", "lots"], "--requests"),
        (["generate", "--out", "OUT", "--seed", "-1"], "--seed"),
        (["generate", "--requests", "5"], "--out"),
        (["convert", "movielens", "--src", "/no/such/dir", "--out", "OUT"], "/no/such/dir"),
        (["convert", "obd", "--src", "/no/such/dir", "--out", "OUT"], "/no/such/dir"),
        (["convert", "netflix", "--src", "x", "--out", "OUT"], "netflix"),
        (["run", "--source", "examples", "--examples-dir", "/no/such/dir"], "/no/such/dir"),
        (["run", "--source", "examples"], "examples_dir"),
        (["run", "--requests", "0"], "--requests"),
        (["run", "--nonclick-keep-rate", "1.5"], "nonclick_keep_rate"),
        (["run", "--activation", "sigmoidish"], "sigmoidish"),
        (["run", "--orchestrator", "airflow"], "--orchestrator"),
        (["serve-check", "/no/such/dir"], "/no/such/dir"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, tmp_path, argv, names):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    code, _, err = _run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert names in lines[0]
    assert not (tmp_path / "out").exists()


def test_generate_writes_splits(capsys, tmp_path):
    out = tmp_path / "data"
    code, stdout, _ = _run(capsys, "generate", "--out", str(out), "--requests", "12", "--seed", "3")
    assert code == 0
    rows = {s: sum(1 for _ in example_io.read_examples(str(out / f"Split-{s}"))) for s in ("train", "eval")}
    assert rows["train"] + rows["eval"] == 12 * 50
    assert "600 candidate rows" in stdout
    # A second run into the same directory refuses to clobber it, in one line.
    code, _, err = _run(capsys, "generate", "--out", str(out), "--requests", "12")
    assert code == 2 and "exists" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [[], ["generate"], ["convert"], ["run"]])
def test_every_subcommand_has_help(capsys, command):
    code, out, _ = _run(capsys, *command, "--help")
    assert code == 0
    assert "usage: cascade" in out


def test_run_flags_switch_the_named_techniques():
    args = cli.build_parser().parse_args([
        "run", "--requests", "300", "--no-distill", "--preranking", "hap", "--cascade-method", "bce",
        "--rank-loss", "multi_task", "--activation", "smelu:0.5", "--lspr", "--no-bias-constraints",
        "--nonclick-keep-rate", "0.25", "--low-loss-keep-rate", "0.5", "--beam-mode", "in_process", "--workers", "3",
    ])
    config = cli.run_config(args)
    config.validate()
    assert config.synthetic.num_requests == 300
    assert config.ranker.distill_weight == 0.0 and config.teacher.distill_weight == 0.0
    assert config.cascade.distill_weight == 0.0
    assert config.preranking_trainer == "hap" and config.cascade.method == "bce"
    assert (config.ranker.rank_loss, config.ranker.activation) == ("multi_task", "smelu:0.5")
    assert config.ranker.lspr and not config.ranker.bias_constraints
    assert (config.sampler.nonclick_keep_rate, config.sampler.low_loss_keep_rate) == (0.25, 0.5)
    assert config.beam_pipeline_args() == []
    assert config.evaluator_config().score_output("preranking_model") == ("serving_default", "score")

    defaults = cli.run_config(cli.build_parser().parse_args(["run"]))
    assert defaults.ranker.distill_weight > 0 and defaults.cascade.distill_weight > 0
    assert defaults.preranking_trainer == "cascade" and not defaults.cascade.with_retrieval
    assert defaults.evaluator_config().score_output("preranking_model") == ("serving_default", "score/prerank")
    assert defaults.evaluator_config().score_output("retrieval_model") == ("score", "score")
    assert defaults.beam_pipeline_args()[0] == "--direct_running_mode=multi_processing"
    assert any(a.startswith("--setup_file=") and a.endswith("setup.py") for a in defaults.beam_pipeline_args())
