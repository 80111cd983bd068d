"""A :class:`LayoutSpec` bound to real storages: regions with addresses."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from ..config.protocols import Storage, StorageKind
from ..errors import LayoutError, StorageTooSmallError
from ._math import LayoutSpec, align_up


@attrs.frozen
class MemoryRegion:
    """One (block, layer, outer) region: ``size`` bytes at ``addr`` (a file offset for disk) in storage
    ``storage_index`` of the layout."""

    addr: int
    size: int
    kind: StorageKind
    storage_index: int


class Layout:
    """Regions of ``spec`` inside ``storages`` (one for FullyContiguous, one per layer for LayerSeparate).

    Each storage's data starts at its first ``alignment``-aligned address, so storages need not be aligned,
    only large enough: ``spec.allocation_bytes`` always is.
    """

    __slots__ = ("base_addrs", "spec", "storages")

    def __init__(self, spec: LayoutSpec, storages: Sequence[Storage]) -> None:
        storages = tuple(storages)
        if len(storages) != spec.num_allocations:
            need = "exactly 1 storage" if spec.num_allocations == 1 else f"one storage per layer ({spec.num_layers})"
            raise LayoutError(f"{spec.layout_type} layout needs {need}, got {len(storages)}")
        for i, storage in enumerate(storages):
            pad = align_up(storage.addr, spec.alignment) - storage.addr
            if storage.size < spec.data_bytes + pad:
                raise StorageTooSmallError(
                    f"storage {i} ({storage.kind.value}) holds {storage.size} bytes but the layout needs"
                    f" {spec.data_bytes + pad} ({spec.data_bytes} of data + {pad} to align address {storage.addr:#x}"
                    f" to {spec.alignment}); give it at least {spec.allocation_bytes} bytes, which fit at any address",
                    i,
                    storage.size,
                    spec.data_bytes + pad,
                )
        self.spec = spec
        self.storages: tuple[Storage, ...] = storages
        self.base_addrs: tuple[int, ...] = tuple(align_up(s.addr, spec.alignment) for s in storages)

    def memory_region(self, block: int, layer: int, outer: int) -> MemoryRegion:
        """Where region (block, layer, outer) lives; bad indices raise ``LayoutIndexError`` (block checked first)."""
        index, offset = self.spec.offset(block, layer, outer)
        storage = self.storages[index]
        return MemoryRegion(self.base_addrs[index] + offset, self.spec.region_bytes, storage.kind, index)

    def __repr__(self) -> str:
        return f"Layout({self.spec!r}, base_addrs={self.base_addrs!r})"
