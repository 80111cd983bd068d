"""The ``DYN_KVBM_*`` environment variables: cache sizes, and whether G1 offloads straight to disk.

One parser for every numeric variable, :func:`read_positive`. Where upstream differs:
upstream's ``should_bypass_cpu_cache`` parses the GB variables as integers (so ``0.5`` counts as unset)
while its sizing parses them as floats; here any positive number counts in both places.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from fractions import Fraction

import attrs

from ..errors import ConfigError, Problem
from .model import KvManagerModelConfig
from .sizes import blocks_from_gb, parse_number

DYN_KVBM_CPU_CACHE_GB = "DYN_KVBM_CPU_CACHE_GB"
DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS = "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS"
DYN_KVBM_DISK_CACHE_GB = "DYN_KVBM_DISK_CACHE_GB"
DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS = "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS"
DYN_KVBM_DISK_CACHE_DIR = "DYN_KVBM_DISK_CACHE_DIR"
DYN_KVBM_DISK_DISABLE_O_DIRECT = "DYN_KVBM_DISK_DISABLE_O_DIRECT"
DYN_KVBM_DISK_ZEROFILL_FALLBACK = "DYN_KVBM_DISK_ZEROFILL_FALLBACK"
DYN_KVBM_USE_HUGE_PAGES = "DYN_KVBM_USE_HUGE_PAGES"
DYN_KVBM_ENABLE_NUMA = "DYN_KVBM_ENABLE_NUMA"
DYN_KVBM_METRICS = "DYN_KVBM_METRICS"
DYN_KVBM_METRICS_PORT = "DYN_KVBM_METRICS_PORT"
DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER = "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER"
DYN_KVBM_MAX_CONCURRENT_TRANSFERS = "DYN_KVBM_MAX_CONCURRENT_TRANSFERS"
DYN_KVBM_MAX_TRANSFER_BATCH_SIZE = "DYN_KVBM_MAX_TRANSFER_BATCH_SIZE"
DYN_KVBM_CACHE_STATS_MAX_REQUESTS = "DYN_KVBM_CACHE_STATS_MAX_REQUESTS"

DEFAULT_DISK_CACHE_DIR = "/tmp/"
DEFAULT_METRICS_PORT = 6880


def read_positive(
    environ: Mapping[str, str],
    name: str,
    *,
    integer: bool = False,
    strict: bool = True,
    what: str | None = None,
    zero_is_unset: bool = True,
) -> Fraction | None:
    """The positive number in ``environ[name]``, or None when unset, empty or zero.

    Unparsable text (or a fraction where a count is needed) raises a ConfigError naming the
    variable when ``strict``, and counts as unset otherwise (upstream's lenient reading). The message
    says ``must be <what>``: by default "a whole number of blocks" when ``integer``, else "a non-negative
    number, such as 4 or 0.5"; a variable that is no block count passes its own words, e.g.
    ``what="a port number 1..65535"``. Zero counts as unset, as upstream reads its sizes; where zero can only be a
    mistake (a port), ``zero_is_unset=False`` refuses it like unparsable text.
    """
    text = environ.get(name)
    if text is None or not text.strip():
        return None
    value = parse_number(text.strip())
    if value is None or (integer and value.denominator != 1) or (not zero_is_unset and not value):
        if not strict:
            return None
        if what is None:
            what = "a whole number of blocks" if integer else "a non-negative number, such as 4 or 0.5"
        raise ConfigError([Problem((name,), f"must be {what}, got {text!r}")], "$env")
    return value if value > 0 else None


def should_bypass_cpu_cache(environ: Mapping[str, str] | None = None) -> bool:
    """True when a disk tier is asked for and a CPU tier is not: G1 then offloads straight to G3.

    Zero, empty or unparsable values count as unset, as upstream; any positive number counts as set.
    """
    env = os.environ if environ is None else environ
    cpu = any(
        read_positive(env, name, integer=name.endswith("NUM_BLOCKS"), strict=False) is not None
        for name in (DYN_KVBM_CPU_CACHE_GB, DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS)
    )
    disk = any(
        read_positive(env, name, integer=name.endswith("NUM_BLOCKS"), strict=False) is not None
        for name in (DYN_KVBM_DISK_CACHE_GB, DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS)
    )
    return disk and not cpu


@attrs.frozen
class CacheSizes:
    """Blocks of the CPU (G2) and disk (G3) tiers asked for by the environment (None: not asked for)."""

    cpu_blocks: int | None
    disk_blocks: int | None


def tier_blocks_from_env(
    model: KvManagerModelConfig, gb_var: str, override_var: str, environ: Mapping[str, str]
) -> int | None:
    """A positive ``override_var`` wins; else ``floor(GB * 1e9 / bytes_per_block)``; else None."""
    override = read_positive(environ, override_var, integer=True)
    if override is not None:
        return int(override)
    gb = read_positive(environ, gb_var)
    if gb is None:
        return None
    blocks = blocks_from_gb(gb, model.bytes_per_block)
    if blocks < 1:
        raise ConfigError(
            [
                Problem(
                    (gb_var,),
                    f"{environ[gb_var]} GB holds no whole block of {model.bytes_per_block} bytes; "
                    "raise it or set the override variable",
                )
            ],
            "$env",
        )
    return blocks


def cache_sizes_from_env(model: KvManagerModelConfig, environ: Mapping[str, str] | None = None) -> CacheSizes:
    """The CPU and disk tier sizes that the ``DYN_KVBM_*`` variables ask for, by upstream's rule.

    Example: 28 layers, outer 2, page 16, inner 1024, 2 bytes = 1,835,008 bytes per block;
    ``DYN_KVBM_CPU_CACHE_GB=4`` gives 2179 blocks.
    """
    env = os.environ if environ is None else environ
    errors: list[Problem] = []
    sizes: list[int | None] = []
    for gb_var, override_var in (
        (DYN_KVBM_CPU_CACHE_GB, DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS),
        (DYN_KVBM_DISK_CACHE_GB, DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS),
    ):
        try:
            sizes.append(tier_blocks_from_env(model, gb_var, override_var, env))
        except ConfigError as err:
            errors.extend(err.problems)
            sizes.append(None)
    if errors:
        raise ConfigError(errors, "$env")
    return CacheSizes(cpu_blocks=sizes[0], disk_blocks=sizes[1])
