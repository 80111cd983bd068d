"""Moving registered blocks between tiers: offload down (G1 -> G2 -> G3), onboard up, match a prefix across tiers.

:class:`OffloadManager` is the part of :class:`~kvbm_builder.KvBlockManager` that decides what moves; the bytes are
moved by a :class:`~kvbm_builder.transfer.TransferEngine`. The rules are upstream's (``offload.rs``), made visible:

- **Offload**, per block: skip when the target tier already holds the hash (or a copy to it is under way): not a
  sighting for the filter; then ask the source tier's ``offload_filter``; then take a target slot (a full target
  tier skips the block and counts it, never silently); then queue it. Queued blocks go by priority (higher first,
  first in first out within one priority; a caller's offloads before cascades to disk), as engine submits of up to
  ``max_concurrent`` batches of ``max_batch_blocks``; per lane (copies through the GPU; host and disk copies) at
  most ``2 * max_concurrent`` batches are out at once: those the engine copies, and as many waiting in it so that
  it never idles between submits. A completed copy registers the target block under the source block's hash (a
  store event); a copy that landed in the host tier is then offered to the disk tier, through the host tier's
  filter, once the offload that made it is settled.
- Each step is taken for all the blocks of a call (or of a transfer) at once: one lock acquisition per pool, the
  blocks held as a :class:`~kvbm_builder.blocks.BlockGroup` / :class:`~kvbm_builder.blocks.SlotGroup` rather than
  an object per block. So all the blocks of a call are checked for presence before any of its target slots is
  taken (a slot taken may evict a block found present a moment before, as another thread's could), and a hash
  offered twice in one call goes once: the second is ``in_flight``.
- **Onboard**: blocks of a lower tier are copied into slots of a higher tier (or found there already) and returned
  as registered blocks of that tier.
- A failed copy registers nothing: its target slots go back to the free list and the waiter gets the
  :class:`~kvbm_builder.transfer.TransferError` (tiers, blocks, step). Source blocks are held while they are read.

Every decision is counted (:meth:`OffloadManager.stats`) and told to listeners (:meth:`OffloadManager.add_listener`):
:class:`OffloadSkipped`, :class:`Lookup` and the engine's :class:`~kvbm_builder.transfer.TransferRecord`.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import heapq
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from .blocks import BlockGroup, BlockPool, FrequencyFilter, ImmutableBlock, PoolCounts, SlotGroup
from .blocks.pool import MAX_PRIORITY
from .config.protocols import EventManager, OffloadFilter, Tier
from .config.runtime import CancellationToken
from .errors import OffloadError
from .layout import Layout
from .transfer import TransferEngine, TransferError, TransferRecord

if TYPE_CHECKING:
    from .metrics import KvbmMetrics, NullKvbmMetrics
    from .metrics import SkipReason as MetricsSkipReason

log = logging.getLogger(__name__)

__all__ = [
    "BlockFuture",
    "KvbmStats",
    "Lookup",
    "OffloadManager",
    "OffloadResult",
    "OffloadSkipped",
    "PrefixMatch",
    "SkipReason",
]

T = TypeVar("T")

_LEVEL = {Tier.G1: 1, Tier.G2: 2, Tier.G3: 3}


class BlockFuture(Future[T]):
    """A ``concurrent.futures.Future`` that ``await`` also accepts (``await manager.onboard(...)``)."""

    def __await__(self) -> Generator[Any, None, T]:
        return asyncio.wrap_future(self).__await__()


class SkipReason(enum.Enum):
    """Why a block offered for offload was not copied."""

    ALREADY_PRESENT = "already_present"  # the target tier holds the hash: nothing to do
    IN_FLIGHT = "in_flight"  # a copy of the hash to the target tier is under way
    FILTERED = "filtered"  # the source tier's offload filter said no
    TARGET_FULL = "target_full"  # every block of the target tier is in use


# the skips the metrics count, by the metrics' names (present and in-flight blocks need no copy: nothing was lost)
_METRICS_REASONS: dict[SkipReason, MetricsSkipReason] = {
    SkipReason.TARGET_FULL: "tier_full",
    SkipReason.FILTERED: "filter",
}


@attrs.frozen
class OffloadSkipped:
    """One block not offloaded, and why (for listeners; also counted in :class:`KvbmStats`)."""

    src_tier: Tier
    dst_tier: Tier
    reason: SkipReason
    sequence_hash: int


@attrs.frozen
class Lookup:
    """One prefix match: tokens asked for and tokens found in each tier (G1 first; a tier absent found none)."""

    requested_tokens: int
    matched_tokens: Mapping[Tier, int]


Event = OffloadSkipped | Lookup | TransferRecord
Listener = Callable[[Event], None]


@attrs.frozen
class OffloadResult:
    """What one offload did with each block offered, by sequence hash.

    ``offloaded`` blocks are registered in ``dst_tier`` (their copies completed); the other fields are the blocks
    skipped, by reason. The tiers are None only for an offload of no blocks.
    """

    src_tier: Tier | None
    dst_tier: Tier | None
    offloaded: tuple[int, ...] = ()
    already_present: tuple[int, ...] = ()
    in_flight: tuple[int, ...] = ()
    filtered: tuple[int, ...] = ()
    target_full: tuple[int, ...] = ()


@attrs.frozen
class KvbmStats:
    """Counters since the manager started, and the blocks of each tier now. Plain data, for metrics.

    - ``blocks``: each tier's :class:`~kvbm_builder.blocks.PoolCounts` (free, active, inactive);
    - ``skipped``: blocks not offloaded, by (source tier, target tier, reason);
    - ``moved_blocks`` / ``moved_bytes``: blocks and bytes whose copy completed, by (source tier, target tier),
      offloads and onboards alike; ``failed_transfers``: transfers that failed, likewise;
    - ``lookups``, ``requested_tokens`` and ``matched_tokens`` (per tier): prefix matches
      (hit rate of a tier = matched / requested);
    - ``pending_offloads``: blocks queued or being copied now.
    """

    blocks: Mapping[Tier, PoolCounts]
    skipped: Mapping[tuple[Tier, Tier, SkipReason], int]
    moved_blocks: Mapping[tuple[Tier, Tier], int]
    moved_bytes: Mapping[tuple[Tier, Tier], int]
    failed_transfers: Mapping[tuple[Tier, Tier], int]
    lookups: int
    requested_tokens: int
    matched_tokens: Mapping[Tier, int]
    pending_offloads: int


class PrefixMatch:
    """The blocks of a prefix found across tiers: ``device`` (G1) first, then ``host`` (G2), then ``disk`` (G3).

    The blocks are held (they cannot be evicted) until :meth:`release` or the end of a ``with`` block; onboard the
    host and disk parts to use them on the GPU.
    """

    def __init__(self, blocks: Mapping[Tier, list[ImmutableBlock]], requested_tokens: int, block_size: int) -> None:
        self.by_tier: dict[Tier, list[ImmutableBlock]] = {tier: list(found) for tier, found in blocks.items()}
        self.requested_tokens = requested_tokens
        self.block_size = block_size

    @property
    def device(self) -> list[ImmutableBlock]:
        return self.by_tier.get(Tier.G1, [])

    @property
    def host(self) -> list[ImmutableBlock]:
        return self.by_tier.get(Tier.G2, [])

    @property
    def disk(self) -> list[ImmutableBlock]:
        return self.by_tier.get(Tier.G3, [])

    @property
    def blocks(self) -> list[ImmutableBlock]:
        """Every matched block, in prefix order."""
        return [block for tier in sorted(self.by_tier, key=_LEVEL.__getitem__) for block in self.by_tier[tier]]

    @property
    def num_blocks(self) -> int:
        return sum(len(found) for found in self.by_tier.values())

    @property
    def matched_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def release(self) -> None:
        """Release every block still held (those onboarded from it are separate handles)."""
        for block in self.blocks:
            if not block.released:
                block.release()

    def __enter__(self) -> PrefixMatch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        parts = ", ".join(f"{tier.name}: {len(found)}" for tier, found in self.by_tier.items())
        return f"PrefixMatch({self.matched_tokens} of {self.requested_tokens} tokens; {parts})"


class _Offload:
    """One offload call (``future`` set) or one cascade to disk (``future`` None), and what became of its blocks."""

    __slots__ = ("dst_tier", "errors", "future", "outstanding", "result", "src_tier")

    def __init__(self, src_tier: Tier, dst_tier: Tier, future: BlockFuture[OffloadResult] | None) -> None:
        self.src_tier, self.dst_tier, self.future = src_tier, dst_tier, future
        self.outstanding = 0
        self.errors: list[BaseException] = []
        self.result: dict[str, list[int]] = {name: [] for name in ("offloaded", *(r.value for r in SkipReason))}


class _Run:
    """Blocks of one offload call that share a priority, queued as one entry: sources held, target slots taken."""

    __slots__ = ("hashes", "request", "slots", "sources")

    def __init__(self, request: _Offload, sources: BlockGroup, slots: SlotGroup, hashes: list[int]) -> None:
        self.request, self.sources, self.slots, self.hashes = request, sources, slots, hashes


class _Transfer:
    """One engine submit of queued runs of one path: their blocks joined into one source and one target group."""

    __slots__ = ("batches", "dst_tier", "hashes", "lane", "parts", "runs", "slots", "sources", "src_tier", "started")

    def __init__(self, src_tier: Tier, dst_tier: Tier, lane: str, runs: list[_Run], batches: int) -> None:
        self.src_tier, self.dst_tier, self.lane = src_tier, dst_tier, lane
        self.runs = runs
        self.batches = batches
        self.sources: BlockGroup | None = None  # joined by _submit, outside the manager's lock
        self.slots: SlotGroup | None = None
        self.hashes = [h for run in runs for h in run.hashes]
        self.parts = [(run.request, len(run.hashes)) for run in runs]  # whose blocks, in order
        self.started = 0.0


class _Group:
    """The blocks of one onboard that come from one tier: their places in the result, sources and target slots."""

    __slots__ = ("positions", "slots", "sources")

    def __init__(self, positions: list[int], sources: BlockGroup, slots: SlotGroup) -> None:
        self.positions, self.sources, self.slots = positions, sources, slots


class _Onboard:
    __slots__ = ("errors", "future", "out", "outstanding")

    def __init__(self, out: list[ImmutableBlock | None], outstanding: int) -> None:
        self.future: BlockFuture[list[ImmutableBlock]] = BlockFuture()
        self.out = out
        self.outstanding = outstanding
        self.errors: list[BaseException] = []


def _release(*groups: BlockGroup | SlotGroup | None) -> None:
    """Release the groups still held (cleanup paths)."""
    for group in groups:
        if group is not None and not group.released:
            group.release()


def _lane(src_tier: Tier, dst_tier: Tier) -> str:
    """What a path's copies occupy: the GPU's copy slots when the device tier is one end, else the CPU's threads."""
    return "gpu" if Tier.G1 in (src_tier, dst_tier) else "cpu"


class OffloadManager:
    """Pools, filters and the offload queue of a manager's tiers. Thread-safe; see the module's documentation.

    Build one with :meth:`for_tiers`; :class:`~kvbm_builder.KvBlockManager` does.
    """

    def __init__(
        self,
        *,
        layouts: Mapping[Tier, Layout],
        pools: Mapping[Tier, BlockPool],
        engine: TransferEngine,
        targets: Mapping[Tier, Tier],
        filters: Mapping[Tier, OffloadFilter],
        cancellation_token: CancellationToken,
        max_batch_blocks: int,
        max_concurrent: int,
        owned_filters: Sequence[FrequencyFilter] = (),
    ) -> None:
        self._layouts = dict(layouts)
        self._pools = dict(pools)
        self._engine = engine
        self._targets = dict(targets)
        self._filters = dict(filters)
        self._token = cancellation_token
        self._max_batch_blocks = max_batch_blocks
        self._max_concurrent = max_concurrent
        self._owned_filters = list(owned_filters)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        # per lane, a heap of (cascade?, -priority, arrival, run): a caller's offloads before cascades to disk,
        # higher priority first, first come first within a priority
        self._queues: dict[str, list[tuple[bool, int, int, _Run]]] = {"gpu": [], "cpu": []}
        self._arrivals = itertools.count()
        self._moving: dict[Tier, set[int]] = {tier: set() for tier in pools}  # hashes queued or copying, by target
        # engine batches submitted per lane and not finished: up to max_concurrent copying and as many waiting in
        # the engine, so that it never idles between two submits; the rest wait here, in priority order
        self._batches_out: Counter[str] = Counter()
        self._window = 2 * max_concurrent
        self._callbacks_pending = 0  # transfers (offload and onboard) whose completion has not been handled
        self._pumping = False
        self._closed = False
        self._listeners: list[Listener] = []
        self._reporting: list[KvbmMetrics | NullKvbmMetrics] = []  # metrics fed by report_to()
        self._skipped: Counter[tuple[Tier, Tier, SkipReason]] = Counter()
        self._moved_blocks: Counter[tuple[Tier, Tier]] = Counter()
        self._moved_bytes: Counter[tuple[Tier, Tier]] = Counter()
        self._failed: Counter[tuple[Tier, Tier]] = Counter()
        self._lookups = 0
        self._requested_tokens = 0
        self._matched_tokens: Counter[Tier] = Counter()

    @classmethod
    def for_tiers(
        cls,
        layouts: Mapping[Tier, Layout],
        *,
        block_size: int,
        filters: Mapping[Tier, OffloadFilter | None],
        event_manager: EventManager | None,
        cancellation_token: CancellationToken,
        max_batch_blocks: int = 16,
        max_concurrent: int = 4,
        bypass_cpu_cache: bool = False,
        disk_offload_filter: bool = True,
        device_id: int | None = None,
    ) -> OffloadManager:
        """Pools for the allocated tiers, upstream's offload paths and filters, and a transfer engine.

        Paths: G1 -> G2 (G1 -> G3 instead when ``bypass_cpu_cache`` or there is no host tier), G2 -> G3.
        ``filters`` are the tiers' configured ``offload_filter``; when the host tier has none and a disk tier exists,
        a ``FrequencyFilter()`` guards the disk unless ``disk_offload_filter`` is false. Frequency filters that are
        not ticking are started on ``cancellation_token`` and stopped by :meth:`close`.
        """
        pools = {
            tier: BlockPool(tier, layout.spec.num_blocks, block_size=block_size, event_manager=event_manager)
            for tier, layout in layouts.items()
        }
        targets: dict[Tier, Tier] = {}
        if Tier.G1 in layouts:
            if Tier.G2 in layouts and not (bypass_cpu_cache and Tier.G3 in layouts):
                targets[Tier.G1] = Tier.G2
            elif Tier.G3 in layouts:
                targets[Tier.G1] = Tier.G3
        if Tier.G2 in layouts and Tier.G3 in layouts:
            targets[Tier.G2] = Tier.G3
        chosen: dict[Tier, OffloadFilter] = {t: f for t, f in filters.items() if f is not None and t in targets}
        if Tier.G2 in targets and Tier.G2 not in chosen and disk_offload_filter:
            chosen[Tier.G2] = FrequencyFilter()
        started = []
        for offload_filter in chosen.values():
            if isinstance(offload_filter, FrequencyFilter) and not offload_filter.running:
                started.append(offload_filter.start(cancellation_token))
        try:
            engine = TransferEngine(
                device_id=device_id,
                max_batch_blocks=max_batch_blocks,
                max_concurrent=max_concurrent,
                cancellation_token=cancellation_token,
            )
            if Tier.G1 in layouts:  # the kernels load now, not on the first offload
                try:
                    engine.prepare_gpu(device_id)
                except BaseException:
                    engine.close()
                    raise
        except BaseException:
            for offload_filter in started:
                offload_filter.stop()
            raise
        return cls(
            layouts=layouts,
            pools=pools,
            engine=engine,
            targets=targets,
            filters=chosen,
            cancellation_token=cancellation_token,
            max_batch_blocks=max_batch_blocks,
            max_concurrent=max_concurrent,
            owned_filters=started,
        )

    # -- what it is -----------------------------------------------------------------------------------------

    @property
    def engine(self) -> TransferEngine:
        return self._engine

    @property
    def pools(self) -> dict[Tier, BlockPool]:
        return dict(self._pools)

    def pool(self, tier: Tier) -> BlockPool:
        found = self._pools.get(tier)
        if found is None:
            raise OffloadError(
                f"the {tier.words} has no block pool: it is not configured, or it is logical (its blocks live on "
                f"other workers); pools: {', '.join(t.name for t in self._pools) or 'none'}"
            )
        return found

    def offload_target(self, tier: Tier) -> Tier | None:
        """Where ``offload`` sends blocks of ``tier`` by default (None for the last tier)."""
        return self._targets.get(tier)

    def offload_filter(self, tier: Tier) -> OffloadFilter | None:
        """The filter offloads from ``tier`` pass (configured, or the default frequency filter on the host tier)."""
        return self._filters.get(tier)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` with every :class:`OffloadSkipped`, :class:`Lookup` and ``TransferRecord``.

        Listeners run on the thread that made the decision or finished the transfer; one that raises is logged.
        """
        with self._lock:
            self._listeners.append(listener)

    def report_to(self, metrics: KvbmMetrics | NullKvbmMetrics) -> None:
        """Feed ``metrics`` until :meth:`close`: each transfer when it completes (moved, or failed: never both),
        offloads skipped because the target tier was full (``tier_full``) or its filter said no (``filter``), each
        lookup (requested tokens and the tokens each tier matched), and the blocks of each tier by state, read from
        the pools at each scrape. What listeners see is what is counted, before any waiter is woken."""

        def record(event: Event) -> None:
            if isinstance(event, TransferRecord):
                metrics.record_transfer(
                    event.src_tier, event.dst_tier, event.num_blocks, event.nbytes, event.seconds, event.ok
                )
            elif isinstance(event, OffloadSkipped):
                reason = _METRICS_REASONS.get(event.reason)
                if reason is not None:
                    metrics.record_skipped(event.dst_tier, reason)
            else:
                metrics.record_lookup(event.requested_tokens, event.matched_tokens)

        from .metrics import TierBlocks

        def block_counts() -> dict[Tier, TierBlocks]:
            return {tier: TierBlocks(c.free, c.active, c.inactive) for tier, c in self.block_counts().items()}

        self.add_listener(record)
        metrics.set_block_counts_source(block_counts)
        self._reporting.append(metrics)

    def block_counts(self) -> dict[Tier, PoolCounts]:
        """Each open pool's blocks by state (free, active, inactive); thread-safe, for scrapes."""
        return {tier: pool.counts() for tier, pool in self._pools.items() if not pool.closed}

    def stats(self) -> KvbmStats:
        blocks = self.block_counts()
        with self._lock:
            return KvbmStats(
                blocks=blocks,
                skipped=dict(self._skipped),
                moved_blocks=dict(self._moved_blocks),
                moved_bytes=dict(self._moved_bytes),
                failed_transfers=dict(self._failed),
                lookups=self._lookups,
                requested_tokens=self._requested_tokens,
                matched_tokens=dict(self._matched_tokens),
                pending_offloads=sum(len(hashes) for hashes in self._moving.values()),
            )

    # -- matching -------------------------------------------------------------------------------------------

    def match(self, sequence_hashes: Sequence[int], *, requested_tokens: int, block_size: int) -> PrefixMatch:
        """The longest prefix of ``sequence_hashes`` held across the tiers, G1 first, each tier continuing where
        the one above stopped. Counted as one lookup of ``requested_tokens`` tokens."""
        if self._closed:
            raise OffloadError("cannot match: the manager is closed")
        found: dict[Tier, list[ImmutableBlock]] = {}
        start = 0
        try:
            for tier in sorted(self._pools, key=_LEVEL.__getitem__):
                found[tier] = self._pools[tier].match(sequence_hashes[start:])
                start += len(found[tier])
        except BaseException:
            PrefixMatch(found, requested_tokens, block_size).release()
            raise
        matched = {tier: len(blocks) * block_size for tier, blocks in found.items()}
        with self._lock:
            self._lookups += 1
            self._requested_tokens += requested_tokens
            self._matched_tokens.update(matched)
        self._tell(Lookup(requested_tokens, matched))
        return PrefixMatch(found, requested_tokens, block_size)

    # -- offload --------------------------------------------------------------------------------------------

    def offload(
        self, blocks: Iterable[ImmutableBlock], *, to: Tier | None = None, priority: int | None = None
    ) -> BlockFuture[OffloadResult]:
        """Copy registered blocks of one tier to a lower tier (by default the tier's offload target).

        Returns at once; the future gives the :class:`OffloadResult` once every copy finished, or raises the first
        :class:`~kvbm_builder.transfer.TransferError`. ``priority`` orders this offload in the queue (default: each
        block's own priority). The caller keeps its handles (release them when done; the copy holds its own).
        """
        blocks = list(blocks)
        self._check_running("offload")
        if priority is not None and (
            isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY
        ):
            raise OffloadError(f"priority must be a whole number 0..{MAX_PRIORITY} or None, got {priority!r}")
        future: BlockFuture[OffloadResult] = BlockFuture()
        if not blocks:
            future.set_result(OffloadResult(None, None))
            return future
        src_tier = self._tier_of(blocks, "offload")
        dst_tier = to if to is not None else self._targets.get(src_tier)
        if dst_tier is None:
            raise OffloadError(
                f"the {src_tier.words} has no lower tier to offload to"
                + (": it is the last tier" if src_tier is Tier.G3 else "; configure a host or disk tier")
            )
        if not isinstance(dst_tier, Tier) or _LEVEL[dst_tier] <= _LEVEL[src_tier]:
            raise OffloadError(f"offload moves blocks down: from the {src_tier.words} to a lower tier, not to {to!r}")
        self.pool(dst_tier)
        request = _Offload(src_tier, dst_tier, future)
        self._admit(request, self._pools[src_tier].hold(blocks), priority)
        self._pump()
        return future

    def _admit(self, request: _Offload, blocks: BlockGroup, priority: int | None) -> None:
        """Upstream's order for each block: present or in flight, then the filter, then a target slot; queue what
        passed. Each step is taken for all the blocks at once (one lock acquisition per pool, one for the queue).

        ``blocks`` (held for this offload) are owned: what is queued stays held by the queue, the rest is
        released, all of it even when this raises."""
        src_tier, dst_tier = request.src_tier, request.dst_tier
        dst_pool = self._pools[dst_tier]
        offload_filter = self._filters.get(src_tier)
        hashes: list[int] = []
        reasons: list[SkipReason | None] = []
        kept: list[int] = []  # the blocks still going, by position
        slots: SlotGroup | None = None
        sources: BlockGroup | None = None
        claimed = False
        try:
            hashes = blocks.sequence_hashes
            n = len(hashes)
            reasons = [None] * n
            present = dst_pool.present(hashes)
            with self._lock:
                moving = self._moving[dst_tier]
                if not present and len(set(hashes)) == n and moving.isdisjoint(hashes):
                    kept = list(range(n))  # the usual case: nothing to skip
                else:
                    offered: set[int] = set()  # a hash twice in one call: the second is in flight with the first
                    for i, sequence_hash in enumerate(hashes):
                        if sequence_hash in present:
                            reasons[i] = SkipReason.ALREADY_PRESENT
                        elif sequence_hash in moving or sequence_hash in offered:
                            reasons[i] = SkipReason.IN_FLIGHT
                        else:
                            offered.add(sequence_hash)
                            kept.append(i)
            if offload_filter is not None:  # user code: outside every lock
                passed = []
                for i in kept:
                    if offload_filter.should_offload(hashes[i]):
                        passed.append(i)
                    else:
                        reasons[i] = SkipReason.FILTERED
                kept = passed
            slots = dst_pool.allocate_group(len(kept), partial=True)
            for i in kept[len(slots) :]:
                reasons[i] = SkipReason.TARGET_FULL
            del kept[len(slots) :]
            wanted = [hashes[i] for i in kept]
            going: list[int] = []  # positions in ``slots`` claimed by this call
            lost: list[int] = []  # positions whose hash another thread claimed meanwhile
            with self._lock:
                if moving.isdisjoint(wanted):
                    moving.update(wanted)
                else:
                    for j, i in enumerate(kept):
                        if hashes[i] in moving:  # another thread queued it meanwhile
                            reasons[i] = SkipReason.IN_FLIGHT
                            lost.append(j)
                        else:
                            moving.add(hashes[i])
                            going.append(j)
                    kept = [kept[j] for j in going]  # what this call claimed (and, if this raises, gives back)
                claimed = True
            if lost:
                slots, extra = slots.partition([going, lost])
                extra.release()
            if len(kept) < n:
                sources, rest = blocks.partition([kept, sorted(set(range(n)) - set(kept))])
                rest.release()
            else:
                sources = blocks
            runs = self._runs(request, sources, slots, [hashes[i] for i in kept], priority)
        except BaseException:
            if claimed:
                with self._lock:
                    self._moving[dst_tier].difference_update(hashes[i] for i in kept)
            _release(slots, sources, blocks)
            raise
        skipped = [(reason, hashes[i]) for i, reason in enumerate(reasons) if reason is not None]
        for reason, sequence_hash in skipped:
            request.result[reason.value].append(sequence_hash)
        lane = _lane(src_tier, dst_tier)
        cascade = request.future is None
        with self._lock:
            for reason, _ in skipped:
                self._skipped[(src_tier, dst_tier, reason)] += 1
            closed = self._closed
            if not closed:
                request.outstanding = len(kept)
                queue = self._queues[lane]
                for run_priority, run in runs:
                    heapq.heappush(queue, (cascade, -run_priority, next(self._arrivals), run))
        for reason, sequence_hash in skipped:
            self._tell(OffloadSkipped(src_tier, dst_tier, reason, sequence_hash))
        if closed:
            self._drop([run for _, run in runs])
            error = self._stopped_error(src_tier, dst_tier, len(kept), "closed")
            self._settle(request, [error] if kept else [])
        elif not kept:
            self._settle(request, [])

    def _runs(
        self, request: _Offload, sources: BlockGroup, slots: SlotGroup, hashes: list[int], priority: int | None
    ) -> list[tuple[int, _Run]]:
        """The queued blocks as runs of one priority each (the call's, or each block's own), in call order, of at
        most one submit each (``max_concurrent`` batches)."""
        if not hashes:
            sources.release()
            slots.release()
            return []
        size = self._max_concurrent * self._max_batch_blocks
        priorities = [priority] if priority is not None else sources.priorities
        by_priority: dict[int, list[int]] = {}
        if len(set(priorities)) == 1:  # one priority: the blocks in call order
            by_priority[priorities[0]] = list(range(len(hashes)))
        else:
            for j, block_priority in enumerate(priorities):
                by_priority.setdefault(block_priority, []).append(j)
        parts = [
            (block_priority, positions[at : at + size])
            for block_priority, positions in by_priority.items()
            for at in range(0, len(positions), size)
        ]
        if len(parts) == 1:
            return [(parts[0][0], _Run(request, sources, slots, hashes))]
        source_parts = sources.partition([positions for _, positions in parts])
        slot_parts = slots.partition([positions for _, positions in parts])
        return [
            (block_priority, _Run(request, source_part, slot_part, [hashes[j] for j in positions]))
            for (block_priority, positions), source_part, slot_part in zip(parts, source_parts, slot_parts, strict=True)
        ]

    def _pump(self) -> None:
        """Submit queued blocks while a lane has fewer than its window of engine batches out.

        One thread pumps at a time; a pump asked for meanwhile is done by that thread's next round."""
        with self._lock:
            if self._pumping:
                return
            self._pumping = True
        cancelled = False
        try:
            while True:
                with self._lock:
                    queued = any(self._queues.values())
                    cancelled = queued and not self._closed and self._token.is_cancelled()
                    transfer = None if cancelled or self._closed or not queued else self._take()
                    if transfer is None:
                        self._pumping = False
                        break
                    self._batches_out[transfer.lane] += transfer.batches
                    self._callbacks_pending += 1
                self._submit(transfer)
        except BaseException:
            with self._lock:
                self._pumping = False
            raise
        if cancelled:  # the engine would refuse each one: fail what waits at once
            self._fail_queued("cancelled")

    def _take(self) -> _Transfer | None:
        """(With the lock held.) The next submit: whole runs of one path from the head of a lane's queue, as many
        as the lane's free window takes, at most ``max_concurrent`` batches (then completions come back in pieces
        that the engine overlaps with the next submit)."""
        for lane, queue in self._queues.items():
            limit = min(self._window - self._batches_out[lane], self._max_concurrent) * self._max_batch_blocks
            if not queue or len(queue[0][3].hashes) > limit:
                continue
            first = queue[0][3].request
            route = (first.src_tier, first.dst_tier)
            runs: list[_Run] = []
            count = 0
            while queue:
                run = queue[0][3]
                if (run.request.src_tier, run.request.dst_tier) != route or count + len(run.hashes) > limit:
                    break
                heapq.heappop(queue)
                runs.append(run)
                count += len(run.hashes)
            return _Transfer(route[0], route[1], lane, runs, -(-count // self._max_batch_blocks))
        return None

    def _fail_queued(self, step: str) -> None:
        """Release what every queued block holds and fail its offload (nothing of it is registered)."""
        with self._lock:
            runs = [entry[3] for queue in self._queues.values() for entry in sorted(queue, key=lambda e: e[:3])]
            for queue in self._queues.values():
                queue.clear()
        self._drop(runs)
        by_request: dict[int, tuple[_Offload, int]] = {}
        for run in runs:
            request, count = by_request.get(id(run.request), (run.request, 0))
            by_request[id(request)] = (request, count + len(run.hashes))
        for request, count in by_request.values():
            error = self._stopped_error(request.src_tier, request.dst_tier, count, step)
            with self._lock:
                request.outstanding -= count
                request.errors.append(error)
                done = request.outstanding == 0
                self._idle.notify_all()
            if done:
                self._settle(request, request.errors)

    def _submit(self, transfer: _Transfer) -> None:
        transfer.started = time.perf_counter()
        try:
            runs = transfer.runs
            if len(runs) == 1:
                transfer.sources, transfer.slots = runs[0].sources, runs[0].slots
            else:
                transfer.sources = BlockGroup.join([run.sources for run in runs])
                transfer.slots = SlotGroup.join([run.slots for run in runs])
            future = self._engine.submit(
                self._layouts[transfer.src_tier],
                transfer.sources.block_ids,
                self._layouts[transfer.dst_tier],
                transfer.slots.block_ids,
            )
        except Exception as error:  # refused (closed, cancelled, bad memory): fail these blocks, keep pumping
            self._finish(transfer, None, error, pump=False)
            return
        future.add_done_callback(functools.partial(self._finish, transfer))

    def _finish(
        self,
        transfer: _Transfer,
        future: Future[TransferRecord] | None,
        error: BaseException | None = None,
        *,
        pump: bool = True,
    ) -> None:
        """A submit of queued blocks ended: register the targets (or free them) and release the sources in one
        pass, tell the listeners, settle the offloads it finishes, then offer host copies to the disk tier."""
        src_tier, dst_tier = transfer.src_tier, transfer.dst_tier
        next_tier = self._targets.get(dst_tier) if dst_tier is Tier.G2 else None
        registered: BlockGroup | None = None
        if transfer.sources is None or transfer.slots is None:  # refused before the runs were joined
            record = self._failed_record(src_tier, dst_tier, len(transfer.hashes), transfer.started, error)
            self._drop(transfer.runs)
        else:
            record, registered, error = self._register_landed(
                src_tier,
                dst_tier,
                transfer.sources,
                transfer.slots,
                transfer.started,
                future,
                error,
                keep=next_tier is not None,
            )
        self._tell(record)  # before anyone waiting on this transfer (or on wait_idle) is woken
        settled: list[_Offload] = []
        hashes = transfer.hashes
        with self._lock:
            self._count_transfer(record)
            self._moving[dst_tier].difference_update(hashes)
            at = 0
            for request, count in transfer.parts:
                if error is None:
                    request.result["offloaded"] += hashes[at : at + count]
                elif not any(e is error for e in request.errors):
                    request.errors.append(error)
                at += count
                request.outstanding -= count
                if request.outstanding == 0:
                    settled.append(request)
            self._batches_out[transfer.lane] -= transfer.batches
            closed = self._closed
            # _callbacks_pending stays up until the cascade below is queued: wait_idle() sees no gap between hops
        for request in settled:
            self._settle(request, request.errors)
        try:
            if registered is not None and next_tier is not None and not closed:
                # a block that reached the host tier is offered to the disk tier, after the waiter above was woken;
                # the registered group is handed over (what the cascade does not queue, it releases)
                cascade, registered = registered, None
                self._admit(_Offload(dst_tier, next_tier, None), cascade, None)
        except Exception:
            log.exception("offering blocks of the %s to the disk tier failed", dst_tier.words)
        finally:
            _release(registered)
            with self._lock:
                self._callbacks_pending -= 1
                self._idle.notify_all()
        if pump:
            self._pump()

    def _drop(self, runs: Iterable[_Run]) -> None:
        """Release what queued blocks held (sources and target slots) and forget them as moving."""
        for run in runs:
            _release(run.sources, run.slots)
            with self._lock:
                moving = self._moving[run.request.dst_tier]
                for sequence_hash in run.hashes:
                    moving.discard(sequence_hash)

    def _settle(self, request: _Offload, errors: list[BaseException]) -> None:
        if request.future is None:  # a cascade to disk: nobody waits; say what failed unless the manager closed
            for error in errors:
                level = logging.DEBUG if self._closed else logging.WARNING
                log.log(
                    level,
                    "offloading from the %s to the %s failed: %s",
                    request.src_tier.words,
                    request.dst_tier.words,
                    error,
                )
            return
        if errors:
            if len(errors) > 1 and hasattr(errors[0], "add_note"):  # Python 3.11+
                errors[0].add_note(f"{len(errors) - 1} more transfer(s) of this offload failed too")
            request.future.set_exception(errors[0])
            return
        result = request.result
        request.future.set_result(
            OffloadResult(
                request.src_tier,
                request.dst_tier,
                offloaded=tuple(result["offloaded"]),
                already_present=tuple(result["already_present"]),
                in_flight=tuple(result["in_flight"]),
                filtered=tuple(result["filtered"]),
                target_full=tuple(result["target_full"]),
            )
        )

    # -- onboard --------------------------------------------------------------------------------------------

    def onboard(self, blocks: Iterable[ImmutableBlock], *, to: Tier = Tier.G1) -> BlockFuture[list[ImmutableBlock]]:
        """Copy registered blocks of lower tiers (host, disk, or both) into the tier ``to``.

        Returns at once; the future gives one registered block of ``to`` per block given, in order (blocks ``to``
        already holds are matched, not copied), or raises the :class:`~kvbm_builder.transfer.TransferError` of a
        failed copy (then nothing of it is registered and none of the returned blocks is kept). Too few free or
        evictable blocks in ``to`` raise ``PoolExhaustedError`` here, changing nothing.
        """
        blocks = list(blocks)
        self._check_running("onboard")
        if not isinstance(to, Tier):
            raise OffloadError(f"onboard's `to` must be a Tier (G1 or G2), got {to!r}")
        dst_pool = self.pool(to)
        tiers = self._tiers_of(blocks, "onboard") if blocks else []
        for tier in tiers:
            if _LEVEL[tier] <= _LEVEL[to]:
                raise OffloadError(f"onboard moves blocks up: the {tier.words} is not below the {to.words}")
        out: list[ImmutableBlock | None] = []
        slots: SlotGroup | None = None
        groups: list[tuple[Tier, _Group]] = []
        held: list[BlockGroup | SlotGroup] = []
        try:
            # every block held while this works (and its hash read from the group): from one tier, or from each
            if len(tiers) == 1:
                where = {tiers[0]: list(range(len(blocks)))}
            else:
                where = {tier: [] for tier in tiers}
                for k, block in enumerate(blocks):
                    where[block.tier].append(k)
            sources_by_tier = {tier: self._pools[tier].hold([blocks[k] for k in where[tier]]) for tier in tiers}
            held = list(sources_by_tier.values())
            if len(tiers) == 1:
                hashes = sources_by_tier[tiers[0]].sequence_hashes
            else:
                hashes = [0] * len(blocks)
                for tier, positions in where.items():
                    for k, sequence_hash in zip(positions, sources_by_tier[tier].sequence_hashes, strict=True):
                        hashes[k] = sequence_hash
            out = dst_pool.find(hashes)  # blocks ``to`` already holds are matched, not copied
            if out.count(None) == len(out):  # the usual case: every block is copied
                needed = {tier: list(range(len(where[tier]))) for tier in tiers}
            else:
                needed = {tier: [j for j, k in enumerate(where[tier]) if out[k] is None] for tier in tiers}
            slots = dst_pool.allocate_group(sum(len(js) for js in needed.values()))
            copied = [tier for tier in tiers if needed[tier]]
            at = 0
            parts = []
            for tier in copied:
                parts.append(list(range(at, at + len(needed[tier]))))
                at += len(parts[-1])
            slot_parts = [slots] if len(copied) == 1 else slots.partition(parts) if copied else []
            held += slot_parts
            for tier, part in zip(copied, slot_parts, strict=True):
                sources, positions = sources_by_tier[tier], where[tier]
                if len(needed[tier]) < len(positions):  # some are in ``to`` already: hold only what is copied
                    others = sorted(set(range(len(positions))) - set(needed[tier]))
                    sources, rest = sources.partition([needed[tier], others])
                    rest.release()
                    held.append(sources)
                groups.append((tier, _Group([positions[j] for j in needed[tier]], sources, part)))
            for tier in tiers:
                if tier not in copied:
                    sources_by_tier[tier].release()
        except BaseException:
            dst_pool.release_all([b for b in out if b is not None])
            _release(slots, *held)
            raise
        request = _Onboard(out, len(groups))
        if not groups:
            _release(slots)
            request.future.set_result([b for b in out if b is not None])
            return request.future
        with self._lock:
            self._callbacks_pending += len(groups)
        for src_tier, group in groups:
            started = time.perf_counter()
            try:
                future = self._engine.submit(
                    self._layouts[src_tier], group.sources.block_ids, self._layouts[to], group.slots.block_ids
                )
            except Exception as error:
                self._landed(request, src_tier, to, group, started, None, error)
                continue
            future.add_done_callback(functools.partial(self._landed, request, src_tier, to, group, started))
        return request.future

    def _landed(
        self,
        request: _Onboard,
        src_tier: Tier,
        dst_tier: Tier,
        group: _Group,
        started: float,
        future: Future[TransferRecord] | None,
        error: BaseException | None = None,
    ) -> None:
        record, registered, error = self._register_landed(
            src_tier, dst_tier, group.sources, group.slots, started, future, error, keep=True
        )
        out = request.out
        if registered is not None:
            try:
                handles = registered.handles()
            except BaseException as cause:  # the pool closed under it: the caller gets an error, never a hang
                _release(registered)
                error = _unregistered(cause, src_tier, dst_tier, len(group.positions))
                record = attrs.evolve(record, error=error)
            else:
                for k, block in zip(group.positions, handles, strict=True):
                    out[k] = block
        self._tell(record)  # before the waiter is woken
        with self._lock:
            self._count_transfer(record)
            if error is not None:
                request.errors.append(error)
            request.outstanding -= 1
            last = request.outstanding == 0
            self._callbacks_pending -= 1
            self._idle.notify_all()
        if not last:
            return
        if request.errors:
            self._pools[dst_tier].release_all([b for b in out if b is not None and not b.released])
            request.future.set_exception(request.errors[0])
        else:
            request.future.set_result([block for block in out if block is not None])

    # -- what both do when a copy lands ---------------------------------------------------------------------

    def _register_landed(
        self,
        src_tier: Tier,
        dst_tier: Tier,
        sources: BlockGroup,
        targets: SlotGroup,
        started: float,
        future: Future[TransferRecord] | None,
        error: BaseException | None,
        *,
        keep: bool,
    ) -> tuple[TransferRecord, BlockGroup | None, BaseException | None]:
        """Register the targets of a finished copy under their sources' hashes, unless it (or that) failed, and
        release the sources; a failed copy's targets go back to the free list.

        The record says what became of the copy: the engine's when it landed and was registered; with the error
        when the copy failed, was refused, or landed but could not be registered (then nothing counts as moved).
        ``keep``: return the registered targets held (else nobody holds them and None is returned).
        """
        record: TransferRecord | None = None
        registered: BlockGroup | None = None
        count = len(targets)
        try:
            if error is None and future is not None:
                error = future.exception()
                record = future.result() if error is None else None
            if error is None:
                registered = targets.register_like(sources, keep=keep)
        except BaseException as cause:  # e.g. the pool closed under the copy: never a block left half-registered
            error = _unregistered(cause, src_tier, dst_tier, count) if error is None else error
        try:
            _release(sources, targets)  # the targets only when they were not registered
        except Exception:  # never leave a waiter hanging for it
            log.exception("releasing the blocks of a finished transfer failed")
        if record is None:  # failed or refused: what it was to move, and how long until it failed
            record = self._failed_record(src_tier, dst_tier, count, started, error)
        elif error is not None:
            record = attrs.evolve(record, error=error)
        return record, registered, error

    def _failed_record(
        self, src_tier: Tier, dst_tier: Tier, count: int, started: float, error: BaseException | None
    ) -> TransferRecord:
        src, dst = self._layouts[src_tier], self._layouts[dst_tier]
        return TransferRecord(
            src_tier=src_tier,
            dst_tier=dst_tier,
            src_kind=src.storages[0].kind,
            dst_kind=dst.storages[0].kind,
            num_blocks=count,
            nbytes=count * src.spec.num_layers * src.spec.outer_dim * src.spec.region_bytes,
            seconds=time.perf_counter() - started,
            error=error,
        )

    def _count_transfer(self, record: TransferRecord) -> None:
        """(With the lock held.) Count a copy on completion: moved when it succeeded, failed otherwise."""
        path = (record.src_tier, record.dst_tier)
        if record.ok:
            self._moved_blocks[path] += record.num_blocks
            self._moved_bytes[path] += record.nbytes
        else:
            self._failed[path] += 1

    # -- lifetime -------------------------------------------------------------------------------------------

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no offload is queued and no transfer is in flight (cascades to disk included); True if so."""
        with self._lock:
            return self._idle.wait_for(lambda: not any(self._queues.values()) and not self._callbacks_pending, timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Fail what is queued (step ``closed``), let transfers in flight finish or fail, close the pools (remove
        events) and stop the filters this manager started. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._fail_queued("closed")
        try:
            self._engine.close()
            with self._lock:
                self._idle.wait_for(lambda: not self._callbacks_pending)
        finally:
            for metrics in self._reporting:
                metrics.set_block_counts_source(None)
            for pool in self._pools.values():
                pool.close()
            for offload_filter in self._owned_filters:
                offload_filter.stop()

    # -- helpers --------------------------------------------------------------------------------------------

    def _check_running(self, what: str) -> None:
        if self._closed:
            raise OffloadError(f"cannot {what}: the manager is closed")
        if self._token.is_cancelled():
            raise OffloadError(f"cannot {what}: the manager's cancellation token was cancelled")

    def _tier_of(self, blocks: Sequence[ImmutableBlock], what: str) -> Tier:
        tiers = self._tiers_of(blocks, what)
        if len(tiers) > 1:
            raise OffloadError(
                f"{what} moves blocks of one tier at a time; got blocks of {', '.join(t.name for t in tiers)}"
            )
        return tiers[0]

    def _tiers_of(self, blocks: Sequence[ImmutableBlock], what: str) -> list[Tier]:
        """The tiers of ``blocks`` (G1 first), each a pool of this manager; every block registered and held."""
        tiers = set()
        checked: BlockPool | None = None  # blocks come in runs of one pool: check each pool once per run
        for block in blocks:
            if not isinstance(block, ImmutableBlock):
                raise OffloadError(f"{what} takes registered blocks (ImmutableBlock), got {block!r}")
            pool = block.pool
            if pool is not checked:
                if self._pools.get(pool.tier) is not pool:
                    raise OffloadError(f"{block!r} belongs to another manager's {pool.tier.words}")
                tiers.add(pool.tier)
                checked = pool
            if block.released:
                raise OffloadError(f"{block!r} was released; {what} needs blocks that are held")
        return sorted(tiers, key=_LEVEL.__getitem__)

    def _stopped_error(self, src_tier: Tier, dst_tier: Tier, count: int, step: str) -> TransferError:
        return TransferError(
            f"offloading {count} block(s) from the {src_tier.words} to the {dst_tier.words}: the manager was "
            f"{step} before their copy started; none of them was registered",
            src_tier=src_tier,
            dst_tier=dst_tier,
            src_blocks=[],
            dst_blocks=[],
            step=step,
        )

    def _tell(self, event: Event) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                log.exception("an offload listener raised on %r", event)


def _unregistered(cause: BaseException, src_tier: Tier, dst_tier: Tier, count: int) -> TransferError:
    error = TransferError(
        f"{count} block(s) copied from the {src_tier.words} to the {dst_tier.words} could not be registered "
        f"({type(cause).__name__}: {cause}); their slots were freed",
        src_tier=src_tier,
        dst_tier=dst_tier,
        step="register",
    )
    error.__cause__ = cause
    return error
