"""Offload round trip: fill blocks with known data, offload them down the tiers, evict, onboard, verify every byte.

With an NVIDIA GPU: device blocks (G1) -> pinned host (G2) -> disk (G3); both upper tiers are then emptied, and the
blocks come back disk -> host -> device. Without one: host blocks (system memory) -> disk, and back to the host.
Every block is compared with what was written, and each move's throughput is printed beside a ceiling measured in
the same run on the same bytes: one large ``cudaMemcpy`` for device <-> host, a plain sequential O_DIRECT write or
read of one file in the same directory for host <-> disk.

The throughput printed is the steady state: the round trip runs ``--warmup`` times (default once) on other blocks
first, untimed but verified, so that what a process does once (first touches of the tiers' memory, the transfer
engine's threads and buffers) is not counted; ``--warmup 0`` shows the first round instead.

    python examples/offload_roundtrip.py [--blocks N] [--disk-dir DIR] [--warmup K]

Blocks are 4 MiB (32 layers x K and V x 32 tokens x 1024 x bf16), as in issue 9's measurements.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kvbm_builder import (
    DeviceAllocator,
    DiskAllocator,
    FullyContiguous,
    KvBlockManager,
    KvBlockManagerConfig,
    KvbmError,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
    LayerSeparate,
    PinnedAllocator,
    SystemAllocator,
    Tier,
)
from kvbm_builder.config.settings import KvbmSettings
from kvbm_builder.storage import cuda_available, cuda_unavailable_reason
from kvbm_builder.transfer import TransferRecord

MODEL = KvManagerModelConfig.builder().num_layers(32).outer_dim(2).page_size(32).inner_dim(1024).build()
BLOCK_BYTES = 32 * 2 * 32 * 1024 * 2


def build(blocks: int, directory: str, gpu: bool) -> KvBlockManager:
    def tier(allocator: Any, layout: Any = None) -> Any:
        builder = KvManagerLayoutConfig.builder().num_blocks(blocks).allocator(allocator)
        return (builder.layout_type(layout) if layout is not None else builder).build()

    config = (
        KvBlockManagerConfig.builder()
        .runtime(KvManagerRuntimeConfig.builder().worker_id(0).disable_nixl().build())
        .model(MODEL)
        .host_layout(tier(PinnedAllocator() if gpu else SystemAllocator(), FullyContiguous()))
        .disk_layout(tier(DiskAllocator(directory=directory)))
    )
    if gpu:
        config = config.device_layout(tier(DeviceAllocator(device_id=0), LayerSeparate(outer_contiguous=True)))
    # each block is offered to the disk once here; the default filter would wait for a second sighting
    return KvBlockManager(config.build(), settings=KvbmSettings(disk_offload_filter=False))


def block_arrays(manager: KvBlockManager, tier: Tier, block_id: int) -> list[Any]:
    """The arrays that hold one block of a tier: per layer for LayerSeparate, one slice for FullyContiguous."""
    views = manager.tier(tier).views()
    if len(views) == 1:  # FullyContiguous: [blocks, layers, outer, page, inner]
        return [views[0][block_id]]
    return [view[:, block_id] for view in views]  # LayerSeparate(outer_contiguous=True): [outer, blocks, ...]


def host_copy(array: Any) -> np.ndarray:
    return array.get() if hasattr(array, "get") else np.array(array)


def timed(what: Callable[[], object], sync: Callable[[], object] = lambda: None) -> float:
    started = time.perf_counter()
    what()
    sync()
    return time.perf_counter() - started


class Spans:
    """From the first submit to the last completion of each path's transfers (a listener of the manager)."""

    def __init__(self) -> None:
        self.spans: dict[str, tuple[float, float]] = {}

    def __call__(self, event: object) -> None:
        if isinstance(event, TransferRecord) and event.ok:
            end = time.perf_counter()
            path = f"{event.src_tier.name} -> {event.dst_tier.name}"
            first, last = self.spans.get(path, (end - event.seconds, end))
            self.spans[path] = (min(first, end - event.seconds), max(last, end))

    def seconds(self, path: str) -> float:
        first, last = self.spans[path]
        return last - first


def copy_ceiling(nbytes: int) -> tuple[float, float]:
    """Seconds of one large device -> pinned and pinned -> device copy of ``nbytes``."""
    import cupy

    device = cupy.empty(nbytes, dtype=cupy.uint8)
    pinned = cupy.cuda.alloc_pinned_memory(nbytes)
    host = np.frombuffer(pinned, dtype=np.uint8, count=nbytes)
    stream = cupy.cuda.Stream(non_blocking=True)
    device.get(out=host, stream=stream)  # warm up
    stream.synchronize()
    d2h = timed(lambda: device.get(out=host, stream=stream), stream.synchronize)
    h2d = timed(lambda: device.set(host, stream=stream), stream.synchronize)
    return d2h, h2d


def disk_ceiling(nbytes: int, directory: str) -> tuple[float, float]:
    """Seconds of a plain sequential O_DIRECT write and read of ``nbytes`` (16 MiB at a time) in ``directory``."""
    chunk = 16 * 2**20
    buffer = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT wants
    buffer.write(os.urandom(chunk))
    fd, path = tempfile.mkstemp(prefix="kvbm-ceiling-", dir=directory)
    os.close(fd)
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_DIRECT", 0))
        try:
            os.posix_fallocate(fd, 0, nbytes)

            def write() -> None:
                for offset in range(0, nbytes, chunk):
                    os.pwritev(fd, [memoryview(buffer)[: min(chunk, nbytes - offset)]], offset)

            def read() -> None:
                for offset in range(0, nbytes, chunk):
                    os.preadv(fd, [memoryview(buffer)[: min(chunk, nbytes - offset)]], offset)

            return timed(write), timed(read)
        finally:
            os.close(fd)
    finally:
        os.unlink(path)
        buffer.close()


class RoundTripError(Exception):
    """The blocks did not come back as they were written."""


def round_trip(
    manager: KvBlockManager,
    count: int,
    gpu: bool,
    after: Callable[[str], object] = lambda step: None,
    *,
    round_number: int = 0,
) -> list[tuple[str, float]]:
    """Fill ``count`` blocks of the top tier with known data, offload them down, evict everything above the disk,
    onboard them back and compare every byte; ``after(step)`` is called after each step (``fill``, ``offload``,
    ``evict``, ``onboard``, ``verify``). Each ``round_number`` moves other tokens (other hashes) and other data.
    Returns (move, seconds) rows; raises RoundTripError on a mismatch."""
    top = Tier.G1 if gpu else Tier.G2
    if gpu:
        import cupy as xp
    else:
        xp = np
    rows: list[tuple[str, float]] = []
    spans = Spans()
    manager.add_listener(spans)
    # 1. known data in the top tier, registered under the hashes of a token sequence
    rng = np.random.default_rng(2026 + round_number)
    expected = [rng.integers(0, 2**16, (MODEL.num_layers, 2, 32, 1024), dtype=np.uint16) for _ in range(count)]
    slots = manager.allocate(top, count)
    for slot, data in zip(slots, expected, strict=True):
        arrays = block_arrays(manager, top, slot.block_id)
        if len(arrays) == 1:
            arrays[0][...] = xp.asarray(data)
        else:
            for layer, array in enumerate(arrays):
                array[...] = xp.asarray(data[layer])
    first = round_number * count * MODEL.page_size
    tokens = list(range(first, first + count * MODEL.page_size))
    held = manager.register(slots, tokens=tokens)
    after("fill")

    # 2. offload down the tiers (on a GPU machine the host copies go on to the disk by themselves)
    target = Tier.G2 if gpu else Tier.G3
    rows.append((f"offload {top.name} -> {target.name}", timed(lambda: manager.offload_sync(held))))
    manager.wait_idle()
    if gpu:
        rows.append(("offload G2 -> G3", spans.seconds("G2 -> G3")))  # from its first write: it overlaps
    for block in held:
        block.release()
    after("offload")

    # 3. evict everything above the disk
    for tier in (Tier.G1, Tier.G2) if gpu else (Tier.G2,):
        manager.pool(tier).reset_inactive()
    after("evict")
    back: list[Any] = []
    with manager.match(tokens) as found:
        if len(found.disk) != count:
            raise RoundTripError(f"expected all {count} blocks on disk only, found {found}")
        # 4. onboard back up
        rows.append(("onboard G3 -> G2", timed(lambda: back.extend(manager.onboard_sync(found.disk, to="G2")))))
    if gpu:
        host_blocks = list(back)
        back.clear()
        rows.append(("onboard G2 -> G1", timed(lambda: back.extend(manager.onboard_sync(host_blocks)))))
        for block in host_blocks:
            block.release()
    after("onboard")

    # 5. every byte, block by block
    for block, data in zip(back, expected, strict=True):
        arrays = block_arrays(manager, top, block.block_id)
        got = host_copy(arrays[0]) if len(arrays) == 1 else np.stack([host_copy(a) for a in arrays])
        if not np.array_equal(got, data):
            raise RoundTripError(f"MISMATCH in block {block.sequence_hash:#x} (G{top.name[1]} slot {block.block_id})")
        block.release()
    after("verify")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=None, help="blocks to move (default 64 with a GPU, 32 without)")
    parser.add_argument("--disk-dir", default=tempfile.gettempdir(), help="where the disk tier and ceiling file go")
    parser.add_argument("--warmup", type=int, default=1, help="untimed (but verified) rounds before the measured one")
    args = parser.parse_args()
    gpu = cuda_available()
    if not gpu:
        print(f"no GPU ({cuda_unavailable_reason()}): host (system memory) <-> disk only")
    count = args.blocks or (64 if gpu else 32)
    nbytes = count * BLOCK_BYTES

    try:
        with build(count, args.disk_dir, gpu) as manager:
            for warmup in range(args.warmup):
                round_trip(manager, count, gpu, round_number=warmup + 1)
            rows = round_trip(manager, count, gpu)
            print(f"verified {count} blocks ({nbytes / 2**20:.0f} MiB) byte for byte after the round trip")
            stats = manager.stats()
    except (KvbmError, RoundTripError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    # 6. the ceilings, on the same number of bytes
    write, read = disk_ceiling(nbytes, args.disk_dir)
    ceilings = {"G2 -> G3": write, "G3 -> G2": read}
    if gpu:
        d2h, h2d = copy_ceiling(nbytes)
        ceilings |= {"G1 -> G2": d2h, "G2 -> G1": h2d}
    state = f"steady state, after {args.warmup} warm-up round(s)" if args.warmup else "first round (no warm-up)"
    print(f"\n{state}; ceiling: one cudaMemcpy, or sequential I/O, of the same bytes")
    print(f"{'path':<18} {'GB/s':>7} {'ceiling GB/s':>13} {'ratio':>6}")
    for what, seconds in rows:
        ceiling = ceilings[what.split(" ", 1)[1]]
        print(f"{what:<18} {nbytes / seconds / 1e9:7.2f} {nbytes / ceiling / 1e9:13.2f} {ceiling / seconds:6.2f}")
    moved = ", ".join(f"{s.name}->{d.name}: {n}" for (s, d), n in sorted(stats.moved_blocks.items(), key=str))
    print(f"\nblocks moved per path: {moved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
