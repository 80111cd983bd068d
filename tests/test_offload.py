"""Offload and onboard by example, on this machine: a system-memory host tier (G2) and a real disk tier (G3).

Every test checks bytes: each block holds data derived from its hash, written and read back region by region, so a
block registered under the wrong data, or a slot left behind by a failure, shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm_builder import DiskAllocator, FullyContiguous, KvManagerRuntimeConfig, LayerSeparate, Tier
from kvbm_builder.blocks import BlockPool, FrequencyFilter, StoreEvent, token_blocks
from kvbm_builder.config.runtime import CancellationToken
from kvbm_builder.config.settings import KvbmSettings
from kvbm_builder.errors import OffloadError, PoolClosedError, PoolExhaustedError
from kvbm_builder.layout import Layout, LayoutSpec
from kvbm_builder.offload import Lookup, OffloadManager, OffloadSkipped, SkipReason
from kvbm_builder.testing import RecordingEventManager
from kvbm_builder.transfer import TransferEngine, TransferError, TransferRecord
from tests.offload_helpers import (
    MODEL_DIMS,
    assert_events_alternate,
    assert_tier_holds_right_data,
    block_nbytes,
    content,
    engine_threads,
    fill_and_register,
    make_manager,
    put_on_disk,
    read_block,
    read_layout_block,
    write_layout_block,
)

PROMPT = list(range(1000, 1032))  # 8 blocks of 4 tokens


def hashes_of(manager: Any, tokens: list[int]) -> list[int]:
    return [b.sequence_hash for b in manager.token_blocks(tokens)]


def release(blocks: Any) -> None:
    for block in blocks:
        block.release()


@pytest.mark.parametrize(
    ("host_layout", "disk_layout"),
    [
        (FullyContiguous(), FullyContiguous()),
        (LayerSeparate(outer_contiguous=True), FullyContiguous()),
        (FullyContiguous(), LayerSeparate(outer_contiguous=False)),
    ],
    ids=["fc-fc", "ls-outer-fc", "fc-ls-block"],
)
def test_blocks_go_to_disk_and_come_back_byte_for_byte(tmp_path: Path, host_layout: Any, disk_layout: Any) -> None:
    with make_manager(tmp_path, host=10, disk=16, host_layout=host_layout, disk_layout=disk_layout) as manager:
        held = fill_and_register(manager, Tier.G2, PROMPT, shuffle=1)  # slots out of order, not contiguous
        result = manager.offload_sync(held)
        assert result.offloaded == tuple(hashes_of(manager, PROMPT))
        release(held)
        assert assert_tier_holds_right_data(manager, Tier.G3, hashes_of(manager, PROMPT)) == 8

        manager.pool(Tier.G2).reset_inactive()  # the host copies are gone; the disk ones stay
        with manager.match(PROMPT) as found:
            assert (len(found.host), len(found.disk)) == (0, 8)
            back = manager.onboard_sync(found.disk, to="G2")
        assert [b.sequence_hash for b in back] == hashes_of(manager, PROMPT)
        size = block_nbytes(manager)
        for block in back:
            assert read_block(manager, Tier.G2, block.block_id) == content(block.sequence_hash, size)
        release(back)


def test_a_prefix_is_matched_across_tiers_and_counted(tmp_path: Path) -> None:
    with make_manager(tmp_path, host=8, disk=16) as manager:
        release(fill_and_register(manager, Tier.G2, PROMPT[:16]))  # blocks 0-3 in host
        first = manager.token_blocks(PROMPT)
        in_host = manager.pool(Tier.G2).match([b.sequence_hash for b in first[:4]])
        manager.offload_sync(in_host)
        release(in_host)
        lookups: list[Any] = []
        manager.add_listener(lambda event: lookups.append(event) if isinstance(event, Lookup) else None)
        with manager.match([*PROMPT[:16], 5, 5, 5, 5]) as found:  # 4 blocks in host (and disk), then a miss
            assert (len(found.host), len(found.disk), found.matched_tokens) == (4, 0, 16)
        manager.pool(Tier.G2).reset_inactive()
        with manager.match(PROMPT[:18]) as found:  # now only the disk has them; 2 tokens of tail
            assert (len(found.host), len(found.disk), found.requested_tokens) == (0, 4, 18)
        stats = manager.stats()
        assert (stats.lookups, stats.requested_tokens) == (2, 20 + 18)
        assert stats.matched_tokens == {Tier.G2: 16, Tier.G3: 16}
        assert lookups[-1] == Lookup(18, {Tier.G2: 0, Tier.G3: 16})


def test_an_offload_skips_what_the_target_holds_and_that_is_no_filter_sighting(tmp_path: Path) -> None:
    seen = FrequencyFilter(flush_interval=3600)
    with make_manager(tmp_path, host_filter=seen) as manager:
        held = fill_and_register(manager, Tier.G2, PROMPT[:8])
        assert manager.offload_sync(held).filtered == tuple(hashes_of(manager, PROMPT[:8]))  # first sighting
        assert manager.offload_sync(held).offloaded == tuple(hashes_of(manager, PROMPT[:8]))  # second: written
        counts = [seen.count(h) for h in hashes_of(manager, PROMPT[:8])]
        again = manager.offload_sync(held)
        assert again.already_present == tuple(hashes_of(manager, PROMPT[:8]))
        assert [seen.count(h) for h in hashes_of(manager, PROMPT[:8])] == counts  # not counted
        release(held)
    assert not seen.running  # the manager started it and stopped it


def test_the_default_filter_guards_the_disk_unless_the_settings_turn_it_off(tmp_path: Path) -> None:
    with make_manager(tmp_path, settings=KvbmSettings()) as manager:
        assert isinstance(manager.offload_manager.offload_filter(Tier.G2), FrequencyFilter)
        held = fill_and_register(manager, Tier.G2, PROMPT[:8])
        assert len(manager.offload_sync(held).filtered) == 2
        release(held)
    with make_manager(tmp_path, settings=KvbmSettings(disk_offload_filter=False)) as manager:
        assert manager.offload_manager.offload_filter(Tier.G2) is None


def test_settings_come_from_the_environment_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_MAX_TRANSFER_BATCH_SIZE", "3")
    monkeypatch.setenv("DYN_KVBM_MAX_CONCURRENT_TRANSFERS", "2")
    monkeypatch.setenv("DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER", "1")
    from kvbm_builder import KvBlockManager

    config = make_manager(tmp_path).config
    with KvBlockManager(config) as manager:
        engine = manager.offload_manager.engine
        assert (engine.max_batch_blocks, engine.max_concurrent) == (3, 2)
        assert manager.settings.disk_offload_filter is False
        assert manager.offload_manager.offload_filter(Tier.G2) is None


def test_a_full_target_skips_the_offload_and_says_so(tmp_path: Path) -> None:
    with make_manager(tmp_path, host=8, disk=2) as manager:
        skipped: list[Any] = []
        manager.add_listener(lambda event: skipped.append(event) if isinstance(event, OffloadSkipped) else None)
        busy = manager.allocate(Tier.G3, 2)  # the whole disk tier is in use
        held = fill_and_register(manager, Tier.G2, PROMPT[:12])
        result = manager.offload_sync(held)
        assert result.offloaded == () and result.target_full == tuple(hashes_of(manager, PROMPT[:12]))
        assert manager.stats().skipped == {(Tier.G2, Tier.G3, SkipReason.TARGET_FULL): 3}
        assert [e.reason for e in skipped] == [SkipReason.TARGET_FULL] * 3
        release(busy)
        assert manager.offload_sync(held).offloaded == tuple(hashes_of(manager, PROMPT[:8]))  # two slots: two blocks
        release(held)


def test_a_full_target_refuses_an_onboard_and_changes_nothing(tmp_path: Path) -> None:
    with make_manager(tmp_path, host=4, disk=8) as manager:
        put_on_disk(manager, Tier.G2, PROMPT[:16])
        busy = manager.allocate(Tier.G2, 2)  # two of the four host blocks are in use
        with manager.match(PROMPT[:16]) as found:
            with pytest.raises(PoolExhaustedError, match=r"host tier \(G2\) has 2 free and 0 evictable"):
                manager.onboard_sync(found.disk, to=Tier.G2)
            counts = manager.pool(Tier.G2).counts()
            assert (counts.free, counts.active, counts.registered) == (2, 2, 0)
        release(busy)


def test_queued_blocks_go_by_priority_then_first_come(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = KvbmSettings(disk_offload_filter=False, max_transfer_batch_size=1, max_concurrent_transfers=1)
    with make_manager(tmp_path, settings=settings) as manager:
        held = fill_and_register(manager, Tier.G2, PROMPT[:24])
        for block, priority in zip(held, [0, 5, 0, 9, 5, 0], strict=True):
            block.set_priority(priority)
        # the order is what the engine is asked to copy: the engine starts its next batch before it reports the
        # last one, so two completions (and their events) may be reported in either order
        engine = manager.offload_manager.engine
        submitted: list[int] = []
        real_submit = engine.submit

        def submit(src: Layout, src_blocks: Any, dst: Layout, dst_blocks: Any) -> Any:
            submitted.extend(int(b) for b in src_blocks)
            return real_submit(src, src_blocks, dst, dst_blocks)

        monkeypatch.setattr(engine, "submit", submit)
        manager.offload_sync(held)
        # one block a submit: priorities 9, 5, 5, 0, 0, 0, first come first within a priority
        assert submitted == [held[i].block_id for i in (3, 1, 4, 0, 2, 5)]
        assert assert_tier_holds_right_data(manager, Tier.G3, [b.sequence_hash for b in held]) == 6
        release(held)


def test_an_offload_goes_as_few_engine_submits_as_the_batch_settings_allow(tmp_path: Path) -> None:
    records: list[Any] = []
    settings = KvbmSettings(disk_offload_filter=False, max_transfer_batch_size=2, max_concurrent_transfers=2)
    with make_manager(tmp_path, host=16, disk=16, settings=settings) as manager:
        manager.add_listener(lambda event: records.append(event) if isinstance(event, TransferRecord) else None)
        held = fill_and_register(manager, Tier.G2, list(range(40)), shuffle=4)  # ten blocks
        assert len(manager.offload_sync(held).offloaded) == 10
        # at most max_concurrent batches of max_transfer_batch_size blocks per submit: 4 + 4 + 2
        assert sorted(r.num_blocks for r in records) == [2, 4, 4]
        assert assert_tier_holds_right_data(manager, Tier.G3, [b.sequence_hash for b in held]) == 10
        release(held)
        records.clear()
        with make_manager(tmp_path, host=64, disk=64) as wide:  # the defaults: 16 blocks a batch, 4 in flight
            wide.add_listener(lambda event: records.append(event) if isinstance(event, TransferRecord) else None)
            held = fill_and_register(wide, Tier.G2, list(range(64 * 4)))
            assert len(wide.offload_sync(held).offloaded) == 64
            release(held)
        assert [r.num_blocks for r in records] == [64]  # one submit; the engine overlaps its four batches


def test_a_hash_offered_twice_in_one_offload_is_copied_once(tmp_path: Path) -> None:
    with make_manager(tmp_path) as manager:
        held = fill_and_register(manager, Tier.G2, PROMPT[:8])
        twice = [held[0], held[1], held[0]]
        result = manager.offload_sync(twice)
        assert result.offloaded == tuple(hashes_of(manager, PROMPT[:8]))
        assert result.in_flight == (held[0].sequence_hash,)
        assert manager.pool(Tier.G3).counts().registered == 2
        release(held)


def test_a_partly_full_target_takes_the_first_blocks_and_counts_the_rest(tmp_path: Path) -> None:
    with make_manager(tmp_path, host=8, disk=4) as manager:
        h = hashes_of(manager, PROMPT[:20])
        held = fill_and_register(manager, Tier.G2, PROMPT[:20])  # five blocks
        manager.offload_sync(held[:1])  # the first is on disk already, and kept there
        busy = [*manager.allocate(Tier.G3, 1), *manager.pool(Tier.G3).match(h[:1])]  # two slots left
        result = manager.offload_sync(held)
        assert (result.already_present, result.offloaded, result.target_full) == ((h[0],), tuple(h[1:3]), tuple(h[3:]))
        assert manager.stats().skipped[(Tier.G2, Tier.G3, SkipReason.TARGET_FULL)] == 2
        assert assert_tier_holds_right_data(manager, Tier.G3, h) == 3
        release(busy)
        release(held)


def test_store_events_for_disk_copies_carry_the_blocks(tmp_path: Path) -> None:
    events = RecordingEventManager()
    with make_manager(tmp_path, event_manager=events) as manager:
        held = fill_and_register(manager, Tier.G2, PROMPT[:8])
        manager.offload_sync(held)
        on_disk = [e for e in events.stored() if e.tier is Tier.G3]
        first, second = manager.token_blocks(PROMPT[:8])
        assert on_disk[1] == StoreEvent(
            sequence_hash=second.sequence_hash,
            parent_hash=first.sequence_hash,
            tokens=tuple(PROMPT[4:8]),
            block_size=4,
            tier=Tier.G3,
            block_id=on_disk[1].block_id,
            local_hash=second.local_hash,
        )
        release(held)
    assert {e.sequence_hash for e in events.removed()} == {e.sequence_hash for e in events.stored()}


def test_the_listener_sees_every_transfer_record(tmp_path: Path) -> None:
    records: list[Any] = []
    with make_manager(tmp_path) as manager:
        manager.add_listener(lambda event: records.append(event) if isinstance(event, TransferRecord) else None)
        held = fill_and_register(manager, Tier.G2, PROMPT[:8])
        manager.offload_sync(held)
        manager.wait_idle()
        release(held)
        stats = manager.stats()
    assert stats.moved_blocks == {(Tier.G2, Tier.G3): 2}
    assert stats.moved_bytes == {(Tier.G2, Tier.G3): 2 * block_nbytes(manager)}
    assert sum(r.num_blocks for r in records) == 2 and all(r.ok for r in records)


def test_the_configs_kvbm_metrics_count_what_the_manager_moves_skips_and_finds(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from kvbm_builder.metrics import KvbmMetrics

    registry = CollectorRegistry()
    with KvbmMetrics(registry) as metrics:
        with make_manager(tmp_path, host=8, disk=2, kvbm_metrics=metrics) as manager:
            held = fill_and_register(manager, Tier.G2, PROMPT[:12])
            manager.offload_sync(held)  # two fit on the disk, the third finds it full
            release(held)
            manager.match(PROMPT[:16]).release()  # 12 of 16 tokens in the host tier
            value = registry.get_sample_value
            assert value("kvbm_offload_blocks_h2d_total") == 2
            assert value("kvbm_offload_skipped_blocks_total", {"dst_tier": "G3", "reason": "tier_full"}) == 1
            assert value("kvbm_requested_tokens_total") == 16
            assert value("kvbm_tier_matched_tokens_total", {"tier": "G2"}) == 12
            assert value("kvbm_tier_blocks", {"tier": "G3", "state": "inactive"}) == 2
            assert value("kvbm_tier_allocated_bytes", {"tier": "G3"}) == manager.tier(Tier.G3).nbytes
        assert value("kvbm_tier_allocated_bytes", {"tier": "G3"}) == 0


def test_onboard_can_be_awaited(tmp_path: Path) -> None:
    with make_manager(tmp_path) as manager:
        put_on_disk(manager, Tier.G2, PROMPT[:8])

        async def bring_back() -> list[Any]:
            with manager.match(PROMPT[:8]) as found:
                return await manager.onboard(found.disk, to="G2")

        back = asyncio.run(bring_back())
        assert [b.tier for b in back] == [Tier.G2, Tier.G2]
        release(back)


def test_misuse_is_an_offload_error(tmp_path: Path) -> None:
    with make_manager(tmp_path) as manager, make_manager(tmp_path) as other:
        held = fill_and_register(manager, Tier.G2, PROMPT[:8])
        theirs = fill_and_register(other, Tier.G2, PROMPT[:4])
        with pytest.raises(OffloadError, match="another manager"):
            manager.offload(theirs)
        manager.offload_sync(held)
        on_disk = manager.pool(Tier.G3).match(hashes_of(manager, PROMPT[:8]))
        with pytest.raises(OffloadError, match="last tier"):
            manager.offload(on_disk)
        with pytest.raises(OffloadError, match="one tier at a time"):
            manager.offload([held[0], on_disk[0]])
        with pytest.raises(OffloadError, match="moves blocks up"):
            manager.onboard(held, to="G2")
        with pytest.raises(OffloadError, match="not configured"):
            manager.onboard(on_disk, to="G1")
        release(on_disk)
        held[0].release()
        with pytest.raises(OffloadError, match="was released"):
            manager.offload(held)
        held[1].release()
        release(theirs)


def test_one_onboard_takes_blocks_of_two_tiers_and_of_the_target_at_once(tmp_path: Path) -> None:
    # the device tier's part played by system memory (the copies are host and disk ones), so that this runs here
    from kvbm_builder.storage import allocate_disk, allocate_system

    spec = LayoutSpec(num_blocks=8, layout_type=FullyContiguous(), alignment=1, **MODEL_DIMS)
    layouts = {
        Tier.G1: Layout(spec, [allocate_system(spec.allocation_bytes)]),
        Tier.G2: Layout(spec, [allocate_system(spec.allocation_bytes)]),
        Tier.G3: Layout(spec, [allocate_disk(spec.allocation_bytes, DiskAllocator(directory=str(tmp_path)))]),
    }
    pools = {tier: BlockPool(tier, 8, block_size=4) for tier in layouts}
    blocks = token_blocks(list(range(24)), 4)  # six blocks, on disk, on the host, and one on the "device" too
    homes = [Tier.G3, Tier.G3, Tier.G2, Tier.G2, Tier.G2, Tier.G3, Tier.G1]
    size = spec.num_layers * spec.outer_dim * spec.region_bytes
    held = []
    for block, home in zip([*blocks, blocks[3]], homes, strict=True):
        (slot,) = pools[home].allocate(1)
        write_layout_block(layouts[home], slot.block_id, content(block.sequence_hash, size))
        held.append(slot.register(block))
    manager = OffloadManager(
        layouts=layouts,
        pools=pools,
        engine=TransferEngine(max_batch_blocks=2, max_concurrent=2),
        targets={},
        filters={},
        cancellation_token=CancellationToken(),
        max_batch_blocks=2,
        max_concurrent=2,
    )
    try:
        on_g1 = held.pop()
        back = manager.onboard(held, to=Tier.G1).result(timeout=60)  # disk, disk, host, host, host, disk
        assert [b.sequence_hash for b in back] == [b.sequence_hash for b in blocks]
        assert back[3].block_id == on_g1.block_id  # matched in the target, not copied
        for block in back:
            assert read_layout_block(layouts[Tier.G1], block.block_id) == content(block.sequence_hash, size)
        assert sum(manager.stats().moved_blocks.values()) == 5  # five copied (two submits), one matched
        on_g1.release()
        release(back)
        release(held)
        for pool in pools.values():
            assert pool.counts().active == 0
    finally:
        manager.close()
        for layout in layouts.values():
            for storage in layout.storages:
                storage.close()  # type: ignore[attr-defined]


# -- faults: every pool stays consistent, no block is registered with wrong data ----------------------------------


class BrokenFd:
    """Replace a disk storage's descriptor with one opened the wrong way, so real reads or writes fail with EBADF."""

    def __init__(self, storage: Any, flags: int) -> None:
        self.storage, self.flags = storage, flags

    def __enter__(self) -> None:
        self.saved = os.dup(self.storage.fd)
        wrong = os.open(self.storage.path, self.flags)
        os.dup2(wrong, self.storage.fd)
        os.close(wrong)

    def __exit__(self, *exc: object) -> None:
        os.dup2(self.saved, self.storage.fd)
        os.close(self.saved)


def test_a_failed_disk_write_registers_nothing_and_frees_its_slots(tmp_path: Path) -> None:
    events = RecordingEventManager()
    with make_manager(tmp_path, event_manager=events) as manager:
        held = fill_and_register(manager, Tier.G2, PROMPT[:16])
        disk = manager.tier(Tier.G3).storages[0]
        with BrokenFd(disk, os.O_RDONLY), pytest.raises(TransferError) as caught:
            manager.offload_sync(held)
        assert (caught.value.src_tier, caught.value.dst_tier) == (Tier.G2, Tier.G3)
        assert caught.value.step and caught.value.src_blocks
        counts = manager.pool(Tier.G3).counts()
        assert (counts.free, counts.active, counts.registered) == (16, 0, 0)  # no slot leaked, nothing registered
        assert not [e for e in events.stored() if e.tier is Tier.G3]
        assert manager.stats().failed_transfers[(Tier.G2, Tier.G3)] >= 1
        # the disk works again: the same offload now succeeds, with the right bytes
        assert len(manager.offload_sync(held).offloaded) == 4
        assert assert_tier_holds_right_data(manager, Tier.G3, hashes_of(manager, PROMPT[:16])) == 4
        release(held)


def test_a_failed_disk_read_registers_nothing_in_the_target(tmp_path: Path) -> None:
    with make_manager(tmp_path) as manager:
        put_on_disk(manager, Tier.G2, PROMPT[:16])
        disk = manager.tier(Tier.G3).storages[0]
        with manager.match(PROMPT[:16]) as found:
            with BrokenFd(disk, os.O_WRONLY), pytest.raises(TransferError) as caught:
                manager.onboard_sync(found.disk, to="G2")
            assert caught.value.dst_tier is Tier.G2
            counts = manager.pool(Tier.G2).counts()
            assert (counts.free, counts.registered) == (8, 0)
            back = manager.onboard_sync(found.disk, to="G2")
        assert assert_tier_holds_right_data(manager, Tier.G2, hashes_of(manager, PROMPT[:16])) == 4
        release(back)


def test_a_cancelled_manager_refuses_new_work_and_leaves_consistent_pools(tmp_path: Path) -> None:
    token = CancellationToken()
    runtime = KvManagerRuntimeConfig.builder().worker_id(0).disable_nixl().cancellation_token(token).build()
    settings = KvbmSettings(disk_offload_filter=False, max_transfer_batch_size=1, max_concurrent_transfers=1)
    tokens = list(range(64))
    with make_manager(tmp_path, host=16, disk=16, runtime=runtime, settings=settings) as manager:
        held = fill_and_register(manager, Tier.G2, tokens)
        pending = manager.offload(held)  # sixteen copies, one at a time
        token.cancel()
        try:
            done = len(pending.result(timeout=60).offloaded)
        except TransferError as error:
            assert error.step in ("cancelled", "closed")
            done = -1
        with pytest.raises(OffloadError, match="cancelled"):
            manager.offload(held)
        manager.wait_idle()
        registered = assert_tier_holds_right_data(manager, Tier.G3, hashes_of(manager, tokens))
        assert done in (-1, registered)
        counts = manager.pool(Tier.G3).counts()
        assert counts.active == 0 and counts.free + counts.inactive == 16 and counts.registered == registered
        release(held)


def test_closing_with_transfers_in_flight_settles_everything(tmp_path: Path) -> None:
    events = RecordingEventManager()
    settings = KvbmSettings(disk_offload_filter=False, max_transfer_batch_size=2, max_concurrent_transfers=1)
    tokens = list(range(64))
    manager = make_manager(tmp_path, host=16, disk=16, settings=settings, event_manager=events)
    held = fill_and_register(manager, Tier.G2, tokens)
    pending = manager.offload(held)
    manager.close()
    assert pending.done()
    if pending.exception() is not None:
        assert isinstance(pending.exception(), TransferError)
    assert_events_alternate(events)  # every block a tier gained, it gave up when the manager closed
    with pytest.raises(PoolClosedError):
        manager.pool(Tier.G2).allocate(1)
    release(held)  # handles can still be released after close
    assert not engine_threads()
    assert not list(tmp_path.iterdir())  # the disk file is gone


def test_threads_offloading_and_onboarding_at_once_leave_every_block_right(tmp_path: Path) -> None:
    events = RecordingEventManager()
    settings = KvbmSettings(disk_offload_filter=False, max_transfer_batch_size=2, max_concurrent_transfers=2)
    prompts = [list(range(200 * p, 200 * p + 12)) for p in range(6)]  # six prompts of three blocks
    errors: list[BaseException] = []
    with make_manager(tmp_path, host=12, disk=9, settings=settings, event_manager=events) as manager:
        for tokens in prompts:
            release(fill_and_register(manager, Tier.G2, tokens))
        start = threading.Barrier(4)

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                start.wait()
                for _ in range(25):
                    tokens = prompts[rng.randrange(6)]  # threads share prompts: the same hash from several at once
                    found = manager.pool(Tier.G2).match(hashes_of(manager, tokens))
                    if found and rng.random() < 0.7:
                        manager.offload(found, priority=rng.randrange(3)).result(timeout=60)
                    release(found)
                    with manager.match(tokens) as hit, contextlib.suppress(PoolExhaustedError):
                        release(manager.onboard_sync(hit.disk, to="G2"))
                    if rng.random() < 0.15:
                        manager.pool(rng.choice([Tier.G2, Tier.G3])).reset_inactive()
            except BaseException as error:  # reported by the main thread
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        assert manager.wait_idle(60)
        every = [h for tokens in prompts for h in hashes_of(manager, tokens)]
        for tier in (Tier.G2, Tier.G3):
            assert_tier_holds_right_data(manager, tier, every)
            counts = manager.pool(tier).counts()
            assert counts.active == 0 and counts.free + counts.inactive == counts.total
        assert manager.stats().pending_offloads == 0
    assert_events_alternate(events)


# -- a property: whatever the sequence of moves, every registered block holds its own bytes --------------------

STEPS = st.lists(
    st.tuples(st.sampled_from(["write", "offload", "evict_host", "onboard", "fill_disk"]), st.integers(0, 5)),
    min_size=1,
    max_size=12,
)


@settings(max_examples=25, deadline=None)
@given(steps=STEPS)
def test_no_sequence_of_moves_registers_a_block_with_wrong_data(
    tmp_path_factory: Any, steps: list[tuple[str, int]]
) -> None:
    directory = tmp_path_factory.mktemp("moves")
    prompts = [list(range(100 * p, 100 * p + 8)) for p in range(6)]  # six prompts of two blocks
    events = RecordingEventManager()
    with make_manager(directory, host=4, disk=6, event_manager=events) as manager:
        busy: list[Any] = []
        for action, which in steps:
            tokens = prompts[which]
            if action == "write":
                with contextlib.suppress(PoolExhaustedError):
                    release(fill_and_register(manager, Tier.G2, tokens))
            elif action == "offload":
                found = manager.pool(Tier.G2).match(hashes_of(manager, tokens))
                manager.offload_sync(found)
                release(found)
            elif action == "evict_host":
                manager.pool(Tier.G2).reset_inactive()
            elif action == "onboard":
                with manager.match(tokens) as found, contextlib.suppress(PoolExhaustedError):
                    release(manager.onboard_sync(found.disk, to="G2"))
            elif action == "fill_disk" and not busy:
                with contextlib.suppress(PoolExhaustedError):
                    busy = manager.allocate(Tier.G3, 2)
            manager.wait_idle()
            every = [h for p in prompts for h in hashes_of(manager, p)]
            for tier in (Tier.G2, Tier.G3):
                assert_tier_holds_right_data(manager, tier, every)
                counts = manager.pool(tier).counts()
                assert counts.free + counts.active + counts.inactive == counts.total
        release(busy)
        for tier in (Tier.G2, Tier.G3):
            assert manager.pool(tier).counts().active == 0
    assert_events_alternate(events)


def test_the_round_trip_example_verifies_every_byte(tmp_path: Path) -> None:
    import subprocess
    import sys

    example = Path(__file__).parent.parent / "examples" / "offload_roundtrip.py"
    done = subprocess.run(
        [sys.executable, str(example), "--blocks", "4", "--disk-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verified 4 blocks (16 MiB) byte for byte" in done.stdout
    assert not list(tmp_path.iterdir())  # neither the disk tier's file nor the ceiling's is left behind
