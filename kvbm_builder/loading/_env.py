"""Layers of configuration and where each value came from: defaults < file < environment < explicit arguments.

The environment is the ``DYN_KVBM_*`` variables, read as upstream reads them (numbers by
:func:`kvbm_builder.config.env.read_positive`; zero or empty means unset):

====================================================  ================================================================
``DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS``            ``host_layout.num_blocks`` (wins over the GB variable)
``DYN_KVBM_CPU_CACHE_GB``                             ``host_layout.size`` = floor(GB * 10^9) bytes
``DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS`` / ``_GB``  ``disk_layout.num_blocks`` / ``disk_layout.size``, likewise
``DYN_KVBM_DISK_CACHE_DIR``                           ``disk_layout.allocator.directory``
``DYN_KVBM_DISK_DISABLE_O_DIRECT``                    present: ``disk_layout.allocator.o_direct = false``
``DYN_KVBM_DISK_ZEROFILL_FALLBACK``                   present: ``disk_layout.allocator.zerofill_fallback = true``
``DYN_KVBM_USE_HUGE_PAGES`` (1/0)                     ``host_layout.allocator.huge_pages``
``DYN_KVBM_ENABLE_NUMA`` (1/0)                        ``host_layout.allocator.numa``
====================================================  ================================================================

A size variable creates its tier when the lower layers have none (a pinned allocator for the host tier, a disk
allocator for the disk tier); the allocator variables act only on a tier that has an allocator table. A byte budget
becomes blocks as every ``size`` does (``floor(bytes / bytes per block)``, alignment padding counted), which at
alignment 1 is upstream's ``floor(GB * 1e9 / bytes_per_block)``.

*Present* means set to anything, as upstream reads these flags; because upstream would read ``=false`` or ``=0`` as
*on*, those spellings are refused here rather than silently turning the option on.

``DYN_KVBM_METRICS``, ``DYN_KVBM_METRICS_PORT``, ``DYN_KVBM_MAX_CONCURRENT_TRANSFERS``,
``DYN_KVBM_MAX_TRANSFER_BATCH_SIZE`` and ``DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER`` have no field in
``KvBlockManagerConfig``; :func:`settings_from_env` reads them into :class:`KvbmSettings`.

Errors of a resolved configuration carry absolute paths: ``$.model.num_layers`` for the document,
``$env.DYN_KVBM_CPU_CACHE_GB`` for a variable (also when the value a variable set is what is wrong) and
``$arg.<key>`` for an explicit argument that is not a dotted path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, TypeVar, cast

import attrs

from ..config import env as names
from ..config.env import read_positive
from ..config.layout import KvManagerLayoutConfig
from ..config.manager import KvBlockManagerConfig
from ..config.protocols import StorageKind, Tier
from ..config.settings import KvbmSettings
from ..errors import ConfigError, Problem, UninitializedFieldError
from ._converter import LAYOUTS, NOTHING_BUILT, Table, build_layout, converter, dump, kind_of, load
from ._render import show_value

__all__ = ["KvbmSettings", "Resolved", "from_env", "resolve", "settings_from_env"]

Path = tuple[str, ...]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


# ---- settings without a config field -----------------------------------------------------------------------------


def _env_problem(name: str, message: str) -> Problem:
    return Problem(("$env", name), message)


def _flag(environ: Mapping[str, str], name: str) -> bool | None:
    """A yes/no variable: None when unset or empty."""
    text = environ.get(name)
    if text is None or not text.strip():
        return None
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ConfigError([_env_problem(name, f"must be 1, true, yes, on or 0, false, no, off; got {show_value(text)}")])


def _present(environ: Mapping[str, str], name: str) -> bool | None:
    """A variable that is on when present (upstream: ``env::var(name).is_ok()``): True, or None when unset."""
    text = environ.get(name)
    if text is None:
        return None
    if text.strip().lower() in (*_FALSE, ""):
        raise ConfigError(
            [
                _env_problem(
                    name,
                    f"is on whenever it is set, as upstream reads it, so {text!r} would turn it on; "
                    "unset it to keep it off, or set it to 1",
                )
            ]
        )
    return True


def _count(environ: Mapping[str, str], name: str, *, default: int, most: int, what: str = "a whole number") -> int:
    """A whole number up to ``most``; unset, empty or zero gives ``default``."""
    value = read_positive(environ, name, integer=True, what=what)
    if value is None:
        return default
    if value > most:
        raise ConfigError([_env_problem(name, f"must be {what} up to {most}, got {environ[name]!r}")])
    return int(value)


def _port(environ: Mapping[str, str], name: str, *, default: int) -> int:
    """A TCP port, 1..65535; unset or empty gives ``default``, and zero is refused (no server listens on it)."""
    what = "a port number 1..65535"
    value = read_positive(environ, name, integer=True, what=what, zero_is_unset=False)
    if value is None:
        return default
    if value > 65535:
        raise ConfigError([_env_problem(name, f"must be {what}, got {environ[name]!r}")])
    return int(value)


class _Problems:
    """Collects the problems of several reads, so that one call reports them all."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def read(self, parse: Callable[[], Any]) -> Any:
        try:
            return parse()
        except ConfigError as err:
            # config.env reports under root "$env"; make the paths absolute like ours
            self.problems.extend(
                p if p.path[:1] == ("$env",) else Problem(("$env", *p.path), p.message) for p in err.problems
            )
            return None


def settings_from_env(environ: Mapping[str, str] = os.environ) -> KvbmSettings:
    """:class:`KvbmSettings` from the ``DYN_KVBM_*`` variables; bad values raise one ConfigError naming each."""
    seen = _Problems()
    values = {
        "metrics": seen.read(lambda: _flag(environ, names.DYN_KVBM_METRICS)),
        "metrics_port": seen.read(
            lambda: _port(environ, names.DYN_KVBM_METRICS_PORT, default=names.DEFAULT_METRICS_PORT)
        ),
        "max_concurrent_transfers": seen.read(
            lambda: _count(environ, names.DYN_KVBM_MAX_CONCURRENT_TRANSFERS, default=4, most=4096)
        ),
        "max_transfer_batch_size": seen.read(
            lambda: _count(
                environ,
                names.DYN_KVBM_MAX_TRANSFER_BATCH_SIZE,
                default=16,
                most=1 << 20,
                what="a whole number of blocks",
            )
        ),
        "disk_offload_filter": seen.read(lambda: not _present(environ, names.DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER)),
        "cache_stats_max_requests": seen.read(
            lambda: _count(environ, names.DYN_KVBM_CACHE_STATS_MAX_REQUESTS, default=1000, most=2**64 - 1)
        ),
    }
    if seen.problems:
        raise ConfigError(seen.problems, "")
    return KvbmSettings(**{k: v for k, v in values.items() if v is not None})


# ---- changes to a document ---------------------------------------------------------------------------------------


@attrs.frozen
class Change:
    """Set ``path`` of the document to ``value`` (None removes it), on behalf of ``source``."""

    path: Path
    value: object
    source: str


_TIERS = {Tier.G2: (names.DYN_KVBM_CPU_CACHE_GB, names.DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS, StorageKind.PINNED)}
_TIERS[Tier.G3] = (names.DYN_KVBM_DISK_CACHE_GB, names.DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS, StorageKind.DISK)
_DEFAULT_KIND = {Tier.G1: StorageKind.DEVICE, Tier.G2: StorageKind.PINNED, Tier.G3: StorageKind.DISK}
_NO_TIER = object()


def _allocator_kind(document: Mapping[str, Any], tier: Tier) -> object:
    """The allocator kind of ``tier`` in ``document``: ``_NO_TIER``, None (no allocator table, or a tier that is not
    a table: its own error is reported), the StorageKind (read as every ``kind`` is, :func:`kind_of`), or the
    value itself when it names no kind (the load says why)."""
    table = document.get(tier.slot)
    if table is None:
        return _NO_TIER
    if not isinstance(table, Mapping):
        return None
    allocator = table.get("allocator")
    if not isinstance(allocator, Mapping):
        return None
    kind = allocator.get("kind", _DEFAULT_KIND[tier])
    return kind_of(kind) or kind


def env_changes(document: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[list[Change], list[Problem]]:
    """What the ``DYN_KVBM_*`` variables change in ``document`` (see the module's table), and their problems."""
    seen = _Problems()
    changes: list[Change] = []
    kinds: dict[Tier, object] = {}
    for tier, (gb_var, override_var, kind) in _TIERS.items():
        kinds[tier] = _allocator_kind(document, tier)
        override = seen.read(partial(read_positive, environ, override_var, integer=True))
        gb = seen.read(partial(read_positive, environ, gb_var))
        if override is not None:
            changes.append(Change((tier.slot, "num_blocks"), int(override), f"env {override_var}"))
        elif gb is not None:
            changes.append(Change((tier.slot, "size"), math.floor(gb * 10**9), f"env {gb_var}"))
        sized_by = override_var if override is not None else gb_var if gb is not None else None
        if sized_by is not None and kinds[tier] is _NO_TIER:
            changes.append(Change((tier.slot, "allocator", "kind"), kind.value, f"env {sized_by}"))
            kinds[tier] = kind
    host = kinds[Tier.G2]
    for var, key in ((names.DYN_KVBM_USE_HUGE_PAGES, "huge_pages"), (names.DYN_KVBM_ENABLE_NUMA, "numa")):
        on = seen.read(partial(_flag, environ, var))
        if on is None or host is _NO_TIER or host is None:
            continue
        if host is StorageKind.PINNED:
            changes.append(Change((Tier.G2.slot, "allocator", key), on, f"env {var}"))
        elif on and isinstance(host, StorageKind):
            why = f"asks for {key}, but host_layout's allocator is {show_value(host.value)}; use kind 'pinned'"
            seen.problems.append(_env_problem(var, why))
    directory = environ.get(names.DYN_KVBM_DISK_CACHE_DIR) or None
    no_direct = seen.read(lambda: _present(environ, names.DYN_KVBM_DISK_DISABLE_O_DIRECT))
    zerofill = seen.read(lambda: _present(environ, names.DYN_KVBM_DISK_ZEROFILL_FALLBACK))
    if kinds[Tier.G3] is StorageKind.DISK:
        for var, key, value in (
            (names.DYN_KVBM_DISK_CACHE_DIR, "directory", directory),
            (names.DYN_KVBM_DISK_DISABLE_O_DIRECT, "o_direct", False if no_direct else None),
            (names.DYN_KVBM_DISK_ZEROFILL_FALLBACK, "zerofill_fallback", True if zerofill else None),
        ):
            if value is not None:
                changes.append(Change((Tier.G3.slot, "allocator", key), value, f"env {var}"))
    return changes, seen.problems


def argument_changes(overrides: Mapping[str, object]) -> tuple[list[Change], list[Problem]]:
    """Explicit arguments, ``{"host_layout.size": "8GiB", "disk_layout": None}``: dotted paths to values."""
    changes: list[Change] = []
    problems: list[Problem] = []
    for key, value in overrides.items():
        path = tuple(key.split(".")) if isinstance(key, str) else ()
        if not path or not all(path):
            problems.append(Problem(("$arg", repr(key)), "must be a dotted path such as 'host_layout.size'"))
        else:
            changes.append(Change(path, value, "argument"))
    return changes, problems


_SIBLING = {"size": "num_blocks", "num_blocks": "size"}  # a tier takes exactly one of the two
_TIER_SLOTS = {tier.slot for tier in Tier}


def apply_changes(document: Mapping[str, Any], changes: Iterable[Change], origins: dict[Path, str]) -> dict[str, Any]:
    """``document`` with ``changes`` made, copying only the tables on their paths; ``origins`` records who set what.

    A change goes through tables only: where its path meets a value that is not a table (``host_layout:
    ["garbage"]``), that value is left in place, so that its own error is reported, and the change is dropped."""
    out = dict(document)
    for change in changes:
        table = out
        for key in change.path[:-1]:
            inner = table.get(key)
            if inner is not None and not isinstance(inner, Mapping):
                break
            table[key] = {} if inner is None else dict(inner)
            table = table[key]
        else:
            _change(table, change, origins)
    return out


def _change(table: dict[str, Any], change: Change, origins: dict[Path, str]) -> None:
    """Make ``change`` in ``table``, the innermost table on its path (copied for this change)."""
    for depth in range(len(change.path) - 1):
        origins.pop(change.path[: depth + 1], None)
    last = change.path[-1]
    cleared = [change.path]
    if len(change.path) == 2 and change.path[0] in _TIER_SLOTS and last in _SIBLING:
        table.pop(_SIBLING[last], None)
        cleared.append((change.path[0], _SIBLING[last]))
    for gone in cleared:
        for path in [p for p in origins if p[: len(gone)] == gone]:
            del origins[path]
    if change.value is None:
        table.pop(last, None)
    else:
        table[last] = change.value
        origins[change.path] = change.source


def leaf_paths(value: object, prefix: Path = (), depth: int = 6) -> Iterable[Path]:
    """Paths of the values in a document (a table deeper than ``depth`` counts as one value)."""
    if isinstance(value, Mapping) and depth > 0:  # an empty table sets nothing
        for key, inner in value.items():
            yield from leaf_paths(inner, (*prefix, str(key)), depth - 1)
    elif prefix:
        yield prefix


# ---- resolving ---------------------------------------------------------------------------------------------------


@attrs.frozen
class Resolved:
    """A configuration resolved from its layers, with ``sources``: for the dotted path of every value in
    ``dump(config)``, ``default``, the document's origin (``file``), ``env DYN_KVBM_...`` or ``argument``."""

    config: KvBlockManagerConfig
    settings: KvbmSettings
    sources: Mapping[str, str]


def _attributed(problem: Problem, origins: Mapping[Path, str]) -> Problem:
    """A document problem, shown under the variable that set the value it is about, if one did."""
    path = tuple(str(p) for p in problem.path)
    for end in range(len(path), 0, -1):
        source = origins.get(path[:end])
        if source is not None and source.startswith("env "):
            where = "$." + ".".join(path) if path else "$"
            return _env_problem(source[4:], f"{problem.message} (it sets {where})")
    return Problem(("$", *problem.path), problem.message)


def resolve(
    document: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    overrides: Mapping[str, object] | None = None,
    origin: str = "file",
) -> Resolved:
    """The configuration of ``document`` (its values labelled ``origin``), then the ``DYN_KVBM_*`` variables of
    ``environ`` (pass ``{}`` to ignore them), then ``overrides`` (dotted paths, see :func:`argument_changes`).

    Raises one :class:`~kvbm_builder.errors.ConfigError` with every problem of every layer (absolute paths).
    """
    base: Mapping[str, Any] = {} if document is None else document
    origins: dict[Path, str] = {}
    problems: list[Problem] = []
    if isinstance(base, Mapping):
        origins.update(dict.fromkeys(leaf_paths(base), origin))
        env, env_problems = env_changes(base, environ)
        args, arg_problems = argument_changes(overrides or {})
        problems += env_problems + arg_problems
        base = apply_changes(base, [*env, *args], origins)
    seen = _Problems()
    settings = seen.read(lambda: settings_from_env(environ))
    problems += seen.problems
    config = None
    missing: tuple[str, ...] = ()
    try:
        config = load(base)
    except ConfigError as err:
        problems.extend(_attributed(p, origins) for p in err.problems)
        missing = getattr(err, "missing", ())
    if problems:
        unique = dict.fromkeys(problems)
        raise UninitializedFieldError(unique, "", missing) if missing else ConfigError(unique, "")
    if config is None:  # a safety net: load() raises whenever it builds nothing
        raise ConfigError([Problem(("$",), NOTHING_BUILT)], "")
    return Resolved(config, settings, _sources(dump(config), base, origins))


def _sources(dumped: Mapping[str, Any], document: Mapping[str, Any], origins: Mapping[Path, str]) -> dict[str, str]:
    sources: dict[str, str] = {}
    for path in leaf_paths(dumped):
        source = next((origins[path[:end]] for end in range(len(path), 0, -1) if path[:end] in origins), None)
        size_path = (*path[:-1], "size")
        if source is None and path[-1] == "num_blocks" and size_path in origins:
            size = document[path[0]]["size"]
            source = f"{origins[size_path]}, from size = {size!r}"
        sources[".".join(path)] = source or "default"
    return sources


def from_env(
    environ: Mapping[str, str] = os.environ, base: KvBlockManagerConfig | Mapping[str, Any] | None = None
) -> KvBlockManagerConfig:
    """``base`` with the ``DYN_KVBM_*`` variables of ``environ`` applied (see the module's table).

    ``base`` is a document (what :func:`load` takes; None is an empty one) or a built config. For a built config
    only the tiers the variables touch are rebuilt, keeping every runtime object (event manager, registry, agent,
    token; a rebuilt tier keeps its offload filter, and its allocator, of the same kind, keeps its progress
    callback); a touched tier backed by pre-allocated storage or a custom allocator is an error.
    """
    if not isinstance(base, KvBlockManagerConfig):
        return resolve(base, environ=environ).config
    shape = {
        tier.slot: {"allocator": {"kind": layout.storage_kind.value}} if layout.allocator is not None else {}
        for tier, layout in base.tiers()
    }
    changes, problems = env_changes(shape, environ)
    seen = _Problems()
    seen.read(lambda: settings_from_env(environ))
    problems += seen.problems
    rebuilt: dict[str, KvManagerLayoutConfig[Any]] = {}
    for tier in (Tier.G2, Tier.G3):
        mine = [c for c in changes if c.path[0] == tier.slot]
        if not mine:
            continue
        layout = getattr(base, tier.slot)
        try:
            table = {} if layout is None else dump(layout)
        except ConfigError as err:
            problems.extend(
                _env_problem(
                    mine[0].source[4:], f"cannot change $.{'.'.join(map(str, (tier.slot, *p.path)))}: {p.message}"
                )
                for p in err.problems
            )
            continue
        origins: dict[Path, str] = {}
        section = apply_changes({tier.slot: table}, mine, origins)[tier.slot]
        new, tier_problems = build_layout(_table(tier, section), base.model)
        problems.extend(_attributed(p.under(tier.slot), origins) for p in tier_problems)
        if new is not None:
            if layout is not None and new.allocator is not None:
                new = attrs.evolve(new, allocator=_carried(layout.allocator, new.allocator))
            rebuilt[tier.slot] = _carried(layout, new)
    if problems:
        raise ConfigError(dict.fromkeys(problems), "")
    if not rebuilt:
        return base
    try:
        return attrs.evolve(base, **cast(dict[str, Any], rebuilt))
    except ConfigError as err:
        raise ConfigError([_attributed(p, {}) for p in err.problems], "") from None


_T = TypeVar("_T")


def _carried(old: object, new: _T) -> _T:
    """``new`` with the runtime objects of ``old`` (its fields that take no part in equality, such as a layout's
    ``offload_filter`` or an allocator's ``progress``), which a document cannot hold; ``new`` itself when ``old``
    is of another class (an allocator of another kind keeps nothing)."""
    if type(old) is not type(new) or not attrs.has(type(new)):
        return new
    kept = {
        field.alias: getattr(old, field.name)
        for field in attrs.fields(cast(Any, type(new)))
        if not field.eq and field.init and getattr(old, field.name) is not getattr(new, field.name)
    }
    return cast(_T, attrs.evolve(cast(Any, new), **kept)) if kept else new


def _table(tier: Tier, section: Mapping[str, Any]) -> Table:
    table: Table = converter.structure(section, LAYOUTS[tier].section)
    return table
