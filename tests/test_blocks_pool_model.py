"""BlockPool against a model simple enough to be obviously right: every step, the same blocks, counts and events.

The model keeps plain lists and dicts and picks the block to evict by sorting; the pool keeps a FIFO, a heap and
a registry. Hypothesis drives both with the same random operations, including misuse (double release, use after
release), and compares them after every step.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvbm_builder.blocks import BlockPool, ImmutableBlock, MutableBlock, RemoveEvent, StoreEvent, TokenBlock
from kvbm_builder.config.protocols import Tier
from kvbm_builder.errors import BlockReleasedError, PoolExhaustedError

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
        counts = self.pool.counts()
        assert counts.active == 0 and counts.free + counts.inactive == NUM_BLOCKS


TestPoolAgainstModel = PoolAgainstModel.TestCase
