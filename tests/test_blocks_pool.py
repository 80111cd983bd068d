"""BlockPool by example: allocate, write, register, match, release; events; and what misuse looks like."""

from __future__ import annotations

import gc
import threading

import pytest

from kvbm_builder.blocks import (
    BlockGroup,
    BlockPool,
    ImmutableBlock,
    NullEventManager,
    RemoveEvent,
    RemoveReason,
    StoreEvent,
    TokenBlock,
    token_blocks,
)
from kvbm_builder.config.protocols import Tier
from kvbm_builder.errors import (
    BlockPoolError,
    BlockReleasedError,
    KvbmError,
    PoolClosedError,
    PoolExhaustedError,
)
from kvbm_builder.testing import RecordingEventManager

PROMPT = list(range(100, 116))  # 16 tokens: four blocks of 4
PROMPT_HASHES = [b.sequence_hash for b in token_blocks(PROMPT, 4)]


def pool(num_blocks: int = 8, events: RecordingEventManager | None = None) -> BlockPool:
    return BlockPool(Tier.G2, num_blocks, block_size=4, event_manager=events)


def test_a_prompt_is_written_registered_and_found_again() -> None:
    host = pool()
    blocks = token_blocks(PROMPT, 4)
    slots = host.allocate(len(blocks))
    assert [s.block_id for s in slots] == [0, 1, 2, 3]  # free slots first, in order
    # ... an engine writes the KV of each block into slot.block_id here ...
    registered = host.register(slots, blocks)
    assert [b.sequence_hash for b in registered] == [b.sequence_hash for b in blocks]
    for block in registered:
        block.release()  # inactive now: still matchable
    assert host.counts().inactive == 4

    # a later request with the same first 12 tokens and a different tail matches three blocks, then stops
    later = token_blocks([*PROMPT[:12], 7, 7, 7, 7], 4)
    matched = host.match(b.sequence_hash for b in later)
    assert [b.block_id for b in matched] == [0, 1, 2]
    assert host.counts().active == 3
    for block in matched:
        block.release()


def test_a_match_stops_at_the_first_miss_even_if_later_blocks_are_present() -> None:
    host = pool()
    a, b, c = token_blocks(PROMPT[:12], 4)
    for held in host.register(host.allocate(2), [a, c]):
        held.release()
    assert [m.sequence_hash for m in host.match([a.sequence_hash, b.sequence_hash, c.sequence_hash])] == [
        a.sequence_hash
    ]


def test_registering_a_hash_already_active_returns_the_existing_block_and_frees_the_duplicate() -> None:
    host = pool(4)
    block = token_blocks(PROMPT[:4], 4)[0]
    first = host.allocate(1)[0].register(block)
    duplicate_slot = host.allocate(1)[0]
    assert duplicate_slot.block_id == 1
    second = duplicate_slot.register(block)
    assert second.block_id == first.block_id == 0
    assert host.counts().free == 3  # slot 1 went back to the free list
    first.release()
    assert host.counts().active == 1  # the second holder keeps it active
    second.release()
    assert host.counts().inactive == 1


def test_registering_a_hash_found_inactive_reuses_that_block() -> None:
    host = pool(4)
    block = token_blocks(PROMPT[:4], 4)[0]
    host.allocate(1)[0].register(block).release()
    again = host.allocate(1)[0].register(block)
    assert again.block_id == 0 and host.counts().inactive == 0


def test_free_slots_go_first_then_the_lowest_priority_then_the_longest_returned() -> None:
    host = pool(3)
    a, b, c = token_blocks(PROMPT[:12], 4)
    held = host.register(host.allocate(3), [a, b, c])
    held[0].set_priority(5)  # a is worth keeping
    for block in held:
        block.release()  # returned in the order a, b, c
    evicted = [s.block_id for s in host.allocate(2)]
    assert evicted == [1, 2]  # b then c (priority 0, oldest first); a (priority 5) stays
    assert a.sequence_hash in host and b.sequence_hash not in host


def test_a_full_tier_refuses_an_allocation_and_changes_nothing() -> None:
    host = pool(2)
    kept = host.allocate(2)
    before = host.counts()
    with pytest.raises(
        PoolExhaustedError, match=r"host tier \(G2\) has 0 free and 0 evictable.*host_layout.num_blocks"
    ):
        host.allocate(1)
    assert host.counts() == before
    for block in kept:
        block.release()


def test_events_say_what_a_tier_gained_and_lost() -> None:
    events = RecordingEventManager()
    host = pool(1, events)
    first, second = token_blocks(PROMPT[:8], 4)
    host.allocate(1)[0].register(first).release()
    host.allocate(1)[0].register(second).release()  # evicts the first
    kinds = [(kind, e.sequence_hash) for kind, e in events.events]  # type: ignore[attr-defined]
    assert kinds == [("store", first.sequence_hash), ("remove", first.sequence_hash), ("store", second.sequence_hash)]
    stored = events.events[0][1]
    assert stored == StoreEvent(
        sequence_hash=first.sequence_hash,
        parent_hash=None,
        tokens=tuple(PROMPT[:4]),
        block_size=4,
        tier=Tier.G2,
        block_id=0,
        local_hash=first.local_hash,
    )
    removed = events.events[1][1]
    assert isinstance(removed, RemoveEvent) and removed.reason is RemoveReason.EVICTED


def test_a_duplicate_registration_sends_no_second_store_event() -> None:
    events = RecordingEventManager()
    host = pool(4, events)
    block = token_blocks(PROMPT[:4], 4)[0]
    held = [host.allocate(1)[0].register(block) for _ in range(3)]
    assert [kind for kind, _ in events.events] == ["store"]
    for h in held:
        h.release()


def test_reset_and_close_remove_what_was_registered() -> None:
    events = RecordingEventManager()
    host = pool(4, events)
    a, b = token_blocks(PROMPT[:8], 4)
    held_a, held_b = host.register(host.allocate(2), [a, b])
    held_a.release()
    assert host.reset_inactive() == 1
    assert events.events[-1][1].reason is RemoveReason.RESET  # type: ignore[attr-defined]
    host.close()
    assert events.events[-1][1].reason is RemoveReason.CLOSED  # type: ignore[attr-defined]
    assert events.events[-1][1].sequence_hash == b.sequence_hash  # type: ignore[attr-defined]
    held_b.release()  # releasing after close is allowed: cleanup code keeps working
    with pytest.raises(PoolClosedError, match="closed"):
        host.allocate(1)
    host.close()  # idempotent


def test_a_block_registered_by_an_engine_hash_carries_it_in_events() -> None:
    events = RecordingEventManager()
    host = pool(2, events)
    host.allocate(1)[0].register(TokenBlock.from_hash(-5, parent_hash=9)).release()
    stored = events.events[0][1]
    assert (stored.sequence_hash, stored.external_hash, stored.parent_hash, stored.tokens) == (
        2**64 - 5,
        2**64 - 5,
        9,
        (),
    )  # type: ignore[attr-defined]
    assert -5 in host


def test_misuse_is_an_error_never_silent() -> None:
    host = pool(4)
    other = BlockPool(Tier.G3, 4, block_size=4)
    block = token_blocks(PROMPT[:4], 4)[0]
    slot = host.allocate(1)[0]
    held = slot.register(block)
    with pytest.raises(BlockReleasedError, match="was registered: release the ImmutableBlock"):
        slot.release()
    spare = host.allocate(1)
    with pytest.raises(BlockPoolError, match="belongs to the host tier"):
        other.register(spare, [block])
    with pytest.raises(BlockPoolError, match=r"holds 4 tokens.*has 3"):
        host.register(spare, [TokenBlock.from_tokens([1, 2, 3])])
    with pytest.raises(BlockPoolError, match="one token block per block"):
        host.register(spare, [])
    spare[0].release()
    with pytest.raises(BlockPoolError, match="priority"):
        held.set_priority(-1)
    held.release()
    with pytest.raises(BlockReleasedError, match="already released"):
        held.release()
    with pytest.raises(BlockReleasedError):
        _ = held.block_id
    assert isinstance(BlockReleasedError("x"), KvbmError)


def test_a_failed_register_changes_nothing() -> None:
    host = pool(4)
    slots = host.allocate(2)
    slots[1].release()
    with pytest.raises(BlockReleasedError):
        host.register(slots, token_blocks(PROMPT[:8], 4))
    assert not slots[0].released  # still the caller's to register or release
    assert host.counts().registered == 0
    slots[0].release()


def test_with_blocks_release_on_exit() -> None:
    host = pool(2)
    with host.allocate(1)[0] as slot:
        assert slot.block_id == 0
    with host.allocate(1)[0].register(token_blocks(PROMPT[:4], 4)[0]) as held:
        assert isinstance(held, ImmutableBlock)
    assert host.counts().active == 0 and host.counts().inactive == 1


def test_a_handle_dropped_without_release_comes_back_with_a_warning() -> None:
    host = pool(2)
    with pytest.warns(ResourceWarning, match="garbage-collected without release"):
        host.allocate(2)  # the handles are dropped at once
        gc.collect()
    assert host.counts().free == 2


def test_threads_sharing_a_pool_never_lose_a_block() -> None:
    host = BlockPool(Tier.G1, 16, block_size=4, event_manager=NullEventManager())
    blocks = token_blocks(list(range(4 * 8)), 4)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for round_ in range(300):
                want = blocks[(seed + round_) % 8]
                found = host.match([want.sequence_hash])
                if not found:
                    try:
                        found = host.allocate(1)
                    except PoolExhaustedError:
                        continue
                    found = [found[0].register(want)]
                clone = found[0].clone()
                found[0].release()
                clone.release()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    counts = host.counts()
    assert counts.active == 0 and counts.free + counts.inactive == 16 and counts.registered == counts.inactive


def test_an_event_manager_that_fails_does_not_break_the_pool(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def on_store(self, event: object) -> None:
            raise RuntimeError("router is down")

        def on_remove(self, event: object) -> None:
            pass

    host = BlockPool(Tier.G2, 2, block_size=4, event_manager=Broken())
    host.allocate(1)[0].register(token_blocks(PROMPT[:4], 4)[0]).release()
    assert host.event_failures == 1 and "router is down" in caplog.text
    assert host.counts().inactive == 1


# -- many blocks as one handle: what the offload manager moves in batches ----------------------------------------


def test_a_group_of_blocks_is_allocated_registered_held_and_released_as_one() -> None:
    events = RecordingEventManager()
    host = pool(8, events)
    written = host.allocate_group(4)  # one handle, one lock acquisition, for four slots
    assert written.block_ids == [0, 1, 2, 3] and len(written) == 4
    registered = written.register(token_blocks(PROMPT, 4))
    assert registered is not None and written.released  # the slots now live on as registered blocks
    assert registered.sequence_hashes == [b.sequence_hash for b in token_blocks(PROMPT, 4)]
    assert [e.block_id for e in events.stored()] == [0, 1, 2, 3]
    matched = host.match(PROMPT_HASHES[:2])
    reader = host.hold(matched)  # another holder of the first two, as one handle
    host.release_all(matched)
    assert host.counts().active == 4
    registered.release()
    assert (host.counts().active, host.counts().inactive) == (2, 2)  # the held two stay active
    reader.release()
    assert host.counts().inactive == 4 and host.present([*PROMPT_HASHES, 7]) == set(PROMPT_HASHES)


def test_a_partial_group_takes_what_the_tier_has_and_register_like_copies_the_source_hashes() -> None:
    host, disk = pool(8), BlockPool(Tier.G3, 3, block_size=4)
    sources = host.allocate_group(4).register(token_blocks(PROMPT, 4))
    assert sources is not None
    with pytest.raises(PoolExhaustedError):
        disk.allocate_group(4)
    slots = disk.allocate_group(4, partial=True)  # the disk tier has three
    assert slots.block_ids == [0, 1, 2]
    first_three, last = sources.partition([[0, 1, 2], [3]])
    copies = slots.register_like(first_three, keep=False)  # what a finished copy registers; nobody holds them
    assert copies is None and disk.counts().inactive == 3
    assert disk.present(PROMPT_HASHES) == set(PROMPT_HASHES[:3])
    whole = BlockGroup.join([first_three, last])
    assert whole.block_ids == [0, 1, 2, 3]
    whole.release()


def test_find_holds_each_block_present_without_stopping_at_a_miss() -> None:
    host = pool(8)
    registered = host.allocate_group(4).register(token_blocks(PROMPT, 4), keep=False)
    assert registered is None
    found = host.find([PROMPT_HASHES[0], 12345, PROMPT_HASHES[3]])
    assert [b.block_id if b is not None else None for b in found] == [0, None, 3]
    host.release_all([b for b in found if b is not None])
    assert host.counts().active == 0


def test_misused_groups_are_errors_and_change_nothing() -> None:
    host, other = pool(8), pool(8)
    group = host.allocate_group(2)
    with pytest.raises(BlockPoolError, match="exactly once"):
        group.partition([[0], [0]])
    with pytest.raises(BlockPoolError, match="one token block per block"):
        group.register(token_blocks(PROMPT[:4], 4))
    group.release()
    with pytest.raises(BlockReleasedError, match="released"):
        group.release()
    theirs = other.allocate(1)[0].register(token_blocks(PROMPT[:4], 4)[0])
    with pytest.raises(BlockPoolError, match="belongs to the"):
        host.hold([theirs])
    mine = host.allocate(2)
    with pytest.raises(BlockReleasedError, match="released nothing"):
        host.release_all([mine[0], mine[0]])  # the same handle twice
    assert not mine[0].released and host.counts().active == 2
    host.release_all(mine)
    theirs.release()
    assert host.counts().free == 8


def test_a_group_dropped_without_release_comes_back_with_a_warning() -> None:
    host = pool(3)
    with pytest.warns(ResourceWarning, match="garbage-collected without release"):
        host.allocate_group(3)  # dropped at once
        gc.collect()
    assert host.counts().free == 3
