"""The one cattrs converter: the dict form of the configuration, both ways, derived from the config fields.

A document uses the field names of the config classes, and each value is judged by its field's own rule. Where a
document differs from Python: a tier gives ``num_blocks`` or a byte budget ``size`` (``"16GiB"``, ``"16GB"``, a
byte count; :func:`budget_blocks` is the one size rule); a tier's ``allocator`` is a table with a ``kind``
(``device``, ``pinned``, ``system``, ``disk``; left out, the tier's own); runtime objects cannot come from a document.

cattrs' detailed validation reads the tables inside each table and collects what fails (its exception groups are
rendered to problems under the keys that failed); what was read goes through the class's builder, whose rules are the
only rules, so every problem of a document is reported at once (``$.path: message`` lines), as a builder chain
meaning the same would report them.
"""

from __future__ import annotations

import difflib
import enum
import functools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NewType, TypedDict, TypeVar, cast, overload

import attrs
import cattrs
from cattrs.errors import ClassValidationError
from cattrs.gen.typeddicts import make_dict_structure_fn

from ..config.allocators import ALLOCATOR_OF_KIND, BUILTIN_ALLOCATORS
from ..config.consolidator import KvEventConsolidatorConfig
from ..config.fields import KEY, U64_MAX, Validated, power_of_two, specs
from ..config.layout import CHOICES, BlockParallelismStrategy, KvManagerLayoutConfig, LayoutType, span_bytes
from ..config.manager import KvBlockManagerConfig
from ..config.model import KvManagerModelConfig
from ..config.protocols import StorageKind, Tier
from ..config.runtime import KvManagerRuntimeConfig, NixlMode, NixlOptions
from ..config.sizes import MAX_BYTES, parse_size
from ..errors import (
    MUST_BE_INITIALIZED,
    ConfigError,
    Problem,
    RuntimeObjectError,
    RuntimeObjectWarning,
    UninitializedFieldError,
    show,
    show_key,
)

__all__ = ["LOADABLE", "budget_blocks", "config_error", "converter", "dump", "kind_of", "load", "tier_from_table"]

C = TypeVar("C")

LOADABLE: tuple[type, ...] = (
    KvBlockManagerConfig,
    KvManagerRuntimeConfig,
    KvManagerModelConfig,
    KvManagerLayoutConfig,
    KvEventConsolidatorConfig,
    *BUILTIN_ALLOCATORS,
)

converter = cattrs.Converter(detailed_validation=True)

#: A value the config field's own rule judges (no coercion: the builder sees exactly what the document holds).
Raw = NewType("Raw", object)
#: A byte budget: ``"16GiB"`` (2^30), ``"16GB"`` (10^9), ``"512 MiB"`` or a byte count.
ByteSize = NewType("ByteSize", int)
converter.register_structure_hook(ByteSize, lambda value, _: parse_size(value))
# the config classes by predicate (registering an attrs class directly makes cattrs resolve its annotations, and they
# name runtime types imported only for type checkers), each through its hook in _HOOKS
converter.register_structure_hook_func(lambda cls: cls in LOADABLE, lambda value, cls: _HOOKS[cls](value, cls))

#: What cattrs made of one table: the values it read, the problems found (paths relative to the table) and the keys of
#: the values that failed, which the builder counts as set but says nothing more about.
Table = tuple[dict[str, Any], list[Problem], set[str]]


class View:
    """The keys a document may give for one class (or one tier): each field a document can hold, read as it is for
    its own rule to judge, unless ``special`` gives it a type for cattrs to structure (a table inside, a byte size);
    ``special`` may also add a key of the document's own (a tier's ``size``). Called, it loads a table."""

    def __init__(self, target: type, **special: Any) -> None:
        described = specs(target)
        self.target = target
        self.keys = {**{name: Raw for name, spec in described.items() if spec.document}, **special}
        self.runtime_only = tuple(name for name, spec in described.items() if not spec.document)
        self.required = frozenset(f.name for f in attrs.fields(cast(Any, target)) if f.default is attrs.NOTHING)
        # cattrs structures the typed keys (a TypedDict of them) and passes the others through
        typed = {key: kind for key, kind in self.keys.items() if kind is not Raw}
        document = cast(Any, TypedDict)(f"{target.__name__}Document", typed, total=False)
        self.read = make_dict_structure_fn(document, converter, _cattrs_forbid_extra_keys=False) if typed else None

    def __call__(self, value: object, _: object = None) -> Any:
        return self.build(self.table(value))

    def table(self, value: object) -> Table:
        if not isinstance(value, Mapping):
            raise document_error(f"must be a table of keys and values, got {show(value)}")
        values = {key: item for key, item in value.items() if key in self.keys}
        problems: list[Problem] = []
        failed: set[str] = set()
        if len(values) < len(value):
            problems = [self.unknown(key) for key in sorted(value.keys() - self.keys.keys(), key=str)]
        if self.read is not None:
            try:
                values = self.read(values, None)
            except ClassValidationError as group:  # read the others again, without the values that failed
                failed = {note.name for _, note in group.group_exceptions()[0]}
                values = self.read({k: v for k, v in values.items() if k not in failed}, None)
                problems[:0] = problems_of(group)
        return values, problems, failed

    def unknown(self, key: object) -> Problem:
        """The problem with a key the table does not take: how to set a runtime object, or a did-you-mean."""
        name = show_key(key)
        if key in self.runtime_only:
            return Problem((name,), f"cannot come from a document: set it in Python with {_setter(self.target, name)}")
        close = difflib.get_close_matches(key, list(self.keys), n=1) if isinstance(key, str) and len(key) < 64 else []
        if close:
            return Problem((name,), f"unknown key; did you mean `{close[0]}`?")
        listed = ", ".join(f"`{k}`" for k in self.keys)
        return Problem(
            (name,), f"unknown key; expected one of: {listed}" if listed else "unknown key; this table takes no keys"
        )

    def build(self, table: Table) -> Any:
        """The config from the table's values through its builder (a class without one: its constructor), then every
        problem of the table at once, in one ConfigError."""
        values, problems, failed = table
        target = self.target
        # the usual case: everything was read, nothing is missing, the builder would add nothing (for a layout: when
        # exactly one memory choice was made); on a problem, the builder says it as for a chain of setters
        usual = not (problems or failed) and values.keys() >= self.required
        if usual and (target is not KvManagerLayoutConfig or len(values.keys() & CHOICES) == 1):
            try:  # (try, not contextlib.suppress: this runs for every table of every load)
                return target(**values)
            except ConfigError:
                pass
        try:
            if hasattr(target, "builder"):
                builder = target.builder()
                for name, value in values.items():
                    builder.set(name, value)
                for name in failed:
                    builder.mark_invalid(name)
                built = builder.build()
            else:
                built = target(**values)
            if not problems:
                return built
        except ConfigError as err:  # what it says of a value that could not be read was said already
            problems += [p for p in err.problems if not (p.path and p.path[0] in failed)]
        raise ConfigError(problems)


def _setter(target: type, name: str) -> str:
    how = f".builder().{name}(...)" if hasattr(target, "builder") else f"({name}=...)"
    return target.__name__ + how


def document_error(message: str, *path: str | int) -> ConfigError:
    return ConfigError([Problem(path, message)])


def problems_of(group: ClassValidationError) -> list[Problem]:
    """The problems in cattrs' exception group, each under the key cattrs noted it failed at."""
    problems: list[Problem] = []
    for exc, note in group.group_exceptions()[0]:
        if isinstance(exc, ConfigError):
            problems += [p.under(note.name) for p in exc.problems]
        else:  # a hook of ours failed unexpectedly: say so, with the path, rather than crash the whole load
            why = f"cannot be read: {type(exc).__name__}: {show(str(exc), typed=False)}"
            problems.append(Problem((note.name,), why))
    return problems


def config_error(problems: Iterable[Problem], root: str) -> ConfigError:
    """One error with each problem once: an UninitializedFieldError when one says a required field is missing."""
    unique = dict.fromkeys(problems)
    missing = [str(p.path[-1]) for p in unique if p.message == MUST_BE_INITIALIZED]
    return UninitializedFieldError(unique, root, missing) if missing else ConfigError(unique, root)


def kind_of(value: object) -> StorageKind | None:
    try:
        return StorageKind.parse(value)
    except ConfigError:
        return None


_TABLES = (KvManagerRuntimeConfig, KvManagerModelConfig, KvEventConsolidatorConfig)
#: The view of each config class loaded by itself (the tiers' views are TIER_VIEWS).
CLASS_VIEWS: dict[type, View] = {cls: View(cls) for cls in (*_TABLES, *BUILTIN_ALLOCATORS)}


def _allocator_hook(tier: Tier | None) -> Callable[[object, object], Any]:
    """A tier's ``allocator`` table (``tier=None``: a layout loaded by itself, which must say its kind)."""
    accepted = [kind.value for kind in StorageKind if tier is None or kind in tier.accepts]

    def hook(value: object, _: object) -> Any:
        if not isinstance(value, Mapping):
            example = f"{{kind = '{tier.default_kind.value if tier else 'pinned'}'}}"
            raise document_error(f"must be an allocator table such as {example}, got {show(value)}")
        given = value.get("kind", None if tier is None else tier.default_kind)
        if given is None:
            raise document_error(f"must be given: {', '.join(accepted)}", "kind")
        kind = kind_of(given)  # a kind the tier does not take is the manager's rule, reported at `<tier>.allocator`
        if kind is None:
            raise document_error(f"must be {' or '.join(accepted)}, got {show(given)}", "kind")
        return CLASS_VIEWS[ALLOCATOR_OF_KIND[kind]]({k: v for k, v in value.items() if k != "kind"})

    return hook


def _own_allocator_hook(cls: Any) -> Callable[[object, object], Any]:
    """An allocator loaded by itself: its table may name its own ``kind`` (as :func:`dump` writes it)."""
    view = CLASS_VIEWS[cls]

    def hook(value: object, _: object) -> Any:
        if not isinstance(value, Mapping) or "kind" not in value:
            return view(value)
        values, problems, failed = view.table({k: v for k, v in value.items() if k != "kind"})
        if kind_of(value["kind"]) is not cls.storage_kind:
            why = f"must be '{cls.storage_kind.value}' for a {cls.__name__}, or left out; got {show(value['kind'])}"
            problems.insert(0, Problem(("kind",), why))
        return view.build((values, problems, failed))

    return hook


#: The view of a tier's table: ``None`` for a layout loaded by itself, whose allocator must say its kind.
TIER_VIEWS: dict[Tier | None, View] = {}
for _tier in (*Tier, None):
    _allocator = NewType("_allocator", object)  # each tier's allocator table has a type, for the tier's hook
    converter.register_structure_hook(_allocator, _allocator_hook(_tier))
    TIER_VIEWS[_tier] = View(KvManagerLayoutConfig, size=ByteSize, allocator=_allocator)


def budget_blocks(
    size: int, model: KvManagerModelConfig, layout_type: object = None, alignment: object = 1
) -> int | Problem | None:
    """The one size rule: how many blocks of ``model`` a byte budget holds in a tier of this layout, alignment
    padding included (``floor(size / block bytes)``; at alignment 1 upstream's ``floor(GB * 1e9 / bytes per
    block)``). A problem under ``size`` when the budget holds no block or too many; None when the layout or the
    alignment is itself invalid (the layout's builder says why)."""
    try:
        layout = LayoutType.parse("FullyContiguous" if layout_type is None else layout_type)
    except ConfigError:
        return None
    if power_of_two(alignment) is not None:
        return None
    span = functools.partial(span_bytes, model, layout_type=layout, alignment=cast(int, alignment))
    one = span(1)
    if one > MAX_BYTES:
        why = f"one block of this layout is too large: it spans {one} bytes with its padding, more than the"
        return Problem(("size",), f"{why} {MAX_BYTES} bytes (2**63 - 1) memory and files can span")
    block_bytes = span(2) - one  # what each block adds, padding included
    if size < block_bytes:
        return Problem(
            ("size",), f"{size} bytes hold no whole block of {block_bytes} bytes; raise it, or give num_blocks"
        )
    count: int = size // block_bytes
    if count > U64_MAX or span(count) > MAX_BYTES:
        blocks = "more than 2**64" if count > U64_MAX else str(count)
        why = f"holds {blocks} blocks of {block_bytes} bytes, more than the {MAX_BYTES} bytes (2**63 - 1) memory"
        return Problem(("size",), f"{why} and files can span, alignment padding included; lower the size")
    return count


def tier_from_table(value: object, model: object, tier: Tier | None) -> KvManagerLayoutConfig[Any]:
    """A tier's layout from its table; ``size`` becomes ``num_blocks`` with ``model``'s blocks. When the model is
    missing or invalid, its own problems say why the tier could not be sized."""
    values, problems, failed = TIER_VIEWS[tier].table(value)
    size = values.pop("size", None)
    given_size = size is not None or "size" in failed
    failed.discard("size")
    if ("num_blocks" in values or "num_blocks" in failed) and given_size:
        problems.append(Problem(("size",), "give either `num_blocks` or `size`, not both"))
    elif "num_blocks" not in values and "num_blocks" not in failed:
        failed.add("num_blocks")
        if not given_size:
            problems.append(Problem((), "needs `num_blocks`, or `size` as a byte budget such as '16GiB'"))
        elif tier is None and size is not None:
            why = "a byte budget needs the model to count blocks: give `num_blocks`, or load this tier as part of a "
            problems.append(Problem(("size",), why + "KvBlockManagerConfig"))
        elif size is not None and isinstance(model, KvManagerModelConfig):
            counted = budget_blocks(size, model, values.get("layout_type"), values.get("alignment", 1))
            if isinstance(counted, Problem):
                problems.append(counted)
            elif counted is not None:
                values["num_blocks"] = counted
                failed.discard("num_blocks")
    return cast("KvManagerLayoutConfig[Any]", TIER_VIEWS[tier].build((values, problems, failed)))


MANAGER_VIEW = View(
    KvBlockManagerConfig,
    runtime=KvManagerRuntimeConfig,
    model=KvManagerModelConfig,
    consolidator_config=KvEventConsolidatorConfig | None,
)
_ORDER: dict[str | int, int] = {key: i for i, key in enumerate(MANAGER_VIEW.keys)}


def _manager_hook(value: object, _: object) -> KvBlockManagerConfig:
    values, problems, failed = MANAGER_VIEW.table(value)
    model = values.get("model")
    for tier in Tier:
        if values.get(tier.slot) is not None:
            try:
                values[tier.slot] = tier_from_table(values[tier.slot], model, tier)
            except ConfigError as err:
                problems += [p.under(tier.slot) for p in err.problems]
                del values[tier.slot]
                failed.add(tier.slot)
    problems.sort(key=lambda p: _ORDER.get(p.path[0] if p.path else "", len(_ORDER)))  # the document's tables in order
    return cast(KvBlockManagerConfig, MANAGER_VIEW.build((values, problems, failed)))


#: How each loadable class is structured, by itself or inside a table.
_HOOKS: dict[type, Callable[[object, object], Any]] = {
    **{cls: CLASS_VIEWS[cls] for cls in _TABLES},
    **{cls: _own_allocator_hook(cls) for cls in BUILTIN_ALLOCATORS},
    KvManagerLayoutConfig: lambda value, _: tier_from_table(value, None, None),
    KvBlockManagerConfig: _manager_hook,
}


@overload
def load(mapping: Mapping[str, Any]) -> KvBlockManagerConfig: ...
@overload
def load(mapping: Mapping[str, Any], cls: type[C]) -> C: ...
def load(mapping: Mapping[str, Any], cls: type[Any] = KvBlockManagerConfig) -> Any:
    """A config from its dict form (what ``json.load``, ``tomllib.load`` or ``yaml.safe_load`` give).

    Raises :class:`~kvbm_builder.errors.ConfigError` listing every problem, each with its path:
    ``$.model.num_layers: must be >= 1, got 0``; an :class:`~kvbm_builder.errors.UninitializedFieldError` when a
    required field was left out.
    """
    if cls not in LOADABLE:
        loadable = ", ".join(c.__name__ for c in LOADABLE)
        raise ConfigError([Problem((), f"cannot load a {getattr(cls, '__name__', show(cls))}; loadable: {loadable}")])
    try:
        return converter.structure(mapping, cls)
    except ConfigError as err:
        raise config_error(err.problems, "$") from None


def dump(config: Validated) -> dict[str, Any]:
    """The dict form of ``config``: plain JSON-able data, which :func:`load` turns back into an equal config.

    What a document cannot hold, by each field's description: memory given as ``storage``, a caller's allocator or
    NIXL agent raise a :class:`~kvbm_builder.errors.RuntimeObjectError` naming them (without them it would describe
    another cache); objects a caller attached (an event manager, an offload filter, a progress callback, an
    executor) are left out with one :class:`~kvbm_builder.errors.RuntimeObjectWarning`; the token and registry a
    runtime config makes for itself are left out silently.
    """
    if type(config) not in LOADABLE:
        dumpable = ", ".join(c.__name__ for c in LOADABLE)
        raise ConfigError([Problem((), f"cannot dump {show(config)}; dumpable: {dumpable}")])
    problems: list[Problem] = []
    left_out: list[str] = []
    out = _table_of(config, problems, left_out)
    if left_out:
        why = "a document cannot hold runtime objects; set them again in Python on the loaded config"
        warnings.warn(RuntimeObjectWarning(f"dump() left out {', '.join(left_out)}: {why}"), stacklevel=2)
    if problems:
        raise RuntimeObjectError(problems, "$")
    return out


def _table_of(config: Validated, problems: list[Problem], left_out: list[str], *path: str) -> dict[str, Any]:
    """``config``'s table; what it cannot hold goes to ``problems`` (refused) or ``left_out`` (left out)."""
    cls = type(config)
    out: dict[str, Any] = {"kind": cast(Any, cls).storage_kind.value} if cls in BUILTIN_ALLOCATORS else {}
    for field in attrs.fields(cast(Any, cls)):
        value, where = getattr(config, field.name), (*path, field.name)
        if (value is None and field.default is None) or isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
            continue  # an unset option; a token or registry a runtime config made for itself
        if not field.metadata[KEY].document:
            if field.eq:
                why = f"cannot be written to a document; set it in Python with {_setter(cls, field.name)}"
                problems.append(Problem(where, why))
            else:
                left_out.append(f"{cls.__name__}.{field.name}")
        elif value is None or type(value) in (int, bool, str):
            out[field.name] = value
        elif type(value) in LOADABLE:
            out[field.name] = _table_of(value, problems, left_out, *where)
        elif isinstance(value, LayoutType):
            out[field.name] = value.to_upstream()
        elif isinstance(value, NixlOptions) and value.mode is NixlMode.ENABLED_WITH_AGENT:
            why = "a caller's NIXL agent cannot be written to a document; write 'enabled' to let the manager make one"
            problems.append(Problem(where, why))
        elif isinstance(value, (NixlOptions, BlockParallelismStrategy)):
            out[field.name] = value.mode.value if isinstance(value, NixlOptions) else value.name
        elif isinstance(value, enum.Enum):
            out[field.name] = value.value
        else:
            why = "cannot be written to a document; only the built-in allocators (and names of layouts and modes) can"
            problems.append(Problem(where, f"{show(value)} {why}"))
    return out
