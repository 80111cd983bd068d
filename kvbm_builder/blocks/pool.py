"""``BlockPool``: the block slots of one tier, who holds them, and which contents they hold.

A tier of ``num_blocks`` slots (ids ``0..num_blocks-1``) has each slot in one state:

- **free**: holds nothing (never registered, or reset). :meth:`BlockPool.allocate` hands free slots out first,
  first in first out;
- **active**: in use. Either a :class:`MutableBlock` (allocated, being written, owned by one holder) or a registered
  :class:`ImmutableBlock`, shared by reference count (:meth:`ImmutableBlock.clone` adds a holder);
- **inactive**: registered but held by nobody. Its contents stay matchable (:meth:`BlockPool.match` makes it active
  again) until a later allocation evicts it: lowest priority first, then the one returned longest ago.

Registration (:meth:`BlockPool.register`) files a written block under its sequence hash. If the hash is already
registered, the existing block is returned (active: one more holder; inactive: reused) and the new slot goes back to
the free list, so a tier never holds two copies of one block. Store and remove events go to the event manager.

Every handle is released exactly once (``release()``, or a ``with`` block); using a handle after that raises
:class:`~kvbm_builder.errors.BlockReleasedError`. A handle dropped without a release is returned to the pool at the
pool's next operation, with a ``ResourceWarning``. All methods are thread-safe.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import threading
import warnings
from collections import deque
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import attrs

from ..config.protocols import EventManager, Tier
from ..errors import BlockPoolError, BlockReleasedError, PoolClosedError, PoolExhaustedError
from .events import BlockEvent, NullEventManager, RemoveEvent, RemoveReason, StoreEvent
from .hashing import _U64, TokenBlock, _u64

log = logging.getLogger(__name__)

__all__ = ["BlockGroup", "BlockPool", "ImmutableBlock", "MutableBlock", "PoolCounts", "SlotGroup"]

MAX_PRIORITY = (1 << 32) - 1

G = TypeVar("G", bound="_Group")


class _State(enum.Enum):
    FREE = "free"
    MUTABLE = "mutable"
    ACTIVE = "active"
    INACTIVE = "inactive"


class _Slot:
    __slots__ = ("block_id", "priority", "refs", "returned_tick", "state", "token_block")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.state = _State.FREE
        self.token_block: TokenBlock | None = None
        self.refs = 0
        self.priority = 0
        self.returned_tick = -1


@attrs.frozen
class PoolCounts:
    """How many of a tier's blocks are in each state (``free + active + inactive == total``).

    ``active`` counts blocks in use (being written, or registered and held); ``registered`` counts the blocks that
    can be matched (active registered ones and inactive ones).
    """

    tier: Tier
    total: int
    free: int
    active: int
    inactive: int
    registered: int


def _check_priority(priority: int) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
        raise BlockPoolError(f"priority must be a whole number 0..{MAX_PRIORITY} (upstream's u32), got {priority!r}")
    return priority


class BlockPool:
    """The slots of one tier. See the module's documentation for the states and the rules."""

    def __init__(
        self, tier: Tier, num_blocks: int, *, block_size: int, event_manager: EventManager | None = None
    ) -> None:
        if not isinstance(tier, Tier):
            raise BlockPoolError(f"tier must be a Tier (G1, G2 or G3), got {tier!r}")
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BlockPoolError(f"the {tier.words} pool's {name} must be a whole number >= 1, got {value!r}")
        self._tier = tier
        self._block_size = block_size
        self._event_manager: EventManager = event_manager if event_manager is not None else NullEventManager()
        self._silent = type(self._event_manager) is NullEventManager  # no event objects made for nobody
        self._lock = threading.Lock()
        self._slots = [_Slot(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._inactive: list[tuple[int, int, int]] = []  # heap of (priority, returned_tick, block_id); stale allowed
        self._num_inactive = 0
        self._num_active = 0
        self._registry: dict[int, _Slot] = {}
        self._ticks = itertools.count()
        self._closed = False
        # events are queued under the lock and delivered outside it, in order, by one thread at a time
        self._outbox: deque[BlockEvent] = deque()
        self._delivering = False
        # handles garbage-collected unreleased; appended from __del__ (no lock there), returned at the next operation
        self._dropped: deque[tuple[bool, _Slot]] = deque()
        self.event_failures = 0
        """Events whose delivery raised (logged with the traceback; the pool itself is unaffected)."""

    # -- what it is -----------------------------------------------------------------------------------------

    @property
    def tier(self) -> Tier:
        return self._tier

    @property
    def num_blocks(self) -> int:
        return len(self._slots)

    @property
    def block_size(self) -> int:
        """Tokens per block (the model's ``page_size``); registered token lists have this length, or none."""
        return self._block_size

    @property
    def closed(self) -> bool:
        return self._closed

    def counts(self) -> PoolCounts:
        with self._lock:
            self._return_dropped()
            return PoolCounts(
                self._tier,
                len(self._slots),
                len(self._free),
                self._num_active,
                self._num_inactive,
                len(self._registry),
            )

    def __contains__(self, sequence_hash: object) -> bool:
        """Whether a block with this sequence hash is registered here (active or inactive). Changes nothing."""
        if isinstance(sequence_hash, TokenBlock):
            sequence_hash = sequence_hash.sequence_hash
        with self._lock:
            return _u64(sequence_hash, "sequence_hash") in self._registry

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._free)} free, {self._num_active} active, "
        state += "" if self._closed else f"{self._num_inactive} inactive"
        return f"BlockPool({self._tier.name}, {len(self._slots)} blocks of {self._block_size} tokens: {state})"

    # -- operations -----------------------------------------------------------------------------------------

    def allocate(self, count: int = 1) -> list[MutableBlock]:
        """``count`` blocks to write into, all or none: free ones first (FIFO), then evicted inactive ones.

        Raises PoolExhaustedError, changing nothing, when fewer than ``count`` are free or evictable.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise BlockPoolError(f"count must be a whole number >= 0, got {count!r}")
        with self._lock:
            self._check_open()
            self._return_dropped()
            if count > len(self._free) + self._num_inactive:
                raise self._exhausted(count)
            handles = []
            for _ in range(count):
                slot = self._slots[self._free.popleft()] if self._free else self._evict()
                slot.state = _State.MUTABLE
                self._num_active += 1
                handles.append(MutableBlock(self, slot))
        self._deliver()
        return handles

    def register(
        self, blocks: Sequence[MutableBlock], token_blocks: Sequence[TokenBlock], *, priority: int = 0
    ) -> list[ImmutableBlock]:
        """File each written block under its token block's sequence hash; all or none.

        Returns one handle per block, in order. Where the hash is already registered the existing block is
        returned (so its ``block_id`` differs) and the written slot goes back to the free list. The mutable handles
        are consumed. ``priority`` (0..2**32-1, default 0) orders eviction: lower goes first.
        """
        blocks = list(blocks)
        token_blocks = self._check_token_blocks(len(blocks), token_blocks, priority)
        for block in blocks:
            if not isinstance(block, MutableBlock):
                raise BlockPoolError(f"register takes MutableBlocks from allocate(), got {block!r}")
            if block._pool is not self:
                raise BlockPoolError(f"{block!r} belongs to the {block._pool.tier.words}, not the {self._tier.words}")
        if len({id(b) for b in blocks}) != len(blocks):
            raise BlockPoolError("register was given the same MutableBlock twice")
        with self._lock:
            self._check_open()
            self._return_dropped()
            for block in blocks:
                block._check_live()
            for block in blocks:
                block._fate = "registered"
            slots = self._register_slots([block._slot for block in blocks], token_blocks, priority)
            out = [ImmutableBlock(self, slot) for slot in slots]
        self._deliver()
        return out

    def _check_token_blocks(self, count: int, token_blocks: Sequence[TokenBlock], priority: int) -> list[TokenBlock]:
        token_blocks = list(token_blocks)
        _check_priority(priority)
        if count != len(token_blocks):
            raise BlockPoolError(
                f"register needs one token block per block: got {count} blocks and {len(token_blocks)} token "
                f"blocks for the {self._tier.words}"
            )
        size = self._block_size
        for token_block in token_blocks:
            if type(token_block) is not TokenBlock and not isinstance(token_block, TokenBlock):
                raise BlockPoolError(
                    f"register takes TokenBlocks (token_blocks(...), TokenBlock.from_hash(...)), got {token_block!r}"
                )
            if token_block.tokens and len(token_block.tokens) != size:
                raise BlockPoolError(
                    f"a block of the {self._tier.words} holds {size} tokens, but a token block given to register "
                    f"has {len(token_block.tokens)}; only full blocks are registered"
                )
        return token_blocks

    def _register_slots(
        self, slots: list[_Slot], token_blocks: list[TokenBlock], priority: int, *, hold: bool = True
    ) -> list[_Slot]:
        """(With the lock held; the written slots checked.) Register each slot; the registered slots, one holder
        each (an already registered hash gives its existing slot, and the written one is freed). ``hold`` False:
        as if each were released right after, in order; nothing is returned."""
        out = []
        registry = self._registry
        returned = 0
        inactive, ticks, active_state, inactive_state = self._inactive, self._ticks, _State.ACTIVE, _State.INACTIVE
        for slot, token_block in zip(slots, token_blocks, strict=True):
            existing = registry.get(token_block.sequence_hash)
            if existing is not None:
                self._free_slot(slot)
                self._acquire(existing)
                existing.priority = max(existing.priority, priority)
                if hold:
                    out.append(existing)
                else:  # released at once (as _drop_ref does; the heap is compacted once, below)
                    existing.refs -= 1
                    if not existing.refs:
                        existing.state = inactive_state
                        existing.returned_tick = tick = next(ticks)
                        heapq.heappush(inactive, (existing.priority, tick, existing.block_id))
                        returned += 1
                continue
            slot.token_block = token_block
            slot.priority = priority
            registry[token_block.sequence_hash] = slot
            if not self._silent:
                self._outbox.append(self._event(StoreEvent, slot))
            if hold:
                slot.state = active_state
                slot.refs = 1
                out.append(slot)
            else:  # registered and released at once: inactive, returned now
                slot.state = inactive_state
                slot.refs = 0
                slot.returned_tick = tick = next(ticks)
                heapq.heappush(inactive, (priority, tick, slot.block_id))
                returned += 1
        self._num_active -= returned
        self._num_inactive += returned
        if not hold and len(inactive) > 2 * self._num_inactive + 64:
            self._inactive = [e for e in inactive if self._is_current(e)]
            heapq.heapify(self._inactive)
        return out

    def match(self, sequence_hashes: Iterable[int | TokenBlock]) -> list[ImmutableBlock]:
        """The registered blocks of the longest prefix of ``sequence_hashes``: stops at the first hash not here.

        Each returned block is held (active) until released; inactive ones become active again.
        """
        with self._lock:
            self._check_open()
            self._return_dropped()
            out = []
            for item in sequence_hashes:
                key = item.sequence_hash if isinstance(item, TokenBlock) else _u64(item, "sequence_hash")
                slot = self._registry.get(key)
                if slot is None:
                    break
                self._acquire(slot)
                out.append(ImmutableBlock(self, slot))
            return out

    # -- many blocks at once: one lock acquisition, no object per block (what the offload manager uses) -------

    def allocate_group(self, count: int, *, partial: bool = False) -> SlotGroup:
        """:meth:`allocate` as one handle for all the blocks (a :class:`SlotGroup`), in the same order.

        ``partial``: as many as the tier has free or evictable, up to ``count`` (fewer, or none, when it is short)
        instead of all or none (PoolExhaustedError)."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise BlockPoolError(f"count must be a whole number >= 0, got {count!r}")
        with self._lock:
            self._check_open()
            self._return_dropped()
            available = len(self._free) + self._num_inactive
            if count > available:
                if not partial:
                    raise self._exhausted(count)
                count = available
            every, free, mutable = self._slots, self._free, _State.MUTABLE
            slots = [every[free.popleft()] for _ in range(min(count, len(free)))]
            slots += [self._evict() for _ in range(count - len(slots))]
            for slot in slots:
                slot.state = mutable
            self._num_active += count
            group = SlotGroup(self, slots)
        self._deliver()
        return group

    def hold(self, blocks: Iterable[ImmutableBlock]) -> BlockGroup:
        """One more holder of each block, as one handle (a :class:`BlockGroup`): ``clone()`` of each, without an
        object per block. All or none: a block of another pool, or one released, raises and holds nothing."""
        blocks = list(blocks)
        with self._lock:
            self._check_open()
            for block in blocks:
                if type(block) is not ImmutableBlock and not isinstance(block, ImmutableBlock):
                    raise BlockPoolError(f"hold takes ImmutableBlocks of the {self._tier.words}, got {block!r}")
                if block._pool is not self:
                    raise BlockPoolError(
                        f"{block!r} belongs to the {block._pool.tier.words}, not the {self._tier.words}"
                    )
                if block._fate is not None:
                    block._check_live()
            slots = [block._slot for block in blocks]
            for slot in slots:
                slot.refs += 1
            return BlockGroup(self, slots)

    def present(self, sequence_hashes: Iterable[int]) -> set[int]:
        """Which of these sequence hashes are registered here (active or inactive), read at one moment. Changes
        nothing (an inactive block stays inactive)."""
        hashes = {h if type(h) is int and 0 <= h < _U64 else _u64(h, "sequence_hash") for h in sequence_hashes}
        with self._lock:
            return hashes & self._registry.keys()

    def find(self, sequence_hashes: Iterable[int]) -> list[ImmutableBlock | None]:
        """Each hash's registered block, held as :meth:`match` holds it, or None where the tier lacks it. Unlike
        :meth:`match` it does not stop at the first miss."""
        hashes = [h if type(h) is int and 0 <= h < _U64 else _u64(h, "sequence_hash") for h in sequence_hashes]
        with self._lock:
            self._check_open()
            self._return_dropped()
            out: list[ImmutableBlock | None] = []
            for sequence_hash in hashes:
                slot = self._registry.get(sequence_hash)
                if slot is None:
                    out.append(None)
                else:
                    self._acquire(slot)
                    out.append(ImmutableBlock(self, slot))
            return out

    def release_all(self, blocks: Iterable[MutableBlock | ImmutableBlock]) -> None:
        """``release()`` each handle (mutable or registered), as one step: all or none. A handle of another pool,
        one already released or registered, or the same handle twice raises and releases nothing."""
        blocks = list(blocks)
        if not blocks:
            return
        with self._lock:
            seen: set[int] = set()
            for block in blocks:
                if not isinstance(block, _Handle) or block._pool is not self:
                    raise BlockPoolError(f"release_all takes blocks of the {self._tier.words}, got {block!r}")
                if block._fate == "registered":
                    raise BlockReleasedError(
                        f"{block!r} was registered: release the ImmutableBlock that register() returned instead; "
                        "release_all released nothing"
                    )
                if block._fate is not None or id(block) in seen:
                    raise BlockReleasedError(
                        f"{block!r} was already released (or given twice): a block is released once; release_all "
                        "released nothing"
                    )
                seen.add(id(block))
            for block in blocks:
                block._fate = "released"
            if self._closed:
                return
            self._return_dropped()
            for block in blocks:  # in order, as many release() calls would
                if isinstance(block, MutableBlock):
                    self._free_slot(block._slot)
                else:
                    self._drop_ref(block._slot)
        self._deliver()

    def reset_inactive(self) -> int:
        """Forget every inactive block (remove events, slots back to the free list); returns how many."""
        with self._lock:
            self._check_open()
            self._return_dropped()
            count = 0
            while self._num_inactive:
                slot = self._evict(RemoveReason.RESET)
                self._free.append(slot.block_id)
                count += 1
        self._deliver()
        return count

    def close(self) -> None:
        """The tier's memory goes away: remove events for every registered block. Idempotent.

        Releasing a handle afterwards is allowed (and does nothing); any other operation raises PoolClosedError.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._dropped.clear()
            for slot in sorted(self._registry.values(), key=lambda s: s.block_id):
                if not self._silent:
                    self._outbox.append(self._event(RemoveEvent, slot, reason=RemoveReason.CLOSED))
            self._registry.clear()
        self._deliver()

    # -- handles call these ---------------------------------------------------------------------------------

    def _release(self, handle: _Handle) -> None:
        with self._lock:
            if handle._fate == "registered":
                raise BlockReleasedError(
                    f"{handle!r} was registered: release the ImmutableBlock that register() returned instead"
                )
            if handle._fate is not None:
                raise BlockReleasedError(f"{handle!r} was already released: a block is released once")
            handle._fate = "released"
            if self._closed:
                return
            self._return_dropped()
            if isinstance(handle, MutableBlock):
                self._free_slot(handle._slot)
            else:
                self._drop_ref(handle._slot)
        self._deliver()

    def _clone(self, handle: ImmutableBlock) -> ImmutableBlock:
        with self._lock:
            handle._check_live()
            self._check_open()
            handle._slot.refs += 1
            return ImmutableBlock(self, handle._slot)

    def _set_priority(self, handle: ImmutableBlock, priority: int) -> None:
        _check_priority(priority)
        with self._lock:
            handle._check_live()
            handle._slot.priority = priority

    def _release_group(self, group: _Group) -> None:
        with self._lock:
            if group._fate is not None:
                raise BlockReleasedError(f"{group!r} was already {group._fate}: a group is released once")
            group._fate = "released"
            if self._closed:
                return
            self._return_dropped()
            if isinstance(group, SlotGroup):
                self._free_slots(group._slots)
            else:
                self._drop_refs(group._slots)
        self._deliver()

    def _register_group(
        self,
        group: SlotGroup,
        token_blocks: Sequence[TokenBlock] | None,
        priority: int,
        keep: bool,
        like: BlockGroup | None = None,
    ) -> BlockGroup | None:
        if like is not None:  # registered blocks' token blocks: already checked when they were registered
            if not isinstance(like, BlockGroup) or like._pool.block_size != self._block_size:
                raise BlockPoolError(
                    f"register_like takes a BlockGroup of a pool with blocks of {self._block_size} tokens, got {like!r}"
                )
            checked = like.token_blocks
            if len(checked) != len(group._slots):
                raise BlockPoolError(
                    f"register_like needs one source per block: got {len(checked)} for {len(group._slots)} blocks"
                )
            _check_priority(priority)
        else:
            checked = self._check_token_blocks(len(group._slots), token_blocks or (), priority)
        with self._lock:
            self._check_open()
            self._return_dropped()
            group._check_live()
            group._fate = "registered"
            slots = self._register_slots(group._slots, checked, priority, hold=keep)
            out = BlockGroup(self, slots) if keep else None
        self._deliver()
        return out

    def _partition(self, group: G, parts: Sequence[Sequence[int]]) -> list[G]:
        parts = [list(part) for part in parts]
        with self._lock:
            self._check_open()
            group._check_live()
            n = len(group._slots)
            named = [i for part in parts for i in part]
            if len(named) != n or set(named) != set(range(n)):
                raise BlockPoolError(
                    f"partition names each of a group's {n} blocks (positions 0..{n - 1}) exactly once; got {parts!r}"
                )
            group._fate = "partitioned"
            slots = group._slots
            return [type(group)(self, [slots[i] for i in part]) for part in parts]

    def _join(self, groups: Sequence[G]) -> G:
        with self._lock:
            self._check_open()
            kind = type(groups[0])
            for group in groups:
                if type(group) is not kind or group._pool is not self:
                    raise BlockPoolError(f"join takes {kind.__name__}s of the {self._tier.words}, got {group!r}")
                group._check_live()
            if len({id(g) for g in groups}) != len(groups):
                raise BlockPoolError("join was given the same group twice")
            for group in groups:
                group._fate = "joined"
            return kind(self, [slot for group in groups for slot in group._slots])

    def _handles(self, group: BlockGroup) -> list[ImmutableBlock]:
        with self._lock:
            self._check_open()
            group._check_live()
            group._fate = "handed out"
            return [ImmutableBlock(self, slot) for slot in group._slots]

    def _dropped_group(self, group: _Group) -> None:
        """From a group's ``__del__``: no lock (see ``_dropped_handle``)."""
        if not self._closed:
            mutable = isinstance(group, SlotGroup)
            self._dropped.extend((mutable, slot) for slot in group._slots)

    def _dropped_handle(self, handle: _Handle) -> None:
        """From a handle's ``__del__``: no lock may be taken here (the collector can run inside a locked section)."""
        if not self._closed:
            self._dropped.append((isinstance(handle, MutableBlock), handle._slot))

    # -- internals (called with the lock held) --------------------------------------------------------------

    def _exhausted(self, count: int) -> PoolExhaustedError:
        return PoolExhaustedError(
            f"the {self._tier.words} has {len(self._free)} free and {self._num_inactive} evictable blocks, "
            f"{count} were asked for; the other {self._num_active} of {len(self._slots)} are in use: "
            f"release blocks, or configure more `{self._tier.slot}.num_blocks`"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosedError(f"the {self._tier.words} pool was closed with its manager; its blocks are gone")

    def _acquire(self, slot: _Slot) -> None:
        if slot.state is _State.INACTIVE:
            slot.state = _State.ACTIVE
            self._num_inactive -= 1
            self._num_active += 1
            slot.refs = 1
        else:
            slot.refs += 1

    def _drop_ref(self, slot: _Slot) -> None:
        slot.refs -= 1
        if slot.refs:
            return
        slot.state = _State.INACTIVE
        slot.returned_tick = next(self._ticks)
        self._num_active -= 1
        self._num_inactive += 1
        heapq.heappush(self._inactive, (slot.priority, slot.returned_tick, slot.block_id))
        if len(self._inactive) > 2 * self._num_inactive + 64:  # drop entries of blocks matched since
            self._inactive = [e for e in self._inactive if self._is_current(e)]
            heapq.heapify(self._inactive)

    def _drop_refs(self, slots: Iterable[_Slot]) -> None:
        """``_drop_ref`` of each slot, in order (one holder each)."""
        inactive, ticks = self._inactive, self._ticks
        returned = 0
        for slot in slots:
            slot.refs -= 1
            if slot.refs:
                continue
            slot.state = _State.INACTIVE
            slot.returned_tick = tick = next(ticks)
            heapq.heappush(inactive, (slot.priority, tick, slot.block_id))
            returned += 1
        self._num_active -= returned
        self._num_inactive += returned
        if len(inactive) > 2 * self._num_inactive + 64:  # drop entries of blocks matched since
            self._inactive = [e for e in inactive if self._is_current(e)]
            heapq.heapify(self._inactive)

    def _free_slots(self, slots: Sequence[_Slot]) -> None:
        free = self._free
        for slot in slots:
            slot.state = _State.FREE
            free.append(slot.block_id)
        self._num_active -= len(slots)

    def _free_slot(self, slot: _Slot) -> None:
        slot.state = _State.FREE
        self._num_active -= 1
        self._free.append(slot.block_id)

    def _is_current(self, entry: tuple[int, int, int]) -> bool:
        slot = self._slots[entry[2]]
        return slot.state is _State.INACTIVE and slot.returned_tick == entry[1]

    def _evict(self, reason: RemoveReason = RemoveReason.EVICTED) -> _Slot:
        """Take the inactive block that goes first (lowest priority, then oldest return) out of the registry."""
        while True:
            entry = heapq.heappop(self._inactive)
            if self._is_current(entry):
                break
        slot = self._slots[entry[2]]
        assert slot.token_block is not None
        del self._registry[slot.token_block.sequence_hash]
        if not self._silent:
            self._outbox.append(self._event(RemoveEvent, slot, reason=reason))
        slot.state = _State.FREE
        slot.token_block = None
        slot.priority = 0
        self._num_inactive -= 1
        return slot

    def _return_dropped(self) -> None:
        while self._dropped:
            mutable, slot = self._dropped.popleft()
            if mutable:
                self._free_slot(slot)
            else:
                self._drop_ref(slot)

    def _event(self, kind: type[BlockEvent], slot: _Slot, **extra: Any) -> BlockEvent:
        token_block = slot.token_block
        assert token_block is not None
        return kind(
            sequence_hash=token_block.sequence_hash,
            parent_hash=token_block.parent_hash,
            tokens=token_block.tokens,
            block_size=self._block_size,
            tier=self._tier,
            block_id=slot.block_id,
            local_hash=token_block.local_hash,
            external_hash=token_block.external_hash,
            **extra,
        )

    def _deliver(self) -> None:
        """Hand queued events to the event manager outside the lock, in the order they happened."""
        if not self._outbox:  # read without the lock: a producer that queues after this delivers for itself
            return
        while True:
            with self._lock:
                if self._delivering or not self._outbox:
                    return
                self._delivering = True
                batch = list(self._outbox)
                self._outbox.clear()
            try:
                for event in batch:
                    try:
                        if isinstance(event, StoreEvent):
                            self._event_manager.on_store(event)
                        else:
                            self._event_manager.on_remove(event)
                    except Exception:
                        self.event_failures += 1
                        log.exception("the event manager %r failed on %r", self._event_manager, event)
            finally:
                with self._lock:
                    self._delivering = False


class _Owned:
    """What block handles and groups share: their pool, a fate once used up, release at the end of a ``with``
    block, and a return to the pool (with a ResourceWarning) when garbage-collected unreleased."""

    __slots__ = ("__weakref__", "_fate", "_pool")

    def __init__(self, pool: BlockPool) -> None:
        self._pool = pool
        self._fate: str | None = None  # how it was used up ("released", "registered", ...)

    @property
    def tier(self) -> Tier:
        return self._pool.tier

    @property
    def pool(self) -> BlockPool:
        return self._pool

    @property
    def released(self) -> bool:
        """Used up: released, or turned into other handles (registered, partitioned, joined, handed out)."""
        return self._fate is not None

    def release(self) -> None:
        raise NotImplementedError

    def _return_dropped(self) -> None:
        """From ``__del__``: queue what it holds for the pool's next operation (no lock may be taken here)."""
        raise NotImplementedError

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fate is None:
            self.release()

    def __del__(self) -> None:
        if getattr(self, "_fate", "gone") is None:
            try:
                self._return_dropped()
                warnings.warn(
                    f"{self!r} was garbage-collected without release(); returned to the pool",
                    ResourceWarning,
                    stacklevel=1,
                )
            except Exception:  # nothing can be reported from a finalizer at interpreter exit
                pass


class _Handle(_Owned):
    __slots__ = ("_block_id", "_slot")

    _kind = "block"

    def __init__(self, pool: BlockPool, slot: _Slot) -> None:
        self._pool = pool
        self._slot = slot
        self._block_id = slot.block_id
        self._fate = None  # "released" or "registered" once the handle is used up

    @property
    def block_id(self) -> int:
        """The slot's index in the tier (what a layout's ``memory_region`` takes)."""
        self._check_live()
        return self._block_id

    def release(self) -> None:
        """Give the block back (once); a ``with`` block does it on exit."""
        self._pool._release(self)

    def _check_live(self) -> None:
        if self._fate is not None:
            raise BlockReleasedError(
                f"{self!r} was {self._fate}; it can no longer be used"
                + ("; use the ImmutableBlock that register() returned" if self._fate == "registered" else "")
            )

    def _return_dropped(self) -> None:
        self._pool._dropped_handle(self)

    def __repr__(self) -> str:
        state = f", {self._fate}" if self._fate else ""
        return f"{type(self).__name__}({self._pool.tier.name} block {self._block_id}{state})"


class MutableBlock(_Handle):
    """A block just allocated, held by one owner: write its memory, then :meth:`register` it or release it."""

    __slots__ = ()

    def register(self, token_block: TokenBlock, *, priority: int = 0) -> ImmutableBlock:
        """``pool.register([self], [token_block])[0]``: this handle is consumed."""
        return self._pool.register([self], [token_block], priority=priority)[0]

    def __enter__(self) -> MutableBlock:
        return self


class ImmutableBlock(_Handle):
    """One holder of a registered block. Matchable by its sequence hash; :meth:`clone` for another holder."""

    __slots__ = ()

    @property
    def token_block(self) -> TokenBlock:
        token_block = self._slot.token_block if self._fate is None else None
        if token_block is None:
            self._check_live()
        assert token_block is not None
        return token_block

    @property
    def sequence_hash(self) -> int:
        return self.token_block.sequence_hash

    @property
    def priority(self) -> int:
        self._check_live()
        return self._slot.priority

    def set_priority(self, priority: int) -> None:
        """Eviction priority once no one holds the block (0..2**32-1; lower is evicted first)."""
        self._pool._set_priority(self, priority)

    def clone(self) -> ImmutableBlock:
        """Another holder of the same block (released separately)."""
        return self._pool._clone(self)

    def __enter__(self) -> ImmutableBlock:
        return self


class _Group(_Owned):
    """Several blocks of one pool as one handle: no object per block, one lock acquisition per operation."""

    __slots__ = ("_slots",)

    def __init__(self, pool: BlockPool, slots: list[_Slot]) -> None:
        self._pool = pool
        self._slots = slots
        self._fate = None  # "released", "registered", "partitioned", "joined", "handed out"

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def block_ids(self) -> list[int]:
        """The slots' indices in the tier, in order (what a layout's ``memory_region`` and a transfer take)."""
        self._check_live()
        return [slot.block_id for slot in self._slots]

    def release(self) -> None:
        """Give every block back (once); a ``with`` block does it on exit."""
        self._pool._release_group(self)

    def partition(self: G, parts: Sequence[Sequence[int]]) -> list[G]:
        """Split into groups of the given positions (each position in exactly one part); this group is used up."""
        return self._pool._partition(self, parts)

    @classmethod
    def join(cls: type[G], groups: Sequence[G]) -> G:
        """One group of the blocks of ``groups`` (of one pool), in order; they are used up."""
        groups = list(groups)
        if not groups:
            raise BlockPoolError(f"{cls.__name__}.join needs at least one group")
        return groups[0]._pool._join(groups)

    def _check_live(self) -> None:
        if self._fate is not None:
            raise BlockReleasedError(f"{self!r} was {self._fate}; it can no longer be used")

    def __enter__(self: G) -> G:
        return self

    def _return_dropped(self) -> None:
        self._pool._dropped_group(self)

    def __repr__(self) -> str:
        state = f", {self._fate}" if self._fate else ""
        return f"{type(self).__name__}({self._pool.tier.name}, {len(self._slots)} blocks{state})"


class SlotGroup(_Group):
    """Blocks just allocated (:meth:`BlockPool.allocate_group`), held by one owner: write them, then register
    them all (:meth:`register`) or release them."""

    __slots__ = ()

    def register(
        self, token_blocks: Sequence[TokenBlock], *, priority: int = 0, keep: bool = True
    ) -> BlockGroup | None:
        """:meth:`BlockPool.register` of every block, all or none; the group is used up.

        ``keep``: return the registered blocks held, as a :class:`BlockGroup` (one holder of each, in order; a
        hash already registered gives its existing block); otherwise nobody holds them afterwards (they are
        inactive unless someone else holds them) and None is returned."""
        return self._pool._register_group(self, token_blocks, priority, keep)

    def register_like(self, sources: BlockGroup, *, priority: int = 0, keep: bool = True) -> BlockGroup | None:
        """:meth:`register` under the token blocks of ``sources`` (held blocks of any pool with blocks of the same
        size, one per block, in order): what a copy from ``sources`` into these blocks registers when it lands."""
        return self._pool._register_group(self, None, priority, keep, like=sources)


class BlockGroup(_Group):
    """One holder of each of several registered blocks (:meth:`BlockPool.hold`, :meth:`SlotGroup.register`)."""

    __slots__ = ()

    @property
    def token_blocks(self) -> list[TokenBlock]:
        self._check_live()
        return [slot.token_block for slot in self._slots]  # type: ignore[misc]  # registered: never None

    @property
    def sequence_hashes(self) -> list[int]:
        return [token_block.sequence_hash for token_block in self.token_blocks]

    @property
    def priorities(self) -> list[int]:
        self._check_live()
        return [slot.priority for slot in self._slots]

    def handles(self) -> list[ImmutableBlock]:
        """One :class:`ImmutableBlock` per block, in order, taking over the group's holds; the group is used up."""
        return self._pool._handles(self)
