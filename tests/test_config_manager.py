"""KvBlockManagerConfig: runtime, model, up to three tiers (each in the slot its memory suits), extras."""

from __future__ import annotations

from typing import Any

import pytest
from callers import EventLog, Region, SeenTwice
from hypothesis import given
from hypothesis import strategies as st

from kvbm_builder import (
    ConfigError,
    KvBlockManagerConfig,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
    UninitializedFieldError,
)
from kvbm_builder.config import (
    BlockParallelismStrategy,
    DeviceAllocator,
    DiskAllocator,
    KvBlockManagerConfigBuilder,
    PinnedAllocator,
    StorageKind,
    SystemAllocator,
    Tier,
)
from kvbm_builder.metrics import NullKvbmMetrics

RUNTIME = KvManagerRuntimeConfig.builder().worker_id(7).disable_nixl().build()
SHARDED = BlockParallelismStrategy.LeaderWorkerSharded
MODEL = KvManagerModelConfig.builder().num_layers(28).outer_dim(2).page_size(16).inner_dim(1024).build()


def layout(allocator: Any = None, *, storage: Any = None, offload_filter: Any = None) -> KvManagerLayoutConfig[Any]:
    builder = KvManagerLayoutConfig.builder().num_blocks(64)
    if storage is not None:
        builder.storage(storage)
    else:
        builder.allocator(allocator)
    if offload_filter is not None:
        builder.offload_filter(offload_filter)
    return builder.build()


def manager() -> KvBlockManagerConfigBuilder:
    return KvBlockManagerConfig.builder().runtime(RUNTIME).model(MODEL)


def test_runtime_and_model_are_enough_and_everything_else_defaults_to_none() -> None:
    config = manager().build()

    assert config.runtime is RUNTIME
    assert config.model is MODEL
    for name in (
        "device_layout",
        "host_layout",
        "disk_layout",
        "event_manager",
        "block_reset_channel",
        "kvbm_metrics",
        "consolidator_config",
    ):
        assert getattr(config, name) is None, name
    assert config.tiers() == []


def test_a_full_hierarchy() -> None:
    device = layout(DeviceAllocator(device_id=0))
    host = layout(PinnedAllocator(device_id=0), offload_filter=SeenTwice())
    disk = layout(DiskAllocator(directory="/var/cache/kv"))
    events = EventLog()
    reset_channel = object()  # upstream reserves the field; nothing reads it yet
    metrics = NullKvbmMetrics()

    config = (
        manager()
        .device_layout(device)  # strip_option: the bare layout, no Some(...)
        .host_layout(host)
        .disk_layout(disk)
        .event_manager(events)
        .block_reset_channel(reset_channel)
        .kvbm_metrics(metrics)
        .build()
    )

    assert (config.device_layout, config.host_layout, config.disk_layout) == (device, host, disk)
    assert config.event_manager is events
    assert config.block_reset_channel is reset_channel
    assert config.kvbm_metrics is metrics
    assert config.tiers() == [(Tier.G1, device), (Tier.G2, host), (Tier.G3, disk)]


def test_runtime_left_unset_is_named_first() -> None:
    with pytest.raises(UninitializedFieldError) as caught:
        KvBlockManagerConfig.builder().device_layout(layout(DeviceAllocator())).build()

    assert str(caught.value).splitlines()[0] == "`runtime` must be initialized"
    assert caught.value.missing == ("runtime", "model")


def test_model_left_unset() -> None:
    with pytest.raises(UninitializedFieldError, match=r"^`model` must be initialized$"):
        KvBlockManagerConfig.builder().runtime(RUNTIME).build()


def test_a_builder_is_not_a_config() -> None:
    with pytest.raises(ConfigError) as caught:
        KvBlockManagerConfig.builder().runtime(KvManagerRuntimeConfig.builder().worker_id(1)).model(MODEL).build()  # type: ignore[arg-type]

    ((path, message),) = caught.value.errors
    assert path == "runtime"
    assert message.startswith("must be a KvManagerRuntimeConfig (build it first), got KvManagerRuntimeConfigBuilder(")


def test_a_layout_slot_takes_a_built_layout() -> None:
    with pytest.raises(ConfigError) as caught:
        manager().host_layout(KvManagerLayoutConfig.builder().num_blocks(4)).build()  # type: ignore[arg-type]

    ((path, message),) = caught.value.errors
    assert path == "host_layout"
    assert message.startswith("must be a KvManagerLayoutConfig (build it first), got")


class TestTierKinds:
    """Each slot accepts only memory that suits it: device for G1, pinned or system for G2, a file for G3."""

    @pytest.mark.parametrize(
        ("slot", "allocator"),
        [
            ("device_layout", DeviceAllocator()),
            ("host_layout", PinnedAllocator()),
            ("host_layout", SystemAllocator()),
            ("disk_layout", DiskAllocator()),
        ],
    )
    def test_suitable(self, slot: str, allocator: Any) -> None:
        builder = manager()
        getattr(builder, slot)(layout(allocator))

        assert getattr(builder.build(), slot).allocator is allocator

    @pytest.mark.parametrize(
        ("slot", "allocator", "message"),
        [
            (
                "device_layout",
                PinnedAllocator(),
                "a pinned allocator cannot back the device tier (G1); it needs device memory",
            ),
            (
                "device_layout",
                SystemAllocator(),
                "a system allocator cannot back the device tier (G1); it needs device memory",
            ),
            (
                "host_layout",
                DeviceAllocator(),
                "a device allocator cannot back the host tier (G2); it needs pinned or system memory",
            ),
            (
                "host_layout",
                DiskAllocator(),
                "a disk allocator cannot back the host tier (G2); it needs pinned or system memory",
            ),
            (
                "disk_layout",
                PinnedAllocator(),
                "a pinned allocator cannot back the disk tier (G3); it needs disk memory",
            ),
        ],
    )
    def test_unsuitable_allocator(self, slot: str, allocator: Any, message: str) -> None:
        builder = manager()
        getattr(builder, slot)(layout(allocator))

        with pytest.raises(ConfigError) as caught:
            builder.build()

        assert caught.value.errors == [(f"{slot}.allocator", message)]

    def test_unsuitable_storage_names_the_item(self) -> None:
        storages = [Region(StorageKind.PINNED, 0x1000, 4096), Region(StorageKind.DEVICE, 0x2000, 4096)]

        with pytest.raises(ConfigError) as caught:
            manager().host_layout(layout(storage=storages)).build()

        assert caught.value.errors == [
            (
                "host_layout.storage[1]",
                "device storage cannot back the host tier (G2); it needs pinned or system memory",
            )
        ]

    def test_a_logical_layout_has_no_memory_to_check(self) -> None:
        logical = KvManagerLayoutConfig.builder().num_blocks(8).logical(BlockParallelismStrategy.LeaderWorkerSharded)

        assert manager().disk_layout(logical.build()).build().disk_layout is not None

    def test_the_disk_tier_has_nothing_to_offload_to(self) -> None:
        with pytest.raises(ConfigError) as caught:
            manager().disk_layout(layout(DiskAllocator(), offload_filter=SeenTwice())).build()

        assert caught.value.errors == [
            ("disk_layout.offload_filter", "the disk tier is the last tier: there is nothing to offload to")
        ]

    def test_direct_construction_checks_the_same(self) -> None:
        with pytest.raises(ConfigError) as caught:
            KvBlockManagerConfig(runtime=RUNTIME, model=MODEL, device_layout=layout(PinnedAllocator()))

        assert caught.value.errors[0][0] == "device_layout.allocator"


class TestTierSpan:
    """A tier spans at most 2**63 - 1 bytes (what memory and file offsets can address): the manager config
    refuses a bigger one at ``<slot>.num_blocks``, so that ``validate`` refuses what ``plan`` cannot lay out."""

    BLOCK = MODEL.bytes_per_block  # 28 * 2 * 16 * 1024 * 2 = 1,835,008 bytes
    MOST = (2**63 - 1) // BLOCK

    def sized(self, num_blocks: int) -> KvManagerLayoutConfig[Any]:
        return KvManagerLayoutConfig.builder().num_blocks(num_blocks).allocator(SystemAllocator()).build()

    def test_the_largest_tier_that_fits(self) -> None:
        config = manager().host_layout(self.sized(self.MOST)).build()

        assert config.host_layout is not None and config.host_layout.num_blocks * self.BLOCK <= 2**63 - 1

    def test_one_block_more_is_refused_under_the_tier(self) -> None:
        with pytest.raises(ConfigError) as caught:
            manager().host_layout(self.sized(self.MOST + 1)).build()

        assert caught.value.errors == [
            (
                "host_layout.num_blocks",
                f"{self.MOST + 1} blocks of 1835008 bytes need {(self.MOST + 1) * self.BLOCK} bytes, more than the "
                "9223372036854775807 bytes (2**63 - 1) memory and files can span; lower num_blocks to at most "
                f"{self.MOST}, or make the blocks smaller (page_size, inner_dim, num_layers)",
            )
        ]

    def test_every_tier_is_checked_and_direct_construction_too(self) -> None:
        huge = 2**64 - 1
        with pytest.raises(ConfigError) as caught:
            KvBlockManagerConfig(
                runtime=RUNTIME,
                model=MODEL,
                device_layout=KvManagerLayoutConfig.builder().num_blocks(huge).logical(SHARDED).build(),
                disk_layout=KvManagerLayoutConfig.builder().num_blocks(huge).allocator(DiskAllocator()).build(),
            )

        assert [path for path, _ in caught.value.errors] == ["device_layout.num_blocks", "disk_layout.num_blocks"]

    def test_an_absurd_count_is_refused_by_the_layout_itself(self) -> None:
        # num_blocks is upstream's usize; str() of an int past 4300 digits raises ValueError: the message must not
        with pytest.raises(ConfigError) as caught:
            self.sized(10**5000)

        assert caught.value.errors == [
            ("layout.num_blocks", "must be <= 18446744073709551615, got an integer of 16610 bits (int)")
        ]

    @given(
        num_blocks=st.integers(1, 2**64 - 1),  # upstream's usize: the layout refuses more
        shape=st.tuples(st.integers(1, 128), st.sampled_from([1, 2]), st.integers(1, 2**12), st.integers(1, 2**16)),
        width=st.sampled_from([1, 2, 4, 8]),
    )
    def test_refused_exactly_when_the_bytes_pass_the_bound(
        self, num_blocks: int, shape: tuple[int, int, int, int], width: int
    ) -> None:
        layers, outer, page, inner = shape
        model = KvManagerModelConfig(
            num_layers=layers, outer_dim=outer, page_size=page, inner_dim=inner, dtype_width_bytes=width
        )
        try:
            KvBlockManagerConfig(runtime=RUNTIME, model=model, host_layout=self.sized(num_blocks))
        except ConfigError as err:
            assert num_blocks * layers * outer * page * inner * width >= 2**63
            assert [path for path, _ in err.errors] == ["host_layout.num_blocks"]
        else:
            assert num_blocks * layers * outer * page * inner * width < 2**63


class TestStorageKindParse:
    """The one reading of an allocator's ``kind`` text, shared by files, the environment and the command line."""

    @given(kind=st.sampled_from(list(StorageKind)), data=st.data())
    def test_any_case_and_surrounding_spaces(self, kind: StorageKind, data: st.DataObject) -> None:
        spelled = "".join(c.upper() if data.draw(st.booleans()) else c for c in kind.value)
        padded = data.draw(st.sampled_from(["", " ", "\t"])) + spelled + data.draw(st.sampled_from(["", " ", "\n"]))

        assert StorageKind.parse(padded) is kind

    def test_a_kind_is_itself(self) -> None:
        assert StorageKind.parse(StorageKind.DISK) is StorageKind.DISK

    @pytest.mark.parametrize(
        ("value", "shown"),
        [("gpu", "'gpu' (str)"), ("", "'' (str)"), ("dev ice", "'dev ice' (str)"), (None, "None"), (1, "1")],
    )
    def test_anything_else_lists_the_kinds(self, value: object, shown: str) -> None:
        with pytest.raises(ConfigError) as caught:
            StorageKind.parse(value)

        assert caught.value.errors == [("", f"must be a storage kind (device, pinned, system, disk), got {shown}")]


def test_every_problem_of_one_build_is_reported_together() -> None:
    with pytest.raises(ConfigError) as caught:
        (
            KvBlockManagerConfig.builder()
            .runtime(RUNTIME)
            .model("llama")  # type: ignore[arg-type]
            .device_layout(layout(PinnedAllocator()))
            .disk_layout(layout(DiskAllocator(), offload_filter=SeenTwice()))
            .event_manager(print)  # type: ignore[arg-type]
            .consolidator_config("tcp://localhost:5557", None, "vllm")
            .build()
        )

    assert [path for path, _ in caught.value.errors] == [
        "consolidator_config",
        "model",
        "event_manager",
        "device_layout.allocator",
        "disk_layout.offload_filter",
    ]
    assert str(caught.value).startswith("5 problems in the configuration:\n  consolidator_config: output_endpoint")


def test_an_event_manager_must_take_both_kinds_of_event() -> None:
    class StoresOnly:
        def on_store(self, event: object) -> None: ...

    with pytest.raises(ConfigError) as caught:
        manager().event_manager(StoresOnly()).build()  # type: ignore[arg-type]

    ((path, message),) = caught.value.errors
    assert path == "event_manager"
    assert message.startswith("must be an event manager (lacks on_remove), got")


def test_equal_configs_describe_the_same_hierarchy() -> None:
    first = manager().device_layout(layout(DeviceAllocator())).build()
    second = manager().device_layout(layout(DeviceAllocator())).build()

    assert first == second
    assert first != manager().device_layout(layout(DeviceAllocator(device_id=1))).build()
