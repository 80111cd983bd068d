"""``KvbmSettings``: what a running KVBM reads from ``DYN_KVBM_*`` besides the cache hierarchy itself, and
:func:`settings_from_env`, which reads them (the manager and the transfer engine do, without the loader)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import ClassVar

import attrs

from ..errors import ConfigError, Problem
from . import env
from .env import EnvVar
from .fields import U64_MAX, Validated, field, integer, specs, true_or_false


@attrs.frozen(kw_only=True)
class KvbmSettings(Validated):
    """Transfer, metrics and filter settings. Upstream reads them from the environment, and so does
    :func:`settings_from_env`; engines and pools take them as plain values."""

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


def settings_from_env(environ: Mapping[str, str] = os.environ) -> KvbmSettings:
    """:class:`KvbmSettings` from the ``DYN_KVBM_*`` variables its fields name; bad values raise one ConfigError
    naming each variable. (Also :func:`kvbm_builder.loading.settings_from_env`.)"""
    problems: list[Problem] = []
    values = {name: var.read_noting(environ, problems) for name, var in _VARIABLES.items()}
    if not problems:
        try:
            return KvbmSettings(**{name: value for name, value in values.items() if value is not None})  # type: ignore[arg-type]
        except ConfigError as err:
            problems = [Problem(("$env", _VARIABLES[str(p.path[0])].name), p.message) for p in err.problems]
    raise ConfigError(problems)


#: The variable that sets each field.
_VARIABLES = {name: var for name, spec in specs(KvbmSettings).items() for var in spec.env}
