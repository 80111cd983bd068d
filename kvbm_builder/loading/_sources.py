"""Where values come from: defaults < file < environment < explicit arguments, and which layer set each one.

Each source gives changes to a document, each with its provenance: the file (:func:`load_file`,
:func:`~kvbm_builder.documents.read_document`), the ``DYN_KVBM_*`` variables the config fields name
(:func:`env_changes`; a size variable creates its tier with the tier's default allocator, an allocator variable acts
on a tier whose allocator table is of its kind) and ``--set`` arguments (:func:`argument_changes`). They are merged
into one document, structured once. Errors carry absolute paths: ``$.model.num_layers``, ``$env.DYN_KVBM_...`` (also
when the value a variable set is what is wrong) and ``$arg.<key>``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, TypeVar, cast, overload

import attrs

from ..config.allocators import ALLOCATOR_OF_KIND
from ..config.fields import spec_of, specs
from ..config.layout import KvManagerLayoutConfig
from ..config.manager import KvBlockManagerConfig
from ..config.model import KvManagerModelConfig
from ..config.protocols import StorageKind, Tier
from ..config.settings import KvbmSettings, settings_from_env
from ..config.sizes import GB
from ..documents import read_document
from ..errors import ConfigError, Problem, show, show_key
from ._converter import budget_blocks, config_error, dump, kind_of, load, tier_from_table

__all__ = ["CacheSizes", "Resolved", "cache_sizes_from_env", "from_env", "load_file", "resolve"]

C = TypeVar("C")

Path = tuple[str, ...]
ARGUMENT = "argument"  # the source of every explicit argument


class Change(NamedTuple):
    """Set ``path`` of the document to ``value`` (None removes it), on behalf of ``source``."""

    path: Path
    value: object
    source: str


#: The variables that set an allocator's field: its kind, the field, the variable, the field's default.
_ALLOCATOR_VARS = [
    (kind, name, var, attrs.fields_dict(cls)[name].default)
    for kind, cls in ALLOCATOR_OF_KIND.items()
    for name, spec in specs(cls).items()
    for var in spec.env
]


def env_changes(document: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[list[Change], list[Problem]]:
    """What the ``DYN_KVBM_*`` variables change in ``document`` (see the module's list), and their problems."""
    problems: list[Problem] = []
    changes: list[Change] = []
    kinds: dict[Tier, StorageKind | None] = {}  # the kind of each tier's allocator table, if it has one
    for tier in Tier:
        table = document.get(tier.slot)
        allocator = table.get("allocator") if isinstance(table, Mapping) else None
        kinds[tier] = kind_of(allocator.get("kind", tier.default_kind)) if isinstance(allocator, Mapping) else None
        for var in spec_of(KvBlockManagerConfig, tier.slot).env:  # the block count first: it wins
            value = var.read_noting(environ, problems)
            if value is None:
                continue
            key, value = ("num_blocks", value) if var.kind == "blocks" else ("size", math.floor(cast(Any, value) * GB))
            changes.append(Change((tier.slot, key), value, f"env {var.name}"))
            if table is None:
                changes.append(Change((tier.slot, "allocator", "kind"), tier.default_kind.value, f"env {var.name}"))
                kinds[tier] = tier.default_kind
            break
    for tier, kind in kinds.items():
        for other, name, var, default in _ALLOCATOR_VARS:
            value = var.read_noting(environ, problems) if other in tier.accepts else None
            if value is None:
                continue
            if kind is other:
                changes.append(Change((tier.slot, "allocator", name), value, f"env {var.name}"))
            elif kind is not None and value != default:
                why = f"asks for {name}, but {tier.slot}'s allocator is {show(kind.value)}"
                problems.append(Problem(("$env", var.name), f"{why}; use kind '{other.value}'"))
    return changes, problems


def argument_changes(overrides: Mapping[str, object]) -> tuple[list[Change], list[Problem]]:
    """Explicit arguments, ``{"host_layout.size": "8GiB", "disk_layout": None}``: dotted paths to values."""
    changes: list[Change] = []
    problems: list[Problem] = []
    for key, value in overrides.items():
        path = tuple(key.split(".")) if isinstance(key, str) else ()
        if path and all(path):
            changes.append(Change(path, value, ARGUMENT))
        else:
            why = "must be a dotted path such as 'host_layout.size'"
            problems.append(Problem(("$arg", show(key, typed=False)), why))
    return changes, problems


_SIBLING = {"size": "num_blocks", "num_blocks": "size"}  # a tier takes exactly one of the two
_TIER_SLOTS = {tier.slot for tier in Tier}


def apply_changes(
    document: Mapping[str, Any], changes: Iterable[Change], origins: dict[Path, str]
) -> tuple[dict[str, Any], list[Problem]]:
    """``document`` with ``changes`` made, copying only the tables on their paths; ``origins`` records which change
    set what. A change goes through tables only: an argument whose path meets another value is a problem
    (``--set model.num_layers.x=5``); a variable's only meets a tier, whose own error is reported. Removing (``None``)
    what is not there does nothing."""
    out = dict(document)
    problems: list[Problem] = []
    for path, value, source in changes:
        table = out
        for depth, key in enumerate(path[:-1]):
            inner = table.get(key)
            if inner is None and value is None:
                break  # nothing there to remove
            if inner is not None and not isinstance(inner, Mapping):
                if source == ARGUMENT:
                    where = show_key(".".join(path[: depth + 1]))
                    why = f"cannot set a value inside {where}: it is {show(inner)}, not a table"
                    problems.append(Problem(("$arg", show_key(".".join(path))), why))
                break
            table[key] = {} if inner is None else dict(inner)
            table = table[key]
        else:
            # what the value replaces loses its origin: a table around it, what was inside it, a tier's other size key
            other = _SIBLING.get(path[-1]) if len(path) == 2 and path[0] in _TIER_SLOTS else None
            for old in [p for p in origins if p[: len(path)] == path[: len(p)] or p[:2] == (path[0], other)]:
                del origins[old]
            if other is not None:
                table.pop(other, None)
            if value is None:
                table.pop(path[-1], None)
            else:
                table[path[-1]] = value
                origins[path] = source
    return out, problems


def _attributed(problem: Problem, origins: Mapping[Path, str]) -> Problem:
    """A document problem, shown under the variable that set the value it is about, if one did."""
    path = tuple(str(p) for p in problem.path)
    for end in range(len(path), 0, -1):
        source = origins.get(path[:end])
        if source is not None and source.startswith("env "):
            return Problem(("$env", source[4:]), f"{problem.message} (it sets {'.'.join(('$', *path))})")
    return Problem(("$", *problem.path), problem.message)


@overload
def load_file(path: str | os.PathLike[str]) -> KvBlockManagerConfig: ...
@overload
def load_file(path: str | os.PathLike[str], cls: type[C]) -> C: ...
def load_file(path: str | os.PathLike[str], cls: type[Any] = KvBlockManagerConfig) -> Any:
    """A config from a JSON, TOML or YAML file (by suffix); the environment is not read (see ``from_env``). Raises
    :class:`~kvbm_builder.errors.LoadError` when the file cannot be read as a document, and
    :class:`~kvbm_builder.errors.ConfigError` (paths under ``$``) when the document is not a valid config."""
    return load(read_document(path), cls)


@attrs.frozen
class Resolved:
    """A configuration resolved from its layers, with ``sources``: for the dotted path of every value in
    ``dump(config)``, ``default``, the document's origin (``file``), ``env DYN_KVBM_...`` or ``argument``."""

    config: KvBlockManagerConfig
    settings: KvbmSettings
    sources: Mapping[str, str]


def resolve(
    document: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    overrides: Mapping[str, object] | None = None,
    origin: str = "file",
) -> Resolved:
    """The configuration of ``document`` (its values labelled ``origin``), then the ``DYN_KVBM_*`` variables of
    ``environ`` (pass ``{}`` to ignore them), then ``overrides`` (dotted paths, see :func:`argument_changes`).
    Raises one :class:`~kvbm_builder.errors.ConfigError` with every problem of every layer (absolute paths)."""
    base: Mapping[str, Any] = {} if document is None else document
    origins: dict[Path, str] = {}  # who set what; what no change set, the document did
    problems: list[Problem] = []
    if isinstance(base, Mapping):
        env, env_problems = env_changes(base, environ)
        args, arg_problems = argument_changes(overrides or {})
        base, blocked = apply_changes(base, [*env, *args], origins)
        problems += env_problems + arg_problems + blocked
    settings = None
    try:
        settings = settings_from_env(environ)
    except ConfigError as err:
        problems += err.problems
    config = None
    try:
        config = load(base)
    except ConfigError as err:
        problems.extend(_attributed(p, origins) for p in err.problems)
    if problems or config is None or settings is None:
        raise config_error(problems, "")
    return Resolved(config, settings, _sources(dump(config), base, origins, origin))


_ABSENT = object()


def _sources(
    dumped: Mapping[str, Any], given: object, origins: Mapping[Path, str], origin: str, path: Path = (), found: str = ""
) -> dict[str, str]:
    """Where each value of ``dumped`` came from: the change that set it or a table around it (``found``, for the
    tables around ``path``), else ``origin`` when the document holds it (``given``: what stands at ``path`` in the
    document), else the default. Only the dumped config is walked: a document's own values never are (YAML's
    aliases can make a small document stand for billions of them)."""
    sources: dict[str, str] = {}
    for key, value in dumped.items():
        where = (*path, key)
        inner = given.get(key, _ABSENT) if isinstance(given, Mapping) else given  # a value where a table was: given
        source = origins.get(where, found)
        if isinstance(value, Mapping):
            sources.update(_sources(value, inner, origins, origin, where, source))
            continue
        if not source and inner is not _ABSENT and not isinstance(inner, Mapping):
            source = origin
        if not source and key == "num_blocks":  # counted from a byte budget
            size = given.get("size", _ABSENT) if isinstance(given, Mapping) else given
            held = size is not _ABSENT and not isinstance(size, Mapping)
            size_source = origins.get((*path, "size"), found) or (origin if held else "")
            if size_source:
                source = f"{size_source}, from size = {show(size, typed=False)}"
        sources[".".join(where)] = source or "default"
    return sources


def from_env(
    environ: Mapping[str, str] = os.environ, base: KvBlockManagerConfig | Mapping[str, Any] | None = None
) -> KvBlockManagerConfig:
    """``base`` with the ``DYN_KVBM_*`` variables of ``environ`` applied (see the module's list).

    ``base`` is a document (what :func:`load` takes; None is an empty one) or a built config. A built config is
    changed with ``attrs.evolve`` on the tiers the variables touch, so every runtime object stays (event manager,
    registry, agent, token, a tier's offload filter, an allocator's progress callback); resizing a tier whose
    memory was given as ``storage`` is an error.
    """
    if not isinstance(base, KvBlockManagerConfig):
        return resolve(base, environ=environ).config
    rebuilt, problems, origins = _changed_tiers(base, base.model, environ)
    try:
        settings_from_env(environ)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(dict.fromkeys(problems))
    try:
        return attrs.evolve(base, **cast(dict[str, Any], rebuilt)) if rebuilt else base
    except ConfigError as err:
        raise ConfigError([_attributed(p, origins) for p in err.problems]) from None


def _changed_tiers(
    base: KvBlockManagerConfig | None, model: KvManagerModelConfig, environ: Mapping[str, str]
) -> tuple[dict[str, KvManagerLayoutConfig[Any]], list[Problem], dict[Path, str]]:
    """The tiers of ``base`` the variables change (``attrs.evolve``) or create (as in a document), the problems
    they raise and who set what."""
    shape = {  # what the variables may see of base: its tiers, and the kind of each built-in allocator
        tier.slot: {"allocator": {"kind": cast(Any, layout.allocator).storage_kind.value}}
        if type(layout.allocator) in ALLOCATOR_OF_KIND.values()
        else {}
        for tier, layout in (base.tiers() if base is not None else ())
    }
    changes, problems = env_changes(shape, environ)
    origins = {change.path: change.source for change in changes}
    tables = apply_changes({}, changes, {})[0]  # what the variables set, as a document's tables
    rebuilt: dict[str, KvManagerLayoutConfig[Any]] = {}
    for tier in Tier:
        table, layout = tables.get(tier.slot), getattr(base, tier.slot, None)
        try:
            if table is not None and layout is not None:
                rebuilt[tier.slot] = _evolved(layout, table, model)
            elif table is not None:  # a tier the variables create, as they would in a document
                rebuilt[tier.slot] = tier_from_table(table, model, tier)
        except ConfigError as err:
            problems.extend(_attributed(p.under(tier.slot), origins) for p in err.problems)
    return rebuilt, problems, origins


def _evolved(
    layout: KvManagerLayoutConfig[Any], table: Mapping[str, Any], model: KvManagerModelConfig
) -> KvManagerLayoutConfig[Any]:
    """``layout`` with what the variables set: its block count or size (a byte budget counted in ``model``'s
    blocks), or fields of its allocator."""
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key == "allocator":
            try:
                kwargs["allocator"] = attrs.evolve(cast(Any, layout.allocator), **value)
            except ConfigError as err:  # paths from the allocator: put them where the variables set them
                raise err.rerooted("", "allocator") from None
            continue
        counted = budget_blocks(value, model, layout.layout_type, layout.alignment) if key == "size" else value
        if isinstance(counted, Problem):
            raise ConfigError([counted])
        if layout.storage is not None:
            why = "cannot resize a tier whose memory was given as `storage`; unset the variable"
            raise ConfigError([Problem((key,), why)])
        kwargs["num_blocks"] = counted
    return attrs.evolve(layout, **kwargs)


@attrs.frozen
class CacheSizes:
    """Blocks of the CPU (G2) and disk (G3) tiers asked for by the environment (None: not asked for)."""

    cpu_blocks: int | None
    disk_blocks: int | None


def cache_sizes_from_env(model: KvManagerModelConfig, environ: Mapping[str, str] | None = None) -> CacheSizes:
    """The CPU and disk tier sizes that the ``DYN_KVBM_*`` variables ask for: a positive block count, else the GB
    amount by the one size rule for a FullyContiguous tier at alignment 1 (upstream's
    ``floor(GB * 1e9 / bytes_per_block)``). Example: 28 layers, outer 2, page 16, inner 1024, 2 bytes = 1,835,008
    bytes per block; ``DYN_KVBM_CPU_CACHE_GB=4`` gives 2179 blocks."""
    tiers, problems, _ = _changed_tiers(None, model, os.environ if environ is None else environ)
    if problems:
        raise ConfigError(problems)
    return CacheSizes(*(tiers[t.slot].num_blocks if t.slot in tiers else None for t in (Tier.G2, Tier.G3)))
