"""Prometheus metrics that say whether each tier pays off, served on ``/metrics``.

:class:`KvbmMetrics` counts what the block manager moved, skipped and found, on the registry it is given (the
runtime config's ``metrics_registry``; one set per manager). :class:`NullKvbmMetrics` has the same methods and does
nothing, for metrics switched off. :meth:`KvbmMetrics.serve` serves the registry over HTTP (:class:`MetricsServer`).

A :class:`~kvbm_builder.KvBlockManager` counts into the config's ``kvbm_metrics``, or into KvbmMetrics of its own on
``runtime.metrics_registry`` (window: ``KvbmSettings.cache_stats_max_requests``); it serves them when
``DYN_KVBM_METRICS`` is true or ``manager.serve_metrics()`` is called, and closes the endpoint when it closes.

What a scrape shows (Prometheus text format 0.0.4; ``d``/``h`` in upstream's names are ambiguous, the labels are not):

- upstream's names, so its dashboards keep working: ``kvbm_offload_blocks_d2h`` (G1->G2), ``kvbm_offload_blocks_h2d``
  (G2->G3), ``kvbm_offload_blocks_d2d`` (G1->G3), ``kvbm_onboard_blocks_h2d`` (G2->G1), ``kvbm_onboard_blocks_d2d``
  (G3->G1), ``kvbm_matched_tokens`` (tokens found in G2 and G3); gauges ``kvbm_host_cache_hit_rate``,
  ``kvbm_disk_cache_hit_rate``: as upstream, the tokens G2 (G3) matched over those the device tier did not hold, over
  the last ``DYN_KVBM_CACHE_STATS_MAX_REQUESTS`` requests (default 1000) that left any to look up below the device;
- by Prometheus' conventions: ``kvbm_transfer_blocks_total``, ``kvbm_transfer_bytes_total``,
  ``kvbm_transfer_failures_total`` and the histogram ``kvbm_transfer_duration_seconds``, each by ``src_tier`` and
  ``dst_tier``; ``kvbm_offload_skipped_blocks_total{dst_tier, reason="tier_full"|"filter"}``;
  ``kvbm_requested_tokens_total`` and ``kvbm_tier_matched_tokens_total{tier}``, G1 included (a tier's token hit rate
  is their ratio); gauges ``kvbm_tier_blocks{tier, state="free"|"active"|"inactive"}`` (read at scrape time from the
  manager's callback) and ``kvbm_tier_allocated_bytes{tier}``.

Transfers are counted when they complete, never when queued; a failed one counts in ``kvbm_transfer_failures_total``
and nowhere as moved.

**The ``_total`` suffix.** Upstream's Rust client serves its counters without ``_total`` (``kvbm_offload_blocks_d2h
3``) and its dashboards query those names; prometheus_client serves every counter with ``_total``. Each upstream
counter is therefore served twice, with the same number: under upstream's name as an untyped sample (the text format
types a counter by its ``_total`` name, so the bare name can only be untyped; PromQL's ``rate()`` and ``increase()``
work on it all the same), and as a conventional counter ``<name>_total``. A scrape shows::

    # HELP kvbm_offload_blocks_d2h Blocks offloaded from device (G1) to host (G2), counted when the copy completes ...
    # TYPE kvbm_offload_blocks_d2h untyped
    kvbm_offload_blocks_d2h 3.0
    # HELP kvbm_offload_blocks_d2h_total Blocks offloaded from device (G1) to host (G2), counted when the copy completes
    # TYPE kvbm_offload_blocks_d2h_total counter
    kvbm_offload_blocks_d2h_total 3.0

No ``_created`` series are served. OpenMetrics is not served: there a counter named ``kvbm_offload_blocks_d2h`` *is*
the family of ``kvbm_offload_blocks_d2h_total``, so the bare name would repeat a family name, which OpenMetrics
forbids. :class:`MetricsServer` answers every scraper in the text format 0.0.4, which Prometheus always accepts (and
which is what upstream serves).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .kvbm import (
    DEFAULT_DURATION_BUCKETS,
    SKIP_REASONS,
    UPSTREAM_BLOCK_COUNTERS,
    BlockCountsSource,
    KvbmMetrics,
    NullKvbmMetrics,
    SkipReason,
    TierBlocks,
)
from .window import DEFAULT_CACHE_STATS_MAX_REQUESTS, HitRateWindow

if TYPE_CHECKING:
    from .server import MetricsServer as MetricsServer

__all__ = [
    "DEFAULT_CACHE_STATS_MAX_REQUESTS",
    "DEFAULT_DURATION_BUCKETS",
    "SKIP_REASONS",
    "UPSTREAM_BLOCK_COUNTERS",
    "BlockCountsSource",
    "HitRateWindow",
    "KvbmMetrics",
    "MetricsServer",
    "NullKvbmMetrics",
    "SkipReason",
    "TierBlocks",
]


def __getattr__(name: str) -> object:
    # server.py is light, but its users are few: keep `import kvbm_builder.metrics` to what recording needs
    if name == "MetricsServer":
        from .server import MetricsServer

        return MetricsServer
    raise AttributeError(f"module 'kvbm_builder.metrics' has no attribute {name!r}")
