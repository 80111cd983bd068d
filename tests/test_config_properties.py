"""Property tests of the configuration DSL.

1. Random builder chains: random setters of random builders with random values of many types (good ones,
   wrong ones, built configs, unbuilt builders), clones, builds, and calls after build. Each ``build()``
   either gives a config that satisfies every rule, or raises a KvbmError whose problems name exactly the
   fields that an independent re-statement of the rules (below, written from the reference, not from the
   code) says are wrong. Nothing else may escape: no AttributeError, KeyError, TypeError or assert.
2. The sizing rule: ``floor(GB * 10^9 / bytes_per_block)``, exact, against Fraction.
3. ``parse_size``: round-trips, and GB (10^9) and GiB (2^30) are never mixed up.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from fractions import Fraction
from typing import Any

import attrs
import pytest
from callers import Agent, EventLog, Region, SeenTwice
from hypothesis import assume, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from prometheus_client import CollectorRegistry

from kvbm_builder import (
    BuilderConsumedError,
    ConfigError,
    KvBlockManagerConfig,
    KvbmError,
    KvEventConsolidatorConfig,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
    UninitializedFieldError,
)
from kvbm_builder.config import (
    BlockParallelismStrategy,
    CancellationToken,
    ConsolidatorMode,
    DeviceAllocator,
    DiskAllocator,
    EventSource,
    FullyContiguous,
    LayerSeparate,
    LayoutType,
    NixlMode,
    NixlOptions,
    PinnedAllocator,
    StorageKind,
    SystemAllocator,
    Tier,
    parse_size,
    should_bypass_cpu_cache,
)
from kvbm_builder.loading import cache_sizes_from_env
from kvbm_builder.metrics import KvbmMetrics, NullKvbmMetrics

# ---------------------------------------------------------------------------------------------------------
# Values a caller might pass


class KindlessAllocator:
    """Looks like an allocator, but its storage_kind is no StorageKind."""

    storage_kind = "device"

    def allocate(self, size: int) -> Region:
        return Region(self.storage_kind, 0, size)


EXECUTOR = ThreadPoolExecutor(max_workers=1)  # starts no thread until something is submitted

SHARDED = BlockParallelismStrategy.LeaderWorkerSharded
ALLOCATORS: list[Any] = [
    DeviceAllocator(),
    DeviceAllocator(device_id=1),
    PinnedAllocator(),
    SystemAllocator(),
    DiskAllocator(),
]
LAYOUT_TYPES = [FullyContiguous(), LayerSeparate(outer_contiguous=True), LayerSeparate(outer_contiguous=False)]
LAYOUT_NAMES = [
    "FullyContiguous",
    "fully_contiguous",
    "Layer-Separate-Outer-Contiguous",
    "layerseparateblockcontiguous",
]
ENDPOINTS = ["tcp://localhost:5557", "tcp://*:5558", "ipc:///run/kv-events", "tcp://10.0.0.2:6000"]
BAD_ENDPOINTS = ["localhost:5557", "tcp://", "://x", "tcp://a b:1", "tcp://a:1\n", ""]
SOURCE_NAMES = ["vllm", "vLLM", "gpu", "trtllm", "TensorRT-LLM", "tensorrt_llm", "kvbm", " kvbm ", "sglang"]
MODE_NAMES = ["dedup", "PASSTHROUGH", " passthrough", "merge"]
ODD_INTS = [0, 1, 2, 3, 4, 8, 16, -1, 2**63, 2**64 - 1, 2**64, -(2**64), 10**5000]


def regions(kinds: Sequence[Any] = tuple(StorageKind)) -> st.SearchStrategy[Region]:
    return st.builds(Region, st.sampled_from(kinds), st.integers(0, 2**48), st.integers(1, 2**30))


anything: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 20),
    st.sampled_from(ODD_INTS),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(LAYOUT_NAMES + ENDPOINTS + BAD_ENDPOINTS + SOURCE_NAMES + MODE_NAMES + ["4", "zigzag"]),
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.tuples(),
    st.sampled_from([*EventSource, *ConsolidatorMode, *BlockParallelismStrategy, *StorageKind, *NixlMode, *Tier]),
    st.sampled_from([NixlOptions.ENABLED, NixlOptions.DISABLED]),
    st.builds(NixlOptions.enabled_with_agent, st.builds(Agent)),
    st.builds(Agent),
    st.sampled_from(LAYOUT_TYPES + ALLOCATORS),
    regions(),
    st.lists(regions(), max_size=3),
    st.lists(regions([*StorageKind, "disk", None]), min_size=1, max_size=2),
    st.builds(SeenTwice),
    st.builds(EventLog),
    st.builds(KindlessAllocator),
    st.builds(object),
    st.builds(CancellationToken),
    st.builds(CollectorRegistry),
    st.just(EXECUTOR),
    st.sampled_from([KvManagerModelConfig.builder, KvManagerLayoutConfig.builder]).map(lambda make: make()),
)

# setters per builder: name -> how many arguments
SETTERS: dict[str, dict[str, int]] = {
    "runtime": {
        "worker_id": 1,
        "cancellation_token": 1,
        "nixl": 1,
        "enable_nixl": 0,
        "use_nixl_agent": 1,
        "disable_nixl": 0,
        "async_runtime": 1,
        "metrics_registry": 1,
    },
    "model": {"num_layers": 1, "outer_dim": 1, "page_size": 1, "inner_dim": 1, "dtype_width_bytes": 1},
    "layout": {
        "num_blocks": 1,
        "layout_type": 1,
        "storage": 1,
        "allocator": 1,
        "logical": 1,
        "offload_filter": 1,
        "alignment": 1,
    },
    "consolidator": {"engine_event_endpoint": 1, "consolidated_event_endpoint": 1, "engine_source": 1, "mode": 1},
    "manager": {
        "runtime": 1,
        "model": 1,
        "device_layout": 1,
        "host_layout": 1,
        "disk_layout": 1,
        "event_manager": 1,
        "block_reset_channel": 1,
        "kvbm_metrics": 1,
        "consolidator_config": 3,
    },
}
CONFIG_OF: dict[str, Any] = {
    "runtime": KvManagerRuntimeConfig,
    "model": KvManagerModelConfig,
    "layout": KvManagerLayoutConfig,
    "consolidator": KvEventConsolidatorConfig,
    "manager": KvBlockManagerConfig,
}
REQUIRED = {
    "runtime": ("worker_id",),
    "model": ("num_layers", "outer_dim", "page_size", "inner_dim"),
    "layout": ("num_blocks",),
    "consolidator": (),
    "manager": ("runtime", "model"),
}
# the field each setter sets (custom setters set one field of another name)
FIELD_OF = {"enable_nixl": "nixl", "disable_nixl": "nixl", "use_nixl_agent": "nixl"}


def good_values(kind: str, setter: str, pool: dict[str, list[Any]]) -> st.SearchStrategy[tuple[Any, ...]]:
    """Arguments a careful caller would pass, so that chains also succeed."""
    one: Callable[[st.SearchStrategy[Any]], st.SearchStrategy[tuple[Any, ...]]] = lambda s: st.tuples(s)  # noqa: E731
    if SETTERS[kind][setter] == 0:
        return st.just(())
    if kind == "runtime":
        return one(
            {
                "worker_id": st.integers(0, 2**64 - 1),
                "cancellation_token": st.builds(CancellationToken),
                "nixl": st.sampled_from([NixlOptions.ENABLED, NixlOptions.DISABLED]),
                "use_nixl_agent": st.builds(Agent),
                "async_runtime": st.sampled_from([None, EXECUTOR]),
                "metrics_registry": st.builds(CollectorRegistry),
            }[setter]
        )
    if kind == "model":
        return one(
            {
                "num_layers": st.integers(1, 128),
                "outer_dim": st.sampled_from([1, 2]),
                "page_size": st.integers(1, 64),
                "inner_dim": st.integers(1, 4096),
                "dtype_width_bytes": st.sampled_from([1, 2, 4, 8]),
            }[setter]
        )
    if kind == "layout":
        return one(
            {
                "num_blocks": st.integers(1, 10**6),
                "layout_type": st.sampled_from([*LAYOUT_TYPES, *LAYOUT_NAMES]),
                "storage": st.one_of(st.none(), st.lists(regions(), min_size=1, max_size=3)),
                "allocator": st.sampled_from(ALLOCATORS),
                "logical": st.sampled_from([SHARDED, None]),
                "offload_filter": st.one_of(st.none(), st.builds(SeenTwice)),
                "alignment": st.integers(0, 21).map(lambda e: 2**e),
            }[setter]
        )
    if kind == "consolidator":
        return one(
            {
                "engine_event_endpoint": st.sampled_from(ENDPOINTS),
                "consolidated_event_endpoint": st.sampled_from(ENDPOINTS),
                "engine_source": st.sampled_from([*EventSource, *SOURCE_NAMES]),
                "mode": st.sampled_from([*ConsolidatorMode, *MODE_NAMES]),
            }[setter]
        )
    if setter == "consolidator_config":
        return st.tuples(
            st.sampled_from(ENDPOINTS),
            st.sampled_from([*ENDPOINTS, None]),
            st.sampled_from([EventSource.Vllm, EventSource.Trtllm, "vllm", "tensorrt-llm", EventSource.Kvbm]),
        )
    source = {"runtime": "runtime", "model": "model"}.get(setter, "layout")
    if setter in ("runtime", "model", "device_layout", "host_layout", "disk_layout"):
        return one(st.sampled_from(pool[source]))
    return one(anything)


# 2**50 blocks of the seeded model (8192 bytes each) are exactly 2**63 bytes: one too many for a manager
COUNT_MISSES: list[Any] = [0, 1, -1, True, "4", 4.0, None, 2**50 - 1, 2**50, 10**5000]
NUMBER_MISSES: dict[str, list[Any]] = {
    "worker_id": [-1, 0, 2**64 - 1, 2**64, True, "7", 7.0],
    "outer_dim": [0, 1, 2, 3, True, 2.0],
    "dtype_width_bytes": [0, 1, 2, 3, 4, 5, 8, 16, True],
    "alignment": [0, 1, 2, 3, 6, 4096, -4, True, 4.0],
}


def near_miss_arguments(kind: str, setter: str) -> list[tuple[Any, ...]]:
    """Arguments just beside the rules: boundaries, look-alike types, bad names and endpoints."""
    if setter == "consolidator_config":
        return [
            (engine, output, source)
            for engine in (ENDPOINTS[0], "localhost:5557", "tcp://a b:1")
            for output in (ENDPOINTS[1], None, "tcp://")
            for source in (*EventSource, *SOURCE_NAMES, None)
        ]
    if SETTERS[kind][setter] == 0:
        return [()]
    values: list[Any]
    if setter in ("engine_event_endpoint", "consolidated_event_endpoint"):
        values = [*BAD_ENDPOINTS, b"tcp://a:1", None]
    elif setter in ("engine_source", "mode"):
        values = [*SOURCE_NAMES, *MODE_NAMES, *EventSource, *ConsolidatorMode, None, 1]
    elif setter == "layout_type":
        values = [*LAYOUT_NAMES, "zigzag", "layer_separate", {"LayerSeparate": {}}, None, LayerSeparate]
    elif setter == "storage":
        values = [[], (), "storage", None, [Region("disk", 0, 1)], [Region(None, 0, 1)], [object()]]
        values += [[Region(kind, 0, 1)] for kind in StorageKind]
    elif kind == "manager" and setter.endswith("_layout"):
        values = [None, *seed_pool()["layout"], KvManagerLayoutConfig.builder()]
    elif kind == "manager" and setter in ("runtime", "model"):
        seeded = seed_pool()
        values = [None, *seeded["runtime"], *seeded["model"]]
    elif setter in ("allocator", "offload_filter", "event_manager", "logical", "nixl", "async_runtime"):
        values = [*ALLOCATORS, KindlessAllocator(), SeenTwice(), EventLog(), SHARDED, None, "x", NixlOptions.DISABLED]
    else:
        values = list(NUMBER_MISSES.get(setter, COUNT_MISSES))
    return [(value,) for value in values]


def near_misses(kind: str, setter: str) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.sampled_from(near_miss_arguments(kind, setter))


def arguments(kind: str, setter: str, pool: dict[str, list[Any]]) -> st.SearchStrategy[tuple[Any, ...]]:
    good = good_values(kind, setter, pool)
    return st.one_of(good, good, near_misses(kind, setter), st.tuples(*[anything] * SETTERS[kind][setter]))


# ---------------------------------------------------------------------------------------------------------
# The rules, restated from the reference (independent of kvbm_builder's checks)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def endpoint_ok(value: object) -> bool:
    if not isinstance(value, str):
        return False
    scheme, sep, rest = value.partition("://")
    return bool(sep and scheme and rest) and not any(c.isspace() for c in value)


def storage_ok(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        return False
    return all(
        all(hasattr(item, a) for a in ("kind", "addr", "size")) and isinstance(item.kind, StorageKind) for item in value
    )


def allocator_ok(value: object) -> bool:
    # a built-in description (storage makes its memory), or an allocator of the caller's own
    return (
        value is None
        or type(value) in (DeviceAllocator, PinnedAllocator, SystemAllocator, DiskAllocator)
        or (hasattr(value, "allocate") and isinstance(getattr(value, "storage_kind", None), StorageKind))
    )


def async_runtime_ok(value: object) -> bool:
    return value is None or isinstance(value, (Executor, asyncio.AbstractEventLoop))


FIELD_RULES: dict[str, dict[str, Callable[[Any], bool]]] = {
    "runtime": {
        "worker_id": lambda v: is_int(v) and 0 <= v < 2**64,
        "cancellation_token": lambda v: isinstance(v, CancellationToken),
        "nixl": lambda v: isinstance(v, NixlOptions),
        "async_runtime": async_runtime_ok,
        "metrics_registry": lambda v: hasattr(v, "register") and hasattr(v, "collect"),
    },
    "model": {
        "num_layers": lambda v: is_int(v) and 1 <= v < 2**64,  # upstream's usize
        "outer_dim": lambda v: is_int(v) and v in (1, 2),
        "page_size": lambda v: is_int(v) and 1 <= v < 2**64,
        "inner_dim": lambda v: is_int(v) and 1 <= v < 2**64,
        "dtype_width_bytes": lambda v: is_int(v) and v in (1, 2, 4, 8),
    },
    "layout": {
        "num_blocks": lambda v: is_int(v) and 1 <= v < 2**64,
        "layout_type": lambda v: isinstance(v, LayoutType),
        "storage": storage_ok,
        "allocator": allocator_ok,
        "logical": lambda v: v is None or isinstance(v, BlockParallelismStrategy),
        "offload_filter": lambda v: v is None or hasattr(v, "should_offload"),
        "alignment": lambda v: is_int(v) and v >= 1 and v & (v - 1) == 0,
    },
    "consolidator": {
        "engine_event_endpoint": endpoint_ok,
        "consolidated_event_endpoint": endpoint_ok,
        "engine_source": lambda v: isinstance(v, EventSource),
        "mode": lambda v: isinstance(v, ConsolidatorMode),
    },
    "manager": {
        "runtime": lambda v: isinstance(v, KvManagerRuntimeConfig),
        "model": lambda v: isinstance(v, KvManagerModelConfig),
        "device_layout": lambda v: v is None or isinstance(v, KvManagerLayoutConfig),
        "host_layout": lambda v: v is None or isinstance(v, KvManagerLayoutConfig),
        "disk_layout": lambda v: v is None or isinstance(v, KvManagerLayoutConfig),
        "event_manager": lambda v: v is None or (hasattr(v, "on_store") and hasattr(v, "on_remove")),
        "block_reset_channel": lambda v: True,
        "kvbm_metrics": lambda v: v is None or isinstance(v, (KvbmMetrics, NullKvbmMetrics)),
        "consolidator_config": lambda v: v is None or isinstance(v, KvEventConsolidatorConfig),
    },
}
SLOT_KINDS = {
    "device_layout": {StorageKind.DEVICE},
    "host_layout": {StorageKind.PINNED, StorageKind.SYSTEM},
    "disk_layout": {StorageKind.DISK},
}
LAYOUT_NAMES_READ = {  # lower-case, drop "_" and "-"
    "fullycontiguous": FullyContiguous(),
    "layerseparateoutercontiguous": LayerSeparate(outer_contiguous=True),
    "layerseparateblockcontiguous": LayerSeparate(outer_contiguous=False),
}
SOURCES_READ = {  # case-insensitive; "_" reads as "-"
    "vllm": EventSource.Vllm,
    "gpu": EventSource.Vllm,
    "trtllm": EventSource.Trtllm,
    "tensorrt-llm": EventSource.Trtllm,
    "kvbm": EventSource.Kvbm,
}
REJECTED = object()  # a custom setter got input it cannot use: counts as set, reported by build()


def read_source(value: object) -> Any:
    if isinstance(value, EventSource):
        return value
    if isinstance(value, str):
        return SOURCES_READ.get(value.strip().lower().replace("_", "-"), REJECTED)
    return REJECTED


def setter_effect(kind: str, setter: str, args: tuple[Any, ...]) -> tuple[str, Any]:
    """What a setter call records: (field, value or REJECTED)."""
    field = FIELD_OF.get(setter, setter)
    if setter == "enable_nixl":
        return field, NixlOptions.ENABLED
    if setter == "disable_nixl":
        return field, NixlOptions.DISABLED
    if setter == "use_nixl_agent":  # the agent's shape is checked: the calls registration makes
        shaped = all(hasattr(args[0], a) for a in ("register_memory", "deregister_memory", "get_reg_descs"))
        return field, ("agent", args[0]) if shaped else REJECTED
    if setter == "nixl" and isinstance(args[0], str) and args[0].strip().lower() in ("enabled", "disabled"):
        return field, NixlOptions.ENABLED if args[0].strip().lower() == "enabled" else NixlOptions.DISABLED
    if kind == "layout" and setter == "allocator" and args[0] is None:  # upstream's setter takes no Option
        return field, REJECTED
    if kind == "layout" and setter == "logical" and isinstance(args[0], str):
        sharded = args[0].lower().replace("_", "").replace("-", "") == "leaderworkersharded"
        return field, SHARDED if sharded else args[0]
    if kind == "layout" and setter == "layout_type" and isinstance(args[0], str):
        return field, LAYOUT_NAMES_READ.get(args[0].lower().replace("_", "").replace("-", ""), REJECTED)
    if kind == "layout" and setter == "storage" and isinstance(args[0], list):
        return field, tuple(args[0])
    if kind == "consolidator" and setter == "engine_source":
        return field, read_source(args[0])
    if kind == "consolidator" and setter == "mode":
        value = args[0]
        if isinstance(value, ConsolidatorMode):
            return field, value
        if isinstance(value, str) and value.strip().lower() in ("dedup", "passthrough"):
            return field, ConsolidatorMode(value.strip().lower())
        return field, REJECTED
    if setter == "consolidator_config":
        engine, output, source = args
        source = read_source(source)
        if source is REJECTED or source is EventSource.Kvbm or output is None:
            return field, REJECTED
        if not (endpoint_ok(engine) and endpoint_ok(output)):
            return field, REJECTED
        return field, ("consolidator", engine, output, source)
    return field, args[0]


def materialize(value: Any) -> Any:
    """The recorded value as the config holds it."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "agent":
        return NixlOptions.enabled_with_agent(value[1])
    if isinstance(value, tuple) and len(value) == 4 and value[0] == "consolidator":
        return KvEventConsolidatorConfig(
            engine_event_endpoint=value[1], consolidated_event_endpoint=value[2], engine_source=value[3]
        )
    return value


def expected_problems(kind: str, calls: dict[str, Any]) -> tuple[set[str], list[str], bool]:
    """(the fields with a problem, "" for the object itself; the missing fields; whether the validate hook
    complained, which upstream reports before a missing field: a custom setter's complaint is no hook failure)."""
    fields: set[str] = set()
    early = False
    values = {name: materialize(v) for name, v in calls.items() if v is not REJECTED}
    for name, value in calls.items():
        if value is REJECTED or not FIELD_RULES[kind][name](values[name]):
            fields.add(name)
    missing = [name for name in REQUIRED[kind] if name not in calls]
    fields.update(missing)
    if kind == "layout":
        chosen = [name for name in ("storage", "allocator", "logical") if name in calls]
        if len(chosen) != 1:
            fields.add(chosen[1] if chosen else "")
            early = True
        present = [
            name for name in ("storage", "allocator", "logical") if name in calls and values.get(name) is not None
        ]
        refused = [name for name in ("storage", "allocator", "logical") if calls.get(name) is REJECTED]
        if len(present) > 1:
            fields.add(present[1])
        elif not present and not refused and len(chosen) == 1:
            fields.add("")  # a choice of None alone: the tier has no memory
    if kind == "manager":
        model = values.get("model")
        for slot, kinds in SLOT_KINDS.items():
            layout = values.get(slot)
            if isinstance(layout, KvManagerLayoutConfig) and (
                slot_problem(slot, layout, kinds) or too_big(layout, model)
            ):
                fields.add(slot)
    return fields, missing, early


def too_big(layout: KvManagerLayoutConfig[Any], model: object) -> bool:
    """A tier spans at most 2**63 - 1 bytes: its blocks times the bytes of one block, before any padding."""
    if not isinstance(model, KvManagerModelConfig):
        return False
    block = model.num_layers * model.outer_dim * model.page_size * model.inner_dim * model.dtype_width_bytes
    return layout.num_blocks * block >= 2**63


def slot_problem(slot: str, layout: KvManagerLayoutConfig[Any], kinds: set[StorageKind]) -> bool:
    if layout.allocator is not None and layout.allocator.storage_kind not in kinds:
        return True
    if any(item.kind not in kinds for item in layout.storage or ()):
        return True
    return slot == "disk_layout" and layout.offload_filter is not None


def defaults(kind: str) -> dict[str, Callable[[Any], bool]]:
    """What an unset field holds after build()."""
    return {
        "runtime": {
            "cancellation_token": lambda v: isinstance(v, CancellationToken) and not v.is_cancelled(),
            "nixl": lambda v: v is NixlOptions.ENABLED,
            "async_runtime": lambda v: v is None,
            "metrics_registry": lambda v: isinstance(v, CollectorRegistry),
        },
        "model": {"dtype_width_bytes": lambda v: v == 2},
        "layout": {
            "layout_type": lambda v: v == FullyContiguous(),
            "storage": lambda v: v is None,
            "allocator": lambda v: v is None,
            "logical": lambda v: v is None,
            "offload_filter": lambda v: v is None,
            "alignment": lambda v: v == 1,
        },
        "consolidator": {
            "engine_event_endpoint": lambda v: v == "tcp://localhost:5557",
            "consolidated_event_endpoint": lambda v: v == "tcp://*:5558",
            "engine_source": lambda v: v is EventSource.Vllm,
            "mode": lambda v: v is ConsolidatorMode.dedup,
        },
        "manager": {
            name: (lambda v: v is None)
            for name in (
                "device_layout",
                "host_layout",
                "disk_layout",
                "event_manager",
                "block_reset_channel",
                "kvbm_metrics",
                "consolidator_config",
            )
        },
    }[kind]


def assert_holds_every_rule(kind: str, config: Any) -> None:
    """Re-check a built config against the rules, field by field and across fields."""
    for name, ok in FIELD_RULES[kind].items():
        assert ok(getattr(config, name)), (kind, name, getattr(config, name))
    if kind == "layout":
        assert sum(getattr(config, n) is not None for n in ("storage", "allocator", "logical")) <= 1
    if kind == "manager":
        for slot, kinds in SLOT_KINDS.items():
            layout = getattr(config, slot)
            assert layout is None or not slot_problem(slot, layout, kinds), slot
            assert layout is None or not too_big(layout, config.model), slot
        assert config.consolidator_config is None or config.consolidator_config.engine_source is not EventSource.Kvbm


def assert_same_value(field: str, got: Any, recorded: Any) -> None:
    if isinstance(recorded, tuple) and len(recorded) == 2 and recorded[0] == "agent":
        assert got.mode is NixlMode.ENABLED_WITH_AGENT and got.agent is recorded[1]
    elif isinstance(recorded, tuple) and len(recorded) == 4 and recorded[0] == "consolidator":
        assert got == materialize(recorded)
    elif field == "storage" and recorded is not None:
        assert tuple(got) == tuple(recorded)
    elif isinstance(recorded, (LayoutType, ConsolidatorMode, NixlOptions)):
        assert got == recorded
    else:
        assert got is recorded, (field, got, recorded)


def assert_names_its_fields(err: ConfigError) -> None:
    for path, message in err.errors:
        assert path or any(name in message for names in SETTERS.values() for name in names), (path, message)
        assert message


# ---------------------------------------------------------------------------------------------------------
# 1. Random builder chains


@attrs.define
class Tracked:
    kind: str
    builder: Any
    calls: dict[str, Any]
    consumed: bool = False


def seed_pool() -> dict[str, list[Any]]:
    """Built configs to pass to other builders; a fresh pool each time (chains add to it)."""
    return {kind: list(configs) for kind, configs in _seeded().items()}


@functools.cache
def _seeded() -> dict[str, tuple[Any, ...]]:
    layouts = [KvManagerLayoutConfig.builder().num_blocks(8).allocator(a).build() for a in ALLOCATORS]
    layouts.append(KvManagerLayoutConfig.builder().num_blocks(8).logical(SHARDED).build())
    layouts.append(KvManagerLayoutConfig.builder().num_blocks(8).storage([Region(StorageKind.DISK, 0, 1)]).build())
    for allocator in (PinnedAllocator(), DiskAllocator()):
        layouts.append(
            KvManagerLayoutConfig.builder().num_blocks(8).allocator(allocator).offload_filter(SeenTwice()).build()
        )
    return {
        "runtime": (KvManagerRuntimeConfig.builder().worker_id(0).build(),),
        "model": (KvManagerModelConfig.builder().num_layers(2).outer_dim(2).page_size(16).inner_dim(64).build(),),
        "layout": tuple(layouts),
        "consolidator": (),
        "manager": (),
    }


OPERATIONS = st.sampled_from(["new", "fill", "set", "set", "set", "set", "set", "clone", "build", "build"])


def outcome(what: str) -> None:
    """Counted in ``pytest --hypothesis-show-statistics``, to see that chains do build."""
    if currently_in_test_context():
        event(what)


def run_build(tracked: Tracked, pool: dict[str, list[Any]]) -> None:
    kind = tracked.kind
    fields, missing, early = expected_problems(kind, tracked.calls)
    try:
        config = tracked.builder.build()
    except ConfigError as err:
        assert fields, f"build() failed where every rule holds: {err.errors}"
        got = {p.path[0] if p.path else "" for p in err.problems}
        assert isinstance(got, set)
        assert {str(g) for g in got} == fields, (err.errors, fields)
        if missing and not early:
            assert type(err) is UninitializedFieldError
            if err.problems[0].message == "must be initialized":  # upstream's message, first
                assert str(err).splitlines()[0] == f"`{err.problems[0].path[0]}` must be initialized"
            assert err.missing == tuple(missing)
        else:
            assert type(err) is ConfigError
        for name, value in tracked.calls.items():
            if value is REJECTED:  # a custom setter's complaint is about its own field
                assert (name,) in {p.path for p in err.problems}, (name, err.errors)
        assert_names_its_fields(err)
        outcome(f"{kind}: {type(err).__name__}")
        return
    finally:
        tracked.consumed = True
    assert not fields, f"build() succeeded but these fields break a rule: {fields}"
    assert isinstance(config, CONFIG_OF[kind])
    for name, recorded in tracked.calls.items():
        assert_same_value(name, getattr(config, name), recorded)
    for name, is_default in defaults(kind).items():
        if name not in tracked.calls:
            assert is_default(getattr(config, name)), (kind, name, getattr(config, name))
    assert_holds_every_rule(kind, config)
    pool[kind].append(config)
    outcome(f"{kind}: built")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_builder_chains_build_valid_configs_or_name_what_is_wrong(data: st.DataObject) -> None:
    pool = seed_pool()
    builders: list[Tracked] = []
    for _ in range(data.draw(st.integers(1, 20), label="steps")):
        op = data.draw(OPERATIONS, label="op") if builders else "new"
        if op == "new":
            kind = data.draw(st.sampled_from(list(SETTERS)), label="kind")
            builders.append(Tracked(kind, CONFIG_OF[kind].builder(), {}))
            continue
        tracked = data.draw(st.sampled_from(builders), label="builder")
        if op == "fill" and not tracked.consumed:
            # what a careful caller writes: every required field (and, for a layout, one memory choice)
            choice = data.draw(st.sampled_from(["storage", "allocator", "logical"]))
            for setter in (*REQUIRED[tracked.kind], *((choice,) if tracked.kind == "layout" else ())):
                args = data.draw(good_values(tracked.kind, setter, pool), label=setter)
                getattr(tracked.builder, setter)(*args)
                tracked.calls[setter] = setter_effect(tracked.kind, setter, args)[1]
        elif op in ("set", "fill"):
            setter = data.draw(st.sampled_from(list(SETTERS[tracked.kind])), label="setter")
            args = data.draw(arguments(tracked.kind, setter, pool), label="args")
            if tracked.consumed:
                with pytest.raises(BuilderConsumedError):
                    getattr(tracked.builder, setter)(*args)
                continue
            assert getattr(tracked.builder, setter)(*args) is tracked.builder  # owned: the builder comes back
            field, value = setter_effect(tracked.kind, setter, args)
            tracked.calls[field] = value
        elif op == "clone":
            if tracked.consumed:
                with pytest.raises(BuilderConsumedError):
                    tracked.builder.clone()
                continue
            twin = tracked.builder.clone()
            assert twin is not tracked.builder
            builders.append(Tracked(tracked.kind, twin, dict(tracked.calls)))
        elif tracked.consumed:
            with pytest.raises(BuilderConsumedError):
                tracked.builder.build()
        else:
            run_build(tracked, pool)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(list(SETTERS)), data=st.data())
def test_any_single_setter_with_any_value_either_builds_or_raises_a_config_error(
    kind: str, data: st.DataObject
) -> None:
    # the shortest chain: the required fields set well, then one setter with any value at all
    pool = seed_pool()
    tracked = Tracked(kind, CONFIG_OF[kind].builder(), {})
    for name in (*REQUIRED[kind], *(("logical",) if kind == "layout" else ())):
        args = data.draw(good_values(kind, name, pool))
        getattr(tracked.builder, name)(*args)
        tracked.calls[name] = setter_effect(kind, name, args)[1]
    setter = data.draw(st.sampled_from(list(SETTERS[kind])))
    args = data.draw(st.one_of(near_misses(kind, setter), st.tuples(*[anything] * SETTERS[kind][setter])))
    try:
        getattr(tracked.builder, setter)(*args)
    except KvbmError as err:  # pragma: no cover - setters record, build() reports
        raise AssertionError(f"{setter}{args!r} raised {err!r} instead of recording the problem") from err
    field, value = setter_effect(kind, setter, args)
    tracked.calls[field] = value
    run_build(tracked, pool)


CAREFUL_START: dict[str, tuple[tuple[str, tuple[Any, ...]], ...]] = {
    "runtime": (("worker_id", (7,)),),
    "model": (("num_layers", (28,)), ("outer_dim", (2,)), ("page_size", (16,)), ("inner_dim", (1024,))),
    "layout": (("num_blocks", (8,)), ("logical", (SHARDED,))),
    "consolidator": (),
    "manager": (("runtime", (seed_pool()["runtime"][0],)), ("model", (seed_pool()["model"][0],))),
}


@pytest.mark.parametrize(
    ("kind", "setter"), [(kind, setter) for kind, setters in SETTERS.items() for setter in setters]
)
def test_every_near_miss_of_every_setter(kind: str, setter: str) -> None:
    # not random: every boundary and look-alike of every setter, after a careful start, against the rules
    pool = seed_pool()
    for args in near_miss_arguments(kind, setter):
        tracked = Tracked(kind, CONFIG_OF[kind].builder(), {})
        for name, start in CAREFUL_START[kind]:
            getattr(tracked.builder, name)(*start)
            tracked.calls[name] = setter_effect(kind, name, start)[1]
        assert getattr(tracked.builder, setter)(*args) is tracked.builder
        field, value = setter_effect(kind, setter, args)
        tracked.calls[field] = value
        run_build(tracked, pool)


def converter_of(kind: str, name: str) -> Callable[[Any], Any]:
    return attrs.fields_dict(CONFIG_OF[kind])[name].converter or (lambda value: value)


def direct_values(kind: str, field: str, pool: dict[str, list[Any]]) -> st.SearchStrategy[Any]:
    if field == "consolidator_config":
        kvbm = KvEventConsolidatorConfig(engine_source=EventSource.Kvbm)  # fine alone, never in a manager
        return st.sampled_from([None, KvEventConsolidatorConfig(), kvbm, "tcp://*:5558"])
    setter = field if field in SETTERS[kind] else "nixl"
    args = st.one_of(good_values(kind, setter, pool), near_misses(kind, setter), st.tuples(anything))
    return args.map(lambda a: a[0])


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(list(SETTERS)), data=st.data())
def test_direct_construction_follows_the_same_rules(kind: str, data: st.DataObject) -> None:
    # no builder, so no hook and no "was the setter called": only the field rules and the cross-field rules
    pool = seed_pool()
    values = {
        field: data.draw(direct_values(kind, field, pool), label=field)
        for field in FIELD_RULES[kind]
        if field in REQUIRED[kind] or data.draw(st.booleans(), label=f"set {field}")
    }
    # what a field may be given as (a name for a layout or a mode, a list for storages) is the field's own
    converted = {name: converter_of(kind, name)(value) for name, value in values.items()}
    fields = {name for name, value in converted.items() if not FIELD_RULES[kind][name](value)}
    if kind == "layout":
        present = [name for name in ("storage", "allocator", "logical") if values.get(name) is not None]
        fields.update(present[1:2] if present else [""])
    if kind == "manager":
        for slot, kinds in SLOT_KINDS.items():
            layout = values.get(slot)
            if isinstance(layout, KvManagerLayoutConfig) and slot_problem(slot, layout, kinds):
                fields.add(slot)
        consolidator = values.get("consolidator_config")
        if isinstance(consolidator, KvEventConsolidatorConfig) and consolidator.engine_source is EventSource.Kvbm:
            fields.add("consolidator_config")
    try:
        config = CONFIG_OF[kind](**values)
    except ConfigError as err:
        assert {p.path[0] if p.path else "" for p in err.problems} == fields, (err.errors, fields)
        assert_names_its_fields(err)
        return
    assert not fields, f"constructed although these fields break a rule: {fields}"
    assert_holds_every_rule(kind, config)


# ---------------------------------------------------------------------------------------------------------
# 2. The sizing rule


models = st.builds(
    lambda layers, outer, page, inner, width: (
        KvManagerModelConfig.builder()
        .num_layers(layers)
        .outer_dim(outer)
        .page_size(page)
        .inner_dim(inner)
        .dtype_width_bytes(width)
        .build()
    ),
    st.integers(1, 128),
    st.sampled_from([1, 2]),
    st.integers(1, 256),
    st.integers(1, 16384),
    st.sampled_from([1, 2, 4, 8]),
)
# decimal numbers as people write them: "4", "0.5", "12.250", ".75", "3."
decimals = st.builds(
    lambda whole, frac, style: {0: f"{whole}", 1: f"{whole}.{frac}", 2: f".{frac}", 3: f"{whole}."}[style],
    st.integers(0, 5000),
    st.integers(0, 10**9).map(str),
    st.integers(0, 3),
)


ONE_BYTE_BLOCKS = (
    KvManagerModelConfig.builder().num_layers(1).outer_dim(1).page_size(1).inner_dim(1).dtype_width_bytes(1).build()
)


@settings(max_examples=300, deadline=None)
@given(model=models, cpu=decimals, disk=decimals)
@example(model=ONE_BYTE_BLOCKS, cpu="1.001", disk="8.001")  # where float arithmetic loses a block
def test_blocks_are_floor_of_decimal_gb_over_bytes_per_block_exactly(
    model: KvManagerModelConfig, cpu: str, disk: str
) -> None:
    bpb = model.num_layers * model.outer_dim * model.page_size * model.inner_dim * model.dtype_width_bytes
    assert model.bytes_per_block == bpb

    def expected(text: str) -> int | None:
        gb = Fraction(text if not text.endswith(".") else text[:-1])
        return None if gb == 0 else (gb * 10**9 // bpb).__floor__()

    want_cpu, want_disk = expected(cpu), expected(disk)
    assume(want_cpu != 0 and want_disk != 0)  # a tier too small for one block is an error, tested apart

    sizes = cache_sizes_from_env(model, {"DYN_KVBM_CPU_CACHE_GB": cpu, "DYN_KVBM_DISK_CACHE_GB": disk})

    assert (sizes.cpu_blocks, sizes.disk_blocks) == (want_cpu, want_disk)
    if want_cpu is not None:
        assert model.blocks_for_bytes(int(Fraction(cpu.rstrip(".") or "0") * 10**9)) == want_cpu
    assert should_bypass_cpu_cache({"DYN_KVBM_CPU_CACHE_GB": cpu, "DYN_KVBM_DISK_CACHE_GB": disk}) is (
        want_disk is not None and want_cpu is None
    )


@settings(max_examples=200, deadline=None)
@given(model=models, gb=decimals, override=st.integers(0, 10**7))
def test_a_positive_override_wins_over_gb(model: KvManagerModelConfig, gb: str, override: int) -> None:
    environ = {"DYN_KVBM_DISK_CACHE_GB": gb, "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": str(override)}
    try:
        blocks = cache_sizes_from_env(model, environ).disk_blocks
    except ConfigError as err:
        # only possible when the override is 0 and GB holds no whole block
        assert override == 0
        assert err.errors[0][0] == "$env.DYN_KVBM_DISK_CACHE_GB"
        return
    if override > 0:
        assert blocks == override
    else:
        assert blocks == cache_sizes_from_env(model, {"DYN_KVBM_DISK_CACHE_GB": gb}).disk_blocks


@settings(max_examples=200, deadline=None)
@given(environ=st.dictionaries(st.sampled_from(["DYN_KVBM_CPU_CACHE_GB", "DYN_KVBM_DISK_CACHE_GB"]), st.text()))
def test_bypass_never_raises_whatever_the_text(environ: dict[str, str]) -> None:
    # upstream's lenient reading: anything unparsable counts as unset
    assert isinstance(should_bypass_cpu_cache(environ), bool)


# ---------------------------------------------------------------------------------------------------------
# 3. parse_size

DECIMAL_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
BINARY_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
spellings = st.sampled_from(["{n}{u}", "{n} {u}", "{n}{lower}", " {n}{upper} "])


@settings(deadline=None)  # no timings in tests
@given(n=st.integers(0, 10**6), unit=st.sampled_from(sorted({**DECIMAL_UNITS, **BINARY_UNITS})), spelling=spellings)
def test_whole_sizes_in_every_unit(n: int, unit: str, spelling: str) -> None:
    factor = {**DECIMAL_UNITS, **BINARY_UNITS}[unit]
    text = spelling.format(n=n, u=unit, lower=unit.lower(), upper=unit.upper())

    assert parse_size(text) == n * factor


@settings(deadline=None)  # no timings in tests
@given(n=st.integers(1, 10**6), unit=st.sampled_from(["K", "M", "G", "T"]))
def test_gb_and_gib_are_never_mixed(n: int, unit: str) -> None:
    decimal, binary = parse_size(f"{n}{unit}B"), parse_size(f"{n}{unit}iB")
    power = "KMGT".index(unit) + 1

    assert decimal == n * 1000**power
    assert binary == n * 1024**power
    assert binary > decimal


@settings(deadline=None)  # no timings in tests
@given(nbytes=st.integers(0, 2**60))
def test_a_byte_count_round_trips(nbytes: int) -> None:
    assert parse_size(nbytes) == nbytes
    assert parse_size(str(nbytes)) == nbytes
    assert parse_size(f"{nbytes}B") == nbytes


def exact_decimal(amount: Fraction) -> str:
    """``amount`` written out exactly; every n / 10^k and n / 2^k has a finite decimal expansion."""
    digits = 0
    while (amount * 10**digits).denominator != 1:
        digits += 1
    scaled = int(amount * 10**digits)
    return str(scaled) if digits == 0 else f"{scaled // 10**digits}.{scaled % 10**digits:0{digits}d}"


@settings(deadline=None)  # no timings in tests
@given(nbytes=st.integers(0, 2**50), unit=st.sampled_from(sorted({**DECIMAL_UNITS, **BINARY_UNITS})))
def test_sizes_written_as_exact_decimals_round_trip(nbytes: int, unit: str) -> None:
    factor = {**DECIMAL_UNITS, **BINARY_UNITS}[unit]

    assert parse_size(f"{exact_decimal(Fraction(nbytes, factor))}{unit}") == nbytes
    with pytest.raises(ConfigError, match="is not a whole number of bytes"):  # half a byte more
        parse_size(f"{exact_decimal(Fraction(2 * nbytes + 1, 2 * factor))}{unit}")


@settings(deadline=None)  # no timings in tests
@given(value=st.one_of(st.text(max_size=20), st.floats(), st.booleans(), st.none(), st.integers(max_value=-1)))
def test_anything_else_is_a_config_error_never_another_exception(value: object) -> None:
    try:
        result = parse_size(value)
    except ConfigError as err:
        assert err.errors and err.errors[0][1]
    else:
        assert isinstance(value, str) and is_int(result) and result >= 0
