"""The one cattrs converter: the dict form of the configuration, both ways, derived from the config fields.

A document uses the field names of the config classes, and each value is judged by its field's own rule. Where a
document differs from Python: a tier gives ``num_blocks`` or a byte budget ``size`` (``"16GiB"``, ``"16GB"``, a
byte count; :func:`budget_blocks` is the one size rule); a tier's ``allocator`` is a table with a ``kind``
(``device``, ``pinned``, ``system``, ``disk``; left out, the tier's own); runtime objects cannot come from a document.

cattrs' detailed validation reads each table key by key and collects what fails; what was read goes through the
class's builder, whose rules are the only rules, so every problem of a document is reported at once, rendered from
cattrs' exception groups to ``$.path: message`` lines, as a builder chain meaning the same would report them.
"""

from __future__ import annotations

import difflib
import enum
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, NewType, TypedDict, TypeVar, cast, overload

import attrs
import cattrs
from cattrs.errors import AttributeValidationNote, ClassValidationError, ForbiddenExtraKeysError
from cattrs.gen.typeddicts import make_dict_structure_fn

from ..config.allocators import ALLOCATOR_OF_KIND, BUILTIN_ALLOCATORS
from ..config.consolidator import KvEventConsolidatorConfig
from ..config.fields import KEY, U64_MAX, Validated, specs
from ..config.layout import CHOICES, BlockParallelismStrategy, KvManagerLayoutConfig, LayoutType, span_bytes
from ..config.manager import KvBlockManagerConfig
from ..config.model import KvManagerModelConfig
from ..config.protocols import StorageKind, Tier
from ..config.runtime import KvManagerRuntimeConfig, NixlMode, NixlOptions
from ..config.sizes import MAX_BYTES, parse_size
from ..errors import ConfigError, Problem, RuntimeObjectError, RuntimeObjectWarning, UninitializedFieldError, show

__all__ = ["LOADABLE", "budget_blocks", "converter", "document_error", "dump", "load", "tier_from_table"]

C = TypeVar("C")

LOADABLE: tuple[type, ...] = (
    KvBlockManagerConfig,
    KvManagerRuntimeConfig,
    KvManagerModelConfig,
    KvManagerLayoutConfig,
    KvEventConsolidatorConfig,
    *BUILTIN_ALLOCATORS,
)

converter = cattrs.Converter(detailed_validation=True, forbid_extra_keys=True)

#: A value the config field's own rule judges (no coercion: the builder sees exactly what the document holds).
Raw = NewType("Raw", object)
#: A byte budget: ``"16GiB"`` (2^30), ``"16GB"`` (10^9), ``"512 MiB"`` or a byte count.
ByteSize = NewType("ByteSize", int)
converter.register_structure_hook(Raw, lambda value, _: value)
converter.register_structure_hook(ByteSize, lambda value, _: parse_size(value))


# ---- tables: cattrs reads each key and collects what fails; the builder judges the rest --------------------------


class Table(NamedTuple):
    """What cattrs made of one table: the values it read, what failed (cattrs' exceptions, with notes) and the
    keys of the values that failed, which the builder counts as set but says nothing more about."""

    values: dict[str, Any]
    errors: list[Exception]
    failed: frozenset[str]


@attrs.frozen
class View:
    """The keys a document may give for one class (or one tier). cattrs structures the tables inside it (a TypedDict
    of them); the other values go to the builder as they are, and the field's own rule judges them."""

    target: type
    keys: dict[str, Any]  # key -> the type its value is structured as
    runtime_only: tuple[str, ...]
    typed: Any = attrs.field(init=False)
    read: Callable[[Mapping[str, Any], Any], dict[str, Any]] = attrs.field(init=False)
    allowed: frozenset[str] = attrs.field(init=False)
    nested: bool = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        nested = {key: t for key, t in self.keys.items() if t is not Raw}
        typed = cast(Any, TypedDict)(f"{self.target.__name__}Document", nested, total=False)
        object.__setattr__(self, "typed", typed)
        object.__setattr__(self, "read", make_dict_structure_fn(typed, converter, _cattrs_forbid_extra_keys=False))
        object.__setattr__(self, "allowed", frozenset(self.keys))
        object.__setattr__(self, "nested", bool(nested))
        _VIEWS[typed] = self

    def table(self, value: object) -> Table:
        if type(value) is not dict and not isinstance(value, Mapping):
            raise document_error(f"must be a table of keys and values, got {show(value)}")
        document = value if type(value) is dict else dict(value)  # cattrs copies it: the caller's stays as it is
        unknown = document.keys() - self.allowed
        errors: list[Exception] = [ForbiddenExtraKeysError("", self.typed, unknown)] if unknown else []
        failed: frozenset[str] = _NO_KEYS
        try:  # a table of values only (a model, an allocator) has nothing for cattrs to structure
            values = self.read(document, self.typed) if self.nested else dict(document)
        except ClassValidationError as group:
            failed = frozenset(note.name for _, note in group.group_exceptions()[0])
            values = self.read({k: v for k, v in document.items() if k not in failed}, self.typed)
            errors[:0] = group.exceptions
        for key in unknown:
            del values[key]
        return Table(values, errors, failed)

    def unknown(self, key: object) -> Problem:
        """The problem with a key the table does not take: how to set a runtime object, or a did-you-mean."""
        name = key if isinstance(key, str) else show(key)
        if key in self.runtime_only:
            return Problem((name,), f"cannot come from a document: set it in Python with {_setter(self.target, name)}")
        close = difflib.get_close_matches(key, list(self.keys), n=1) if isinstance(key, str) and len(key) < 64 else []
        if close:
            return Problem((name,), f"unknown key; did you mean `{close[0]}`?")
        listed = ", ".join(f"`{k}`" for k in self.keys)
        return Problem(
            (name,), f"unknown key; expected one of: {listed}" if listed else "unknown key; this table takes no keys"
        )


_VIEWS: dict[Any, View] = {}
_NO_KEYS: frozenset[str] = frozenset()


def _setter(target: type, name: str) -> str:
    return (
        f"{target.__name__}.builder().{name}(...)" if hasattr(target, "builder") else f"{target.__name__}({name}=...)"
    )


def document_error(message: str, *path: str | int) -> ConfigError:
    return ConfigError([Problem(path, message)])


def _noted(exc: Exception, name: str) -> Exception:
    note = AttributeValidationNote(f"@ attribute {name}", name, object)
    exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]  # add_note: 3.11+
    return exc


def _note_name(exc: BaseException) -> str | None:
    note = next((n for n in getattr(exc, "__notes__", ()) if isinstance(n, AttributeValidationNote)), None)
    return None if note is None else note.name


@functools.cache
def _required(target: type) -> frozenset[str]:
    return frozenset(f.name for f in attrs.fields(cast(Any, target)) if f.default is attrs.NOTHING)


_CHOICES = frozenset(CHOICES)


def _built(target: type, table: Table, values: Mapping[str, Any], problems: Sequence[Problem] = ()) -> Any:
    """The config from ``values`` through its builder (a class without one: its constructor), then every problem of
    the table at once, as one exception group."""
    # the usual case: everything was read, nothing is missing, the builder would add nothing (for a layout: when
    # exactly one memory choice was made); on a problem, the builder says it as for a chain of setters
    complete = not (table.errors or problems or table.failed) and values.keys() >= _required(target)
    if complete and (target is not KvManagerLayoutConfig or len(values.keys() & _CHOICES) == 1):
        try:  # (try, not contextlib.suppress: this runs for every table of every load)
            return target(**values)
        except ConfigError:
            pass
    errors = [*table.errors, *([ConfigError(problems)] if problems else [])]
    built = None
    try:
        if hasattr(target, "builder"):
            builder = target.builder()
            for name, value in values.items():
                builder.set(name, value)
            for name in table.failed:
                builder.mark_invalid(name)
            built = builder.build()
        else:
            built = target(**{k: v for k, v in values.items() if k not in table.failed})
    except ConfigError as err:  # what it says of a value that could not be read was said already
        kept = [p for p in err.problems if not (p.path and p.path[0] in table.failed)]
        missing = getattr(err, "missing", ())
        errors.append(UninitializedFieldError(kept, "", missing) if missing else ConfigError(kept))
    if errors:
        raise ClassValidationError(f"While structuring {target.__name__}", errors, target)
    return built


def _view(target: type, **special: Any) -> View:
    described = specs(target)
    keys = {name: special.get(name, Raw) for name, spec in described.items() if spec.document}
    keys.update({k: v for k, v in special.items() if k not in described})
    return View(target, keys, tuple(name for name, spec in described.items() if not spec.document))


def _load(view: View, value: object) -> Any:
    table = view.table(value)
    return _built(view.target, table, table.values)


# ---- allocators: a table with a kind -------------------------------------------------------------------------------

_ALLOCATOR_VIEWS = {cls: _view(cls) for cls in BUILTIN_ALLOCATORS}
#: The view of each config class loaded by itself (the tiers' views are TIER_VIEWS).
CLASS_VIEWS: dict[type, View] = dict(_ALLOCATOR_VIEWS)


_VIEW_OF_KIND = {kind.value: _ALLOCATOR_VIEWS[cls] for kind, cls in ALLOCATOR_OF_KIND.items()}


def _kind_of(value: object) -> StorageKind | None:
    try:
        return StorageKind.parse(value)
    except ConfigError:
        return None


def _allocator_hook(tier: Tier | None) -> Callable[[object, object], Any]:
    """A tier's ``allocator`` table (``tier=None``: a layout loaded by itself, which must say its kind)."""
    accepted = [kind.value for kind in StorageKind if tier is None or kind in tier.accepts]

    def hook(value: object, _: object) -> Any:
        if type(value) is not dict and not isinstance(value, Mapping):
            example = f"{{kind = '{tier.default_kind.value if tier else 'pinned'}'}}"
            raise document_error(f"must be an allocator table such as {example}, got {show(value)}")
        rest = dict(value)
        given = rest.pop("kind", None if tier is None else tier.default_kind.value)
        if given is None:
            raise document_error(f"must be given: {', '.join(accepted)}", "kind")
        # a kind the tier does not take is the manager's rule, reported at `<tier>.allocator` as for a builder
        view = _VIEW_OF_KIND.get(given) if type(given) is str else None  # the usual spelling, without parsing it
        if view is None:
            kind = _kind_of(given)
            if kind is None:
                raise document_error(f"must be {' or '.join(accepted)}, got {show(given)}", "kind")
            view = _VIEW_OF_KIND[kind.value]
        table = view.table(rest)
        return _built(view.target, table, table.values)

    return hook


def _own_allocator_hook(cls: type) -> Callable[[object, object], Any]:
    """An allocator loaded by itself: its table may name its own ``kind`` (as :func:`dump` writes it)."""
    view = _ALLOCATOR_VIEWS[cls]
    own = cast(Any, cls).storage_kind

    def hook(value: object, _: object) -> Any:
        if not isinstance(value, Mapping) or "kind" not in value:
            return _load(view, value)
        rest = {k: v for k, v in value.items() if k != "kind"}
        if _kind_of(value["kind"]) is own:
            return _load(view, rest)
        wrong = document_error(f"must be '{own.value}' for a {cls.__name__}, or left out; got {show(value['kind'])}")
        table = view.table(rest)
        return _built(cls, table._replace(errors=[_noted(wrong, "kind"), *table.errors]), table.values)

    return hook


# ---- tiers: a byte budget needs the model ------------------------------------------------------------------------

_FULLY_CONTIGUOUS = LayoutType.parse("FullyContiguous")
TierAllocator = {tier: NewType(f"{tier.name}Allocator", object) for tier in Tier}
AnyAllocator = NewType("AnyAllocator", object)
for _tier, _slot_type in TierAllocator.items():
    converter.register_structure_hook(_slot_type, _allocator_hook(_tier))
converter.register_structure_hook(AnyAllocator, _allocator_hook(None))

TIER_VIEWS: dict[Tier | None, View] = {
    tier: _view(KvManagerLayoutConfig, size=ByteSize, allocator=TierAllocator[tier]) for tier in Tier
}
TIER_VIEWS[None] = _view(KvManagerLayoutConfig, size=ByteSize, allocator=AnyAllocator)


def _spec(model: KvManagerModelConfig, num_blocks: int, layout_type: Any, alignment: Any) -> Any:
    from ..layout import LayoutSpec

    shape = attrs.asdict(model, recurse=False)
    return LayoutSpec(num_blocks=num_blocks, **shape, layout_type=layout_type, alignment=alignment)


def budget_blocks(
    size: int,
    model: KvManagerModelConfig,
    layout_type: object = None,
    alignment: object = 1,
    seen: dict[Any, Any] | None = None,
) -> int | Problem | None:
    """The one size rule: how many blocks of ``model`` a byte budget holds in a tier of this layout, alignment
    padding included (``floor(size / block bytes)``; at alignment 1 upstream's ``floor(GB * 1e9 / bytes per
    block)``). A problem under ``size`` when the budget holds no block or too many; None when the layout or the
    alignment is itself invalid (the layout's builder says why)."""
    shape = (layout_type if layout_type is not None else _FULLY_CONTIGUOUS, alignment)
    key = (shape[0], alignment) if type(alignment) is int and isinstance(shape[0], LayoutType) else None
    if seen is not None and key in seen:  # tiers of one document often share their shape
        block_bytes = seen[key]
    else:
        try:
            block_bytes = _spec(model, 1, *shape).block_bytes
        except ConfigError as err:
            whole = [p for p in err.problems if not p.path]  # field problems are the builder's to report
            return Problem(("size",), f"one block of this layout is too large: {whole[0].message}") if whole else None
        if seen is not None and key is not None:
            seen[key] = block_bytes
    if size < block_bytes:
        return Problem(
            ("size",), f"{size} bytes hold no whole block of {block_bytes} bytes; raise it, or give num_blocks"
        )
    count: int = size // block_bytes
    if count * block_bytes > 1 << 62 and (count > U64_MAX or span_bytes(model, count, *cast(Any, shape)) > MAX_BYTES):
        # (below 2**62 bytes, no padding can pass 2**63 - 1)
        blocks = "more than 2**64" if count > U64_MAX else str(count)
        why = f"holds {blocks} blocks of {block_bytes} bytes, more than the {MAX_BYTES} bytes (2**63 - 1) memory"
        return Problem(("size",), f"{why} and files can span, alignment padding included; lower the size")
    return count


def tier_from_table(
    table: Table, model: object, tier: Tier | None, seen: dict[Any, Any] | None = None
) -> KvManagerLayoutConfig[Any]:
    """A tier's layout from its table; ``size`` becomes ``num_blocks`` with ``model``'s blocks. When the model is
    missing or invalid, its own problems say why the tier could not be sized."""
    values = dict(table.values)
    size = values.pop("size", None)
    given_size = size is not None or "size" in table.failed
    failed = set(table.failed) - {"size"}
    problems: list[Problem] = []
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
            if "layout_type" in values:  # read once: the layout's own converter takes it as it is
                values["layout_type"] = _parsed_layout(values["layout_type"])
            counted = budget_blocks(size, model, values.get("layout_type"), values.get("alignment", 1), seen)
            if isinstance(counted, Problem):
                problems.append(counted)
            elif counted is not None:
                values["num_blocks"] = counted
                failed.discard("num_blocks")
    if failed != table.failed:
        table = table._replace(failed=frozenset(failed))
    layout: KvManagerLayoutConfig[Any] = _built(KvManagerLayoutConfig, table, values, problems)
    return layout


def _parsed_layout(value: object) -> object:
    try:
        return LayoutType.parse(value)
    except ConfigError:
        return value


TierTable = {tier: NewType(f"{tier.name}Table", object) for tier in Tier}
for _tier, _table_type in TierTable.items():
    converter.register_structure_hook(
        _table_type, functools.partial(lambda v, value, _: v.table(value), TIER_VIEWS[_tier])
    )


def _exactly(cls: type) -> Callable[[Any], bool]:
    # by predicate: registering an attrs class directly makes cattrs resolve its annotations, and the config
    # classes name runtime types they import only for type checkers
    return lambda t: t is cls


def _register(cls: type) -> None:
    view = CLASS_VIEWS[cls] = _view(cls)
    converter.register_structure_hook_func(_exactly(cls), lambda value, _: _load(view, value))


for _config in (KvManagerRuntimeConfig, KvManagerModelConfig, KvEventConsolidatorConfig):
    _register(_config)

MANAGER_VIEW = _view(
    KvBlockManagerConfig,
    runtime=KvManagerRuntimeConfig,
    model=KvManagerModelConfig,
    consolidator_config=KvEventConsolidatorConfig | None,
    **{tier.slot: TierTable[tier] | None for tier in Tier},
)


_SLOTS = tuple((tier, tier.slot) for tier in Tier)
_ORDER = {key: i for i, key in enumerate(MANAGER_VIEW.keys)}


def _manager_hook(value: object, _: object) -> KvBlockManagerConfig:
    table = MANAGER_VIEW.table(value)
    values, errors, failed = dict(table.values), list(table.errors), set(table.failed)
    model = values.get("model")
    seen: dict[Any, Any] = {}
    for tier, slot in _SLOTS:
        tier_table = values.get(slot)
        if isinstance(tier_table, Table):
            try:
                values[slot] = tier_from_table(tier_table, model, tier, seen)
            except ClassValidationError as group:
                errors.append(_noted(group, slot))
                del values[slot]
                failed.add(slot)
    if errors:  # the document's tables in their order
        errors.sort(key=lambda exc: _ORDER.get(_note_name(exc) or "", len(_ORDER)))
    config: KvBlockManagerConfig = _built(KvBlockManagerConfig, Table(values, errors, frozenset(failed)), values)
    return config


def _standalone_tier_hook(value: object, _: object) -> KvManagerLayoutConfig[Any]:
    return tier_from_table(TIER_VIEWS[None].table(value), None, None)


converter.register_structure_hook_func(_exactly(KvBlockManagerConfig), _manager_hook)
converter.register_structure_hook_func(_exactly(KvManagerLayoutConfig), _standalone_tier_hook)
for _allocator in BUILTIN_ALLOCATORS:
    converter.register_structure_hook_func(_exactly(_allocator), _own_allocator_hook(_allocator))


# ---- exception groups into problems -------------------------------------------------------------------------------


def problems_of(exc: BaseException, path: tuple[str | int, ...] = ()) -> tuple[list[Problem], list[str]]:
    """The problems (with paths from the document's root) and the missing fields that ``exc`` holds."""
    problems: list[Problem] = []
    missing: list[str] = []
    if isinstance(exc, ClassValidationError):
        for sub in exc.exceptions:
            name = _note_name(sub)
            found, lacking = problems_of(sub, path if name is None else (*path, name))
            problems += found
            missing += lacking
    elif isinstance(exc, ForbiddenExtraKeysError):
        view = _VIEWS[exc.cl]
        problems += [view.unknown(key).under(*path) for key in sorted(exc.extra_fields, key=str)]
    elif isinstance(exc, ConfigError):
        problems += [p.under(*path) for p in exc.problems]
        missing += getattr(exc, "missing", ())
    else:  # a hook of ours failed unexpectedly: say so, with the path, rather than crash the whole load
        problems.append(Problem(path, f"cannot be read: {type(exc).__name__}: {show(str(exc), typed=False)}"))
    return problems, missing


def rendered(exc: BaseException, root: str = "$") -> ConfigError:
    """One ConfigError (an UninitializedFieldError when a required field was left out) for everything in ``exc``."""
    problems, missing = problems_of(exc)
    problems = list(dict.fromkeys(problems))
    return UninitializedFieldError(problems, root, missing) if missing else ConfigError(problems, root)


@overload
def load(mapping: Mapping[str, Any]) -> KvBlockManagerConfig: ...
@overload
def load(mapping: Mapping[str, Any], cls: type[C]) -> C: ...
def load(mapping: Mapping[str, Any], cls: type[Any] = KvBlockManagerConfig) -> Any:
    """A config from its dict form (what ``json.load``, ``tomllib.load`` or ``yaml.safe_load`` give).

    Raises :class:`~kvbm_builder.errors.ConfigError` listing every problem, each with its path:
    ``$.model.num_layers: must be >= 1, got 0``.
    """
    if cls not in LOADABLE:
        loadable = ", ".join(c.__name__ for c in LOADABLE)
        raise ConfigError([Problem((), f"cannot load a {getattr(cls, '__name__', show(cls))}; loadable: {loadable}")])
    try:
        return converter.structure(mapping, cls)
    except (ClassValidationError, ConfigError) as exc:
        raise rendered(exc) from None


# ---- dump: the dict form of a config -----------------------------------------------------------------------------


def _dumped(value: object) -> Any:
    """A field's value as a document writes it."""
    if value is None or type(value) in (int, bool, str):
        return value
    if isinstance(value, LayoutType):
        return value.to_upstream()
    if isinstance(value, NixlOptions) and value.mode is NixlMode.ENABLED_WITH_AGENT:
        why = "a caller's NIXL agent cannot be written to a document; write 'enabled' to let the manager make one"
        raise RuntimeObjectError([Problem((), why)])
    if isinstance(value, (NixlOptions, BlockParallelismStrategy)):
        return value.mode.value if isinstance(value, NixlOptions) else value.name
    if type(value) in LOADABLE:
        return dump(cast(Validated, value), _root=False)
    if isinstance(value, enum.Enum):
        return value.value
    why = "cannot be written to a document; only the built-in allocators (and names of layouts and modes) can"
    raise RuntimeObjectError([Problem((), f"{show(value)} {why}")])


def dump(config: Validated, *, _root: bool = True) -> dict[str, Any]:
    """The dict form of ``config``: plain JSON-able data, which :func:`load` turns back into an equal config.

    One rule for what a document cannot hold, from each field's description: a runtime object whose absence would
    describe another cache (memory given as ``storage``, a caller's allocator or NIXL agent) is refused with a
    :class:`~kvbm_builder.errors.RuntimeObjectError` naming it; one a caller attached (an event manager, an offload
    filter, a progress callback, an executor) is left out with a :class:`~kvbm_builder.errors.RuntimeObjectWarning`;
    the token and registry every runtime config makes for itself are left out silently (a loaded one makes its own).
    """
    cls = type(config)
    if cls not in LOADABLE:
        loadable = ", ".join(c.__name__ for c in LOADABLE)
        raise ConfigError([Problem((), f"cannot dump {show(config)}; dumpable: {loadable}")])
    out: dict[str, Any] = {"kind": cast(Any, cls).storage_kind.value} if cls in BUILTIN_ALLOCATORS else {}
    problems: list[Problem] = []
    left_out: list[str] = []
    for field in attrs.fields(cast(Any, cls)):
        value = getattr(config, field.name)
        if (value is None and field.default is None) or isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
            continue  # an unset option; a token or registry a runtime config made for itself
        if not field.metadata[KEY].document:
            if field.eq:
                why = f"cannot be written to a document; set it in Python with {_setter(cls, field.name)}"
                problems.append(Problem((field.name,), why))
            else:
                left_out.append(f"{cls.__name__}.{field.name}")
            continue
        try:
            out[field.name] = _dumped(value)
        except RuntimeObjectError as err:
            problems.extend(p.under(field.name) for p in err.problems)
    if left_out:
        why = "a document cannot hold runtime objects; set them again in Python on the loaded config"
        warnings.warn(
            RuntimeObjectWarning(f"dump() left out {', '.join(left_out)}: {why}"), stacklevel=3 if _root else 4
        )
    if problems:
        raise RuntimeObjectError(problems, "$" if _root else "")
    return out
