"""Offload and onboard through the GPU tier (G1): device -> host -> disk and back, byte for byte. Needs a CUDA GPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from kvbm_builder import FullyContiguous, LayerSeparate, Tier
from kvbm_builder.config.settings import KvbmSettings
from kvbm_builder.testing import RecordingEventManager
from kvbm_builder.transfer import TransferError
from tests.offload_helpers import (
    assert_events_alternate,
    assert_tier_holds_right_data,
    block_nbytes,
    content,
    fill_and_register,
    make_manager,
    put_on_disk,
    read_block,
)
from tests.test_offload import BrokenFd, hashes_of, release

pytestmark = pytest.mark.gpu

PROMPT = list(range(5000, 5064))  # 16 blocks of 4 tokens


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "system"])
@pytest.mark.parametrize(
    "device_layout",
    [FullyContiguous(), LayerSeparate(outer_contiguous=True), LayerSeparate(outer_contiguous=False)],
    ids=["fc", "ls-outer", "ls-block"],
)
def test_device_blocks_reach_host_and_disk_and_come_back(tmp_path: Path, device_layout: Any, pinned: bool) -> None:
    events = RecordingEventManager()
    with make_manager(
        tmp_path, device=24, host=20, disk=32, pinned=pinned, device_layout=device_layout, event_manager=events
    ) as manager:
        assert manager.offload_manager.offload_target(Tier.G1) is Tier.G2
        held = fill_and_register(manager, Tier.G1, PROMPT, shuffle=3)
        assert len(manager.offload_sync(held).offloaded) == 16
        manager.wait_idle()  # the host copies are then offered to the disk
        hashes = hashes_of(manager, PROMPT)
        assert assert_tier_holds_right_data(manager, Tier.G2, hashes) == 16
        assert assert_tier_holds_right_data(manager, Tier.G3, hashes) == 16
        release(held)

        manager.pool(Tier.G1).reset_inactive()
        manager.pool(Tier.G2).reset_inactive()
        with manager.match(PROMPT) as found:
            assert (len(found.device), len(found.host), len(found.disk)) == (0, 0, 16)
            back = manager.onboard_sync(found.disk)  # disk -> GPU, staged through pinned memory (no GDS needed)
        size = block_nbytes(manager)
        for block in back:
            assert read_block(manager, Tier.G1, block.block_id) == content(block.sequence_hash, size)
        release(back)

        manager.pool(Tier.G1).reset_inactive()
        with manager.match(PROMPT[:32]) as found:
            half = manager.onboard_sync(found.disk[:4], to="G2")  # disk -> host ...
        again = manager.onboard_sync(half)  # ... -> GPU
        for block in again:
            assert read_block(manager, Tier.G1, block.block_id) == content(block.sequence_hash, size)
        release(half)
        release(again)
    assert_events_alternate(events)


def test_one_onboard_takes_blocks_of_the_host_and_the_disk_at_once(tmp_path: Path) -> None:
    with make_manager(tmp_path, device=24, host=20, disk=32, pinned=True) as manager:
        put_on_disk(manager, Tier.G1, PROMPT[:32])  # eight blocks, on disk only
        with manager.match(PROMPT[:32]) as found:
            release(manager.onboard_sync(found.disk[2:5], to="G2"))  # three of them on the host too, inactive
        with manager.match(PROMPT[:32]) as found:
            assert (len(found.host), len(found.disk)) == (0, 8)  # a match continues where the tier above stopped
            host_part = manager.pool(Tier.G2).match(hashes_of(manager, PROMPT[:32])[2:5])
            mixed = [*found.disk[:2], *host_part, *found.disk[5:]]  # disk, host, disk: in prefix order
            back = manager.onboard_sync(mixed)
            again = manager.onboard_sync(mixed)  # now all on the device: matched there, not copied
        assert [b.sequence_hash for b in back] == hashes_of(manager, PROMPT[:32])
        assert [b.block_id for b in again] == [b.block_id for b in back]
        size = block_nbytes(manager)
        for block in back:
            assert read_block(manager, Tier.G1, block.block_id) == content(block.sequence_hash, size)
        release(host_part)
        release(back)
        release(again)


def test_without_a_host_tier_the_gpu_offloads_to_disk(tmp_path: Path) -> None:
    with make_manager(tmp_path, device=8, host=0, disk=16) as manager:
        assert manager.offload_manager.offload_target(Tier.G1) is Tier.G3
        held = fill_and_register(manager, Tier.G1, PROMPT[:16])
        assert manager.offload_sync(held).dst_tier is Tier.G3
        assert assert_tier_holds_right_data(manager, Tier.G3, hashes_of(manager, PROMPT[:16])) == 4
        release(held)


def test_bypassing_the_cpu_cache_sends_gpu_blocks_straight_to_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_GB", "1")
    monkeypatch.delenv("DYN_KVBM_CPU_CACHE_GB", raising=False)
    monkeypatch.delenv("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", raising=False)
    with make_manager(tmp_path, device=8, host=8, disk=16) as manager:
        assert manager.offload_manager.offload_target(Tier.G1) is Tier.G3
        held = fill_and_register(manager, Tier.G1, PROMPT[:16])
        manager.offload_sync(held)
        assert manager.pool(Tier.G2).counts().registered == 0
        assert assert_tier_holds_right_data(manager, Tier.G3, hashes_of(manager, PROMPT[:16])) == 4
        release(held)


def test_the_disk_filter_lets_a_host_block_through_on_its_second_arrival(tmp_path: Path) -> None:
    with make_manager(tmp_path, device=8, host=8, disk=16, settings=KvbmSettings()) as manager:
        held = fill_and_register(manager, Tier.G1, PROMPT[:8])
        manager.offload_sync(held)
        manager.wait_idle()
        assert manager.pool(Tier.G3).counts().registered == 0  # seen once: not written to disk
        manager.pool(Tier.G2).reset_inactive()
        manager.offload_sync(held)
        manager.wait_idle()
        assert assert_tier_holds_right_data(manager, Tier.G3, hashes_of(manager, PROMPT[:8])) == 2
        release(held)


def test_a_failed_disk_to_gpu_copy_registers_nothing_on_the_gpu(tmp_path: Path) -> None:
    with make_manager(tmp_path, device=8, host=0, disk=16) as manager:
        put_on_disk(manager, Tier.G1, PROMPT[:16])
        disk = manager.tier(Tier.G3).storages[0]
        with manager.match(PROMPT[:16]) as found:
            with BrokenFd(disk, os.O_WRONLY), pytest.raises(TransferError) as caught:
                manager.onboard_sync(found.disk)
            assert (caught.value.src_tier, caught.value.dst_tier) == (Tier.G3, Tier.G1)
            counts = manager.pool(Tier.G1).counts()
            assert (counts.free, counts.registered) == (8, 0)
            back = manager.onboard_sync(found.disk)
        assert assert_tier_holds_right_data(manager, Tier.G1, hashes_of(manager, PROMPT[:16])) == 4
        release(back)


def test_closing_with_device_transfers_in_flight_settles_everything(tmp_path: Path) -> None:
    events = RecordingEventManager()
    settings = KvbmSettings(disk_offload_filter=False, max_transfer_batch_size=2, max_concurrent_transfers=1)
    manager = make_manager(tmp_path, device=16, host=16, disk=32, settings=settings, event_manager=events)
    held = fill_and_register(manager, Tier.G1, PROMPT)
    pending = manager.offload(held)
    manager.close()
    assert pending.done()
    assert_events_alternate(events)
    release(held)
