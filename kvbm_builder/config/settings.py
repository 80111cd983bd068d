"""``KvbmSettings``: what a running KVBM reads from ``DYN_KVBM_*`` besides the cache hierarchy itself."""

from __future__ import annotations

from typing import ClassVar

import attrs

from . import env
from .env import EnvVar
from .fields import U64_MAX, Validated, field, integer, true_or_false


@attrs.frozen(kw_only=True)
class KvbmSettings(Validated):
    """Transfer, metrics and filter settings. Upstream reads them from the environment, and so does
    :func:`kvbm_builder.loading.settings_from_env`; engines and pools take them as plain values."""

    _kvbm_root: ClassVar[str] = "settings"

    metrics: bool = field(
        default=False,
        rule=true_or_false,
        env=EnvVar(env.DYN_KVBM_METRICS, "flag"),
        doc="Serve Prometheus metrics on /metrics.",
    )
    metrics_port: int = field(
        default=env.DEFAULT_METRICS_PORT,
        rule=integer(min=1, max=65535, what="a port number 1..65535"),
        env=EnvVar(env.DYN_KVBM_METRICS_PORT, "count", what="a port number 1..65535", zero_is_unset=False),
        doc="Where the metrics are served.",
    )
    max_concurrent_transfers: int = field(
        default=4,
        rule=integer(min=1, max=4096),
        env=EnvVar(env.DYN_KVBM_MAX_CONCURRENT_TRANSFERS, "count"),
        doc="Offload transfers in flight at once.",
    )
    max_transfer_batch_size: int = field(
        default=16,
        rule=integer(min=1, max=1 << 20),
        env=EnvVar(env.DYN_KVBM_MAX_TRANSFER_BATCH_SIZE, "count", what="a whole number of blocks"),
        doc="Blocks per transfer batch.",
    )
    disk_offload_filter: bool = field(
        default=True,
        rule=true_or_false,
        env=EnvVar(env.DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER, "set", when_set=False),
        doc="A host block must be seen twice before it is written to disk, protecting SSDs (off when "
        "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER is set).",
    )
    cache_stats_max_requests: int = field(
        default=env.DEFAULT_CACHE_STATS_MAX_REQUESTS,
        rule=integer(min=1, max=U64_MAX),
        env=EnvVar(env.DYN_KVBM_CACHE_STATS_MAX_REQUESTS, "count"),
        doc="The requests the cache hit-rate gauges look back over.",
    )
