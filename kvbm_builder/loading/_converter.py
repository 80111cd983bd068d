"""The one cattrs converter: the only place that knows the dict form of the configuration.

The dict form uses the field names of the config classes. Where a document differs from Python:

- a tier names its size either as ``num_blocks`` or as a byte budget ``size`` (``"16GiB"``, ``"16GB"``, a byte
  count): exactly one of the two; the budget becomes ``floor(size / bytes per block)`` blocks, counting each
  block's alignment padding;
- a tier's ``allocator`` is a table: ``{kind = "device", device_id = 0}``, ``{kind = "pinned", ...}``,
  ``{kind = "system"}`` or ``{kind = "disk", directory = "/tmp/kvbm", ...}``; ``kind`` may be left out where the
  tier implies it (device, pinned, disk);
- layouts, event sources and modes accept upstream's spellings; ``runtime.nixl`` is ``"enabled"`` or ``"disabled"``;
- runtime objects (agents, registries, tokens, executors, storages, filters, event managers) cannot come from a
  document: the error says which builder setter takes them.

Loading is strict: no coercion (``"false"`` is not a bool, ``2.7`` is not an int, ``true`` is not a count) and
unknown keys are errors. Each table is structured key by key; a value that fails becomes an :class:`Invalid`
holding its problems, the others go through the class's builder, whose rules are the only rules. So one load
reports every problem of the document, and a document and a builder chain that mean the same thing give equal
configs and equal errors.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Collection, Mapping
from typing import Any, NewType, TypedDict, TypeVar, Union, cast, get_args, get_origin, overload

import attrs
import cattrs
from cattrs.gen.typeddicts import make_dict_structure_fn

from ..config._rules import Validated, is_int, show
from ..config.allocators import DeviceAllocator, DiskAllocator, PinnedAllocator, PinningMode, SystemAllocator
from ..config.consolidator import ConsolidatorMode, EventSource, KvEventConsolidatorConfig
from ..config.layout import _CHOICES, BlockParallelismStrategy, FullyContiguous, KvManagerLayoutConfig, LayoutType
from ..config.manager import KvBlockManagerConfig
from ..config.model import KvManagerModelConfig
from ..config.protocols import StorageKind, Tier
from ..config.runtime import U64_MAX, KvManagerRuntimeConfig, NixlMode, NixlOptions
from ..config.sizes import parse_size
from ..errors import ConfigError, Problem, UninitializedFieldError
from ._render import key_name, show_value, unknown_key

__all__ = ["FORMS", "ByteSize", "Form", "Key", "converter", "dump", "kind_of", "load"]

C = TypeVar("C")

ByteSize = NewType("ByteSize", int)
"""A byte budget: ``"16GiB"`` (2^30), ``"16GB"`` (10^9), ``"512 MiB"`` or a byte count."""

# What a tier's `allocator` table may hold. Only hook lookups use these types.
DeviceTierAllocator = NewType("DeviceTierAllocator", object)
HostTierAllocator = NewType("HostTierAllocator", object)
DiskTierAllocator = NewType("DiskTierAllocator", object)
AnyAllocator = NewType("AnyAllocator", object)


@attrs.frozen
class Invalid:
    """A document value that could not be structured; ``problems`` say why, with paths relative to the value;
    ``missing`` names the required fields it left out (they make the load an UninitializedFieldError)."""

    problems: tuple[Problem, ...]
    missing: tuple[str, ...] = ()


@attrs.frozen
class Key:
    """One key of a table: the type its value is structured as, what it means, and JSON-schema facets."""

    type: Any
    doc: str
    schema: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen(eq=False)
class Form:
    """The dict form of one config class (for layouts: of one tier's layout)."""

    name: str
    target: type
    doc: str
    keys: Mapping[str, Key]
    runtime_only: Mapping[str, str] = attrs.field(factory=dict)
    section: Any = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        # every value is captured as itself or Invalid, so one bad value never hides the problems of others
        fields = {name: Union[key.type, Invalid] for name, key in self.keys.items()}  # noqa: UP007
        object.__setattr__(self, "section", cast(Any, TypedDict)(f"{self.name}Table", fields, total=False))

    @property
    def kind(self) -> str | None:
        """For an allocator form, its ``kind`` (``device``, ``pinned``, ``system``, ``disk``)."""
        storage_kind = getattr(self.target, "storage_kind", None)
        return storage_kind.value if isinstance(storage_kind, StorageKind) else None


def _setter(target: type, name: str) -> str:
    return f"set it in Python with {target.__name__}.builder().{name}(...)"


_NON_NEGATIVE = {"type": "integer", "minimum": 0}

MODEL = Form(
    "Model",
    KvManagerModelConfig,
    "The shape of one KV block: [num_layers, outer_dim, page_size, inner_dim] elements.",
    {
        "num_layers": Key(int, "Attention layers of the model.", {"minimum": 1}),
        "outer_dim": Key(int, "2 = separate K and V; 1 = MLA or fused KV.", {"enum": [1, 2]}),
        "page_size": Key(int, "Tokens per block.", {"minimum": 1}),
        "inner_dim": Key(
            int, "Elements per token per outer index per layer, e.g. kv_heads * head_dim.", {"minimum": 1}
        ),
        "dtype_width_bytes": Key(int, "Bytes per element (2 for bf16 and fp16).", {"enum": [1, 2, 4, 8], "default": 2}),
    },
)

RUNTIME = Form(
    "Runtime",
    KvManagerRuntimeConfig,
    "Who the manager is, and whether it uses NIXL.",
    {
        "worker_id": Key(
            int, "This worker's id (a u64); also the NIXL agent's name.", {"minimum": 0, "maximum": U64_MAX}
        ),
        "nixl": Key(
            NixlOptions,
            "'enabled': the manager creates its own NIXL agent; 'disabled': no NIXL.",
            {"default": "enabled"},
        ),
    },
    {
        "cancellation_token": _setter(KvManagerRuntimeConfig, "cancellation_token"),
        "async_runtime": _setter(KvManagerRuntimeConfig, "async_runtime"),
        "metrics_registry": _setter(KvManagerRuntimeConfig, "metrics_registry"),
    },
)

CONSOLIDATOR = Form(
    "Consolidator",
    KvEventConsolidatorConfig,
    "Deduplicates the KV events of the engine (G1) and of KVBM (G2, G3).",
    {
        "engine_event_endpoint": Key(
            str, "Where the engine publishes its KV events.", {"default": "tcp://localhost:5557"}
        ),
        "consolidated_event_endpoint": Key(
            str, "Where consolidated events are published.", {"default": "tcp://*:5558"}
        ),
        "engine_source": Key(
            EventSource,
            "Who publishes the engine events: vllm (or gpu), trtllm (or tensorrt-llm); case-insensitive.",
            {"default": "vllm"},
        ),
        "mode": Key(ConsolidatorMode, "dedup or passthrough.", {"default": "dedup"}),
    },
)

_DEVICE_ID = Key(int, "The GPU ordinal.", {"minimum": 0, "default": 0})

DEVICE_ALLOCATOR = Form(
    "DeviceAllocator", DeviceAllocator, "G1: exact allocations in GPU memory.", {"device_id": _DEVICE_ID}
)
PINNED_ALLOCATOR = Form(
    "PinnedAllocator",
    PinnedAllocator,
    "G2: page-locked host memory.",
    {
        "device_id": Key(int, "The GPU that copies to and from this memory.", {"minimum": 0, "default": 0}),
        "mode": Key(
            PinningMode,
            "register: mmap, parallel first touch, then cudaHostRegister (fast); host_alloc: cudaHostAlloc.",
            {"default": "register"},
        ),
        "huge_pages": Key(bool, "Back the tier with huge pages (DYN_KVBM_USE_HUGE_PAGES).", {"default": False}),
        "numa": Key(bool, "Place memory on the GPU's NUMA node (DYN_KVBM_ENABLE_NUMA).", {"default": False}),
        "threads": Key(
            int | None, "Threads that first-touch the pages (mode register).", {"minimum": 1, "maximum": 1024}
        ),
    },
    {"progress": "set it in Python: PinnedAllocator(progress=callback)"},
)
SYSTEM_ALLOCATOR = Form("SystemAllocator", SystemAllocator, "G2 without CUDA: ordinary page-aligned host memory.", {})
DISK_ALLOCATOR = Form(
    "DiskAllocator",
    DiskAllocator,
    "G3: one file in a directory, removed when released.",
    {
        "directory": Key(str, "Where the cache file is created (DYN_KVBM_DISK_CACHE_DIR).", {"default": "/tmp/"}),
        "o_direct": Key(
            bool, "Open the file with O_DIRECT (DYN_KVBM_DISK_DISABLE_O_DIRECT turns it off).", {"default": True}
        ),
        "zerofill_fallback": Key(
            bool,
            "Zero-fill when the file system refuses fallocate (DYN_KVBM_DISK_ZEROFILL_FALLBACK).",
            {"default": False},
        ),
    },
)
ALLOCATOR_FORMS = (DEVICE_ALLOCATOR, PINNED_ALLOCATOR, SYSTEM_ALLOCATOR, DISK_ALLOCATOR)


@attrs.frozen(eq=False)
class AllocatorSlot:
    """The allocators a tier's ``allocator`` table may describe; ``default`` applies when ``kind`` is left out."""

    accepted: tuple[Form, ...]
    default: Form | None
    tier: Tier | None


SLOTS: dict[Any, AllocatorSlot] = {
    DeviceTierAllocator: AllocatorSlot((DEVICE_ALLOCATOR,), DEVICE_ALLOCATOR, Tier.G1),
    HostTierAllocator: AllocatorSlot((PINNED_ALLOCATOR, SYSTEM_ALLOCATOR), PINNED_ALLOCATOR, Tier.G2),
    DiskTierAllocator: AllocatorSlot((DISK_ALLOCATOR,), DISK_ALLOCATOR, Tier.G3),
    AnyAllocator: AllocatorSlot(ALLOCATOR_FORMS, None, None),
}


def _layout_form(name: str, slot: Any, what: str) -> Form:
    return Form(
        name,
        KvManagerLayoutConfig,
        f"{what}: how many blocks, in what layout, backed by what memory.",
        {
            "num_blocks": Key(int, "Blocks in this tier (or give `size`).", {"minimum": 1}),
            "size": Key(
                ByteSize,
                "A byte budget instead of num_blocks: '16GiB' (2^30), '16GB' (10^9) or a byte count; "
                "blocks = floor(size / bytes per block, alignment padding included).",
            ),
            "layout_type": Key(
                LayoutType,
                "FullyContiguous, LayerSeparateOuterContiguous or LayerSeparateBlockContiguous "
                "(case, '_' and '-' ignored), or {LayerSeparate = {outer_contiguous = true}}.",
                {"default": "FullyContiguous"},
            ),
            "alignment": Key(int, "Each block starts on a multiple of this (a power of two).", {"default": 1}),
            "allocator": Key(slot, "How this tier's memory is made."),
            "logical": Key(
                BlockParallelismStrategy | None,
                "Blocks sharded across workers under a leader, instead of an allocator.",
            ),
        },
        {
            "storage": _setter(KvManagerLayoutConfig, "storage") + " (memory allocated beforehand)",
            "offload_filter": _setter(KvManagerLayoutConfig, "offload_filter"),
        },
    )


LAYOUTS: dict[Tier | None, Form] = {
    Tier.G1: _layout_form("DeviceLayout", DeviceTierAllocator, "The device tier (G1, GPU memory)"),
    Tier.G2: _layout_form("HostLayout", HostTierAllocator, "The host tier (G2, pinned or system memory)"),
    Tier.G3: _layout_form("DiskLayout", DiskTierAllocator, "The disk tier (G3, a file)"),
    None: _layout_form("Layout", AnyAllocator, "A tier"),
}

MANAGER = Form(
    "KvBlockManagerConfig",
    KvBlockManagerConfig,
    "A KV block manager: runtime, model, up to three tiers and the event consolidator.",
    {
        "runtime": Key(KvManagerRuntimeConfig, RUNTIME.doc),
        "model": Key(KvManagerModelConfig, MODEL.doc),
        "device_layout": Key(LAYOUTS[Tier.G1].section | None, LAYOUTS[Tier.G1].doc),
        "host_layout": Key(LAYOUTS[Tier.G2].section | None, LAYOUTS[Tier.G2].doc),
        "disk_layout": Key(LAYOUTS[Tier.G3].section | None, LAYOUTS[Tier.G3].doc),
        "consolidator_config": Key(KvEventConsolidatorConfig | None, CONSOLIDATOR.doc),
    },
    {
        "event_manager": _setter(KvBlockManagerConfig, "event_manager"),
        "block_reset_channel": _setter(KvBlockManagerConfig, "block_reset_channel"),
        "kvbm_metrics": _setter(KvBlockManagerConfig, "kvbm_metrics"),
    },
)

FORMS: tuple[Form, ...] = (MANAGER, RUNTIME, MODEL, *LAYOUTS.values(), *ALLOCATOR_FORMS, CONSOLIDATOR)
"""Every table of the dict form."""

converter = cattrs.Converter(detailed_validation=False, forbid_extra_keys=False)
"""The converter. Structuring raises :class:`~kvbm_builder.errors.ConfigError` with paths relative to the value."""


def _fail(message: str, *path: str | int) -> ConfigError:
    return ConfigError([Problem(path, message)])


# ---- scalars: no coercion, messages worded as the builders' rules word them --------------------------------------


def _int(value: object, _: object) -> int:
    # no bound of the loader's own: the builders' rules decide (a size is bounded by the layout's 2**63 - 1 bytes)
    if not is_int(value):
        raise _fail(f"must be an integer, got {show_value(value)}")
    assert isinstance(value, int)
    return value


def _bool(value: object, _: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(f"must be true or false, got {show_value(value)}")
    return value


def _str(value: object, _: object) -> str:
    if not isinstance(value, str):
        raise _fail(f"must be a string, got {show_value(value)}")
    return value


def _size(value: object, _: object) -> int:
    if isinstance(value, (str, int)):
        return _int(parse_size(value), None)
    raise _fail(f"must be a size such as '16GiB' or a byte count, got {show_value(value)}")


def _words(value: object) -> str:
    return value.lower().replace("_", "").replace("-", "") if isinstance(value, str) else ""


def _named(parse: Callable[[object], C], example: str) -> Callable[[object, object], C]:
    """A hook from a class's own parser, which sees only scalars (it shows what it refuses in its message)."""

    def hook(value: object, _: object) -> C:
        if not isinstance(value, (str, int, float, type(None))):
            raise _fail(f"must be a name such as {example}, got {show_value(value)}")
        return parse(value)

    return hook


def _flat(value: object) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) <= 4
        and all(isinstance(k, str) and isinstance(v, (str, int, float, type(None))) for k, v in value.items())
    )


def _layout_type(value: object, _: object) -> LayoutType:
    if isinstance(value, str):
        return LayoutType.parse(value)
    if isinstance(value, Mapping) and len(value) == 1 and _flat(next(iter(value.values()))):
        ((name, _body),) = value.items()
        if isinstance(name, str):
            return LayoutType.parse(value)
    raise _fail(
        f"must be a layout name ({', '.join(LayoutType.ACCEPTED)}) or "
        f"{{'LayerSeparate': {{'outer_contiguous': true}}}}, got {show_value(value)}"
    )


_PINNING_MODES = {_words(mode.value): mode for mode in PinningMode}
_STRATEGIES = {_words(strategy.name): strategy for strategy in BlockParallelismStrategy}


def _pinning_mode(value: object) -> PinningMode:
    mode = _PINNING_MODES.get(_words(value))
    if mode is None:
        raise _fail(f"must be 'register' or 'host_alloc', got {show_value(value)}")
    return mode


def _strategy(value: object) -> BlockParallelismStrategy:
    strategy = _STRATEGIES.get(_words(value))
    if strategy is None:
        raise _fail(f"must be 'LeaderWorkerSharded' (or null), got {show_value(value)}")
    return strategy


def _nixl(value: object) -> NixlOptions:
    word = value.strip().lower() if isinstance(value, str) else None
    if word == "enabled":
        return NixlOptions.ENABLED
    if word == "disabled":
        return NixlOptions.DISABLED
    if _words(value) == "enabledwithagent":
        raise _fail(
            "an agent cannot come from a document; set it in Python with "
            "KvManagerRuntimeConfig.builder().use_nixl_agent(agent), or write 'enabled' to let the manager create one"
        )
    raise _fail(f"must be 'enabled' or 'disabled', got {show_value(value)}")


converter.register_structure_hook(int, _int)
converter.register_structure_hook(bool, _bool)
converter.register_structure_hook(str, _str)
converter.register_structure_hook(ByteSize, _size)
converter.register_structure_hook(LayoutType, _layout_type)
converter.register_structure_hook(EventSource, _named(EventSource.parse, "'vllm'"))
converter.register_structure_hook(ConsolidatorMode, _named(ConsolidatorMode.parse, "'dedup'"))
converter.register_structure_hook(PinningMode, _named(_pinning_mode, "'register'"))
converter.register_structure_hook(BlockParallelismStrategy, _named(_strategy, "'LeaderWorkerSharded'"))
converter.register_structure_hook(NixlOptions, _named(_nixl, "'enabled'"))


# ---- capture: a value that fails is kept as Invalid, so its neighbours are still checked -------------------------


def _is_captured(t: Any) -> bool:
    return get_origin(t) in (Union, types.UnionType) and Invalid in get_args(t)


def _captured_hook(t: Any) -> Callable[[object, object], object]:
    rest = tuple(arg for arg in get_args(t) if arg is not Invalid)
    inner: Any = rest[0] if len(rest) == 1 else Union[rest]  # noqa: UP007
    hook = converter.get_structure_hook(inner)
    plain = inner if inner in (str, bool, int) else None  # values of exactly these types pass as they are

    def capture(value: object, _: object) -> object:
        if type(value) is plain:
            return value
        try:
            return hook(value, inner)
        except ConfigError as err:
            return Invalid(err.problems, getattr(err, "missing", ()))

    return capture


converter.register_structure_hook_factory(_is_captured, _captured_hook)

# ---- tables ------------------------------------------------------------------------------------------------------


@attrs.define
class Table:
    """One table of a document, structured key by key: what to give the builder (a stand-in for each value that
    failed), the problems found so far (paths from the table), the keys whose values failed, and the required
    fields left out (here or in a table inside)."""

    values: dict[str, Any]
    problems: list[Problem]
    failed: set[str]
    missing: list[str] = attrs.field(factory=list)

    def error(self) -> ConfigError:
        """The table's problems as one error: an UninitializedFieldError when a required field was left out."""
        if self.missing:
            return UninitializedFieldError(self.problems, "", self.missing)
        return ConfigError(self.problems)


class _StandIn:
    """Stands in for a value that failed: its builder setter is still called, so the key counts as set (no
    "must be initialized", no "must provide either ..."), and what the builder says about the stand-in is
    replaced by the value's own problems."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<invalid>"


STAND_IN = _StandIn()


def _table_hook(form: Form) -> Callable[[object, object], Table]:
    keys = form.keys
    allowed = tuple(keys)
    made: list[Callable[[Any, Any], dict[Any, Any]]] = []  # generated on first use: its hooks exist by then

    def hook(value: object, _: object) -> Table:
        if type(value) is not dict and not isinstance(value, Mapping):
            raise _fail(f"must be a table of keys and values, got {show_value(value)}")
        if not made:
            made.append(
                make_dict_structure_fn(
                    form.section, converter, _cattrs_forbid_extra_keys=False, _cattrs_detailed_validation=False
                )
            )
        values = made[0](value if type(value) is dict else dict(value), form.section)
        table = Table(values, [], set())
        for key in [key for key, item in values.items() if key not in keys or type(item) is Invalid]:
            item = values.pop(key)
            name = key_name(key)
            if key in keys:
                table.problems.extend(p.under(name) for p in item.problems)
                table.missing.extend(item.missing)
                values[name] = STAND_IN
                table.failed.add(name)
            else:
                table.problems.append(unknown_key(key, allowed, form.runtime_only))
        return table

    return hook


_TABLES = {form: _table_hook(form) for form in FORMS}


def _verdict(err: ConfigError, failed: Collection[str]) -> list[Problem]:
    return [p for p in err.problems if not (p.path and p.path[0] in failed)]


def _built(builder: Any, table: Table) -> Any:
    """``builder.build()``, or None with its problems (except those about stand-ins) added to the table's."""
    try:
        return builder.build()
    except ConfigError as err:
        table.problems.extend(_verdict(err, table.failed))
        if isinstance(err, UninitializedFieldError):
            table.missing.extend(err.missing)
        return None


_SETTERS: dict[type, dict[str, Callable[[Any, object], Any]]] = {}


def _setters(builder_type: type) -> dict[str, Callable[[Any, object], Any]]:
    """The public methods of a builder class, looked up once: calling them unbound is the same call, cheaper."""
    found = _SETTERS.get(builder_type)
    if found is None:
        found = {name: getattr(builder_type, name) for name in dir(builder_type) if not name.startswith("_")}
        _SETTERS[builder_type] = found
    return found


def _apply(builder: Any, values: Mapping[str, object]) -> Any:
    """Each value through the builder setter of the same name (the dict form's keys are the builders' setters)."""
    setters = _setters(type(builder))
    for name, value in values.items():
        builder = setters[name](builder, value)
    return builder


def _config_hook(form: Form) -> Callable[[object, object], object]:
    table = _TABLES[form]
    target = form.target
    new_builder = getattr(target, "builder", None)

    def hook(value: object, _: object) -> object:
        parsed = table(value, form.section)
        values, problems = parsed.values, parsed.problems
        if new_builder is not None:
            built = _built(_apply(new_builder(), values), parsed)
        else:  # the allocators are plain data without a builder: their constructor checks every field
            try:
                built = target(**values)
            except ConfigError as err:
                problems.extend(_verdict(err, parsed.failed))
        if problems:
            raise parsed.error()
        return built

    return hook


def _exactly(cls: object) -> Callable[[object], bool]:
    # by predicate: registering an attrs class directly makes cattrs resolve its annotations, and the config
    # classes name runtime types they import only for type checkers
    return lambda t: t is cls


_CONFIG_HOOKS = {form: _config_hook(form) for form in (MODEL, RUNTIME, CONSOLIDATOR, *ALLOCATOR_FORMS)}
for _form, _hook in _CONFIG_HOOKS.items():
    if _form not in ALLOCATOR_FORMS:
        converter.register_structure_hook_func(_exactly(_form.target), _hook)
for _layout in LAYOUTS.values():
    converter.register_structure_hook(_layout.section, _TABLES[_layout])


def kind_of(value: object) -> StorageKind | None:
    """The storage kind a document's allocator ``kind`` names (:meth:`StorageKind.parse`: ``'pinned'``, ``'DISK'``,
    ``' System '``), or None when it names none. Every reader of ``kind`` in loading uses this one rule."""
    try:
        return StorageKind.parse(value)
    except ConfigError:
        return None


def _direct_allocator_hook(form: Form) -> Callable[[object, object], object]:
    """An allocator class loaded by itself: its table may name its own ``kind`` (as :func:`dump` writes it)."""
    hook = _CONFIG_HOOKS[form]
    target = form.target

    def direct(value: object, _: object) -> object:
        if not isinstance(value, Mapping) or "kind" not in value:
            return hook(value, target)
        kind = value["kind"]
        rest = {k: v for k, v in value.items() if k != "kind"}
        if kind_of(kind) is getattr(target, "storage_kind", None):
            return hook(rest, target)
        problems = [
            Problem(("kind",), f"must be '{form.kind}' for a {target.__name__}, or left out; got {show_value(kind)}")
        ]
        try:
            hook(rest, target)
        except ConfigError as err:
            problems.extend(err.problems)
        raise ConfigError(problems)

    return direct


for _form in ALLOCATOR_FORMS:
    converter.register_structure_hook_func(_exactly(_form.target), _direct_allocator_hook(_form))


def _allocator_hook(slot: AllocatorSlot) -> Callable[[object, object], object]:
    kinds = {cast(Any, form.target).storage_kind: form for form in ALLOCATOR_FORMS}
    accepted = " or ".join(str(form.kind) for form in slot.accepted)

    def hook(value: object, _: object) -> object:
        if not isinstance(value, Mapping):
            example = "{kind = 'pinned'}" if slot.default is None else f"{{kind = '{slot.default.kind}'}}"
            raise _fail(f"must be an allocator table such as {example}, got {show_value(value)}")
        if "kind" not in value:
            if slot.default is None:
                raise _fail(f"must be given: {', '.join(str(form.kind) for form in ALLOCATOR_FORMS)}", "kind")
            form = slot.default
        else:
            kind = value["kind"]
            found = kinds.get(kind_of(kind))
            if found is None:
                raise _fail(f"must be {accepted}, got {show_value(kind)}", "kind")
            # a kind the tier does not take is the manager's rule (tier_problems): reported at `<tier>.allocator`,
            # as for a builder chain
            form = found
        return _CONFIG_HOOKS[form]({k: v for k, v in value.items() if k != "kind"}, form.target)

    return hook


for _slot_type, _slot in SLOTS.items():
    converter.register_structure_hook(_slot_type, _allocator_hook(_slot))


# ---- layouts and the manager: a byte budget needs the model ------------------------------------------------------


_FULLY_CONTIGUOUS = FullyContiguous()  # the layout's default


def build_layout(
    table: Table, model: object, *, standalone: bool = False, seen: dict[object, int | Problem | None] | None = None
) -> tuple[KvManagerLayoutConfig[Any] | None, list[Problem]]:
    """A tier's table through the layout builder. ``size`` becomes ``num_blocks`` with ``model``'s block bytes;
    when the model is missing or invalid, its own problems say why the tier could not be sized. ``seen`` keeps
    the block bytes of layouts already sized in this load (tiers often share one)."""
    values, problems, failed = table.values, table.problems, table.failed  # the table is this call's to use up
    given_size = "size" in values
    size = values.pop("size", None)
    if "num_blocks" in values and given_size:
        problems.append(Problem(("size",), "give either `num_blocks` or `size`, not both"))
    elif "num_blocks" not in values:
        values["num_blocks"] = STAND_IN
        failed.add("num_blocks")
        if not given_size:
            problems.append(Problem((), "needs `num_blocks`, or `size` as a byte budget such as '16GiB'"))
        elif standalone:
            problems.append(
                Problem(
                    ("size",),
                    "a byte budget needs the model to count blocks: give `num_blocks`, "
                    "or load this tier as part of a KvBlockManagerConfig",
                )
            )
        elif isinstance(size, int) and isinstance(model, KvManagerModelConfig):
            shape = (values.get("layout_type", _FULLY_CONTIGUOUS), values.get("alignment", 1))
            block_bytes = seen[shape] if seen is not None and shape in seen else _block_bytes(model, *shape)
            if seen is not None:
                seen[shape] = block_bytes
            if isinstance(block_bytes, Problem):
                problems.append(block_bytes)
            elif block_bytes is not None and size < block_bytes:
                problems.append(
                    Problem(
                        ("size",),
                        f"{size} bytes hold no whole block of {block_bytes} bytes; raise it, or give num_blocks",
                    )
                )
            elif block_bytes is not None:
                count = size // block_bytes
                too_big = _spec_problem(model, count, *shape) if count * block_bytes > _LARGE else None
                if isinstance(too_big, Problem):
                    problems.append(too_big)
                else:
                    values["num_blocks"] = count
                    failed.discard("num_blocks")
    layout = _built(_apply(KvManagerLayoutConfig.builder(), values), table)
    return (None, problems) if problems else (layout, problems)


_LARGE = 1 << 62  # below this, padding before each allocation cannot take a tier past the layout's 2**63 - 1 bytes


def _spec_problem(model: KvManagerModelConfig, num_blocks: int, layout_type: object, alignment: object) -> Any:
    """The LayoutSpec of ``num_blocks`` blocks, or its problem: under ``size`` when it is too large (a problem of
    its own), None when its layout or alignment is invalid (the builder says why)."""
    from ..layout import LayoutSpec

    try:
        return LayoutSpec(
            num_blocks=num_blocks,
            num_layers=model.num_layers,
            outer_dim=model.outer_dim,
            page_size=model.page_size,
            inner_dim=model.inner_dim,
            dtype_width_bytes=model.dtype_width_bytes,
            layout_type=cast(LayoutType, layout_type),
            alignment=cast(int, alignment),
        )
    except ConfigError as err:
        whole = [p for p in err.problems if not p.path]  # field problems are the builder's to report
        if not whole:
            return None
        what = "one block of this layout is too large" if num_blocks == 1 else f"{num_blocks} blocks are too many"
        return Problem(("size",), f"{what}: {whole[0].message}" + ("" if num_blocks == 1 else "; lower the size"))


def _block_bytes(model: KvManagerModelConfig, layout_type: object, alignment: object) -> int | Problem | None:
    """Bytes per block of this tier, alignment padding included; a problem under ``size`` when one block is
    already too large; None when its layout or alignment is invalid (the builder says why)."""
    spec = _spec_problem(model, 1, layout_type, alignment)
    return spec if spec is None or isinstance(spec, Problem) else cast(int, spec.block_bytes)


_SLOTS = tuple(tier.slot for tier in Tier)


def _manager_hook(value: object, _: object) -> KvBlockManagerConfig:
    table = _TABLES[MANAGER](value, MANAGER.section)
    values, problems, failed = table.values, table.problems, table.failed
    consolidator = values.pop("consolidator_config", None)
    seen: dict[object, int | Problem | None] = {}
    for slot in _SLOTS:
        tier_table = values.get(slot)
        if isinstance(tier_table, Table):
            layout, tier_problems = build_layout(tier_table, values.get("model"), seen=seen)
            problems.extend(p.under(slot) for p in tier_problems)
            table.missing.extend(tier_table.missing)
            values[slot] = STAND_IN if layout is None else layout
            if layout is None:
                failed.add(slot)
    config = _built(_apply(KvBlockManagerConfig.builder(), values), table)
    if isinstance(consolidator, KvEventConsolidatorConfig):
        # the manager's setter takes upstream's three arguments, a table may also set `mode`: check it the same way
        problems.extend(KvBlockManagerConfig.check_values({"consolidator_config": consolidator}))
        if config is not None and not problems:
            config = attrs.evolve(config, consolidator_config=consolidator)
    if problems:
        # in the document's order (tiers are checked after the model they need); missing tables last
        order: dict[object, int] = {key_name(key): i for i, key in enumerate(cast(Mapping[Any, Any], value))}
        problems.sort(key=lambda p: order.get(p.path[0], len(order)) if p.path else -1)
        raise table.error()
    return cast(KvBlockManagerConfig, config)


def _standalone_layout_hook(value: object, _: object) -> KvManagerLayoutConfig[Any]:
    form = LAYOUTS[None]
    table = _TABLES[form](value, form.section)
    layout, _ = build_layout(table, None, standalone=True)
    if layout is None:
        raise table.error()
    return layout


converter.register_structure_hook_func(_exactly(KvBlockManagerConfig), _manager_hook)
converter.register_structure_hook_func(_exactly(KvManagerLayoutConfig), _standalone_layout_hook)

LOADABLE: tuple[type, ...] = (
    KvBlockManagerConfig,
    KvManagerRuntimeConfig,
    KvManagerModelConfig,
    KvManagerLayoutConfig,
    KvEventConsolidatorConfig,
    DeviceAllocator,
    PinnedAllocator,
    SystemAllocator,
    DiskAllocator,
)


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
        raise ConfigError(
            [
                Problem(
                    (),
                    f"cannot load a {getattr(cls, '__name__', cls)!s}; loadable: "
                    + ", ".join(c.__name__ for c in LOADABLE),
                )
            ]
        )
    try:
        loaded = converter.structure(mapping, cls)
    except ConfigError as err:
        raise err.rerooted("$") from None  # keeps the class: UninitializedFieldError when a field was left out
    if loaded is None:  # a safety net: every path that builds nothing records why
        raise ConfigError([Problem((), NOTHING_BUILT)], "$")
    return loaded


NOTHING_BUILT = (
    "the document could not be loaded, yet no problem was recorded; this is a bug in kvbm_builder.loading: "
    "please report it with the document"
)


# ---- dump: the dict form of a config -----------------------------------------------------------------------------


def _unstructure_hook(form: Form) -> Callable[[Any], dict[str, Any]]:
    fields = attrs.fields_dict(form.target)
    written = [name for name in form.keys if name in fields]  # `size` exists only in documents

    def hook(obj: Any) -> dict[str, Any]:
        out: dict[str, Any] = {} if form.kind is None else {"kind": form.kind}
        problems: list[Problem] = []
        for name in written:
            value = getattr(obj, name)
            if value is None and fields[name].default is None:
                continue
            try:
                out[name] = _dumped(value, name)
            except ConfigError as err:
                problems.extend(p.under(name) for p in err.problems)
        for name in form.runtime_only:
            field = fields[name]
            # runtime objects that take no part in equality are not part of the configuration's value
            if field.eq and getattr(obj, name) != field.default:
                problems.append(Problem((name,), f"cannot be written to a document; {form.runtime_only[name]}"))
        if form.target is KvManagerLayoutConfig and all(getattr(obj, n) is None for n in _CHOICES):
            out["logical"] = None  # upstream's rule: `logical(None)` was chosen; keep it loadable
        if problems:
            raise ConfigError(problems)
        return out

    return hook


_WRITABLE = (
    int,
    bool,
    str,
    LayoutType,
    EventSource,
    ConsolidatorMode,
    PinningMode,
    BlockParallelismStrategy,
    NixlOptions,
    *LOADABLE,
)


def _dumped(value: object, name: str) -> Any:
    if not isinstance(value, _WRITABLE):
        raise _fail(f"{show(value)} cannot be written to a document; only the built-in allocators and layouts can")
    return converter.unstructure(value)


def _dump_nixl(options: NixlOptions) -> str:
    if options.mode is NixlMode.ENABLED_WITH_AGENT:
        raise _fail(
            "a caller's NIXL agent cannot be written to a document; write 'enabled' to let the manager make one"
        )
    return str(options.mode.value)


for _form in (MANAGER, RUNTIME, MODEL, LAYOUTS[None], CONSOLIDATOR, *ALLOCATOR_FORMS):
    converter.register_unstructure_hook_func(_exactly(_form.target), _unstructure_hook(_form))
converter.register_unstructure_hook_func(
    lambda t: isinstance(t, type) and issubclass(t, LayoutType), lambda v: v.to_upstream()
)
converter.register_unstructure_hook(NixlOptions, _dump_nixl)
converter.register_unstructure_hook(BlockParallelismStrategy, lambda v: v.name)
for _enum in (EventSource, ConsolidatorMode, PinningMode):
    converter.register_unstructure_hook(_enum, lambda v: v.value)


def dump(config: Validated) -> dict[str, Any]:
    """The dict form of ``config``: plain JSON-able data, which :func:`load` turns back into an equal config.

    Runtime objects that take no part in equality (tokens, registries, executors, event managers, filters,
    progress callbacks) are left out. Values a document cannot describe (pre-allocated storage, a custom
    allocator, a caller's NIXL agent) raise :class:`~kvbm_builder.errors.ConfigError` naming them.
    """
    if not isinstance(config, LOADABLE):
        raise ConfigError(
            [Problem((), f"cannot dump {show(config)}; dumpable: " + ", ".join(c.__name__ for c in LOADABLE))]
        )
    try:
        return cast(dict[str, Any], converter.unstructure(config))
    except ConfigError as err:
        raise ConfigError(err.problems, "$") from None
