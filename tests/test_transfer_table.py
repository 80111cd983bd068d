"""The address table of a transfer, against ``Layout.memory_region``: every region moved once, runs as long as
both sides allow, and arguments that cannot describe a transfer refused with the reason."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import attrs
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvbm_builder import FullyContiguous, LayerSeparate, LayoutType, StorageKind, Tier
from kvbm_builder.layout import Layout, LayoutSpec
from kvbm_builder.transfer import TransferError, region_table
from kvbm_builder.transfer._table import check_blocks, whole_block_runs


@attrs.frozen
class FakeStorage:
    """Plain data with the shape of a storage: the table reads only kind, addr and size."""

    addr: int
    size: int
    kind: StorageKind = StorageKind.SYSTEM


LAYOUT_TYPES = [FullyContiguous(), LayerSeparate(outer_contiguous=True), LayerSeparate(outer_contiguous=False)]


def layout(spec: LayoutSpec, addr: int = 1 << 40, gap: int = 0, kind: StorageKind = StorageKind.SYSTEM) -> Layout:
    """Storages one after another (``gap`` bytes apart: 0 makes neighbouring allocations touch)."""
    storages = []
    for _ in range(spec.num_allocations):
        storages.append(FakeStorage(addr, spec.allocation_bytes, kind))
        addr += spec.allocation_bytes + gap
    return Layout(spec, storages)


def spec(layout_type: LayoutType, num_blocks: int = 8, alignment: int = 1, **shape: int) -> LayoutSpec:
    fields = {"num_layers": 3, "outer_dim": 2, "page_size": 4, "inner_dim": 8, "dtype_width_bytes": 2} | shape
    return LayoutSpec(num_blocks=num_blocks, layout_type=layout_type, alignment=alignment, **fields)


def expected_regions(src: Layout, s_ids: list[int], dst: Layout, d_ids: list[int]) -> list[tuple[int, ...]]:
    """(src storage, src addr, dst storage, dst addr) of every region, the slow way."""
    out = []
    for s, d in zip(s_ids, d_ids, strict=True):
        for la in range(src.spec.num_layers):
            for o in range(src.spec.outer_dim):
                a, b = src.memory_region(s, la, o), dst.memory_region(d, la, o)
                out.append((a.storage_index, a.addr, b.storage_index, b.addr))
    return sorted(out)


def regions_of(table: object, region_bytes: int) -> list[tuple[int, ...]]:
    """The table's runs cut back into regions."""
    out = []
    for s, d, n, ss, ds in zip(
        table.src.tolist(),  # type: ignore[attr-defined]
        table.dst.tolist(),  # type: ignore[attr-defined]
        table.size.tolist(),  # type: ignore[attr-defined]
        table.src_storage.tolist(),  # type: ignore[attr-defined]
        table.dst_storage.tolist(),  # type: ignore[attr-defined]
        strict=True,
    ):
        assert n % region_bytes == 0
        out.extend((ss, s + k, ds, d + k) for k in range(0, n, region_bytes))
    return sorted(out)


@st.composite
def transfers(draw: st.DrawFn) -> tuple[Layout, list[int], Layout, list[int]]:
    """Two layouts of one model shape (any types, alignments, sizes; storages sometimes touching) and random,
    shuffled, non-contiguous (or sometimes contiguous) block id pairs."""
    shape = {
        "num_layers": draw(st.integers(1, 4)),
        "outer_dim": draw(st.integers(1, 2)),
        "page_size": draw(st.integers(1, 4)),
        "inner_dim": draw(st.integers(1, 16)),
        "dtype_width_bytes": draw(st.sampled_from([1, 2, 4])),
    }
    sides = []
    for _ in range(2):
        sides.append(
            spec(
                draw(st.sampled_from(LAYOUT_TYPES)),
                num_blocks=draw(st.integers(1, 12)),
                alignment=draw(st.sampled_from([1, 2, 16, 256, 4096])),
                **shape,
            )
        )
    n = draw(st.integers(0, min(s.num_blocks for s in sides)))
    contiguous = draw(st.booleans())
    ids = []
    for side in sides:
        if contiguous:
            start = draw(st.integers(0, side.num_blocks - n))
            ids.append(list(range(start, start + n)))
        else:
            ids.append(draw(st.permutations(range(side.num_blocks)))[:n])
    src = layout(sides[0], addr=draw(st.integers(0, 2**40)), gap=draw(st.sampled_from([0, 64, 4096])))
    dst = layout(sides[1], addr=draw(st.integers(0, 2**40)), gap=draw(st.sampled_from([0, 64, 4096])))
    return src, ids[0], dst, ids[1]


@given(transfers())
def test_every_region_is_moved_exactly_once_to_its_place(case: tuple[Layout, list[int], Layout, list[int]]) -> None:
    src, s_ids, dst, d_ids = case

    table = region_table(src, s_ids, dst, d_ids)

    assert regions_of(table, src.spec.region_bytes) == expected_regions(src, s_ids, dst, d_ids)
    assert table.nbytes == len(s_ids) * src.spec.num_layers * src.spec.outer_dim * src.spec.region_bytes


@given(transfers())
def test_whole_block_runs_move_every_region_to_its_place_where_blocks_are_one_piece(
    case: tuple[Layout, list[int], Layout, list[int]],
) -> None:
    src, s_ids, dst, d_ids = case
    ids = check_blocks(src, s_ids, dst, d_ids)

    runs = whole_block_runs(src, ids[0], dst, ids[1])

    fully = (src.spec.layout_type, dst.spec.layout_type) == (FullyContiguous(), FullyContiguous())
    if not fully or len(src.storages) != 1 or len(dst.storages) != 1:
        assert runs is None  # a block is several pieces on one side: the table says which
        return
    assert runs is not None
    dst_addr, src_addr, size = (r.astype(np.int64) for r in runs)
    zero = np.zeros_like(size)
    as_table = SimpleNamespace(src=src_addr, dst=dst_addr, size=size, src_storage=zero, dst_storage=zero)
    assert len(size) == len(s_ids)  # one run per block pair, in the caller's order
    assert regions_of(as_table, src.spec.region_bytes) == expected_regions(src, s_ids, dst, d_ids)


@given(transfers())
def test_no_two_runs_could_be_one(case: tuple[Layout, list[int], Layout, list[int]]) -> None:
    src, s_ids, dst, d_ids = case

    table = region_table(src, s_ids, dst, d_ids)

    runs = list(
        zip(
            table.src.tolist(),
            table.dst.tolist(),
            table.size.tolist(),
            table.src_storage.tolist(),
            table.dst_storage.tolist(),
            strict=True,
        )
    )
    ends = {(ss, s + n, ds, d + n) for s, d, n, ss, ds in runs}
    for s, d, _, ss, ds in runs:
        assert (ss, s, ds, d) not in ends, "a run starts where another ends on both sides: they should be one"


@given(transfers())
def test_runs_never_overlap_on_the_target(case: tuple[Layout, list[int], Layout, list[int]]) -> None:
    src, s_ids, dst, d_ids = case

    table = region_table(src, s_ids, dst, d_ids)

    spans = sorted(zip(table.dst_storage.tolist(), table.dst.tolist(), table.size.tolist(), strict=True))
    for (sa, a, n), (sb, b, _) in itertools.pairwise(spans):
        assert sa != sb or a + n <= b


def test_fully_contiguous_both_sides_moves_whole_blocks_and_merges_neighbouring_ids() -> None:
    src, dst = layout(spec(FullyContiguous())), layout(spec(FullyContiguous()), addr=1 << 44)
    block = src.spec.block_bytes

    merged = region_table(src, [2, 3, 4], dst, [5, 6, 7])
    shuffled = region_table(src, [4, 2, 3], dst, [7, 0, 1])  # 2, 3 -> 0, 1 still neighbours on both sides

    assert (len(merged), merged.size.tolist()) == (1, [3 * block])
    assert merged.src.tolist() == [src.memory_region(2, 0, 0).addr]
    assert merged.dst.tolist() == [dst.memory_region(5, 0, 0).addr]
    assert sorted(shuffled.size.tolist()) == [block, 2 * block]


def test_alignment_padding_keeps_blocks_apart() -> None:
    src = layout(spec(FullyContiguous(), alignment=4096))  # a 384-byte block padded to 4096
    dst = layout(spec(FullyContiguous()), addr=1 << 44)

    table = region_table(src, [0, 1, 2], dst, [0, 1, 2])

    assert table.size.tolist() == [src.spec.natural_block_bytes] * 3


def test_outer_contiguous_to_fully_contiguous_is_one_run_per_region() -> None:
    src = layout(spec(LayerSeparate(outer_contiguous=True)))
    dst = layout(spec(FullyContiguous()), addr=1 << 44)

    table = region_table(src, [0, 1, 2, 3], dst, [3, 1, 6, 0])

    assert len(table) == 4 * 3 * 2
    assert set(table.size.tolist()) == {src.spec.region_bytes}


def test_outer_contiguous_to_itself_merges_consecutive_blocks_of_each_layer_and_outer() -> None:
    src = layout(spec(LayerSeparate(outer_contiguous=True)))
    dst = layout(spec(LayerSeparate(outer_contiguous=True)), addr=1 << 44)

    table = region_table(src, [0, 1, 2, 3], dst, [4, 5, 6, 7])

    assert len(table) == 3 * 2  # one run per (layer, outer): the four blocks sit side by side on both sides
    assert set(table.size.tolist()) == {4 * src.spec.region_bytes}
    assert sorted(set(table.src_storage.tolist())) == [0, 1, 2]


def test_runs_never_cross_from_one_storage_into_the_next_even_when_they_touch() -> None:
    src = layout(spec(LayerSeparate(outer_contiguous=False), num_blocks=2), gap=0)  # layer storages back to back
    dst = layout(spec(FullyContiguous(), num_blocks=2), addr=1 << 44)

    table = region_table(src, [0, 1], dst, [0, 1])

    for ss, s, n in zip(table.src_storage.tolist(), table.src.tolist(), table.size.tolist(), strict=True):
        storage = src.storages[ss]
        assert storage.addr <= s and s + n <= storage.addr + storage.size


def test_numpy_ids_work_like_lists() -> None:
    src, dst = layout(spec(FullyContiguous())), layout(spec(LayerSeparate(True)), addr=1 << 44)

    a = region_table(src, [3, 1], dst, [0, 7])
    b = region_table(src, np.array([3, 1], dtype=np.int32), dst, np.array([0, 7], dtype=np.uint64))

    assert a.src.tolist() == b.src.tolist() and a.dst.tolist() == b.dst.tolist()


def test_no_blocks_is_an_empty_table() -> None:
    src, dst = layout(spec(FullyContiguous())), layout(spec(FullyContiguous()), addr=1 << 44)

    table = region_table(src, [], dst, [])

    assert (len(table), table.nbytes) == (0, 0)


@pytest.mark.parametrize(
    ("src_ids", "dst_ids", "words"),
    [
        ([0, 8], [0, 1], "src_blocks holds 8, outside the layout's blocks 0..7"),
        ([0, -1], [0, 1], "src_blocks holds -1"),
        ([0, 1], [2, 2], "a target block appears twice"),
        ([0, 1, 2], [0, 1], "3 source blocks but 2 target blocks"),
        ([0, True], [0, 1], "src_blocks must be a sequence of integers"),
        ([0, 1.0], [0, 1], "src_blocks must be a sequence of integers"),
        ([0, 1], "ab", "dst_blocks must be a sequence of integers"),
    ],
)
def test_bad_block_ids_are_refused_with_the_reason(src_ids: object, dst_ids: object, words: str) -> None:
    src, dst = layout(spec(FullyContiguous())), layout(spec(FullyContiguous()), addr=1 << 44)

    with pytest.raises(TransferError, match=words) as caught:
        region_table(src, src_ids, dst, dst_ids)  # type: ignore[arg-type]

    assert caught.value.step == "validate"
    assert (caught.value.src_tier, caught.value.dst_tier) == (Tier.G2, Tier.G2)


ID = st.one_of(st.integers(-3, 10), st.integers(-(2**70), 2**70), st.booleans())


def _verdict(src_ids: object, dst_ids: object) -> str | tuple[list[int], list[int]]:
    src, dst = layout(spec(FullyContiguous())), layout(spec(FullyContiguous()), addr=1 << 44)
    try:
        s_ids, d_ids = check_blocks(src, src_ids, dst, dst_ids)  # type: ignore[arg-type]
    except TransferError as err:
        return str(err).split(": ", 1)[1]
    return s_ids.tolist(), d_ids.tolist()


@given(st.lists(ID, max_size=6), st.lists(ID, max_size=6))
def test_ids_are_judged_alike_as_lists_tuples_and_arrays_and_as_a_simple_model_says(
    src_ids: list[int], dst_ids: list[int]
) -> None:
    """Lists and tuples of plain ints are checked in Python, anything else by numpy: the verdicts agree."""
    verdict = _verdict(src_ids, dst_ids)

    assert _verdict(tuple(src_ids), tuple(dst_ids)) == verdict
    if not any(type(x) is bool or abs(x) >= 2**63 for x in [*src_ids, *dst_ids]):
        assert _verdict(np.array(src_ids, dtype=np.int64), np.array(dst_ids, dtype=np.int64)) == verdict
    plain = all(type(x) is int for x in [*src_ids, *dst_ids])
    in_range = all(0 <= x < 8 for x in [*src_ids, *dst_ids])
    ok = plain and in_range and len(src_ids) == len(dst_ids) and len(set(dst_ids)) == len(dst_ids)
    assert (verdict == (src_ids, dst_ids)) if ok else isinstance(verdict, str)


@pytest.mark.parametrize("field", ["num_layers", "outer_dim", "page_size"])
def test_layouts_of_two_models_are_refused_naming_the_difference(field: str) -> None:
    src = layout(spec(FullyContiguous()))
    other = {"num_layers": 4, "outer_dim": 1, "page_size": 8}
    dst = layout(spec(FullyContiguous(), **{field: other[field]}), addr=1 << 44, kind=StorageKind.DISK)

    with pytest.raises(TransferError, match="the layouts differ in") as caught:
        region_table(src, [0], dst, [0])

    named = "region_bytes" if field == "page_size" else field
    assert named in str(caught.value)
    assert caught.value.dst_tier is Tier.G3
