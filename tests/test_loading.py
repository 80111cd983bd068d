"""The dict form, by example: what a document may say, what it means, and how every mistake is reported."""

from __future__ import annotations

import copy
from typing import Any

import attrs
import pytest
from callers import Agent

from kvbm_builder import (
    ConfigError,
    KvBlockManagerConfig,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    RuntimeObjectError,
    RuntimeObjectWarning,
    UninitializedFieldError,
)
from kvbm_builder.config import (
    BlockParallelismStrategy,
    ConsolidatorMode,
    DeviceAllocator,
    DiskAllocator,
    EventSource,
    FullyContiguous,
    KvEventConsolidatorConfig,
    KvManagerRuntimeConfig,
    LayerSeparate,
    NixlOptions,
    PinnedAllocator,
    PinningMode,
    StorageKind,
    SystemAllocator,
)
from kvbm_builder.layout import LayoutSpec
from kvbm_builder.loading import dump, load

MODEL = {"num_layers": 32, "outer_dim": 2, "page_size": 32, "inner_dim": 1024, "dtype_width_bytes": 2}
BLOCK_BYTES = 32 * 2 * 32 * 1024 * 2  # 4 MiB


def document(**changes: Any) -> dict[str, Any]:
    """The README's example: a Llama-3-8B-like model, a device tier by blocks, 16 GiB pinned, 64 GB of disk."""
    doc: dict[str, Any] = {
        "runtime": {"worker_id": 0},
        "model": dict(MODEL),
        "device_layout": {"num_blocks": 2048, "allocator": {"kind": "device", "device_id": 0}},
        "host_layout": {"size": "16GiB", "allocator": {"kind": "pinned"}},
        "disk_layout": {"size": "64GB", "allocator": {"kind": "disk", "directory": "/tmp/kvbm"}},
    }
    doc.update(changes)
    return doc


def errors(doc: object, cls: type = KvBlockManagerConfig) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        load(doc, cls)  # type: ignore[arg-type]
    return caught.value.errors


def test_a_document_means_what_the_same_builder_chain_means() -> None:
    chain = (
        KvBlockManagerConfig.builder()
        .runtime(KvManagerRuntimeConfig.builder().worker_id(0).build())
        .model(KvManagerModelConfig.builder().num_layers(32).outer_dim(2).page_size(32).inner_dim(1024).build())
        .device_layout(KvManagerLayoutConfig.builder().num_blocks(2048).allocator(DeviceAllocator(device_id=0)).build())
        .host_layout(
            KvManagerLayoutConfig.builder().num_blocks(16 * 2**30 // BLOCK_BYTES).allocator(PinnedAllocator()).build()
        )
        .disk_layout(
            KvManagerLayoutConfig.builder()
            .num_blocks(64 * 10**9 // BLOCK_BYTES)
            .allocator(DiskAllocator(directory="/tmp/kvbm"))
            .build()
        )
        .build()
    )
    assert load(document()) == chain


# ---- sizes ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "blocks"),
    [("16GiB", 4096), ("16 GiB", 4096), ("16GB", 3814), ("16gb", 3814), ("512MiB", 128), (17179869184, 4096)],
)
def test_a_byte_budget_becomes_whole_blocks_gb_decimal_gib_binary(size: object, blocks: int) -> None:
    config = load(document(host_layout={"size": size, "allocator": {}}))
    assert config.host_layout is not None
    assert config.host_layout.num_blocks == blocks


def test_a_byte_budget_counts_the_alignment_padding_of_each_block() -> None:
    model = {**MODEL, "inner_dim": 1000}  # 4,096,000 bytes of data per block, padded to 4 MiB at alignment 2^20
    doc = document(model=model, host_layout={"size": "16GiB", "alignment": 2**20, "allocator": {}})
    config = load(doc)
    assert config.host_layout is not None
    spec = LayoutSpec.from_config(config.model, config.host_layout)
    assert spec.block_bytes == 4 * 2**20
    assert config.host_layout.num_blocks == 16 * 2**30 // spec.block_bytes == 4096


def test_a_budget_of_less_than_one_block_is_an_error() -> None:
    assert errors(document(host_layout={"size": "1MiB", "allocator": {}})) == [
        ("$.host_layout.size", "1048576 bytes hold no whole block of 4194304 bytes; raise it, or give num_blocks")
    ]


def test_a_tier_gives_exactly_one_of_num_blocks_and_size() -> None:
    assert errors(document(host_layout={"num_blocks": 10, "size": "1GiB", "allocator": {}})) == [
        ("$.host_layout.size", "give either `num_blocks` or `size`, not both")
    ]
    assert errors(document(host_layout={"allocator": {}})) == [
        ("$.host_layout", "needs `num_blocks`, or `size` as a byte budget such as '16GiB'")
    ]


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("16 gigs", "'16 gigs' is not a size; write e.g. '16GiB' (2^30 bytes) or '16GB' (10^9 bytes)"),
        (-1, "a size cannot be negative, got -1"),
        (1.5e10, "must be a size such as '16GiB' or a byte count, got 15000000000.0"),
        (True, "True is not a size; write e.g. '16GiB' or '16GB'"),
        ("0.5B", "'0.5B' is not a whole number of bytes"),
    ],
)
def test_a_bad_size_says_what_a_size_looks_like(size: object, message: str) -> None:
    assert errors(document(host_layout={"size": size, "allocator": {}})) == [("$.host_layout.size", message)]


# ---- strictness: no coercion, unknown keys, runtime objects ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("4", "must be an integer, got '4' (str)"),
        (2.7, "must be an integer, got 2.7"),
        (2.0, "must be an integer, got 2.0"),
        (True, "must be an integer, got True (bool)"),
        (None, "must be an integer, got None"),
        (0, "must be >= 1, got 0"),
    ],
)
def test_no_silent_coercion_and_the_messages_of_the_builder(value: object, message: str) -> None:
    assert errors(document(model={**MODEL, "num_layers": value})) == [("$.model.num_layers", message)]
    with pytest.raises(ConfigError) as chain:
        KvManagerModelConfig.builder().num_layers(value).outer_dim(2).page_size(32).inner_dim(1024).build()  # type: ignore[arg-type]
    assert chain.value.errors == [("model.num_layers", message)]


def test_booleans_are_booleans() -> None:
    doc = document(host_layout={"num_blocks": 10, "allocator": {"huge_pages": "false"}})
    assert errors(doc) == [("$.host_layout.allocator.huge_pages", "must be true or false, got 'false' (str)")]


def test_an_unknown_key_suggests_the_closest_one() -> None:
    assert errors(document(model={**MODEL, "num_layer": 32})) == [
        ("$.model.num_layer", "unknown key; did you mean `num_layers`?")
    ]


def test_an_unknown_key_with_nothing_close_lists_the_keys() -> None:
    assert errors(document(runtime={"worker_id": 0, "zzz": 1})) == [
        ("$.runtime.zzz", "unknown key; expected one of: `worker_id`, `nixl`")
    ]


def test_an_unknown_key_of_any_length_is_named_by_a_short_path() -> None:
    """Found by the documents fuzz family: a megabyte-long key was the path of its own problem, in full."""
    long = "x" * 1_000_000

    [(path, message)] = errors(document(runtime={"worker_id": 0, long: 1}))

    assert path.startswith("$.runtime.'xxxxxxxxxx") and "..." in path and len(path) < 80
    assert message == "unknown key; expected one of: `worker_id`, `nixl`"


@pytest.mark.parametrize(
    ("section", "key", "setter"),
    [
        ("runtime", "metrics_registry", "KvManagerRuntimeConfig.builder().metrics_registry(...)"),
        ("runtime", "cancellation_token", "KvManagerRuntimeConfig.builder().cancellation_token(...)"),
        ("host_layout", "offload_filter", "KvManagerLayoutConfig.builder().offload_filter(...)"),
        ("host_layout", "storage", "KvManagerLayoutConfig.builder().storage(...)"),
    ],
)
def test_runtime_objects_cannot_come_from_a_document(section: str, key: str, setter: str) -> None:
    doc = document()
    doc[section] = {**doc[section], key: "anything"}
    [(path, message)] = errors(doc)
    assert path == f"$.{section}.{key}"
    assert message.startswith("cannot come from a document: set it in Python with ") and setter in message


def test_every_problem_of_a_document_is_reported_at_once() -> None:
    doc = document(
        model={**MODEL, "num_layers": 0},
        host_layout={"size": "16 gigs", "allocator": {}},
        event_manager="mine",
        extra=1,
    )
    assert errors(doc) == [
        ("$.model.num_layers", "must be >= 1, got 0"),
        ("$.host_layout.size", "'16 gigs' is not a size; write e.g. '16GiB' (2^30 bytes) or '16GB' (10^9 bytes)"),
        (
            "$.event_manager",
            "cannot come from a document: set it in Python with KvBlockManagerConfig.builder().event_manager(...)",
        ),
        (
            "$.extra",
            "unknown key; expected one of: `runtime`, `model`, `device_layout`, `host_layout`, `disk_layout`, "
            "`consolidator_config`",
        ),
    ]


def test_a_value_that_failed_is_not_reported_again_as_missing() -> None:
    assert errors(document(model={**MODEL, "outer_dim": "2"}, device_layout={"num_blocks": 1, "allocator": 7})) == [
        ("$.model.outer_dim", "must be an integer, got '2' (str)"),
        ("$.device_layout.allocator", "must be an allocator table such as {kind = 'device'}, got 7"),
    ]


def test_missing_tables_and_keys_are_named_as_the_builders_name_them() -> None:
    assert errors({"model": {"num_layers": 1}}) == [
        ("$.model.outer_dim", "must be initialized"),
        ("$.model.page_size", "must be initialized"),
        ("$.model.inner_dim", "must be initialized"),
        ("$.runtime", "must be initialized"),
    ]


@pytest.mark.parametrize("doc", [[], "runtime", 3, None])
def test_a_document_is_a_table(doc: object) -> None:
    [(path, message)] = errors(doc)
    assert path == "$" and message.startswith("must be a table of keys and values")


def test_odd_values_are_shown_briefly_and_never_break_the_message() -> None:
    deep: Any = 1
    for _ in range(5000):
        deep = [deep]
    doc = document(
        model={**MODEL, "num_layers": deep, "page_size": 2**70, "inner_dim": "x" * 10_000, 3: 4},
        device_layout={"num_blocks": 1, "allocator": {}, "layout_type": {"LayerSeparate": deep}},
    )
    found = dict(errors(doc))
    assert found["$.model.num_layers"] == "must be an integer, got [[[...]]] (list)"
    assert found["$.model.page_size"] == f"must be <= {2**64 - 1}, got {2**70}"  # upstream's usize
    assert len(found["$.model.inner_dim"]) < 120
    assert found["$.model.3"].startswith("unknown key")
    assert (
        found["$.device_layout.layout_type"]
        == "LayerSeparate needs {'outer_contiguous': true|false}, got [[[...]]] (list)"
    )


# ---- names: layouts, event sources, modes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "layout"),
    [
        ("FullyContiguous", FullyContiguous()),
        ("fully_contiguous", FullyContiguous()),
        ("layer-separate-outer-contiguous", LayerSeparate(outer_contiguous=True)),
        ("LayerSeparateBlockContiguous", LayerSeparate(outer_contiguous=False)),
        ({"LayerSeparate": {"outer_contiguous": True}}, LayerSeparate(outer_contiguous=True)),
        ({"LayerSeparate": {"outer_contiguous": False}}, LayerSeparate(outer_contiguous=False)),
    ],
)
def test_layouts_take_upstreams_spellings(spelling: object, layout: object) -> None:
    config = load(document(device_layout={"num_blocks": 1, "allocator": {}, "layout_type": spelling}))
    assert config.device_layout is not None
    assert config.device_layout.layout_type == layout


def test_an_unknown_layout_lists_the_accepted_names() -> None:
    assert errors(document(device_layout={"num_blocks": 1, "allocator": {}, "layout_type": "striped"})) == [
        (
            "$.device_layout.layout_type",
            "unknown layout 'striped'; accepted: fullycontiguous, layerseparateoutercontiguous, "
            "layerseparateblockcontiguous",
        )
    ]


@pytest.mark.parametrize(
    ("spelling", "source"),
    [
        ("vllm", EventSource.Vllm),
        ("VLLM", EventSource.Vllm),
        ("gpu", EventSource.Vllm),
        ("TensorRT-LLM", EventSource.Trtllm),
    ],
)
def test_event_sources_are_case_insensitive(spelling: str, source: EventSource) -> None:
    config = load(document(consolidator_config={"engine_source": spelling, "mode": "passthrough"}))
    assert config.consolidator_config == KvEventConsolidatorConfig(
        engine_source=source, mode=ConsolidatorMode.passthrough
    )


def test_kvbm_events_never_go_through_the_consolidator() -> None:
    [(path, message)] = errors(document(consolidator_config={"engine_source": "kvbm"}))
    assert path == "$.consolidator_config.engine_source" and message.startswith("Kvbm is not valid here")


def test_nixl_is_enabled_or_disabled_and_an_agent_is_set_in_python() -> None:
    assert load(document(runtime={"worker_id": 1, "nixl": "disabled"})).runtime.nixl == NixlOptions.DISABLED
    assert load(document(runtime={"worker_id": 1, "nixl": "Enabled"})).runtime.nixl == NixlOptions.ENABLED
    [(path, message)] = errors(document(runtime={"worker_id": 1, "nixl": "enabled_with_agent"}))
    assert path == "$.runtime.nixl" and "use_nixl_agent(agent)" in message
    assert errors(document(runtime={"worker_id": 1, "nixl": True})) == [
        ("$.runtime.nixl", "must be 'enabled' or 'disabled' (or NixlOptions), got True (bool)")
    ]


# ---- allocators and the memory choice -------------------------------------------------------------------------------


def test_each_tier_implies_its_allocator_kind() -> None:
    config = load(
        document(
            device_layout={"num_blocks": 1, "allocator": {"device_id": 1}},
            host_layout={"num_blocks": 1, "allocator": {"mode": "host_alloc", "threads": 4}},
            disk_layout={"num_blocks": 1, "allocator": {"o_direct": False, "zerofill_fallback": True}},
        )
    )
    assert [layout.allocator for _, layout in config.tiers()] == [
        DeviceAllocator(device_id=1),
        PinnedAllocator(mode=PinningMode.host_alloc, threads=4),
        DiskAllocator(o_direct=False, zerofill_fallback=True),
    ]


def test_the_host_tier_may_use_ordinary_memory() -> None:
    config = load(document(host_layout={"num_blocks": 8, "allocator": {"kind": "system"}}))
    assert config.host_layout is not None
    assert config.host_layout.allocator == SystemAllocator()
    assert config.host_layout.storage_kind is StorageKind.SYSTEM


def test_an_allocator_of_the_wrong_kind_for_its_tier() -> None:
    assert errors(document(disk_layout={"num_blocks": 1, "allocator": {"kind": "pinned"}})) == [
        ("$.disk_layout.allocator", "a pinned allocator cannot back the disk tier (G3); it needs disk memory")
    ]
    assert errors(document(host_layout={"num_blocks": 1, "allocator": {"kind": "gpu"}})) == [
        ("$.host_layout.allocator.kind", "must be pinned or system, got 'gpu' (str)")
    ]


def test_allocator_rules_are_the_allocators_own() -> None:
    doc = document(host_layout={"num_blocks": 1, "allocator": {"huge_pages": True, "numa": True, "threads": 0}})
    assert errors(doc) == [
        ("$.host_layout.allocator.threads", "must be >= 1, got 0"),
        (
            "$.host_layout.allocator.numa",
            "huge_pages and numa cannot both be on (upstream: DYN_KVBM_USE_HUGE_PAGES with DYN_KVBM_ENABLE_NUMA is "
            "an error); turn one off",
        ),
    ]


def test_a_tier_chooses_one_memory_source() -> None:
    sharded = load(document(disk_layout={"num_blocks": 1, "logical": "LeaderWorkerSharded"}))
    assert sharded.disk_layout is not None
    assert sharded.disk_layout.logical is BlockParallelismStrategy.LeaderWorkerSharded
    assert errors(document(disk_layout={"num_blocks": 1})) == [
        ("$.disk_layout", "must provide either `storage` or `allocator` or `logical`")
    ]
    both = document(disk_layout={"num_blocks": 1, "allocator": {}, "logical": "leader_worker_sharded"})
    assert errors(both) == [
        (
            "$.disk_layout.logical",
            "only one of `storage`, `allocator` or `logical` may be chosen, but `allocator`, `logical` were set",
        )
    ]


# ---- other classes, and dump ----------------------------------------------------------------------------------------


def test_any_config_class_loads_from_its_own_table() -> None:
    assert load(MODEL, KvManagerModelConfig) == KvManagerModelConfig(**MODEL)
    assert load({"directory": "/data"}, DiskAllocator) == DiskAllocator(directory="/data")
    assert load({"num_blocks": 4, "allocator": {"kind": "system"}}, KvManagerLayoutConfig) == (
        KvManagerLayoutConfig.builder().num_blocks(4).allocator(SystemAllocator()).build()
    )
    assert errors({"size": "1GiB", "allocator": {"kind": "system"}}, KvManagerLayoutConfig) == [
        (
            "$.size",
            "a byte budget needs the model to count blocks: give `num_blocks`, or load this tier as part of a "
            "KvBlockManagerConfig",
        )
    ]
    assert errors({"num_blocks": 4, "allocator": {}}, KvManagerLayoutConfig) == [
        ("$.allocator.kind", "must be given: device, pinned, system, disk")
    ]
    [(_, message)] = errors({}, dict)
    assert message.startswith("cannot load a dict; loadable: KvBlockManagerConfig")


def test_dump_is_plain_data_that_loads_back_equal() -> None:
    config = load(
        document(consolidator_config={"engine_source": "trtllm", "consolidated_event_endpoint": "tcp://*:6000"})
    )
    data = dump(config)
    assert data["host_layout"] == {
        "num_blocks": 4096,
        "layout_type": "FullyContiguous",
        "alignment": 1,
        "allocator": {"kind": "pinned", "device_id": 0, "mode": "register", "huge_pages": False, "numa": False},
    }
    assert data["consolidator_config"]["engine_source"] == "trtllm"
    assert load(copy.deepcopy(data)) == config


def test_dump_leaves_out_runtime_objects_and_refuses_what_a_document_cannot_hold() -> None:
    config = load(document())
    with_filter = attrs.evolve(
        config, host_layout=attrs.evolve(config.host_layout, offload_filter=type("F", (), {"should_offload": id})())
    )
    with pytest.warns(RuntimeObjectWarning, match=r"left out KvManagerLayoutConfig\.offload_filter"):
        assert dump(with_filter) == dump(config)

    class Carved:
        kind, addr, size = StorageKind.DEVICE, 0, 1 << 30

    given = attrs.evolve(
        config, device_layout=KvManagerLayoutConfig.builder().num_blocks(1).storage([Carved()]).build()
    )
    with pytest.raises(ConfigError) as caught:
        dump(given)
    [(path, message)] = caught.value.errors
    assert path == "$.device_layout.storage" and message.startswith("cannot be written to a document")
    assert isinstance(caught.value, RuntimeObjectError)

    agent = attrs.evolve(config, runtime=KvManagerRuntimeConfig.builder().worker_id(0).use_nixl_agent(Agent()).build())
    with pytest.raises(ConfigError, match=r"\$\.runtime\.nixl: a caller's NIXL agent cannot be written"):
        dump(agent)


def test_a_tier_whose_only_choice_is_null_has_no_memory() -> None:
    assert errors({"num_blocks": 3, "logical": None}, KvManagerLayoutConfig) == [
        ("$", "must provide either `storage` or `allocator` or `logical`")
    ]


def test_a_callers_allocator_cannot_be_written() -> None:
    class Arena:
        storage_kind = StorageKind.SYSTEM

        def allocate(self, size: int) -> Any: ...

    with pytest.raises(RuntimeObjectError, match=r"\$\.allocator: .* only the built-in allocators"):
        dump(KvManagerLayoutConfig.builder().num_blocks(1).allocator(Arena()).build())


# ---- review 2: a load always builds or says why; the dict form and the builders agree -----------------------------


def test_a_tier_whose_one_block_is_too_large_is_reported_under_its_size() -> None:
    doc = document(host_layout={"size": "1GiB", "alignment": 2**63, "allocator": {"kind": "pinned"}})
    [(path, message)] = errors(doc)
    assert path == "$.host_layout.size"
    assert message.startswith("one block of this layout is too large: it spans 9223372036858970111 bytes with its")


@pytest.mark.parametrize(
    "allocator", [DeviceAllocator(device_id=3), PinnedAllocator(threads=8), SystemAllocator(), DiskAllocator()]
)
def test_an_allocator_loads_from_its_own_dump_with_its_kind(allocator: Any) -> None:
    data = dump(allocator)
    assert "kind" in data and load(data, type(allocator)) == allocator
    assert load({**data, "kind": data["kind"].upper()}, type(allocator)) == allocator


def test_an_allocator_loaded_by_itself_refuses_another_kind() -> None:
    assert errors({"kind": "disk", "device_id": -1}, DeviceAllocator) == [
        ("$.kind", "must be 'device' for a DeviceAllocator, or left out; got 'disk' (str)"),
        ("$.device_id", "must be >= 0, got -1"),
    ]


def test_integers_beyond_64_bits_are_the_builders_to_judge() -> None:
    model = {"num_layers": 2**64, "outer_dim": 2, "page_size": 1, "inner_dim": 1}
    assert errors(model, KvManagerModelConfig) == [
        ("$.num_layers", "must be <= 18446744073709551615, got 18446744073709551616")
    ]
    assert errors({"worker_id": 2**64}, KvManagerRuntimeConfig) == [
        ("$.worker_id", "must be <= 18446744073709551615, got 18446744073709551616")
    ]


def test_a_missing_field_is_an_uninitialized_field_error_as_from_a_builder() -> None:
    with pytest.raises(UninitializedFieldError) as caught:
        load({}, KvManagerRuntimeConfig)
    assert caught.value.missing == ("worker_id",) and caught.value.errors == [("$.worker_id", "must be initialized")]
    with pytest.raises(UninitializedFieldError) as nested:
        load({"runtime": {}, "model": MODEL})
    assert nested.value.errors == [("$.runtime.worker_id", "must be initialized")]


def test_an_allocator_of_another_tier_is_reported_where_the_builder_reports_it() -> None:
    host = KvManagerLayoutConfig.builder().num_blocks(1).allocator(DeviceAllocator()).build()
    runtime = KvManagerRuntimeConfig.builder().worker_id(0).build()
    model = load(MODEL, KvManagerModelConfig)
    with pytest.raises(ConfigError) as built:
        KvBlockManagerConfig.builder().runtime(runtime).model(model).host_layout(host).build()
    found = errors(document(host_layout={"num_blocks": 1, "allocator": {"kind": "Device"}}))
    assert found == [("$." + path, message) for path, message in built.value.errors]
