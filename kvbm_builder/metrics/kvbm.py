"""``KvbmMetrics``: what the block manager moved, skipped and found, counted for Prometheus.

Recording takes one uncontended lock for a few integer additions; a scrape copies the numbers under that lock and
does everything else (the block-count callback, building the families, writing the response) without it, so a slow
scrape never holds up a transfer.
"""

from __future__ import annotations

import bisect
import copy
import logging
import math
import operator
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, Literal, NamedTuple

import attrs

from ..config.env import DEFAULT_METRICS_PORT
from ..config.protocols import Tier
from ..errors import MetricsError, MetricsRegistryError
from .window import DEFAULT_CACHE_STATS_MAX_REQUESTS, HitRateWindow

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from .server import MetricsServer

__all__ = [
    "DEFAULT_DURATION_BUCKETS",
    "SKIP_REASONS",
    "UPSTREAM_BLOCK_COUNTERS",
    "BlockCountsSource",
    "KvbmMetrics",
    "NullKvbmMetrics",
    "SkipReason",
    "TierBlocks",
]

logger = logging.getLogger(__name__)

SkipReason = Literal["tier_full", "filter"]
"""Why an offload was not made: the target tier had no free or evictable slot, or its offload filter said no."""
SKIP_REASONS: tuple[SkipReason, ...] = ("tier_full", "filter")

DEFAULT_DURATION_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""Upper bounds (seconds) of the transfer duration histogram: one small block (tens of microseconds) to a large
batch written to a slow disk (seconds)."""

UPSTREAM_BLOCK_COUNTERS: Mapping[tuple[Tier, Tier], str] = {
    (Tier.G1, Tier.G2): "kvbm_offload_blocks_d2h",
    (Tier.G2, Tier.G3): "kvbm_offload_blocks_h2d",
    (Tier.G1, Tier.G3): "kvbm_offload_blocks_d2d",
    (Tier.G2, Tier.G1): "kvbm_onboard_blocks_h2d",
    (Tier.G3, Tier.G1): "kvbm_onboard_blocks_d2d",
}
"""Upstream's block counter for each (source, target) path. Its ``d``/``h`` letters are ambiguous (``h2d`` is host to
disk when offloading and host to device when onboarding); the labelled metrics say ``src_tier``/``dst_tier``."""

_UPSTREAM_HELP = {
    (Tier.G1, Tier.G2): "Blocks offloaded from device (G1) to host (G2)",
    (Tier.G2, Tier.G3): "Blocks offloaded from host (G2) to disk (G3)",
    (Tier.G1, Tier.G3): "Blocks offloaded from device (G1) straight to disk (G3)",
    (Tier.G2, Tier.G1): "Blocks onboarded from host (G2) to device (G1)",
    (Tier.G3, Tier.G1): "Blocks onboarded from disk (G3) to device (G1)",
}
_MATCHED_TOKENS = "kvbm_matched_tokens"
_COMPAT_NOTE = " (upstream's name without _total, kept for its dashboards; the same number as {name}_total)"
_COUNTED = ", counted when the copy completes"


class TierBlocks(NamedTuple):
    """A tier's block slots by state, as the manager's callback reports them at scrape time."""

    free: int
    """never registered or reset: handed out first"""
    active: int
    """held by at least one user"""
    inactive: int
    """registered and unreferenced: still matchable, evictable"""


BlockCountsSource = Callable[[], Mapping[Tier, TierBlocks]]
"""Called on the scraping thread at each scrape; must be thread-safe and quick."""


def _count(value: object, name: str) -> int:
    """A non-negative whole number (numpy integers too), or a MetricsError naming the argument."""
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        number = -1
    if number < 0:
        raise MetricsError(f"{name} must be a whole number >= 0, got {value!r}")
    return number


def _tier(value: object, name: str) -> Tier:
    if not isinstance(value, Tier):
        raise MetricsError(f"{name} must be a kvbm_builder.Tier (G1, G2 or G3), got {value!r}")
    return value


class _Direction:
    """What moved on one (source tier, target tier) path; changed only under KvbmMetrics' lock."""

    __slots__ = ("blocks", "buckets", "failures", "nbytes", "seconds")

    def __init__(self, num_buckets: int) -> None:
        self.blocks = 0
        self.nbytes = 0
        self.failures = 0
        self.seconds = 0.0
        self.buckets = [0] * (num_buckets + 1)  # per bound, then +Inf; not cumulative

    def copy(self) -> _Direction:
        other = copy.copy(self)
        other.buckets = list(self.buckets)
        return other


@attrs.frozen
class _Snapshot:
    directions: dict[tuple[Tier, Tier], _Direction]
    skipped: dict[tuple[Tier, str], int]
    requested_tokens: int
    matched_tokens: dict[Tier, int]
    host_hit_rate: float
    disk_hit_rate: float
    allocated_bytes: dict[Tier, int]


class KvbmMetrics:
    """The block manager's Prometheus metrics, registered on one ``CollectorRegistry``: one set per manager.

    ``registry`` is the runtime config's ``metrics_registry``; left out, a fresh private registry is made (never the
    process-global one). A registry that already holds these names is refused with
    :class:`~kvbm_builder.errors.MetricsRegistryError`: two managers on one registry would serve one family twice.
    ``cache_stats_max_requests`` is the hit-rate window (``DYN_KVBM_CACHE_STATS_MAX_REQUESTS``, default 1000).

    Record with plain values (``record_transfer``, ``record_skipped``, ``record_lookup``, ``set_allocated_bytes``);
    serve ``/metrics`` with :meth:`serve`; :meth:`close` stops the servers and frees the names on the registry.
    Every method is thread-safe; recording never waits for a scrape.
    """

    enabled: ClassVar[bool] = True

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        cache_stats_max_requests: int = DEFAULT_CACHE_STATS_MAX_REQUESTS,
        duration_buckets: Sequence[float] = DEFAULT_DURATION_BUCKETS,
        block_counts: BlockCountsSource | None = None,
    ) -> None:
        bounds = tuple(float(b) for b in duration_buckets)
        if not bounds or any(not math.isfinite(b) or b <= 0 for b in bounds) or list(bounds) != sorted(set(bounds)):
            raise MetricsError(
                f"duration_buckets must be increasing finite upper bounds > 0 in seconds (+Inf is added), "
                f"got {tuple(duration_buckets)!r}"
            )
        if registry is None:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry(auto_describe=True)
        elif not all(callable(getattr(registry, attr, None)) for attr in ("register", "unregister", "collect")):
            raise MetricsError(
                f"registry must be a prometheus_client CollectorRegistry (the runtime config's metrics_registry), "
                f"got {type(registry).__name__}"
            )
        self._lock = threading.Lock()
        self._bounds = bounds
        self._window = HitRateWindow(cache_stats_max_requests)
        self._directions: dict[tuple[Tier, Tier], _Direction] = {
            pair: _Direction(len(bounds)) for pair in UPSTREAM_BLOCK_COUNTERS
        }
        self._skipped: dict[tuple[Tier, str], int] = {
            (tier, reason): 0 for tier in (Tier.G2, Tier.G3) for reason in SKIP_REASONS
        }
        self._requested_tokens = 0
        self._matched_tokens: dict[Tier, int] = dict.fromkeys(Tier, 0)
        self._allocated_bytes: dict[Tier, int] = {}
        self._block_counts = block_counts
        self._servers: list[MetricsServer] = []
        self._closed = False
        self._registry = registry
        self._collector = _Collector(self)
        try:
            registry.register(self._collector)
        except ValueError as err:
            duplicates = sorted(getattr(err, "duplicates", ()) or ())
            raise MetricsRegistryError(
                f"the metrics registry already holds {', '.join(duplicates) or 'these metric names'}: another "
                "KvbmMetrics (or a metric of the same name) is registered on it. Give each block manager its own "
                "registry (KvManagerRuntimeConfig makes a fresh one unless metrics_registry is set), or close() "
                "the other KvbmMetrics first"
            ) from err

    @property
    def registry(self) -> CollectorRegistry:
        """The registry these metrics are registered on (and that :meth:`serve` serves, whole)."""
        return self._registry

    @property
    def cache_stats_max_requests(self) -> int:
        return self._window.max_requests

    # ---- recording ---------------------------------------------------------------------------------------------

    def record_transfer(self, src: Tier, dst: Tier, num_blocks: int, nbytes: int, seconds: float, ok: bool) -> None:
        """A transfer from ``src`` to ``dst`` has completed (call it on completion, never when it is queued).

        ``ok``: its blocks and bytes count as moved and ``seconds`` (submit to completion) goes into the duration
        histogram; otherwise it counts once as a failed transfer on that path, and nothing as moved.
        """
        num_blocks = _count(num_blocks, "num_blocks")
        nbytes = _count(nbytes, "nbytes")
        seconds = float(seconds)
        if not (math.isfinite(seconds) and seconds >= 0):
            raise MetricsError(f"seconds must be a finite duration >= 0, got {seconds!r}")
        bucket = bisect.bisect_left(self._bounds, seconds)  # the first bound >= seconds, as Prometheus' `le`
        with self._lock:
            direction = self._directions.get((src, dst))
            if direction is None:
                direction = self._directions[(_tier(src, "src"), _tier(dst, "dst"))] = _Direction(len(self._bounds))
            if ok:
                direction.blocks += num_blocks
                direction.nbytes += nbytes
                direction.seconds += seconds
                direction.buckets[bucket] += 1
            else:
                direction.failures += 1

    def record_skipped(self, tier: Tier, reason: SkipReason, num_blocks: int = 1) -> None:
        """``num_blocks`` offloads to ``tier`` were not made: ``"tier_full"`` (no free or evictable slot; upstream
        drops these with only a warning) or ``"filter"`` (the tier's offload filter said no)."""
        if reason not in SKIP_REASONS:
            raise MetricsError(f"reason must be one of {', '.join(SKIP_REASONS)}, got {reason!r}")
        num_blocks = _count(num_blocks, "num_blocks")
        key = (tier, reason)
        with self._lock:
            if key not in self._skipped:
                _tier(tier, "tier")
            self._skipped[key] = self._skipped.get(key, 0) + num_blocks

    def record_lookup(self, requested_tokens: int, matched_tokens_by_tier: Mapping[Tier, int]) -> None:
        """One request's lookup across the tiers: ``requested_tokens`` asked for, and how many of them each tier
        holds (G1 included; each matched token counts under the one tier it will be read from, so the matches add up
        to at most ``requested_tokens``).

        ``kvbm_requested_tokens_total`` and ``kvbm_tier_matched_tokens_total{tier}`` count them all (a token hit
        rate per tier is their ratio). Upstream's ``kvbm_matched_tokens`` and hit-rate gauges keep upstream's
        meaning, which is about the tokens the device tier did not hold: the host (disk) hit rate is G2's (G3's)
        matched tokens over the requested tokens less G1's, summed over the last ``cache_stats_max_requests``
        requests that left anything to look up below the device.
        """
        requested = _count(requested_tokens, "requested_tokens")
        matched = {
            _tier(tier, "a key of matched_tokens_by_tier"): _count(n, f"matched_tokens_by_tier[{tier}]")
            for tier, n in matched_tokens_by_tier.items()
        }
        if sum(matched.values()) > requested:
            raise MetricsError(
                f"matched_tokens_by_tier adds up to {sum(matched.values())} tokens, more than the {requested} "
                "requested_tokens: count each matched token under one tier, out of those requested"
            )
        below_device = requested - matched.get(Tier.G1, 0)
        with self._lock:
            self._requested_tokens += requested
            for tier, n in matched.items():
                self._matched_tokens[tier] += n
            self._window.record(below_device, matched.get(Tier.G2, 0), matched.get(Tier.G3, 0))

    def set_allocated_bytes(self, tier: Tier, nbytes: int) -> None:
        """The bytes allocated for ``tier`` (0 once released)."""
        nbytes = _count(nbytes, "nbytes")
        with self._lock:
            self._allocated_bytes[_tier(tier, "tier")] = nbytes

    def set_block_counts_source(self, source: BlockCountsSource | None) -> None:
        """Report blocks per tier by state at each scrape from ``source()`` (None: stop reporting them)."""
        self._block_counts = source

    @property
    def block_counts_source(self) -> BlockCountsSource | None:
        """What reports blocks per tier at each scrape (a block manager's pools while one is fed by it)."""
        return self._block_counts

    # ---- serving -----------------------------------------------------------------------------------------------

    def serve(self, port: int = DEFAULT_METRICS_PORT, host: str = "127.0.0.1") -> MetricsServer:
        """Serve this registry on ``http://host:port/metrics`` until :meth:`close` (port 0: one the OS picks).

        Bound to 127.0.0.1 unless ``host`` says otherwise. A port in use is a
        :class:`~kvbm_builder.errors.MetricsServerError` naming ``DYN_KVBM_METRICS_PORT``.
        """
        from .server import MetricsServer

        with self._lock:
            if self._closed:
                raise MetricsError("these KvbmMetrics are closed; make new ones to serve /metrics again")
        server = MetricsServer(self._registry, port=port, host=host)
        with self._lock:
            closed = self._closed
            if not closed:
                self._servers = [*(s for s in self._servers if not s.closed), server]
        if closed:  # closed while the server was starting
            server.close()
            raise MetricsError("these KvbmMetrics were closed while /metrics was starting")
        return server

    def close(self) -> None:
        """Stop every server started by :meth:`serve` and unregister from the registry. Idempotent.

        Recording afterwards is harmless and counts nowhere that is served.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        self._registry.unregister(self._collector)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> KvbmMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- scraping ----------------------------------------------------------------------------------------------

    def _snapshot(self) -> _Snapshot:
        with self._lock:
            return _Snapshot(
                directions={pair: d.copy() for pair, d in self._directions.items()},
                skipped=dict(self._skipped),
                requested_tokens=self._requested_tokens,
                matched_tokens=dict(self._matched_tokens),
                host_hit_rate=self._window.host_hit_rate,
                disk_hit_rate=self._window.disk_hit_rate,
                allocated_bytes=dict(self._allocated_bytes),
            )

    def _read_block_counts(self) -> Mapping[Tier, TierBlocks] | None:
        source = self._block_counts
        if source is None:
            return None
        try:
            counts = {
                _tier(tier, "a tier of the block counts"): TierBlocks(*(_count(n, "a block count") for n in blocks))
                for tier, blocks in source().items()
            }
        except Exception:
            # a scrape must not fail for it: the series go stale and the log says why
            logger.warning("kvbm_tier_blocks left out of this scrape: the block counts callback failed", exc_info=True)
            return None
        return counts

    def _families(self, *, with_block_counts: bool = True) -> list[Metric]:
        from prometheus_client.metrics_core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            UnknownMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        snap = self._snapshot()
        block_counts = self._read_block_counts() if with_block_counts else None
        out: list[Metric] = []

        def upstream_counter(name: str, help_text: str, value: int) -> None:
            out.append(UnknownMetricFamily(name, help_text + _COMPAT_NOTE.format(name=name), value=value))
            out.append(CounterMetricFamily(name, help_text, value=value))

        for pair, name in UPSTREAM_BLOCK_COUNTERS.items():
            upstream_counter(name, _UPSTREAM_HELP[pair] + _COUNTED, snap.directions[pair].blocks)
        upstream_counter(
            _MATCHED_TOKENS,
            "Tokens found in the host (G2) and disk (G3) tiers by lookups",
            snap.matched_tokens[Tier.G2] + snap.matched_tokens[Tier.G3],
        )
        window = (
            f" (its matched tokens over those the device tier did not hold) over the last "
            f"{self.cache_stats_max_requests} requests that left tokens to look up below the device"
        )
        out.append(
            GaugeMetricFamily("kvbm_host_cache_hit_rate", "Host (G2) cache hit rate" + window, snap.host_hit_rate)
        )
        out.append(
            GaugeMetricFamily("kvbm_disk_cache_hit_rate", "Disk (G3) cache hit rate" + window, snap.disk_hit_rate)
        )

        by_path = ["src_tier", "dst_tier"]
        blocks = CounterMetricFamily("kvbm_transfer_blocks", "Blocks moved between tiers" + _COUNTED, labels=by_path)
        moved = CounterMetricFamily("kvbm_transfer_bytes", "Bytes moved between tiers" + _COUNTED, labels=by_path)
        failed = CounterMetricFamily(
            "kvbm_transfer_failures", "Transfers that failed (their blocks count as not moved)", labels=by_path
        )
        durations = HistogramMetricFamily(
            "kvbm_transfer_duration_seconds",
            "Seconds from submit to completion of transfers that moved",
            labels=by_path,
        )
        le_labels = [floatToGoString(bound) for bound in (*self._bounds, math.inf)]  # type: ignore[no-untyped-call]
        for (src, dst), d in sorted(snap.directions.items(), key=lambda item: (item[0][0].name, item[0][1].name)):
            labels = [src.name, dst.name]
            blocks.add_metric(labels, d.blocks)
            moved.add_metric(labels, d.nbytes)
            failed.add_metric(labels, d.failures)
            cumulative, buckets = 0, []
            for le, n in zip(le_labels, d.buckets, strict=True):
                cumulative += n
                buckets.append((le, float(cumulative)))
            durations.add_metric(labels, buckets, d.seconds)
        out += [blocks, moved, failed, durations]

        skipped = CounterMetricFamily(
            "kvbm_offload_skipped_blocks",
            "Offloads not made: the target tier was full (tier_full) or its offload filter said no (filter)",
            labels=["dst_tier", "reason"],
        )
        for (tier, reason), n in sorted(snap.skipped.items(), key=lambda item: (item[0][0].name, item[0][1])):
            skipped.add_metric([tier.name, reason], n)
        out.append(skipped)

        out.append(CounterMetricFamily("kvbm_requested_tokens", "Tokens asked for by lookups", snap.requested_tokens))
        matched = CounterMetricFamily(
            "kvbm_tier_matched_tokens", "Tokens found by lookups, under the tier they are read from", labels=["tier"]
        )
        for tier in Tier:
            matched.add_metric([tier.name], snap.matched_tokens[tier])
        out.append(matched)

        occupancy = GaugeMetricFamily(
            "kvbm_tier_blocks", "Block slots per tier by state (free, active, inactive)", labels=["tier", "state"]
        )
        for tier, counts in sorted((block_counts or {}).items(), key=lambda item: item[0].name):
            for state, n in counts._asdict().items():
                occupancy.add_metric([tier.name, state], n)
        out.append(occupancy)
        allocated = GaugeMetricFamily("kvbm_tier_allocated_bytes", "Bytes allocated per tier", labels=["tier"])
        for tier, n in sorted(snap.allocated_bytes.items(), key=lambda item: item[0].name):
            allocated.add_metric([tier.name], n)
        out.append(allocated)
        return out


class _Collector:
    """What the registry holds: a custom collector, so the upstream counters can be served without ``_total``."""

    def __init__(self, metrics: KvbmMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._metrics._families()

    def describe(self) -> Iterator[Metric]:
        # For the registry's name check. Each untyped family is the compatibility twin of the counter family of the
        # same name, whose names include it; listing it again would make the registry's unregister() fail.
        for family in self._metrics._families(with_block_counts=False):
            if family.type != "unknown":
                family.samples = []
                yield family


class NullKvbmMetrics:
    """Metrics switched off: every method of :class:`KvbmMetrics`, doing nothing. Set it as the config's
    ``kvbm_metrics`` and the manager counts nothing, registers nothing and serves nothing.

    Silent by design, so the manager records unconditionally; :meth:`serve` starts nothing and returns None.
    """

    enabled: ClassVar[bool] = False
    registry: ClassVar[None] = None
    closed: ClassVar[bool] = False
    block_counts_source: ClassVar[None] = None

    def record_transfer(self, src: Tier, dst: Tier, num_blocks: int, nbytes: int, seconds: float, ok: bool) -> None:
        pass

    def record_skipped(self, tier: Tier, reason: SkipReason, num_blocks: int = 1) -> None:
        pass

    def record_lookup(self, requested_tokens: int, matched_tokens_by_tier: Mapping[Tier, int]) -> None:
        pass

    def set_allocated_bytes(self, tier: Tier, nbytes: int) -> None:
        pass

    def set_block_counts_source(self, source: BlockCountsSource | None) -> None:
        pass

    def serve(self, port: int = DEFAULT_METRICS_PORT, host: str = "127.0.0.1") -> None:
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> NullKvbmMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
