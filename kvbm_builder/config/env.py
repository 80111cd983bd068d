"""The ``DYN_KVBM_*`` environment variables: their names (this module is the one place that spells them), how
each kind of variable is read, and whether G1 offloads straight to disk.

Config fields name the variable that sets them (``field(env=EnvVar(...))``); the loader reads them through
:meth:`EnvVar.read`. One reading for every numeric variable: a block count is an integer as upstream parses one
(an optional sign, digits, no spaces, within u64); a GB amount is a non-negative decimal number. Where upstream
differs: its ``should_bypass_cpu_cache`` parses the GB variables as integers (so ``0.5`` counts as unset) while its
sizing parses them as floats; here any positive amount counts in both places.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from fractions import Fraction

import attrs

from ..errors import ConfigError, Problem, show
from .sizes import parse_number

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

DEFAULT_METRICS_PORT = 6880
DEFAULT_CACHE_STATS_MAX_REQUESTS = 1000
"""Upstream's hit-rate window (``DYN_KVBM_CACHE_STATS_MAX_REQUESTS``): the one default of settings and metrics."""

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_COUNT = re.compile(r"[+-]?[0-9]{1,40}")
U64_MAX = 2**64 - 1


def parse_count(text: str) -> int | None:
    """A block count as upstream's integer parse reads one (``10``, ``+10``; not ``10.0``, ``1e3`` or `` 10 ``),
    or None when ``text`` is no count within u64."""
    if _COUNT.fullmatch(text) is None:
        return None
    value = int(text)
    return value if 0 <= value <= U64_MAX else None


def parse_gigabytes(text: str) -> Fraction | None:
    """A non-negative decimal amount (``4``, ``0.5``, ``+2``, ``1e3``; no spaces) as an exact Fraction, else None."""
    number = parse_number(text[1:] if text.startswith("+") else text)
    return None if number is None or text != text.strip() else number


@attrs.frozen
class EnvVar:
    """A ``DYN_KVBM_*`` variable and how its text is read (:meth:`read`).

    ``kind``: ``"flag"`` (1/true/yes/on or 0/false/no/off), ``"set"`` (upstream's ``env::var(name).is_ok()``: the
    value is ``when_set`` whenever the variable is present), ``"count"`` (a whole number; zero means unset unless
    ``zero_is_unset`` is False), ``"gigabytes"`` (a decimal amount of 10^9 bytes; zero means unset), ``"blocks"``
    (a block count; zero means unset) or ``"text"``. ``what`` words what a count must be in messages.
    """

    name: str
    kind: str
    when_set: object = None
    what: str | None = None
    zero_is_unset: bool = True

    def problem(self, message: str) -> ConfigError:
        return ConfigError([Problem(("$env", self.name), message)])

    def read(self, environ: Mapping[str, str], *, strict: bool = True) -> object:
        """The value the variable sets, or None when it sets nothing (unset; empty; zero for an amount).

        Text that is not what the kind takes raises a ConfigError at ``$env.<name>`` when ``strict``, and counts as
        unset otherwise (upstream's lenient reading, as in :func:`should_bypass_cpu_cache`)."""
        text = environ.get(self.name)
        if text is None or (not text.strip() and self.kind != "set"):
            return None
        try:
            return self._parse(text)
        except ConfigError:
            if strict:
                raise
            return None

    def read_noting(self, environ: Mapping[str, str], problems: list[Problem]) -> object:
        """As :meth:`read`, but a problem goes to ``problems`` (the variable then sets nothing), so that one pass
        over several variables reports every problem."""
        try:
            return self.read(environ)
        except ConfigError as err:
            problems.extend(err.problems)
            return None

    def _parse(self, text: str) -> object:
        if self.kind == "text":
            return text
        if self.kind == "flag":
            word = text.strip().lower()
            if word in _TRUE or word in _FALSE:
                return word in _TRUE
            raise self.problem(f"must be 1, true, yes, on or 0, false, no, off; got {show(text)}")
        if self.kind == "set":
            if text.strip().lower() in (*_FALSE, ""):
                raise self.problem(
                    f"is on whenever it is set, as upstream reads it, so {show(text, typed=False)} would turn it on; "
                    "unset it to keep it off, or set it to 1"
                )
            return self.when_set
        if self.kind == "gigabytes":
            amount = parse_gigabytes(text)
            if amount is None:
                raise self.problem(f"must be a non-negative number, such as 4 or 0.5, got {show(text, typed=False)}")
            return amount or None
        count = parse_count(text)
        if count is None:
            what = self.what or ("a whole number of blocks" if self.kind == "blocks" else "a whole number")
            raise self.problem(f"must be {what}, got {show(text, typed=False)}")
        return None if count == 0 and self.zero_is_unset else count


#: The variables that size the host (G2) and disk (G3) tiers: a positive block count wins over GB.
CPU_CACHE = (EnvVar(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS, "blocks"), EnvVar(DYN_KVBM_CPU_CACHE_GB, "gigabytes"))
DISK_CACHE = (EnvVar(DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS, "blocks"), EnvVar(DYN_KVBM_DISK_CACHE_GB, "gigabytes"))


def should_bypass_cpu_cache(environ: Mapping[str, str] | None = None) -> bool:
    """True when a disk tier is asked for and a CPU tier is not: G1 then offloads straight to G3.

    Unset, empty, zero or unparsable values count as unset, as upstream; any positive amount counts as set.
    """
    env = os.environ if environ is None else environ
    cpu = any(var.read(env, strict=False) is not None for var in CPU_CACHE)
    disk = any(var.read(env, strict=False) is not None for var in DISK_CACHE)
    return disk and not cpu
