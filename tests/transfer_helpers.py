"""Shared by the transfer tests: real layouts of every storage kind, random contents, and each block's bytes read
back the slow way (region by region through ``memory_region``), so a test compares what a transfer did with what
the layout says, never with the engine's own arithmetic."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from kvbm_builder import DiskAllocator, FullyContiguous, LayerSeparate, LayoutType, StorageKind
from kvbm_builder.layout import Layout, LayoutSpec
from kvbm_builder.storage import allocate_disk, allocate_system

LAYOUT_TYPES: list[LayoutType] = [
    FullyContiguous(),
    LayerSeparate(outer_contiguous=True),
    LayerSeparate(outer_contiguous=False),
]
LAYOUT_IDS = ["fc", "ls-outer", "ls-block"]


def make_spec(layout_type: LayoutType, num_blocks: int, alignment: int = 1, **shape: int) -> LayoutSpec:
    fields = {"num_layers": 3, "outer_dim": 2, "page_size": 4, "inner_dim": 24, "dtype_width_bytes": 2} | shape
    return LayoutSpec(num_blocks=num_blocks, layout_type=layout_type, alignment=alignment, **fields)


def allocate(spec: LayoutSpec, kind: StorageKind, directory: Path | None = None, *, o_direct: bool = True) -> Layout:
    """A layout of ``spec`` over new storages of ``kind`` (close them with :func:`close_layout`)."""
    storages: list[Any] = []
    try:
        for _ in range(spec.num_allocations):
            if kind is StorageKind.SYSTEM:
                storages.append(allocate_system(spec.allocation_bytes))
            elif kind is StorageKind.DISK:
                assert directory is not None
                storages.append(
                    allocate_disk(spec.allocation_bytes, DiskAllocator(directory=str(directory), o_direct=o_direct))
                )
            elif kind is StorageKind.PINNED:
                from kvbm_builder import PinnedAllocator
                from kvbm_builder.storage import allocate_pinned

                storages.append(allocate_pinned(spec.allocation_bytes, PinnedAllocator()))
            else:
                from kvbm_builder.storage import allocate_device

                storages.append(allocate_device(spec.allocation_bytes, 0))
        return Layout(spec, storages)
    except BaseException:
        for storage in storages:
            storage.close()
        raise


def close_layout(layout: Layout) -> None:
    for storage in layout.storages:
        storage.close()  # type: ignore[attr-defined]


def fill_random(layout: Layout, rng: np.random.Generator) -> None:
    """Random bytes over every storage (padding included)."""
    for storage in layout.storages:
        data = rng.integers(0, 256, storage.size, dtype=np.uint8)
        if storage.kind is StorageKind.DISK:
            storage.write(0, data)  # type: ignore[attr-defined]
        elif storage.kind is StorageKind.DEVICE:
            storage.as_cupy()[:] = __import__("cupy").asarray(data)  # type: ignore[attr-defined]
        else:
            storage.as_numpy()[:] = data  # type: ignore[attr-defined]


def block_bytes(layout: Layout, block: int) -> bytes:
    """Block ``block`` of ``layout``: its regions in (layer, outer) order, read through ``memory_region``."""
    spec = layout.spec
    parts = []
    for layer in range(spec.num_layers):
        for outer in range(spec.outer_dim):
            region = layout.memory_region(block, layer, outer)
            storage = layout.storages[region.storage_index]
            start = region.addr - storage.addr
            if storage.kind is StorageKind.DISK:
                buf = bytearray(region.size)
                storage.read_into(region.addr, buf)  # type: ignore[attr-defined]
                parts.append(bytes(buf))
            elif storage.kind is StorageKind.DEVICE:
                view = storage.as_cupy()[start : start + region.size]  # type: ignore[attr-defined]
                parts.append(view.get().tobytes())
            else:
                parts.append(storage.as_numpy()[start : start + region.size].tobytes())  # type: ignore[attr-defined]
    return b"".join(parts)


def assert_same_blocks(src: Layout, s_ids: Any, dst: Layout, d_ids: Any) -> None:
    for s, d in zip(s_ids, d_ids, strict=True):
        assert block_bytes(src, int(s)) == block_bytes(dst, int(d)), f"source block {s} != target block {d}"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def engine_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("kvbm-")]


@contextmanager
def no_leaks() -> Iterator[None]:
    """Asserts that the block leaves no engine thread and no file descriptor behind."""
    fds = open_fds()
    yield
    assert engine_threads() == []
    assert open_fds() == fds
