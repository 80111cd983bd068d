"""KvManagerLayoutConfig: a tier's block count, layout type and the one source of its memory."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from callers import Region, SeenTwice

from kvbm_builder import ConfigError, KvManagerLayoutConfig, UninitializedFieldError
from kvbm_builder.config import (
    BlockParallelismStrategy,
    DeviceAllocator,
    DiskAllocator,
    FullyContiguous,
    LayerSeparate,
    LayoutType,
    PinnedAllocator,
    StorageKind,
    SystemAllocator,
)

SHARDED = BlockParallelismStrategy.LeaderWorkerSharded
EXCLUSIVE = "only one of `storage`, `allocator` or `logical` may be chosen"


def test_the_defaults_are_upstreams() -> None:
    layout = KvManagerLayoutConfig.builder().num_blocks(1024).allocator(DeviceAllocator()).build()

    assert layout.num_blocks == 1024
    assert layout.layout_type == FullyContiguous()
    assert layout.storage is None
    assert layout.logical is None
    assert layout.offload_filter is None
    assert layout.alignment == 1
    assert layout.allocator == DeviceAllocator(device_id=0)


def test_every_field_can_be_set() -> None:
    flt = SeenTwice()
    layout = (
        KvManagerLayoutConfig.builder()
        .num_blocks(4096)
        .layout_type(LayerSeparate(outer_contiguous=False))
        .allocator(PinnedAllocator(device_id=1))
        .offload_filter(flt)
        .alignment(256)
        .build()
    )

    assert layout.layout_type == LayerSeparate(outer_contiguous=False)
    assert layout.allocator == PinnedAllocator(device_id=1)
    assert layout.offload_filter is flt
    assert layout.alignment == 256


def test_num_blocks_left_unset() -> None:
    with pytest.raises(UninitializedFieldError) as caught:
        KvManagerLayoutConfig.builder().logical(SHARDED).build()

    assert str(caught.value) == "`num_blocks` must be initialized"


@pytest.mark.parametrize(
    ("value", "message"),
    [(0, "must be >= 1, got 0"), (-1, "must be >= 1, got -1"), (True, "must be an integer, got True (bool)")],
)
def test_num_blocks_is_a_positive_count(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        KvManagerLayoutConfig.builder().num_blocks(value).logical(SHARDED).build()  # type: ignore[arg-type]

    assert caught.value.errors == [("layout.num_blocks", message)]


class TestTheExclusiveChoice:
    """Exactly one of storage, allocator or logical: upstream checks which setters were *called*."""

    def test_one_choice_each(self) -> None:
        region = Region(StorageKind.SYSTEM, 0x7000_0000, 1 << 20)
        base = KvManagerLayoutConfig.builder().num_blocks(8)

        assert base.clone().storage([region]).build().storage == (region,)
        assert base.clone().allocator(SystemAllocator()).build().allocator == SystemAllocator()
        assert base.clone().logical(SHARDED).build().logical is SHARDED

    def test_none_chosen(self) -> None:
        with pytest.raises(ConfigError) as caught:
            KvManagerLayoutConfig.builder().num_blocks(8).build()

        assert caught.value.errors == [("layout", "must provide either `storage` or `allocator` or `logical`")]

    def test_two_chosen(self) -> None:
        with pytest.raises(ConfigError) as caught:
            KvManagerLayoutConfig.builder().num_blocks(8).allocator(DeviceAllocator()).logical(SHARDED).build()

        assert caught.value.errors == [
            ("layout.logical", f"{EXCLUSIVE}, but `allocator`, `logical` were set"),
        ]

    def test_storage_none_still_counts_as_chosen(self) -> None:
        # upstream's rule: the call counts, whatever its value, so storage(None) and allocator(...) are two choices
        with pytest.raises(ConfigError) as caught:
            KvManagerLayoutConfig.builder().num_blocks(8).storage(None).allocator(DeviceAllocator()).build()
        assert caught.value.errors == [("layout.allocator", f"{EXCLUSIVE}, but `storage`, `allocator` were set")]

    @pytest.mark.parametrize("choice", ["storage", "logical"])
    def test_a_choice_of_none_alone_leaves_the_tier_without_memory(self, choice: str) -> None:
        # upstream builds it and fails when the manager starts; a layout must say where its blocks live
        with pytest.raises(ConfigError) as caught:
            getattr(KvManagerLayoutConfig.builder().num_blocks(8), choice)(None).build()

        assert caught.value.errors == [("layout", "must provide either `storage` or `allocator` or `logical`")]

    def test_allocator_none_is_refused_by_the_setter(self) -> None:
        # upstream's allocator() takes an allocator, not an Option; None used to pass build() and fail later
        with pytest.raises(ConfigError) as caught:
            KvManagerLayoutConfig.builder().num_blocks(8).allocator(None).build()  # type: ignore[arg-type]

        assert caught.value.errors == [
            (
                "layout.allocator",
                "allocator() needs an allocator, got None; choose storage(...) or logical(...) instead",
            )
        ]

    def test_direct_construction_and_evolve_need_memory_too(self) -> None:
        with pytest.raises(ConfigError, match="must provide either `storage` or `allocator` or `logical`"):
            KvManagerLayoutConfig(num_blocks=1)
        built = KvManagerLayoutConfig.builder().num_blocks(8).allocator(DeviceAllocator()).build()
        with pytest.raises(ConfigError, match="must provide either `storage` or `allocator` or `logical`"):
            attrs.evolve(built, allocator=None)

    def test_direct_construction_keeps_storages_as_a_tuple(self) -> None:
        regions = [Region(StorageKind.SYSTEM, 0x1000, 4096)]
        layout = KvManagerLayoutConfig(num_blocks=1, storage=regions)

        regions.append(Region(StorageKind.SYSTEM, 0x2000, 4096))
        assert layout.storage == (Region(StorageKind.SYSTEM, 0x1000, 4096),)
        assert hash(layout) == hash(KvManagerLayoutConfig(num_blocks=1, storage=regions[:1]))

    def test_the_hook_is_reported_before_a_missing_field_as_upstream(self) -> None:
        # upstream's build_fn(validate) runs first: its error wins over "`num_blocks` must be initialized"
        with pytest.raises(ConfigError) as caught:
            KvManagerLayoutConfig.builder().build()

        assert type(caught.value) is ConfigError
        assert caught.value.errors == [
            ("layout", "must provide either `storage` or `allocator` or `logical`"),
            ("layout.num_blocks", "must be initialized"),
        ]

    def test_direct_construction_rejects_two_values(self) -> None:
        with pytest.raises(ConfigError) as caught:
            KvManagerLayoutConfig(num_blocks=8, allocator=DeviceAllocator(), logical=SHARDED)

        assert caught.value.errors == [("layout.logical", f"{EXCLUSIVE}, but `allocator`, `logical` were set")]


class TestLayoutType:
    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("FullyContiguous", FullyContiguous()),
            ("fully_contiguous", FullyContiguous()),
            ("fully-contiguous", FullyContiguous()),
            ("LayerSeparateOuterContiguous", LayerSeparate(outer_contiguous=True)),
            ("layer_separate_outer_contiguous", LayerSeparate(outer_contiguous=True)),
            ("layer-separate-block-contiguous", LayerSeparate(outer_contiguous=False)),
            ("LAYERSEPARATEBLOCKCONTIGUOUS", LayerSeparate(outer_contiguous=False)),
        ],
    )
    def test_names_are_read_as_upstream_reads_them(self, name: str, expected: LayoutType) -> None:
        assert LayoutType.parse(name) == expected
        assert KvManagerLayoutConfig.builder().num_blocks(1).logical(SHARDED).layout_type(name).build().layout_type == (
            expected
        )

    def test_an_unknown_name_lists_the_accepted_ones(self) -> None:
        with pytest.raises(ConfigError) as caught:
            KvManagerLayoutConfig.builder().num_blocks(1).logical(SHARDED).layout_type("striped").build()

        assert caught.value.errors == [
            (
                "layout.layout_type",
                "unknown layout 'striped'; accepted: fullycontiguous, layerseparateoutercontiguous, "
                "layerseparateblockcontiguous",
            )
        ]

    @pytest.mark.parametrize(
        ("form", "expected"),
        [
            ({"LayerSeparate": {"outer_contiguous": True}}, LayerSeparate(outer_contiguous=True)),
            ({"LayerSeparate": {"outer_contiguous": False}}, LayerSeparate(outer_contiguous=False)),
            ({"FullyContiguous": {}}, FullyContiguous()),
        ],
    )
    def test_upstreams_serialized_form_round_trips(self, form: Any, expected: LayoutType) -> None:
        assert LayoutType.parse(form) == expected
        assert LayoutType.parse(expected.to_upstream()) == expected

    def test_to_upstream(self) -> None:
        assert FullyContiguous().to_upstream() == "FullyContiguous"
        assert LayerSeparate(outer_contiguous=True).to_upstream() == {"LayerSeparate": {"outer_contiguous": True}}

    @pytest.mark.parametrize(
        "form", [{"LayerSeparate": {}}, {"LayerSeparate": {"outer_contiguous": "yes"}}, {"LayerSeparate": True}]
    )
    def test_layer_separate_needs_its_flag(self, form: Any) -> None:
        with pytest.raises(ConfigError, match=r"LayerSeparate needs \{'outer_contiguous': true\|false\}"):
            LayoutType.parse(form)

    @pytest.mark.parametrize("value", [3, None, ["FullyContiguous"], {"Striped": {}}])
    def test_anything_else_is_not_a_layout(self, value: object) -> None:
        with pytest.raises(ConfigError, match="must be a layout name"):
            LayoutType.parse(value)

    def test_outer_contiguous_is_a_bool(self) -> None:
        with pytest.raises(ConfigError) as caught:
            LayerSeparate(outer_contiguous="yes")  # type: ignore[arg-type]

        assert caught.value.errors == [("layout_type.outer_contiguous", "must be true or false, got 'yes' (str)")]

    def test_a_layout_type_that_is_not_one(self) -> None:
        with pytest.raises(ConfigError) as caught:
            KvManagerLayoutConfig.builder().num_blocks(1).logical(SHARDED).layout_type(3).build()  # type: ignore[arg-type]

        assert caught.value.errors == [
            (
                "layout.layout_type",
                "must be a layout name (fullycontiguous, layerseparateoutercontiguous, layerseparateblockcontiguous), "
                "got 3",
            )
        ]

    def test_str(self) -> None:
        assert str(FullyContiguous()) == "FullyContiguous"
        assert str(LayerSeparate(outer_contiguous=False)) == "LayerSeparate(outer_contiguous=False)"


class TestStorage:
    def test_a_list_is_kept_as_a_tuple(self) -> None:
        regions = [Region(StorageKind.SYSTEM, 0x1000 * i, 4096) for i in range(1, 4)]
        layout = KvManagerLayoutConfig.builder().num_blocks(1).storage(regions).build()

        regions.clear()  # the config does not share the caller's list
        assert len(layout.storage or ()) == 3

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ([], "must hold at least one storage (one for FullyContiguous, one per layer for LayerSeparate), got []"),
            ("tensor", "must be a list of storages (or None), got 'tensor' (str)"),
            (42, "must be a list of storages (or None), got 42"),
            ([object()], "item 0 must be a storage (with kind, addr, size), got <object object at"),
            ([Region("system", 0, 1)], "item 0 must have a StorageKind as its kind, got 'system' (str)"),
        ],
    )
    def test_what_is_not_storage(self, value: Any, message: str) -> None:
        with pytest.raises(ConfigError) as caught:
            KvManagerLayoutConfig.builder().num_blocks(1).storage(value).build()

        ((path, got),) = caught.value.errors
        assert path == "layout.storage"
        assert got.startswith(message)

    def test_storage_kind_comes_from_the_storage_or_the_allocator(self) -> None:
        with_storage = KvManagerLayoutConfig.builder().num_blocks(1).storage([Region(StorageKind.DISK, 0, 1)]).build()
        with_allocator = KvManagerLayoutConfig.builder().num_blocks(1).allocator(PinnedAllocator()).build()
        logical = KvManagerLayoutConfig.builder().num_blocks(1).logical(SHARDED).build()

        assert with_storage.storage_kind is StorageKind.DISK
        assert with_allocator.storage_kind is StorageKind.PINNED
        assert logical.storage_kind is None


class TestAllocator:
    @pytest.mark.parametrize(
        ("allocator", "kind"),
        [
            (DeviceAllocator(device_id=1), StorageKind.DEVICE),
            (PinnedAllocator(), StorageKind.PINNED),
            (SystemAllocator(), StorageKind.SYSTEM),
            (DiskAllocator(directory="/var/cache/kv"), StorageKind.DISK),
        ],
    )
    def test_the_built_in_allocators(self, allocator: Any, kind: StorageKind) -> None:
        layout = KvManagerLayoutConfig.builder().num_blocks(1).allocator(allocator).build()

        assert layout.allocator is allocator
        assert layout.storage_kind is kind

    @pytest.mark.parametrize(
        ("directory", "message"),
        [
            (
                "/var/cache/\0kv",
                "must not contain a NUL byte (no file system path can), got '/var/cache/\\x00kv' (str)",
            ),
            ("", "must be a directory path, got '' (str)"),
            (7, "must be a directory path, got 7"),
        ],
    )
    def test_a_disk_directory_must_be_a_usable_path(self, directory: object, message: str) -> None:
        with pytest.raises(ConfigError) as caught:
            DiskAllocator(directory=directory)  # type: ignore[arg-type]

        assert caught.value.errors == [("allocator.directory", message)]

    def test_an_allocator_of_your_own(self) -> None:
        class Arena:
            """Hands out pieces of host memory it already holds."""

            storage_kind = StorageKind.SYSTEM

            def allocate(self, size: int) -> Region:
                return Region(StorageKind.SYSTEM, 0x1000, size)

        arena = Arena()
        assert KvManagerLayoutConfig.builder().num_blocks(1).allocator(arena).build().allocator is arena

    def test_something_that_cannot_allocate(self) -> None:
        with pytest.raises(ConfigError) as caught:
            KvManagerLayoutConfig.builder().num_blocks(1).allocator("cuda:0").build()  # type: ignore[arg-type]

        assert caught.value.errors == [
            (
                "layout.allocator",
                "must be a storage allocator (with storage_kind and allocate()) (lacks storage_kind, allocate), "
                "got 'cuda:0' (str)",
            )
        ]

    def test_an_allocator_whose_kind_is_not_a_storage_kind(self) -> None:
        class Odd:
            def __init__(self) -> None:
                self.storage_kind = ["device"]

            def allocate(self, size: int) -> None: ...

        with pytest.raises(ConfigError) as caught:
            KvManagerLayoutConfig.builder().num_blocks(1).allocator(Odd()).build()  # type: ignore[arg-type]

        assert caught.value.errors == [
            ("layout.allocator", "must have a StorageKind as its storage_kind, got ['device'] (list)")
        ]


def test_logical_is_a_block_parallelism_strategy() -> None:
    with pytest.raises(ConfigError) as caught:
        KvManagerLayoutConfig.builder().num_blocks(1).logical("sharded").build()  # type: ignore[arg-type]

    assert caught.value.errors == [
        ("layout.logical", "must be 'LeaderWorkerSharded' (or null), got 'sharded' (str)"),
    ]


def test_an_offload_filter_must_be_able_to_decide() -> None:
    with pytest.raises(ConfigError) as caught:
        KvManagerLayoutConfig.builder().num_blocks(1).logical(SHARDED).offload_filter(lambda h: True).build()  # type: ignore[arg-type]

    ((path, message),) = caught.value.errors
    assert path == "layout.offload_filter"
    assert message.startswith("must be an offload filter (should_offload()) (lacks should_offload), got <function")


@pytest.mark.parametrize("alignment", [1, 2, 64, 4096, 2**21])
def test_alignment_is_a_power_of_two(alignment: int) -> None:
    assert KvManagerLayoutConfig.builder().num_blocks(1).logical(SHARDED).alignment(alignment).build().alignment == (
        alignment
    )


@pytest.mark.parametrize(
    ("alignment", "message"),
    [
        (0, "must be a power of two (1, 2, 4, ... 2**63), got 0"),
        (3, "must be a power of two (1, 2, 4, ... 2**63), got 3"),
        (-4, "must be a power of two (1, 2, 4, ... 2**63), got -4"),
        (4.0, "must be an integer, got 4.0"),
    ],
)
def test_alignment_that_is_not(alignment: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        KvManagerLayoutConfig.builder().num_blocks(1).logical(SHARDED).alignment(alignment).build()  # type: ignore[arg-type]

    assert caught.value.errors == [("layout.alignment", message)]


def test_the_config_is_generic_over_the_storage_kind() -> None:
    # KvManagerLayoutConfig[S], as upstream's KvManagerLayoutConfig<S>
    alias = KvManagerLayoutConfig[Region]
    layout: KvManagerLayoutConfig[Region] = alias(num_blocks=2, storage=(Region(StorageKind.DEVICE, 0, 1),))

    assert layout.storage_kind is StorageKind.DEVICE
