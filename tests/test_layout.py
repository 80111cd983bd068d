"""Layout math by example: upstream's worked example, the sizes a tier requests, and the errors."""

from __future__ import annotations

import pickle

import attrs
import pytest

from kvbm_builder import (
    BlockParallelismStrategy,
    ConfigError,
    FullyContiguous,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    LayerSeparate,
    LayoutError,
    LayoutType,
    StorageKind,
)
from kvbm_builder.layout import Layout, LayoutIndexError, LayoutSpec, MemoryRegion, StorageTooSmallError, align_up


@attrs.frozen
class FakeStorage:
    """Plain data with the shape of a storage: the layout only reads kind, addr and size."""

    addr: int
    size: int
    kind: StorageKind = StorageKind.SYSTEM


def example(layout_type: LayoutType | None = None, alignment: int = 1) -> LayoutSpec:
    """Upstream's test constants: 7 blocks, 5 layers, outer 2, page 4, inner 13, 4-byte dtype."""
    return LayoutSpec(7, 5, 2, 4, 13, 4, layout_type or FullyContiguous(), alignment)


def test_align_up() -> None:
    assert [align_up(v, 256) for v in (0, 1, 255, 256, 257)] == [0, 256, 256, 256, 512]
    assert align_up(2080, 1) == 2080


def test_fully_contiguous_worked_example() -> None:
    spec = example()
    assert spec.region_bytes == 208
    assert (spec.outer_stride, spec.layer_stride, spec.block_stride) == (208, 416, 2080)
    assert spec.data_bytes == 14560 == spec.total_bytes == spec.allocation_bytes
    assert spec.num_allocations == 1
    assert spec.offset(3, 2, 0) == (0, 7072)
    assert spec.offset(6, 4, 1) == (0, 14352)
    assert spec.alignment_overhead == 0


def test_fully_contiguous_alignment_pads_blocks_but_not_the_last() -> None:
    spec = example(alignment=256)
    assert spec.natural_block_bytes == 2080
    assert spec.block_stride == spec.block_bytes == 2304
    assert spec.data_bytes == 6 * 2304 + 2080
    assert spec.allocation_bytes == spec.data_bytes + 255
    assert spec.alignment_overhead == 6 * (2304 - 2080) + 255


def test_layer_separate_outer_contiguous_worked_example() -> None:
    spec = example(LayerSeparate(outer_contiguous=True))
    assert (spec.block_stride, spec.outer_stride, spec.data_bytes) == (208, 1456, 2912)
    assert spec.layer_stride is None
    assert spec.num_allocations == 5
    assert spec.total_bytes == 5 * 2912
    assert spec.offset(3, 2, 1) == (2, 1456 + 3 * 208)


def test_layer_separate_block_contiguous() -> None:
    spec = example(LayerSeparate(outer_contiguous=False), alignment=512)
    assert (spec.outer_stride, spec.block_stride) == (208, 512)
    assert spec.data_bytes == 7 * 512
    assert spec.block_bytes == 5 * 512
    assert spec.offset(3, 2, 1) == (2, 3 * 512 + 208)


def test_from_config() -> None:
    model = KvManagerModelConfig(num_layers=5, outer_dim=2, page_size=4, inner_dim=13, dtype_width_bytes=4)
    layout = (
        KvManagerLayoutConfig.builder()
        .num_blocks(7)
        .layout_type("layer_separate_outer_contiguous")
        .alignment(256)
        .logical(BlockParallelismStrategy.LeaderWorkerSharded)
        .build()
    )
    assert LayoutSpec.from_config(model, layout) == example(LayerSeparate(outer_contiguous=True), alignment=256)


def test_spec_fields_are_checked() -> None:
    with pytest.raises(ConfigError) as err:
        LayoutSpec(0, 5, 2, 4, 13, 4, FullyContiguous(), alignment=3)
    assert err.value.errors == [
        ("layout_spec.num_blocks", "must be >= 1, got 0"),
        ("layout_spec.alignment", "must be a power of two (1, 2, 4, ... 2**63), got 3"),
    ]


def test_layout_places_regions_after_the_aligned_start() -> None:
    spec = example(alignment=256)
    layout = Layout(spec, [FakeStorage(addr=0x1001, size=spec.allocation_bytes, kind=StorageKind.PINNED)])
    assert layout.base_addrs == (0x1100,)
    assert layout.memory_region(1, 0, 1) == MemoryRegion(0x1100 + 2304 + 208, 208, StorageKind.PINNED, 0)


def test_disk_regions_are_file_offsets() -> None:
    spec = example(LayerSeparate(outer_contiguous=False), alignment=4096)
    disks = [FakeStorage(addr=0, size=spec.data_bytes, kind=StorageKind.DISK) for _ in range(5)]
    region = Layout(spec, disks).memory_region(2, 4, 1)
    assert region == MemoryRegion(2 * 4096 + 208, 208, StorageKind.DISK, 4)


def test_wrong_storage_count() -> None:
    with pytest.raises(LayoutError, match=r"FullyContiguous layout needs exactly 1 storage, got 2"):
        Layout(example(), [FakeStorage(0, 14560), FakeStorage(0, 14560)])
    with pytest.raises(LayoutError, match=r"needs one storage per layer \(5\), got 1"):
        Layout(example(LayerSeparate(outer_contiguous=True)), [FakeStorage(0, 2912)])


def test_too_small_storage_names_both_sizes_and_the_storage() -> None:
    spec = example(LayerSeparate(outer_contiguous=True), alignment=64)
    assert spec.data_bytes == 2 * 7 * 256
    storages = [FakeStorage(addr=0x1000 * i, size=3584) for i in range(5)]
    storages[3] = FakeStorage(addr=0x3010, size=3584)  # the data fits, but not once moved up to 0x3040
    with pytest.raises(StorageTooSmallError) as err:
        Layout(spec, storages)
    assert (err.value.storage_index, err.value.size, err.value.required) == (3, 3584, 3584 + 48)
    assert "storage 3 (system) holds 3584 bytes but the layout needs 3632" in str(err.value)
    assert isinstance(err.value, LayoutError)


def test_indices_are_checked_in_upstream_order() -> None:
    layout = Layout(example(), [FakeStorage(0, 14560)])
    with pytest.raises(LayoutIndexError) as err:
        layout.memory_region(7, 5, 2)  # all three are out of range: the block is reported
    assert (err.value.axis, err.value.index, err.value.bound) == ("block", 7, 7)
    assert str(err.value) == "block index 7 is out of range: the layout has 7 blocks; valid block indices are 0..6"
    with pytest.raises(LayoutIndexError) as err:
        layout.memory_region(6, 5, 2)
    assert (err.value.axis, err.value.index, err.value.bound) == ("layer", 5, 5)
    with pytest.raises(LayoutIndexError) as err:
        layout.memory_region(6, 4, 2)
    assert (err.value.axis, err.value.index, err.value.bound) == ("outer", 2, 2)


def test_negative_and_non_integer_indices() -> None:
    spec = example()
    with pytest.raises(LayoutIndexError, match=r"layer index -1 is negative") as err:
        spec.offset(0, -1, 0)
    assert isinstance(err.value, IndexError)
    with pytest.raises(LayoutError, match=r"outer index must be an integer, got True \(bool\)"):
        spec.offset(0, 0, True)


def test_errors_survive_pickling() -> None:
    err = LayoutIndexError("block", 9, 7)
    again = pickle.loads(pickle.dumps(err))
    assert (again.axis, again.index, again.bound, str(again)) == ("block", 9, 7, str(err))


def test_a_layout_larger_than_2_63_bytes_is_refused_naming_the_fields() -> None:
    # one region of 2**30 * 2**30 * 8 = 2**63 bytes: no allocator or file can hold it, and ctypes would wrap it
    with pytest.raises(ConfigError) as err:
        LayoutSpec(2, 1, 1, 2**30, 2**30, 8, FullyContiguous(), alignment=4096)
    [(path, message)] = err.value.errors
    assert path == "layout_spec"
    assert message.startswith(f"the layout needs {2 * 2**63 + 4095} bytes (num_blocks * num_layers * outer_dim")
    assert "more than the 9223372036854775807 bytes (2**63 - 1)" in message
    assert "lower num_blocks, page_size, inner_dim or num_layers" in message


def test_the_largest_layout_that_fits_is_accepted() -> None:
    spec = LayoutSpec(1, 1, 1, 2**30, 2**29, 8, FullyContiguous())  # 2**62 bytes
    assert spec.total_bytes == 2**62
