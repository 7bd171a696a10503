"""`cascade` command line: good runs and one-line exit-2 errors for bad arguments."""
import os

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
