"""``KvbmSettings``: what a running KVBM reads from ``DYN_KVBM_*`` besides the cache hierarchy itself."""

from __future__ import annotations

from typing import ClassVar

import attrs

from ._rules import Validated, instance, integer, rule
from .env import DEFAULT_METRICS_PORT

_true_or_false = rule(instance(bool, what="true or false"))


@attrs.frozen(kw_only=True)
class KvbmSettings(Validated):
    """Transfer, metrics and filter settings (upstream reads them from the environment; so does
    :func:`kvbm_builder.loading.settings_from_env`). Engines and pools take these as plain values.

    - ``metrics``: serve Prometheus metrics (``DYN_KVBM_METRICS``: 1/true/yes/on or 0/false/no/off);
    - ``metrics_port``: where (``DYN_KVBM_METRICS_PORT``, default 6880);
    - ``max_concurrent_transfers``: offload transfers in flight (``DYN_KVBM_MAX_CONCURRENT_TRANSFERS``, default 4);
    - ``max_transfer_batch_size``: blocks per transfer batch (``DYN_KVBM_MAX_TRANSFER_BATCH_SIZE``, default 16);
    - ``disk_offload_filter``: a host block must be seen twice before it is written to disk, protecting SSDs
      (off when ``DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER`` is present);
    - ``cache_stats_max_requests``: the requests the cache hit-rate gauges look back over
      (``DYN_KVBM_CACHE_STATS_MAX_REQUESTS``, default 1000).
    """

    _kvbm_root: ClassVar[str] = "settings"

    metrics: bool = attrs.field(default=False, metadata=_true_or_false)
    metrics_port: int = attrs.field(default=DEFAULT_METRICS_PORT, metadata=rule(integer(min=1, max=65535)))
    max_concurrent_transfers: int = attrs.field(default=4, metadata=rule(integer(min=1, max=4096)))
    max_transfer_batch_size: int = attrs.field(default=16, metadata=rule(integer(min=1, max=1 << 20)))
    disk_offload_filter: bool = attrs.field(default=True, metadata=_true_or_false)
    cache_stats_max_requests: int = attrs.field(default=1000, metadata=rule(integer(min=1, max=2**64 - 1)))
