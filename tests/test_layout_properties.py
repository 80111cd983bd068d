"""Rules every layout keeps, over random shapes, layout types, alignments and (unaligned) storage addresses."""

from __future__ import annotations

import itertools

import attrs
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvbm_builder import ConfigError, FullyContiguous, LayerSeparate, LayoutType, StorageKind
from kvbm_builder.layout import Layout, LayoutSpec, MemoryRegion, StorageTooSmallError


@attrs.frozen
class FakeStorage:
    """Plain data with the shape of a storage: the layout only reads kind, addr and size."""

    addr: int
    size: int
    kind: StorageKind = StorageKind.SYSTEM


ALIGNMENTS = st.sampled_from([1, 2, 8, 64, 256, 4096])
OUTER_DIMS = st.integers(1, 2)
LAYOUT_TYPES = st.sampled_from([FullyContiguous(), LayerSeparate(outer_contiguous=True), LayerSeparate(False)])


@st.composite
def specs(
    draw: st.DrawFn,
    alignments: st.SearchStrategy[int] = ALIGNMENTS,
    outer_dims: st.SearchStrategy[int] = OUTER_DIMS,
    layout_types: st.SearchStrategy[LayoutType] = LAYOUT_TYPES,
) -> LayoutSpec:
    return LayoutSpec(
        num_blocks=draw(st.integers(1, 8)),
        num_layers=draw(st.integers(1, 5)),
        outer_dim=draw(outer_dims),
        page_size=draw(st.integers(1, 16)),
        inner_dim=draw(st.integers(1, 40)),
        dtype_width_bytes=draw(st.sampled_from([1, 2, 4, 8])),
        layout_type=draw(layout_types),
        alignment=draw(alignments),
    )


@st.composite
def layouts(draw: st.DrawFn, spec_strategy: st.SearchStrategy[LayoutSpec] | None = None) -> Layout:
    """A layout over storages of exactly ``allocation_bytes``, one after another with random gaps."""
    spec = draw(specs() if spec_strategy is None else spec_strategy)
    storages = []
    addr = draw(st.integers(0, 2**40))
    for _ in range(spec.num_allocations):
        storages.append(FakeStorage(addr, spec.allocation_bytes))
        addr += spec.allocation_bytes + draw(st.integers(0, 300))
    return Layout(spec, storages)


def _indices(spec: LayoutSpec) -> list[tuple[int, int, int]]:
    """Every (block, layer, outer), in C order."""
    return [(b, la, o) for b in range(spec.num_blocks) for la in range(spec.num_layers) for o in range(spec.outer_dim)]


def all_regions(layout: Layout) -> list[MemoryRegion]:
    return [layout.memory_region(*index) for index in _indices(layout.spec)]


@given(layouts())
def test_regions_have_size_r_never_overlap_and_lie_inside_their_storage(layout: Layout) -> None:
    regions = all_regions(layout)
    assert {r.size for r in regions} == {layout.spec.region_bytes}
    ordered = sorted(regions, key=lambda r: r.addr)
    for before, after in itertools.pairwise(ordered):
        assert before.addr + before.size <= after.addr
    for r in regions:
        storage = layout.storages[r.storage_index]
        assert storage.addr <= r.addr and r.addr + r.size <= storage.addr + storage.size
        assert r.kind is storage.kind


@given(layouts())
def test_region_starts_are_aligned_where_the_layout_promises(layout: Layout) -> None:
    s = layout.spec
    if s.layout_type == FullyContiguous():
        promised = [(b, 0, 0) for b in range(s.num_blocks)]  # each block
    elif s.layout_type == LayerSeparate(outer_contiguous=False):
        promised = [(b, la, 0) for b, la, _ in _indices(s)]  # each block of each layer
    else:
        promised = _indices(s)  # every region
    for index in promised:
        assert layout.memory_region(*index).addr % s.alignment == 0, index


@given(specs(), st.integers(0, 2**40))
def test_storage_needs_data_bytes_plus_its_own_alignment_padding(spec: LayoutSpec, addr: int) -> None:
    padding = -addr % spec.alignment
    assert padding <= spec.alignment - 1
    Layout(spec, [FakeStorage(addr, spec.data_bytes + padding)] * spec.num_allocations)
    short = [FakeStorage(addr, spec.data_bytes + padding - 1)] * spec.num_allocations
    with pytest.raises(StorageTooSmallError) as err:
        Layout(spec, short)
    assert (err.value.size, err.value.required) == (spec.data_bytes + padding - 1, spec.data_bytes + padding)


@given(specs())
def test_byte_accounting(spec: LayoutSpec) -> None:
    payload = spec.num_blocks * spec.num_layers * spec.outer_dim * spec.region_bytes
    assert spec.total_bytes == spec.num_allocations * (spec.data_bytes + spec.alignment - 1)
    assert spec.alignment_overhead == spec.total_bytes - payload >= 0
    assert spec.block_bytes >= spec.num_layers * spec.outer_dim * spec.region_bytes
    if spec.alignment == 1:
        assert spec.alignment_overhead == 0


@given(layouts(specs(outer_dims=st.just(1), layout_types=st.just(LayerSeparate(outer_contiguous=True)))))
def test_with_one_outer_index_both_layer_separate_forms_are_the_same(layout: Layout) -> None:
    outer = attrs.evolve(layout.spec, layout_type=LayerSeparate(outer_contiguous=True))
    block = attrs.evolve(layout.spec, layout_type=LayerSeparate(outer_contiguous=False))
    assert all_regions(Layout(outer, layout.storages)) == all_regions(Layout(block, layout.storages))


@given(specs(alignments=st.just(1)))
def test_offsets_agree_with_numpy_strides(spec: LayoutSpec) -> None:
    dtype = np.dtype(f"u{spec.dtype_width_bytes}")
    n, layers, outer, inner = spec.num_blocks, spec.num_layers, spec.outer_dim, (spec.page_size, spec.inner_dim)
    if spec.layout_type == FullyContiguous():
        strides = np.empty((n, layers, outer, *inner), dtype).strides
        expect = {(b, la, o): (0, b * strides[0] + la * strides[1] + o * strides[2]) for b, la, o in _indices(spec)}
    elif spec.layout_type == LayerSeparate(outer_contiguous=True):
        strides = np.empty((outer, n, *inner), dtype).strides
        expect = {(b, la, o): (la, o * strides[0] + b * strides[1]) for b, la, o in _indices(spec)}
    else:
        strides = np.empty((n, outer, *inner), dtype).strides
        expect = {(b, la, o): (la, b * strides[0] + o * strides[1]) for b, la, o in _indices(spec)}
    assert {i: spec.offset(*i) for i in _indices(spec)} == expect


@given(layouts())
def test_data_starts_at_the_first_aligned_address_of_each_storage(layout: Layout) -> None:
    for storage, base in zip(layout.storages, layout.base_addrs, strict=True):
        assert base % layout.spec.alignment == 0
        assert storage.addr <= base < storage.addr + layout.spec.alignment


def restated_total_bytes(n: int, layers: int, outer: int, region: int, align: int, layout_type: LayoutType) -> int:
    """kvbm-behaviour §2, restated: what a tier asks its allocator for."""
    pad = align - 1
    if layout_type == FullyContiguous():
        block = layers * outer * region
        return (n - 1) * (-(-block // align) * align) + block + pad
    if layout_type == LayerSeparate(outer_contiguous=True):
        return layers * (outer * n * (-(-region // align) * align) + pad)
    return layers * (n * (-(-(outer * region) // align) * align) + pad)


@given(
    n=st.integers(1, 2**40),
    layers=st.integers(1, 2**12),
    outer=OUTER_DIMS,
    page=st.integers(1, 2**30),
    inner=st.integers(1, 2**30),
    width=st.sampled_from([1, 2, 4, 8]),
    layout_type=LAYOUT_TYPES,
    align=ALIGNMENTS,
)
def test_a_spec_exists_exactly_when_its_bytes_fit_in_2_63(
    n: int, layers: int, outer: int, page: int, inner: int, width: int, layout_type: LayoutType, align: int
) -> None:
    total = restated_total_bytes(n, layers, outer, page * inner * width, align, layout_type)
    if total <= 2**63 - 1:
        assert LayoutSpec(n, layers, outer, page, inner, width, layout_type, align).total_bytes == total
    else:
        with pytest.raises(ConfigError, match=rf"^layout_spec: the layout needs {total} bytes \(num_blocks \*"):
            LayoutSpec(n, layers, outer, page, inner, width, layout_type, align)
