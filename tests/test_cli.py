"""`cascade` command line: good runs and one-line exit-2 errors for bad arguments."""
import pytest

from cascade_ranking.datasources import example_io
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.pipelines import cli
from tests.cli_runner import run_cli


_run = run_cli


@pytest.mark.parametrize(
    "argv, names",
    [
        (["generate", "--out", "OUT", "--requests", "-5"], "--requests"),
        (["generate", "--out", "OUT", "--requests", "lots"], "--requests"),
        (["generate", "--out", "OUT", "--seed", "-1"], "--seed"),
        (["generate", "--requests", "5"], "--out"),
        (["generate", "--out", "OUT", "--requests", "5", "--drift", "0.3"], "--spans"),
        (["generate", "--out", "OUT", "--requests", "5", "--spans", "2", "--drift", "-1"], "drift"),
        (["generate", "--out", "OUT", "--requests", "5", "--spans", "0"], "--spans"),
        (["convert", "movielens", "--src", "/no/such/dir", "--out", "OUT"], "/no/such/dir"),
        (["convert", "obd", "--src", "/no/such/dir", "--out", "OUT"], "/no/such/dir"),
        (["convert", "netflix", "--src", "x", "--out", "OUT"], "netflix"),
        (["run", "--source", "examples", "--examples-dir", "/no/such/dir"], "/no/such/dir"),
        (["run", "--source", "examples"], "examples_dir"),
        (["run", "--span", "2"], "span 2"),
        (["stream", "--span", "2"], "--span picks one"),
        (["stream", "--drift", "-0.5"], "drift must be in"),
        (["stream", "--source", "examples", "--examples-dir", "EMPTY"], "has no span-<number>/ directories"),
        (["stream", "--source", "examples", "--examples-dir", "EMPTY", "--drift", "0.2"], "--drift shapes synthetic"),
        (["run", "--requests", "0"], "--requests"),
        (["run", "--nonclick-keep-rate", "1.5"], "--nonclick-keep-rate"),
        (["run", "--activation", "sigmoidish"], "sigmoidish"),
        (["run", "--orchestrator", "airflow"], "--orchestrator"),
        (["serve-check", "/no/such/dir"], "/no/such/dir"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, tmp_path, argv, names):
    if "EMPTY" in argv:  # an Examples directory without spans
        from cascade_ranking.datasources import synthetic
        synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=5), str(tmp_path / "flat"))
    argv = [str(tmp_path / "out") if a == "OUT" else str(tmp_path / "flat") if a == "EMPTY" else a for a in argv]
    if argv[0] == "stream" and "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "out")]
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


def test_generate_writes_spans_and_run_reads_the_one_named(capsys, tmp_path):
    out = tmp_path / "spans"
    code, stdout, _ = _run(capsys, "generate", "--out", str(out), "--requests", "6", "--spans", "3", "--drift", "0.2")
    assert code == 0 and "3 spans of 6 requests" in stdout
    for k in (1, 2, 3):
        ids = {ex.features.feature["request_id"].int64_list.value[0]
               for s in ("train", "eval") for ex in example_io.read_examples(str(out / f"span-{k}" / f"Split-{s}"))}
        assert ids == set(range((k - 1) * 6, k * 6))
    config = cli.run_config(cli.build_parser().parse_args(
        ["run", "--source", "examples", "--examples-dir", str(out), "--span", "2"]))
    assert config.span == 2 and config.read_span() == 2 and config.split_root() == str(out / "span-2")
    code, _, err = _run(capsys, "run", "--source", "examples", "--examples-dir", str(out), "--span", "4",
                        "--output-dir", str(tmp_path / "run"))
    assert code == 2 and err.strip().endswith("it has span(s) 1, 2, 3")


def test_stream_of_synthetic_spans_keeps_the_window(capsys, tmp_path, monkeypatch):
    """`cascade stream --spans 2 --window 2`: synthetic data has no spans to window until the stream
    writes them, so the window is checked then and reaches every span's run (runs stubbed)."""
    from cascade_ranking.pipelines import stream

    seen = []

    def run_stream(config, numbers, **_):
        config.validate()
        seen.append((config.source, config.span_window, config.warm_start, list(numbers)))
        empty = dict.fromkeys(stream.METRICS)
        return [{"span": n, "seconds": 1.0, "model": empty, "baseline": empty, "baseline_span": None,
                 "warm_started": []} for n in numbers]

    monkeypatch.setattr(stream, "run_stream", run_stream)
    code, out, _ = _run(capsys, "stream", "--spans", "2", "--requests", "4", "--window", "2", "--set",
                        "warm_start=false", "--output-dir", str(tmp_path / "out"))
    assert code == 0, out
    assert seen == [("examples", 2, False, [1, 2])]
    assert "training window: 2 spans" in out and "warm start: off" in out


@pytest.mark.parametrize("command", [[], ["generate"], ["convert"], ["run"], ["stream"]])
def test_every_subcommand_has_help(capsys, command):
    code, out, _ = _run(capsys, *command, "--help")
    assert code == 0
    assert "usage: cascade" in out


def test_run_flags_switch_the_named_techniques():
    args = cli.build_parser().parse_args([
        "run", "--requests", "300", "--no-distill", "--cascade-method", "hap", "--epochs", "2",
        "--rank-loss", "multi_task", "--activation", "smelu:0.5", "--lspr", "--no-bias-constraints",
        "--nonclick-keep-rate", "0.25", "--low-loss-keep-rate", "0.5", "--beam-mode", "in_process", "--workers", "3",
    ])
    config = cli.run_config(args)
    config.validate()
    assert config.synthetic.num_requests == 300
    assert config.ranker.distill_weight == 0.0 and config.teacher.distill_weight == 0.0
    assert config.cascade.method == "hap" and config.cascade.epochs == 2
    assert (config.ranker.rank_loss, config.ranker.activation) == ("multi_task", "smelu:0.5")
    assert config.ranker.lspr and not config.ranker.bias_constraints
    assert (config.sampler.nonclick_keep_rate, config.sampler.low_loss_keep_rate) == (0.25, 0.5)
    assert config.beam_pipeline_args() == []

    defaults = cli.run_config(cli.build_parser().parse_args(["run"]))
    assert defaults.ranker == RankerConfig.cascade_stage() and defaults.ranker.distill_weight > 0
    assert defaults.cascade.method == "lcron"
    for stage, signature in (("preranking_model", "serving_default"), ("model", "serving_default"),
                             ("retrieval_model", "score")):
        assert defaults.evaluator_config().score_output(stage) == (signature, "score")
    assert defaults.beam_mode == "auto" and defaults.estimated_rows() == 5_000 * 50
    assert defaults.effective_beam_mode() == "in_process" and defaults.beam_pipeline_args() == []
    larger = cli.run_config(cli.build_parser().parse_args(["run", "--requests", "6001"]))  # 300,050 rows
    assert larger.effective_beam_mode() == "multi_processing"
    assert larger.beam_pipeline_args()[0] == "--direct_running_mode=multi_processing"
    assert any(a.startswith("--setup_file=") and a.endswith("setup.py") for a in larger.beam_pipeline_args())
    assert "multi_processing (auto: ~300,050 rows" in larger.beam_mode_label()
    forced = cli.run_config(cli.build_parser().parse_args(["run", "--beam-mode", "multi_processing"]))
    assert forced.effective_beam_mode() == "multi_processing" and forced.beam_mode_label() == "multi_processing"


def test_run_and_compile_kubeflow_build_the_same_pipeline_config_from_the_same_flags():
    flags = ["--requests", "300", "--cascade-method", "icc", "--rank-loss", "multi_task", "--lspr",
             "--nonclick-keep-rate", "0.5", "--epochs", "2", "--no-distill"]
    parser = cli.build_parser()
    local = cli.run_config(parser.parse_args(["run", *flags]))
    kubeflow = cli.compile_config(parser.parse_args(["compile-kubeflow", "--out", "p.json", *flags]))
    for field in ("synthetic", "teacher", "ranker", "retrieval", "cascade", "sampler", "evaluator", "source"):
        assert getattr(local, field) == getattr(kubeflow, field), field
    assert kubeflow.ranker.rank_loss == "multi_task" and kubeflow.cascade.method == "icc"


@pytest.mark.parametrize("case", ["empty_split_dir", "split_without_records", "truncated_gzip"])
def test_unreadable_or_empty_splits_are_one_line_naming_the_split_or_file(capsys, tmp_path, case):
    """Caught before the pipeline starts (`datasources.example_io.check_split_readable`): exit 2, one
    line naming the split directory or the file."""
    import tensorflow as tf

    from cascade_ranking.datasources import synthetic

    data = tmp_path / "data"
    synthetic.write_dataset(synthetic.SyntheticConfig(num_requests=20, seed=1), str(data))
    eval_file = data / "Split-eval" / example_io.RECORD_FILE
    if case == "empty_split_dir":
        eval_file.unlink()
        named = str(data / "Split-eval")
    elif case == "split_without_records":
        eval_file.unlink()
        with tf.io.TFRecordWriter(str(eval_file), options="GZIP"):
            pass
        named = "has no records"
    else:
        content = eval_file.read_bytes()
        eval_file.write_bytes(content[: len(content) // 2])
        named = str(eval_file)
    code, _, err = _run(capsys, "run", "--source", "examples", "--examples-dir", str(data),
                        "--output-dir", str(tmp_path / "out"))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Split-eval" in lines[0], err
    assert not (tmp_path / "out").exists()
