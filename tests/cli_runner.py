"""Runs `cascade` in-process, as the CLI tests do: (exit code, stdout, stderr)."""
from cascade_ranking.pipelines import cli


def run_cli(capsys, *argv):
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse exits on its own errors and --help
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
