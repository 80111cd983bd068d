"""Shared by the offload tests: managers with real tiers, and block contents written and read region by region
through ``memory_region`` (never through the transfer engine), each block's bytes a function of its hash."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any

import numpy as np

from kvbm_builder import (
    DeviceAllocator,
    DiskAllocator,
    KvBlockManager,
    KvBlockManagerConfig,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
    LayoutType,
    PinnedAllocator,
    StorageKind,
    SystemAllocator,
    Tier,
)
from kvbm_builder.config.settings import KvbmSettings
from kvbm_builder.layout import Layout

MODEL = KvManagerModelConfig.builder().num_layers(3).outer_dim(2).page_size(4).inner_dim(32).build()
MODEL_DIMS = {"num_layers": 3, "outer_dim": 2, "page_size": 4, "inner_dim": 32, "dtype_width_bytes": 2}


def tier_config(blocks: int, allocator: Any, layout: LayoutType | None = None, **extra: Any) -> Any:
    builder = KvManagerLayoutConfig.builder().num_blocks(blocks).allocator(allocator)
    if layout is not None:
        builder = builder.layout_type(layout)
    for name, value in extra.items():
        builder = getattr(builder, name)(value)
    return builder.build()


def make_manager(
    directory: Path,
    *,
    device: int = 0,
    host: int = 8,
    disk: int = 16,
    pinned: bool = False,
    device_layout: LayoutType | None = None,
    host_layout: LayoutType | None = None,
    disk_layout: LayoutType | None = None,
    settings: KvbmSettings | None = None,
    event_manager: Any = None,
    host_filter: Any = None,
    runtime: KvManagerRuntimeConfig | None = None,
    kvbm_metrics: Any = None,
) -> KvBlockManager:
    builder = (
        KvBlockManagerConfig.builder()
        .runtime(runtime or KvManagerRuntimeConfig.builder().worker_id(0).disable_nixl().build())
        .model(MODEL)
    )
    if device:
        builder = builder.device_layout(tier_config(device, DeviceAllocator(device_id=0), device_layout))
    if host:
        extra = {"offload_filter": host_filter} if host_filter is not None else {}
        allocator = PinnedAllocator() if pinned else SystemAllocator()
        builder = builder.host_layout(tier_config(host, allocator, host_layout, **extra))
    if disk:
        builder = builder.disk_layout(tier_config(disk, DiskAllocator(directory=str(directory)), disk_layout))
    if event_manager is not None:
        builder = builder.event_manager(event_manager)
    if kvbm_metrics is not None:
        builder = builder.kvbm_metrics(kvbm_metrics)
    return KvBlockManager(builder.build(), settings=settings or KvbmSettings(disk_offload_filter=False))


def content(sequence_hash: int, nbytes: int) -> bytes:
    """What a block with this hash holds in these tests."""
    return np.random.default_rng(sequence_hash).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


def _regions(layout: Layout, block_id: int) -> list[Any]:
    spec = layout.spec
    return [
        layout.memory_region(block_id, layer, outer)
        for layer in range(spec.num_layers)
        for outer in range(spec.outer_dim)
    ]


def _layout(manager: KvBlockManager, tier: Tier) -> Layout:
    layout = manager.tier(tier).layout
    assert layout is not None
    return layout


def block_nbytes(manager: KvBlockManager) -> int:
    spec = manager.tier(next(iter(manager.tiers))).spec
    assert spec is not None
    return spec.num_layers * spec.outer_dim * spec.region_bytes


def write_block(manager: KvBlockManager, tier: Tier, block_id: int, data: bytes) -> None:
    write_layout_block(_layout(manager, tier), block_id, data)


def read_block(manager: KvBlockManager, tier: Tier, block_id: int) -> bytes:
    return read_layout_block(_layout(manager, tier), block_id)


def write_layout_block(layout: Layout, block_id: int, data: bytes) -> None:
    at = 0
    for region in _regions(layout, block_id):
        piece = data[at : at + region.size]
        at += region.size
        if region.kind is StorageKind.DISK:
            layout.storages[region.storage_index].write(region.addr, piece)  # type: ignore[attr-defined]
        elif region.kind is StorageKind.DEVICE:
            import cupy

            source = ctypes.create_string_buffer(piece, len(piece))  # alive until the copy has returned
            cupy.cuda.runtime.memcpy(region.addr, ctypes.addressof(source), len(piece), 1)  # host to device
        else:
            ctypes.memmove(region.addr, piece, len(piece))


def read_layout_block(layout: Layout, block_id: int) -> bytes:
    out = bytearray()
    for region in _regions(layout, block_id):
        if region.kind is StorageKind.DISK:
            buf = bytearray(region.size)
            layout.storages[region.storage_index].read_into(region.addr, buf)  # type: ignore[attr-defined]
            out += buf
        elif region.kind is StorageKind.DEVICE:
            import cupy

            host = ctypes.create_string_buffer(region.size)
            cupy.cuda.runtime.memcpy(ctypes.addressof(host), region.addr, region.size, 2)  # device to host
            out += host.raw
        else:
            out += ctypes.string_at(region.addr, region.size)
    return bytes(out)


def fill_and_register(
    manager: KvBlockManager, tier: Tier, tokens: list[int], *, shuffle: int | None = None
) -> list[Any]:
    """Blocks of ``tokens`` in ``tier``, each holding ``content(its hash)``; ``shuffle`` seeds a random choice of
    slots (non-contiguous, out of order)."""
    token_blocks = manager.token_blocks(tokens)
    pool = manager.pool(tier)
    slots = pool.allocate(pool.num_blocks) if shuffle is not None else pool.allocate(len(token_blocks))
    if shuffle is not None:
        order = np.random.default_rng(shuffle).permutation(len(slots))
        chosen = [slots[i] for i in order[: len(token_blocks)]]
        for i in order[len(token_blocks) :]:
            slots[i].release()
        slots = chosen
    size = block_nbytes(manager)
    for slot, token_block in zip(slots, token_blocks, strict=True):
        write_block(manager, tier, slot.block_id, content(token_block.sequence_hash, size))
    return manager.register(slots, token_blocks=token_blocks)


def put_on_disk(manager: KvBlockManager, tier: Tier, tokens: list[int]) -> None:
    """Blocks of ``tokens`` written in ``tier``, offloaded until they are on disk (G3), then gone from above it."""
    held = fill_and_register(manager, tier, tokens)
    manager.offload_sync(held)
    manager.wait_idle()  # a copy that reached the host tier goes on to the disk
    for block in held:
        block.release()
    for upper in (Tier.G1, Tier.G2):
        if upper in manager.tiers:
            manager.pool(upper).reset_inactive()


def assert_tier_holds_right_data(manager: KvBlockManager, tier: Tier, hashes: list[int]) -> int:
    """Every one of ``hashes`` registered in ``tier`` holds its content; returns how many are registered."""
    pool = manager.pool(tier)
    size = block_nbytes(manager)
    found = 0
    for sequence_hash in hashes:
        held = pool.match([sequence_hash])
        for block in held:
            assert read_block(manager, tier, block.block_id) == content(sequence_hash, size), (tier, sequence_hash)
            block.release()
            found += 1
    return found


def assert_events_alternate(events: Any, *, all_removed: bool = True) -> None:
    """Per (tier, hash): store, remove, store, ... (never two stores or a remove of what is not held); after the
    manager closed, everything stored was removed."""
    held: set[tuple[Tier, int]] = set()
    for kind, event in events.events:
        key = (event.tier, event.sequence_hash)
        assert (key in held) == (kind == "remove"), (kind, key)
        if kind == "remove":
            held.remove(key)
        else:
            held.add(key)
    assert not (all_removed and held), held


def engine_threads() -> list[str]:
    return [
        t.name for t in threading.enumerate() if t.name.startswith(("kvbm-transfer", "kvbm-frequency", "kvbm-close"))
    ]
