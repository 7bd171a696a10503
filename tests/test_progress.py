"""The console's component lines (`pipelines.progress`): the start and end lines, and the meter
line of a running Beam component, which counts the bytes its outputs write and lets the text the
component prints pass above it."""
import io
import os
import re
import sys
import time
import types

from tfx.orchestration.portable import launcher
from tfx.proto.orchestration import executable_spec_pb2, pipeline_pb2

from cascade_ranking.pipelines import progress as P


def _launcher(name: str, root: str, beam: bool):
    spec = pipeline_pb2.PipelineRuntimeSpec()
    spec.pipeline_root.field_value.string_value = root
    executor = executable_spec_pb2.BeamExecutableSpec() if beam else executable_spec_pb2.PythonClassExecutableSpec()
    return types.SimpleNamespace(name=name, _pipeline_node=types.SimpleNamespace(node_info=types.SimpleNamespace(id=name)),
                                 _pipeline_runtime_spec=spec, _executor_spec=executor)


def test_a_beam_component_gets_a_meter_of_what_it_writes_and_its_prints_pass_above_it(tmp_path, monkeypatch):
    stream = io.StringIO()
    meters = []

    def launch(self):
        out = os.path.join(str(tmp_path), self.name, "output", "1")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "part-0"), "wb") as f:
            f.write(b"x" * 300_000)
        time.sleep(2.5 * P.METER_INTERVAL)  # the meter's thread updates at least once
        meters.append(sys.stdout)
        print("a line the component prints")
        return "done"

    monkeypatch.setattr(launcher.Launcher, "launch", launch)
    monkeypatch.setattr(sys, "stdout", stream)
    with P.ComponentProgress(stream=stream, meters=True) as progress:
        assert launcher.Launcher.launch(_launcher("Sampler", str(tmp_path), beam=True)) == "done"
        assert launcher.Launcher.launch(_launcher("Trainer.x", str(tmp_path), beam=False)) == "done"
    assert sys.stdout is stream  # restored
    text = stream.getvalue()
    assert "Sampler: 293k" in text and "written" in text  # 300,000 bytes in units of 1,024
    assert re.search(r"Sampler: 293k written[^\r]*\r +\ra line the component prints", text)  # the line cleared first
    lines = [line for line in text.splitlines() if line.startswith("[")]
    assert [line.split("] ")[1].split()[:2] for line in lines] == [["▶", "Sampler"], ["✓", "Sampler"],
                                                                   ["▶", "Trainer.x"], ["✓", "Trainer.x"]]
    assert isinstance(meters[0], P._AboveMeter) and meters[1] is stream  # no meter for a non-Beam component
    assert [node for node, _, _ in progress.timings] == ["Sampler", "Trainer.x"]


def test_no_meter_unless_the_stream_is_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher.Launcher, "launch", lambda self: "done")
    stream = io.StringIO()
    with P.ComponentProgress(stream=stream):
        launcher.Launcher.launch(_launcher("Sampler", str(tmp_path), beam=True))
    assert "written" not in stream.getvalue() and len(stream.getvalue().splitlines()) == 2


def test_bytes_under_counts_every_file_below_a_directory(tmp_path):
    assert P.bytes_under(str(tmp_path / "missing")) == 0
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one").write_bytes(b"1" * 10)
    (tmp_path / "a" / "b" / "two").write_bytes(b"2" * 32)
    assert P.bytes_under(str(tmp_path)) == 42
