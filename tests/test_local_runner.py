"""The local runner's per-component hooks: progress lines and the garbage collection before each."""
import gc
import io
import types
import weakref

import pytest

from tfx.orchestration.portable import launcher

from cascade_ranking.pipelines import local_runner
from cascade_ranking.pipelines.progress import ComponentProgress


def test_collect_and_freeze_frees_dead_cycles_and_freezes_the_live_objects():
    gc.unfreeze()

    class Node:
        pass

    dead = Node()
    dead.self = dead  # a cycle: only the collector frees it
    dead_ref = weakref.ref(dead)
    del dead
    alive = Node()
    local_runner.collect_and_freeze_garbage()
    try:
        assert dead_ref() is None
        assert gc.get_freeze_count() > 0 and alive is not None
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_the_hook_runs_once_as_each_component_starts_before_its_clock(monkeypatch):
    calls = []
    monkeypatch.setattr(launcher.Launcher, "launch", lambda self: calls.append(("launch", self.name)) or "done")
    progress = ComponentProgress(stream=io.StringIO(), before_launch=lambda: calls.append(("hook",)))
    with progress:
        for name in ("A", "B"):
            node = types.SimpleNamespace(name=name, _pipeline_node=types.SimpleNamespace(
                node_info=types.SimpleNamespace(id=name)))
            assert launcher.Launcher.launch(node) == "done"
    assert calls == [("hook",), ("launch", "A"), ("hook",), ("launch", "B")]
    assert [node for node, _, _ in progress.timings] == ["A", "B"]


def test_freed_memory_left_resident_goes_back_to_the_system():
    """Freed blocks between survivors stay resident (the heap cannot shrink past a live block)
    until `release_free_heap` trims them."""
    psutil = pytest.importorskip("psutil")
    process = psutil.Process()
    blocks = [bytes(4000) + bytes([i % 256]) for i in range(60000)]  # about 240 MB
    survivors = blocks[::64]
    del blocks
    gc.collect()
    resident = process.memory_info().rss
    assert not local_runner.release_free_heap(min_free_bytes=2 ** 50)  # not that much free: kept
    if not local_runner.release_free_heap(min_free_bytes=100 * 2 ** 20):
        pytest.skip("no glibc here (or no mallinfo2): malloc_trim is not called")
    assert process.memory_info().rss < resident - 100 * 2 ** 20
    assert len(survivors) == 938
