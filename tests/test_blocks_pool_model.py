"""BlockPool against a model simple enough to be obviously right: every step, the same blocks, counts and events.

The model keeps plain lists and dicts and picks the block to evict by sorting; the pool keeps a FIFO, a heap and
a registry. Hypothesis drives both with the same random operations, including misuse (double release, use after
release), and compares them after every step. The batch operations (groups, ``hold``, ``find``, ``present``,
``release_all``) are modelled as the same steps taken one block at a time, in order.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvbm_builder.blocks import (
    BlockGroup,
    BlockPool,
    ImmutableBlock,
    MutableBlock,
    RemoveEvent,
    SlotGroup,
    StoreEvent,
    TokenBlock,
)
from kvbm_builder.config.protocols import Tier
from kvbm_builder.errors import BlockPoolError, BlockReleasedError, PoolExhaustedError

NUM_BLOCKS = 6
HASHES = st.integers(0, 9)  # few hashes, so duplicates and re-matches happen often


class Model:
    def __init__(self, n: int) -> None:
        self.free = list(range(n))
        self.state = dict.fromkeys(range(n), "free")
        self.refs = dict.fromkeys(range(n), 0)
        self.hash_of: dict[int, int] = {}
        self.priority = dict.fromkeys(range(n), 0)
        self.returned: dict[int, int] = {}
        self.registry: dict[int, int] = {}
        self.tick = 0
        self.events: list[tuple[str, int, int]] = []

    def eviction_order(self) -> list[int]:
        inactive = [b for b, s in self.state.items() if s == "inactive"]
        return sorted(inactive, key=lambda b: (self.priority[b], self.returned[b]))

    def forget(self, block: int, why: str) -> None:
        self.events.append((why, self.hash_of[block], block))
        del self.registry[self.hash_of[block]]
        del self.hash_of[block]
        self.priority[block] = 0

    def allocate(self, count: int) -> list[int] | None:
        if count > len(self.free) + len(self.eviction_order()):
            return None
        out = []
        for _ in range(count):
            if self.free:
                block = self.free.pop(0)
            else:
                block = self.eviction_order()[0]
                self.forget(block, "remove")
            self.state[block] = "mutable"
            out.append(block)
        return out

    def register(self, block: int, sequence_hash: int, priority: int) -> int:
        existing = self.registry.get(sequence_hash)
        if existing is not None:
            self.state[block] = "free"
            self.free.append(block)
            self.acquire(existing)
            self.priority[existing] = max(self.priority[existing], priority)
            return existing
        self.state[block], self.refs[block] = "active", 1
        self.hash_of[block], self.priority[block] = sequence_hash, priority
        self.registry[sequence_hash] = block
        self.events.append(("store", sequence_hash, block))
        return block

    def acquire(self, block: int) -> None:
        if self.state[block] == "inactive":
            self.state[block], self.refs[block] = "active", 1
        else:
            self.refs[block] += 1

    def release_mutable(self, block: int) -> None:
        self.state[block] = "free"
        self.free.append(block)

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.state[block] = "inactive"
            self.returned[block] = self.tick
            self.tick += 1

    def match(self, hashes: list[int]) -> list[int]:
        out = []
        for h in hashes:
            if h not in self.registry:
                break
            self.acquire(self.registry[h])
            out.append(self.registry[h])
        return out

    def reset_inactive(self) -> int:
        order = self.eviction_order()
        for block in order:
            self.forget(block, "remove")
            self.state[block] = "free"
            self.free.append(block)
        return len(order)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []

    def on_store(self, event: Any) -> None:
        assert isinstance(event, StoreEvent)
        self.events.append(("store", event.sequence_hash, event.block_id))

    def on_remove(self, event: Any) -> None:
        assert isinstance(event, RemoveEvent)
        self.events.append(("remove", event.sequence_hash, event.block_id))


class PoolAgainstModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.recorder = Recorder()
        self.pool = BlockPool(Tier.G2, NUM_BLOCKS, block_size=4, event_manager=self.recorder)
        self.model = Model(NUM_BLOCKS)
        self.mutables: list[MutableBlock] = []
        self.immutables: list[ImmutableBlock] = []
        self.used_up: list[MutableBlock | ImmutableBlock] = []
        self.slot_groups: list[SlotGroup] = []
        self.block_groups: list[BlockGroup] = []
        self.used_up_groups: list[SlotGroup | BlockGroup] = []

    @rule(count=st.integers(0, 4))
    def allocate(self, count: int) -> None:
        expected = self.model.allocate(count)
        if expected is None:
            with pytest.raises(PoolExhaustedError):
                self.pool.allocate(count)
            return
        got = self.pool.allocate(count)
        assert [b.block_id for b in got] == expected
        self.mutables += got

    @precondition(lambda self: self.mutables)
    @rule(data=st.data(), sequence_hash=HASHES, priority=st.integers(0, 3))
    def register(self, data: st.DataObject, sequence_hash: int, priority: int) -> None:
        block = self.mutables.pop(data.draw(st.integers(0, len(self.mutables) - 1)))
        expected = self.model.register(block.block_id, sequence_hash, priority)
        got = block.register(TokenBlock.from_hash(sequence_hash), priority=priority)
        assert got.block_id == expected and got.sequence_hash == sequence_hash
        self.immutables.append(got)
        self.used_up.append(block)

    @precondition(lambda self: self.mutables)
    @rule(data=st.data())
    def release_mutable(self, data: st.DataObject) -> None:
        block = self.mutables.pop(data.draw(st.integers(0, len(self.mutables) - 1)))
        self.model.release_mutable(block.block_id)
        block.release()
        self.used_up.append(block)

    @precondition(lambda self: self.immutables)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        block = self.immutables.pop(data.draw(st.integers(0, len(self.immutables) - 1)))
        self.model.release(block.block_id)
        block.release()
        self.used_up.append(block)

    @precondition(lambda self: self.immutables)
    @rule(data=st.data())
    def clone(self, data: st.DataObject) -> None:
        block = self.immutables[data.draw(st.integers(0, len(self.immutables) - 1))]
        self.model.acquire(block.block_id)
        self.immutables.append(block.clone())

    @precondition(lambda self: self.immutables)
    @rule(data=st.data(), priority=st.integers(0, 3))
    def set_priority(self, data: st.DataObject, priority: int) -> None:
        block = self.immutables[data.draw(st.integers(0, len(self.immutables) - 1))]
        self.model.priority[block.block_id] = priority
        block.set_priority(priority)

    @rule(hashes=st.lists(HASHES, max_size=5))
    def match(self, hashes: list[int]) -> None:
        expected = self.model.match(hashes)
        got = self.pool.match(hashes)
        assert [b.block_id for b in got] == expected
        self.immutables += got

    @rule()
    def reset_inactive(self) -> None:
        assert self.pool.reset_inactive() == self.model.reset_inactive()

    @precondition(lambda self: self.used_up)
    @rule(data=st.data())
    def misuse_a_used_up_handle(self, data: st.DataObject) -> None:
        block = self.used_up[data.draw(st.integers(0, len(self.used_up) - 1))]
        with pytest.raises(BlockReleasedError):
            block.release()
        with pytest.raises(BlockReleasedError):
            _ = block.block_id
        if isinstance(block, ImmutableBlock):
            with pytest.raises(BlockReleasedError):
                block.clone()

    # -- many blocks at once ---------------------------------------------------------------------------------

    @rule(count=st.integers(0, 4), partial=st.booleans())
    def allocate_group(self, count: int, partial: bool) -> None:
        available = len(self.model.free) + len(self.model.eviction_order())
        if count > available and not partial:
            with pytest.raises(PoolExhaustedError):
                self.pool.allocate_group(count)
            return
        expected = self.model.allocate(min(count, available))
        got = self.pool.allocate_group(count, partial=partial)
        assert got.block_ids == expected
        self.slot_groups.append(got)

    @precondition(lambda self: self.slot_groups)
    @rule(data=st.data(), priority=st.integers(0, 3), keep=st.booleans())
    def register_group(self, data: st.DataObject, priority: int, keep: bool) -> None:
        group = self.slot_groups.pop(data.draw(st.integers(0, len(self.slot_groups) - 1)))
        hashes = data.draw(st.lists(HASHES, min_size=len(group), max_size=len(group)))
        expected = []
        for block, sequence_hash in zip(group.block_ids, hashes, strict=True):
            registered = self.model.register(block, sequence_hash, priority)
            if keep:
                expected.append(registered)
            else:  # as if released right after
                self.model.release(registered)
        got = group.register([TokenBlock.from_hash(h) for h in hashes], priority=priority, keep=keep)
        if keep:
            assert got is not None and got.block_ids == expected and got.sequence_hashes == hashes
            self.block_groups.append(got)
        else:
            assert got is None
        self.used_up_groups.append(group)

    @precondition(lambda self: self.slot_groups and self.block_groups)
    @rule(data=st.data(), keep=st.booleans())
    def register_like_a_held_group(self, data: st.DataObject, keep: bool) -> None:
        group = self.slot_groups[data.draw(st.integers(0, len(self.slot_groups) - 1))]
        sources = self.block_groups[data.draw(st.integers(0, len(self.block_groups) - 1))]
        if len(sources) != len(group):
            with pytest.raises(BlockPoolError, match="one source per block"):
                group.register_like(sources)
            return
        self.slot_groups.remove(group)
        hashes = sources.sequence_hashes
        expected = []
        for block, sequence_hash, source_priority in zip(group.block_ids, hashes, sources.priorities, strict=True):
            del source_priority  # register_like registers with its own priority (default 0)
            registered = self.model.register(block, sequence_hash, 0)
            if keep:
                expected.append(registered)
            else:
                self.model.release(registered)
        got = group.register_like(sources, keep=keep)
        if keep:
            assert got is not None and got.block_ids == expected
            self.block_groups.append(got)
        self.used_up_groups.append(group)

    @precondition(lambda self: self.immutables)
    @rule(data=st.data())
    def hold(self, data: st.DataObject) -> None:
        chosen = data.draw(st.lists(st.sampled_from(self.immutables), max_size=4))  # the same block may repeat
        for block in chosen:
            self.model.acquire(block.block_id)
        group = self.pool.hold(chosen)
        assert group.block_ids == [b.block_id for b in chosen]
        self.block_groups.append(group)

    @precondition(lambda self: self.slot_groups or self.block_groups)
    @rule(data=st.data())
    def release_group(self, data: st.DataObject) -> None:
        groups: list[Any] = self.slot_groups if not self.block_groups or data.draw(st.booleans()) else self.block_groups
        if not groups:
            groups = self.block_groups
        group = groups.pop(data.draw(st.integers(0, len(groups) - 1)))
        for block in group.block_ids:
            if isinstance(group, SlotGroup):
                self.model.release_mutable(block)
            else:
                self.model.release(block)
        group.release()
        self.used_up_groups.append(group)

    @precondition(lambda self: self.slot_groups or self.block_groups)
    @rule(data=st.data())
    def partition_and_join(self, data: st.DataObject) -> None:
        groups: list[Any] = self.slot_groups if self.slot_groups and data.draw(st.booleans()) else self.block_groups
        if not groups:
            groups = self.slot_groups
        group = groups.pop(data.draw(st.integers(0, len(groups) - 1)))
        ids = group.block_ids
        order = data.draw(st.permutations(range(len(ids))))
        cut = data.draw(st.integers(0, len(ids)))
        first, second = group.partition([order[:cut], order[cut:]])
        assert first.block_ids + second.block_ids == [ids[i] for i in order]
        self.used_up_groups.append(group)
        if data.draw(st.booleans()):
            expected = second.block_ids + first.block_ids
            joined = type(group).join([second, first])
            assert joined.block_ids == expected
            self.used_up_groups += [first, second]
            groups.append(joined)
        else:
            groups += [first, second]

    @precondition(lambda self: self.block_groups)
    @rule(data=st.data())
    def handles(self, data: st.DataObject) -> None:
        group = self.block_groups.pop(data.draw(st.integers(0, len(self.block_groups) - 1)))
        ids = group.block_ids
        handles = group.handles()
        assert [b.block_id for b in handles] == ids
        self.immutables += handles
        self.used_up_groups.append(group)

    @rule(hashes=st.lists(HASHES, max_size=5))
    def present(self, hashes: list[int]) -> None:
        assert self.pool.present(hashes) == set(hashes) & set(self.model.registry)

    @rule(hashes=st.lists(HASHES, max_size=5))
    def find(self, hashes: list[int]) -> None:
        expected = []
        for sequence_hash in hashes:
            block = self.model.registry.get(sequence_hash)
            if block is not None:
                self.model.acquire(block)
            expected.append(block)
        got = self.pool.find(hashes)
        assert [None if b is None else b.block_id for b in got] == expected
        self.immutables += [b for b in got if b is not None]

    @precondition(lambda self: self.mutables or self.immutables)
    @rule(data=st.data())
    def release_all(self, data: st.DataObject) -> None:
        every: list[Any] = [*self.mutables, *self.immutables]
        chosen = data.draw(st.lists(st.sampled_from(range(len(every))), unique=True, max_size=4))
        handles = [every[i] for i in chosen]
        for handle in handles:
            if isinstance(handle, MutableBlock):
                self.model.release_mutable(handle.block_id)
                self.mutables.remove(handle)
            else:
                self.model.release(handle.block_id)
                self.immutables.remove(handle)
        self.pool.release_all(handles)
        self.used_up += handles

    @precondition(lambda self: self.used_up_groups)
    @rule(data=st.data())
    def misuse_a_used_up_group(self, data: st.DataObject) -> None:
        group = self.used_up_groups[data.draw(st.integers(0, len(self.used_up_groups) - 1))]
        with pytest.raises(BlockReleasedError):
            group.release()
        with pytest.raises(BlockReleasedError):
            _ = group.block_ids
        with pytest.raises(BlockReleasedError):
            group.partition([range(len(group))])

    @precondition(lambda self: self.used_up)
    @rule(data=st.data())
    def release_all_refuses_a_used_up_handle_and_releases_nothing(self, data: st.DataObject) -> None:
        stale = self.used_up[data.draw(st.integers(0, len(self.used_up) - 1))]
        live: list[Any] = [*self.mutables[:1], *self.immutables[:1]]
        with pytest.raises(BlockReleasedError):
            self.pool.release_all([*live, stale])
        for handle in live:
            assert not handle.released  # all or none

    @invariant()
    def same_counts_registry_and_events(self) -> None:
        counts = self.pool.counts()
        states = list(self.model.state.values())
        assert (counts.free, counts.active, counts.inactive) == (
            states.count("free"),
            states.count("mutable") + states.count("active"),
            states.count("inactive"),
        )
        assert counts.free + counts.active + counts.inactive == NUM_BLOCKS
        assert counts.registered == len(self.model.registry)
        assert {h for h in range(10) if h in self.pool} == set(self.model.registry)
        assert self.recorder.events == self.model.events

    def teardown(self) -> None:
        for block in [*self.mutables, *self.immutables]:
            block.release()
        for group in [*self.slot_groups, *self.block_groups]:
            group.release()
        counts = self.pool.counts()
        assert counts.active == 0 and counts.free + counts.inactive == NUM_BLOCKS


TestPoolAgainstModel = PoolAgainstModel.TestCase
