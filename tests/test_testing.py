"""kvbm_builder.testing: fakes a user's tests can lean on, each real where it can be."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kvbm_builder import (
    AllocationError,
    KvBlockManager,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
)
from kvbm_builder.config import DiskAllocator, SystemAllocator
from kvbm_builder.testing import FailingAllocator, RecordingAllocator, RecordingEventManager

MODEL = KvManagerModelConfig.builder().num_layers(2).outer_dim(2).page_size(4).inner_dim(8).build()


def manager_with(host: object, disk: object = None) -> KvBlockManager:
    builder = (
        KvBlockManager.builder()
        .runtime(KvManagerRuntimeConfig.builder().worker_id(0).disable_nixl().build())
        .model(MODEL)
        .host_layout(KvManagerLayoutConfig.builder().num_blocks(4).allocator(host).build())  # type: ignore[arg-type]
    )
    if disk is not None:
        builder = builder.disk_layout(KvManagerLayoutConfig.builder().num_blocks(4).allocator(disk).build())  # type: ignore[arg-type]
    return builder.build()


def test_a_recording_allocator_makes_real_memory_and_remembers_it() -> None:
    host = RecordingAllocator(SystemAllocator())
    with manager_with(host) as manager:
        [storage] = host.made
        assert manager.tier("G2").layout is not None
        assert not storage.closed  # type: ignore[attr-defined]
    assert storage.closed  # type: ignore[attr-defined]
    assert host.storage_kind is SystemAllocator.storage_kind


def test_a_failing_allocator_fails_at_the_call_you_choose_and_everything_made_is_released(tmp_path: Path) -> None:
    host = RecordingAllocator(SystemAllocator())
    disk = FailingAllocator(DiskAllocator(directory=str(tmp_path)), fail_at=1, error=OSError(28, "disk full"))
    with pytest.raises(AllocationError, match="disk full"):
        manager_with(host, disk)
    assert disk.calls == 1 and disk.made == []
    assert [storage.closed for storage in host.made] == [True]  # type: ignore[attr-defined]
    assert list(tmp_path.iterdir()) == []


def test_a_failing_allocator_allocates_until_its_turn() -> None:
    allocator = FailingAllocator(SystemAllocator(), fail_at=3, error=MemoryError("third"))
    first, second = allocator.allocate(4096), allocator.allocate(4096)
    with pytest.raises(MemoryError, match="third"):
        allocator.allocate(4096)
    assert allocator.made == [first, second] and allocator.calls == 3
    for storage in allocator.made:
        storage.close()  # type: ignore[attr-defined]


def test_the_recording_event_manager_keeps_kind_and_event_in_order() -> None:
    events = RecordingEventManager()
    events.on_store({"hash": 1})
    events.on_remove("anything goes")
    assert events.events == [("store", {"hash": 1}), ("remove", "anything goes")]
    assert events.stored() == [{"hash": 1}] and events.removed() == ["anything goes"]
    events.clear()
    assert events.events == []


def test_the_recording_event_manager_loses_nothing_across_threads() -> None:
    events = RecordingEventManager()

    def store(worker: int) -> None:
        for i in range(500):
            events.on_store((worker, i))

    threads = [threading.Thread(target=store, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(events.stored()) == sorted((w, i) for w in range(4) for i in range(500))
    for w in range(4):  # each thread's events stay in its order
        assert [e for e in events.stored() if e[0] == w] == [(w, i) for i in range(500)]
