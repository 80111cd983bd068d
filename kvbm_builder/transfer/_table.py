"""The address table of a transfer: which bytes of one layout go where in another, as few runs as possible.

For (src layout, src block ids, dst layout, dst block ids) every (block pair, layer, outer) region is a copy of
``region_bytes`` from its place in the source to its place in the target. Regions that sit next to each other on
*both* sides are one run (FullyContiguous to FullyContiguous moves whole blocks, and blocks with neighbouring ids
merge). Pure arithmetic over numpy arrays: no memory is touched.

How it stays fast: pairs are sorted by source block id and the regions are laid out in the source layout's own
memory order, so that any two regions that can merge are neighbours in that order (the second starts where the
first ends in the source, and nothing else of the transfer lies between). The innermost axes whose strides equal the
piece size on both sides are merged by arithmetic before any array is built (the outer axis everywhere but in an
outer-contiguous target, the layer axis between FullyContiguous layouts); what is left is merged with one vectorised
pass over neighbours.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config.layout import FullyContiguous, LayerSeparate
from ..layout import Layout, LayoutSpec
from ._errors import TransferError

__all__ = ["RegionTable", "check_blocks", "region_table", "whole_block_runs"]

_I64 = np.int64


class RegionTable:
    """Runs of bytes to copy: run ``i`` copies ``size[i]`` bytes from ``src[i]`` to ``dst[i]``.

    ``src`` and ``dst`` are addresses as :meth:`Layout.memory_region` gives them (pointers for memory, file offsets
    for disk) inside storage ``src_storage[i]`` / ``dst_storage[i]`` of each layout. All five are int64 arrays of one
    length; runs never span two storages, never overlap on the target side, and no two of them could be merged.
    """

    __slots__ = ("dst", "dst_storage", "size", "src", "src_storage")

    def __init__(self, src: Any, dst: Any, size: Any, src_storage: Any, dst_storage: Any) -> None:
        self.src, self.dst, self.size = src, dst, size
        self.src_storage, self.dst_storage = src_storage, dst_storage

    def __len__(self) -> int:
        return int(self.size.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.size.sum())

    def __repr__(self) -> str:
        return f"RegionTable({len(self)} runs, {self.nbytes} bytes)"


class _Side:
    """One layout's strides in the traversal: ``offset = b*block + l*layer + o*outer``, storage ``l`` or 0."""

    __slots__ = ("block", "layer", "outer", "separate")

    def __init__(self, spec: LayoutSpec) -> None:
        self.block = spec.block_stride
        self.outer = spec.outer_stride
        self.separate = not isinstance(spec.layout_type, FullyContiguous)  # one storage per layer
        self.layer = 0 if self.separate else spec.outer_dim * spec.region_bytes


def _order(spec: LayoutSpec) -> tuple[str, str, str]:
    """The layout's memory order of the axes (b)lock, (l)ayer, (o)uter, outermost first."""
    kind = spec.layout_type
    if isinstance(kind, FullyContiguous):
        return ("b", "l", "o")
    assert isinstance(kind, LayerSeparate)
    return ("l", "o", "b") if kind.outer_contiguous else ("l", "b", "o")


def check_blocks(src: Layout, src_blocks: Sequence[int], dst: Layout, dst_blocks: Sequence[int]) -> tuple[Any, Any]:
    """The block ids as int64 arrays, once the layouts have the same region shape and the ids are in range,
    equally many, and the targets distinct; else a :class:`TransferError` (step ``validate``) that says which."""

    def fail(why: str) -> TransferError:
        return TransferError(
            f"cannot move blocks {_show(src_blocks)} of the {_tier(src)} to blocks {_show(dst_blocks)} of the "
            f"{_tier(dst)}: {why}",
            src_tier=src.storages[0].kind.tier,
            dst_tier=dst.storages[0].kind.tier,
            src_blocks=_tuple(src_blocks),
            dst_blocks=_tuple(dst_blocks),
            step="validate",
        )

    a, b = src.spec, dst.spec
    for field in ("num_layers", "outer_dim", "region_bytes"):
        if getattr(a, field) != getattr(b, field):
            raise fail(
                f"the layouts differ in {field} ({getattr(a, field)} against {getattr(b, field)}); blocks move only "
                "between layouts of one model (num_layers, outer_dim, page_size * inner_dim * dtype_width_bytes)"
            )
    ids = []
    plain = []  # a few plain ints are checked in Python, which beats numpy's cost per call
    for name, blocks, spec in (("src_blocks", src_blocks, a), ("dst_blocks", dst_blocks, b)):
        small = _plain(blocks)
        array = _as_ids(blocks, small)
        if array is None:
            raise fail(f"{name} must be a sequence of integers")
        if array.size:
            low, high = (min(blocks), max(blocks)) if small else (int(array.min()), int(array.max()))
            if low < 0 or high >= spec.num_blocks:
                bad = next(int(x) for x in array if not 0 <= x < spec.num_blocks)
                raise fail(f"{name} holds {bad}, outside the layout's blocks 0..{spec.num_blocks - 1}")
        ids.append(array)
        plain.append(small)
    if ids[0].size != ids[1].size:
        raise fail(f"{ids[0].size} source blocks but {ids[1].size} target blocks; give one target per source")
    if ids[1].size > 1 and not _distinct(dst_blocks, ids[1], plain[1]):
        raise fail("a target block appears twice; each target block can receive one source block")
    return ids[0], ids[1]


def _plain(blocks: object) -> bool:
    """A list or tuple of plain ints."""
    return type(blocks) in (list, tuple) and all(type(x) is int for x in blocks)  # type: ignore[attr-defined]


def _distinct(blocks: object, array: Any, plain: bool) -> bool:
    if plain:
        return len(set(blocks)) == len(blocks)  # type: ignore[call-overload, arg-type]
    ordered = np.sort(array)
    return bool((ordered[1:] != ordered[:-1]).all())


def _as_ids(blocks: object, plain: bool) -> Any:
    """``blocks`` as an int64 array, or None when it is not a flat sequence of integers (bools are not ids);
    ``plain``: :func:`_plain` said it is a list or tuple of plain ints."""
    if plain:
        with contextlib.suppress(OverflowError):  # beyond int64: numpy's general path says what it is
            return np.array(blocks, dtype=_I64)
    if not isinstance(blocks, np.ndarray):
        try:
            if bool in set(map(type, blocks)):  # type: ignore[call-overload]  # True is an int to numpy too
                return None
            blocks = np.asarray(blocks)
        except (TypeError, ValueError, OverflowError):
            return None
    assert isinstance(blocks, np.ndarray)
    if blocks.ndim != 1 or (blocks.dtype.kind not in "iu" and blocks.size):
        return None
    return blocks.astype(_I64, copy=False)


def region_table(src: Layout, src_blocks: Sequence[int], dst: Layout, dst_blocks: Sequence[int]) -> RegionTable:
    """The coalesced runs that move ``src_blocks[i]`` of ``src`` to ``dst_blocks[i]`` of ``dst`` for every ``i``."""
    s_ids, d_ids = check_blocks(src, src_blocks, dst, dst_blocks)
    return table_of(src, s_ids, dst, d_ids)


def whole_block_runs(src: Layout, s_ids: Any, dst: Layout, d_ids: Any) -> tuple[Any, Any, Any] | None:
    """(dst, src, size) uint64 arrays of one run per block pair, by arithmetic on the ids, when each side is one
    FullyContiguous storage (a block is one piece there); None otherwise. Unlike :func:`table_of`, neighbouring
    blocks are not merged: for the copy engine's batched call, where a run costs about a microsecond, the ~50 us of
    building the merged table would cost more than they save. Ids as :func:`check_blocks` returns them."""
    spec, other = src.spec, dst.spec
    if not (
        isinstance(spec.layout_type, FullyContiguous)
        and isinstance(other.layout_type, FullyContiguous)
        and len(src.base_addrs) == len(dst.base_addrs) == 1
    ):
        return None
    u64 = np.uint64
    src_addr = u64(src.base_addrs[0]) + s_ids.astype(u64) * u64(spec.block_stride)
    dst_addr = u64(dst.base_addrs[0]) + d_ids.astype(u64) * u64(other.block_stride)
    size = np.full(src_addr.shape[0], spec.num_layers * spec.outer_dim * spec.region_bytes, dtype=u64)
    return dst_addr, src_addr, size


def table_of(src: Layout, s_ids: Any, dst: Layout, d_ids: Any) -> RegionTable:
    """:func:`region_table` for ids already checked by :func:`check_blocks` (int64 arrays)."""
    spec = src.spec
    n = int(s_ids.size)
    if n == 0:
        empty = np.zeros(0, dtype=_I64)
        return RegionTable(empty, empty, empty, empty, empty)
    if n > 1:
        order = np.argsort(s_ids, kind="stable")
        s_ids, d_ids = s_ids[order], d_ids[order]
    sides = (_Side(spec), _Side(dst.spec))
    counts = {"b": n, "l": spec.num_layers, "o": spec.outer_dim}
    axes = list(_order(spec))
    # merge innermost axes by arithmetic while both sides step exactly one piece along them
    piece = spec.region_bytes
    while axes[-1] != "b":
        axis = axes[-1]
        if counts[axis] > 1 and any(_stride(side, axis) != piece for side in sides):
            break
        piece *= counts[axis]
        axes.pop()
    shape = [counts[axis] for axis in axes]
    src_addr, src_storage = _addresses(src, sides[0], axes, shape, s_ids)
    dst_addr, dst_storage = _addresses(dst, sides[1], axes, shape, d_ids)
    return _merge(src_addr, dst_addr, src_storage, dst_storage, piece)


def _stride(side: _Side, axis: str) -> int | None:
    if axis == "o":
        return side.outer
    return None if side.separate else side.layer  # a layer step changes storage in LayerSeparate


def _addresses(layout: Layout, side: _Side, axes: list[str], shape: list[int], ids: Any) -> tuple[Any, Any]:
    """(flat addresses, flat storage indices or None when every piece is in storage 0), in traversal order."""
    total: Any = None
    storage: Any = None
    for position, axis in enumerate(axes):
        view = [1] * len(axes)
        view[position] = shape[position]
        if axis == "b":
            term = ids * side.block
        elif axis == "o":
            term = np.arange(shape[position], dtype=_I64) * side.outer
        elif side.separate:  # each layer its own storage: the layer picks the base address
            storage = np.arange(shape[position], dtype=_I64).reshape(view)
            term = np.asarray(layout.base_addrs, dtype=_I64)
        else:
            term = np.arange(shape[position], dtype=_I64) * side.layer
        term = term.reshape(view)
        total = term if total is None else total + term
    if storage is None:
        total = total + layout.base_addrs[0]
    else:
        storage = np.broadcast_to(storage, shape).ravel()
    return np.broadcast_to(total, shape).ravel(), storage


def _merge(src: Any, dst: Any, src_storage: Any, dst_storage: Any, piece: int) -> RegionTable:
    """Runs of neighbours that are contiguous on both sides, in one storage on each side."""
    m = int(src.shape[0])
    breaks = np.zeros(0, dtype=_I64)
    if m > 1:
        joins = (src[1:] == src[:-1] + piece) & (dst[1:] == dst[:-1] + piece)
        for storage in (src_storage, dst_storage):
            if storage is not None:
                joins &= storage[1:] == storage[:-1]
        breaks = np.flatnonzero(~joins) + 1
    if breaks.size + 1 == m:  # nothing merged
        size = np.full(m, piece, dtype=_I64)
        pick: Any = slice(None)
    else:
        pick = np.concatenate((np.zeros(1, dtype=_I64), breaks))
        size = np.diff(pick, append=m) * piece
    zeros = np.zeros(size.shape[0], dtype=_I64)
    return RegionTable(
        np.ascontiguousarray(src[pick]),
        np.ascontiguousarray(dst[pick]),
        size,
        zeros if src_storage is None else np.ascontiguousarray(src_storage[pick]),
        zeros if dst_storage is None else np.ascontiguousarray(dst_storage[pick]),
    )


def _tier(layout: Layout) -> str:
    return layout.storages[0].kind.tier.words


def _tuple(blocks: object) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in blocks)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return ()


def _show(blocks: object) -> str:
    ids = _tuple(blocks)
    if len(ids) <= 8:
        return str(list(ids))
    return f"[{', '.join(map(str, ids[:6]))}, ... ({len(ids)} blocks)]"
