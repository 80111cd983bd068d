"""The host and disk cache hit rates over the last N requests, as upstream's ``CacheStatsTracker`` computes them."""

from __future__ import annotations

import sys
from collections import deque

from ..config.env import DEFAULT_CACHE_STATS_MAX_REQUESTS, DYN_KVBM_CACHE_STATS_MAX_REQUESTS

__all__ = ["DEFAULT_CACHE_STATS_MAX_REQUESTS", "HitRateWindow"]


class HitRateWindow:
    """Tokens asked for and found in the host (G2) and disk (G3) tiers, over the last ``max_requests`` requests.

    A hit rate is the tier's matched tokens over the requested tokens of the requests in the window (not a mean of
    per-request rates), and 0.0 while the window is empty. A request that asked for nothing does not enter the window.
    Sums are kept as exact integers, so recording is O(1) however large the window.

    Not thread-safe on its own: :class:`~kvbm_builder.metrics.KvbmMetrics` uses it under its lock.
    """

    __slots__ = ("_disk", "_entries", "_host", "_max_requests", "_requested")

    def __init__(self, max_requests: int = DEFAULT_CACHE_STATS_MAX_REQUESTS) -> None:
        from ..errors import MetricsError

        if isinstance(max_requests, bool) or not isinstance(max_requests, int) or max_requests < 1:
            raise MetricsError(
                f"cache_stats_max_requests ({DYN_KVBM_CACHE_STATS_MAX_REQUESTS}) must be a whole number of requests "
                f">= 1, got {max_requests!r}"
            )
        self._max_requests = max_requests
        # upstream takes any usize; a deque's bound must fit a C ssize_t, and no process lives to see 2**63 requests
        self._entries: deque[tuple[int, int, int]] = deque(maxlen=min(max_requests, sys.maxsize))
        self._requested = 0
        self._host = 0
        self._disk = 0

    @property
    def max_requests(self) -> int:
        return self._max_requests

    def record(self, requested: int, host: int, disk: int) -> None:
        """One request: ``requested`` tokens asked for, ``host`` of them found in G2 and ``disk`` in G3."""
        if requested == 0:
            return
        entries = self._entries
        if len(entries) == entries.maxlen:
            old_requested, old_host, old_disk = entries[0]
            self._requested -= old_requested
            self._host -= old_host
            self._disk -= old_disk
        entries.append((requested, host, disk))  # drops entries[0] when full
        self._requested += requested
        self._host += host
        self._disk += disk

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def host_hit_rate(self) -> float:
        return self._host / self._requested if self._requested else 0.0

    @property
    def disk_hit_rate(self) -> float:
        return self._disk / self._requested if self._requested else 0.0

    def sums(self) -> tuple[int, int, int]:
        """Requested, host-matched and disk-matched tokens of the requests now in the window."""
        return self._requested, self._host, self._disk
