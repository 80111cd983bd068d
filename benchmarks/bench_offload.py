"""What the manager adds to a transfer: ``offload_sync`` / ``onboard_sync`` against ``engine.copy`` of the same blocks.

For N = 16, 64, 256 registered blocks, in one run and interleaved round by round:

- **manager**: ``manager.offload_sync(blocks)`` (the already-present check, the filter, target slots, queueing,
  engine submits, registration on completion, events, metrics), and ``manager.onboard_sync(blocks)`` back;
- **engine**: the manager's own transfer engine, ``engine.copy(src_layout, ids, dst_layout, ids)`` of the same
  blocks between the same layouts, with the same batch size and concurrency: the bytes alone.

The difference is the manager's overhead, reported in microseconds per block and as manager / engine time.

- ``--cpu`` (the default without a GPU): a system-memory host tier (G2) and a disk tier (G3) of tiny blocks
  (2 layers x 2 x page 16 x inner 64 x 2 bytes = 8 KiB), 4096 blocks each, so the I/O is negligible and the overhead
  shows; offload is G2 -> G3, onboard G3 -> G2.
- ``--gpu`` (the default with one): issue 9's shape, 4 MiB blocks (32 layers x 2 x page 32 x inner 1024 x 2 bytes),
  device LayerSeparate(outer-contiguous) G1 <-> pinned FullyContiguous G2, 512 blocks each; offload G1 -> G2,
  onboard G2 -> G1; GB/s and the fraction of the ceiling, one large pinned ``cudaMemcpyAsync`` of the same bytes
  each way measured in the same run. A second manager with a disk tier (G3) behind the host tier shows what the
  cascade to disk (each block that reaches the host goes on to the disk) costs the G1 -> G2 waiter.

Median of repeats after warm-up rounds; the disk (or host) copies of the previous round are evicted between rounds,
untimed, so every round copies every block. Writes ``bench_offload.json`` into ``--out`` when given.

    python benchmarks/bench_offload.py [--cpu | --gpu] [--disk-dir DIR] [--repeats R] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvbm_builder import (
    DeviceAllocator,
    DiskAllocator,
    FullyContiguous,
    KvBlockManager,
    KvBlockManagerConfig,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
    LayerSeparate,
    PinnedAllocator,
    SystemAllocator,
    Tier,
)
from kvbm_builder.config.settings import KvbmSettings

NS = (16, 64, 256)
CPU_MODEL = KvManagerModelConfig.builder().num_layers(2).outer_dim(2).page_size(16).inner_dim(64).build()
GPU_MODEL = KvManagerModelConfig.builder().num_layers(32).outer_dim(2).page_size(32).inner_dim(1024).build()
CPU_BLOCKS = 4096
GPU_BLOCKS = 512


def tier(blocks: int, allocator: Any, layout: Any = None) -> Any:
    builder = KvManagerLayoutConfig.builder().num_blocks(blocks).allocator(allocator)
    return (builder.layout_type(layout) if layout is not None else builder).build()


def build(model: Any, *, device: int = 0, host: int = 0, disk: int = 0, pinned: bool = False, directory: str = "") -> Any:
    config = (
        KvBlockManagerConfig.builder()
        .runtime(KvManagerRuntimeConfig.builder().worker_id(0).disable_nixl().build())
        .model(model)
    )
    if device:
        config = config.device_layout(tier(device, DeviceAllocator(device_id=0), LayerSeparate(outer_contiguous=True)))
    if host:
        config = config.host_layout(tier(host, PinnedAllocator() if pinned else SystemAllocator(), FullyContiguous()))
    if disk:
        config = config.disk_layout(tier(disk, DiskAllocator(directory=directory), FullyContiguous()))
    # defaults for batch size and concurrency (16, 4); every block offered to the disk goes (no second sighting)
    return KvBlockManager(config.build(), settings=KvbmSettings(disk_offload_filter=False))


def fill(manager: KvBlockManager, tier_: Tier, count: int, salt: int) -> list[Any]:
    """``count`` registered blocks of ``tier_`` (contents left as allocated: only the time is measured here)."""
    page = manager.config.model.page_size
    slots = manager.allocate(tier_, count)
    return manager.register(slots, tokens=list(range(salt, salt + count * page)))


class Rows:
    def __init__(self, out: str | None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.out = out
        self.lines: list[str] = []

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.lines.append(text)

    def save(self, meta: dict[str, Any]) -> None:
        if self.out is None:
            return
        Path(self.out).mkdir(parents=True, exist_ok=True)
        (Path(self.out) / "bench_offload.json").write_text(json.dumps({**meta, "rows": self.rows}, indent=1))
        (Path(self.out) / "bench_offload.log").write_text("\n".join(self.lines) + "\n")


def measure(
    rounds: int,
    warmup: int,
    manager_round: Callable[[], float],
    engine_round: Callable[[], float],
) -> tuple[float, float]:
    """Median seconds of the manager's and the engine's rounds, alternated so that both see the same machine."""
    for _ in range(warmup):
        manager_round()
        engine_round()
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(manager_round())
        theirs.append(engine_round())
    return statistics.median(ours), statistics.median(theirs)


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def offload_pair(manager: KvBlockManager, held: list[Any], dst: Tier) -> tuple[Callable[[], float], Callable[[], float]]:
    """A manager round (offload every block of ``held`` to ``dst``, evicting the copies afterwards, untimed) and an
    engine round (the same source blocks to the target slots the manager used)."""
    src = held[0].tier
    engine = manager.offload_manager.engine
    src_layout, dst_layout = manager.tier(src).layout, manager.tier(dst).layout
    src_ids = [b.block_id for b in held]
    dst_ids: list[int] = []
    hashes = [b.sequence_hash for b in held]

    def ours() -> float:
        seconds = timed(lambda: manager.offload_sync(held))
        manager.wait_idle()  # a cascade to disk (GPU with a disk tier) is not part of the G1 -> G2 waiter's time
        found = manager.pool(dst).match(hashes)
        if len(found) != len(held):
            raise SystemExit(f"the offload left {len(found)} of {len(held)} blocks in the {dst.words}")
        dst_ids[:] = [b.block_id for b in found]
        for block in found:
            block.release()
        for tier_ in (Tier.G2, Tier.G3):  # the next round copies every block again
            if tier_ in manager.tiers and tier_ is not src:
                manager.pool(tier_).reset_inactive()
        return seconds

    def theirs() -> float:
        return timed(lambda: engine.copy(src_layout, src_ids, dst_layout, dst_ids))

    return ours, theirs


def onboard_pair(manager: KvBlockManager, lower: list[Any], dst: Tier) -> tuple[Callable[[], float], Callable[[], float]]:
    """A manager round (onboard ``lower`` into ``dst``, then evict the copies, untimed) and an engine round."""
    src = lower[0].tier
    engine = manager.offload_manager.engine
    src_layout, dst_layout = manager.tier(src).layout, manager.tier(dst).layout
    src_ids = [b.block_id for b in lower]
    dst_ids: list[int] = []

    def ours() -> float:
        back: list[Any] = []
        seconds = timed(lambda: back.extend(manager.onboard_sync(lower, to=dst)))
        dst_ids[:] = [b.block_id for b in back]
        for block in back:
            block.release()
        manager.pool(dst).reset_inactive()
        return seconds

    def theirs() -> float:
        return timed(lambda: engine.copy(src_layout, src_ids, dst_layout, dst_ids))

    return ours, theirs


def run_cpu(args: argparse.Namespace, rows: Rows) -> None:
    block = CPU_MODEL.num_layers * CPU_MODEL.outer_dim * CPU_MODEL.page_size * CPU_MODEL.inner_dim * 2
    rows.say(
        f"CPU: system G2 <-> disk G3 in {args.disk_dir}, blocks of {block // 1024} KiB, {CPU_BLOCKS} per tier, "
        f"batches of 16, 4 in flight; median of {args.repeats} rounds"
    )
    rows.say(f"{'N':>4} {'path':<9} {'manager':>10} {'engine':>10} {'overhead':>14} {'ratio':>6}")
    with build(CPU_MODEL, host=CPU_BLOCKS, disk=CPU_BLOCKS, directory=args.disk_dir) as manager:
        for n in NS:
            held = fill(manager, Tier.G2, n, salt=n * 100_000)
            ours, theirs = offload_pair(manager, held, Tier.G3)
            off = measure(args.repeats, 3, ours, theirs)
            manager.offload_sync(held)  # on disk for the onboard rounds
            for block in held:
                block.release()
            manager.pool(Tier.G2).reset_inactive()
            lower = manager.pool(Tier.G3).match([b.sequence_hash for b in manager.token_blocks(
                list(range(n * 100_000, n * 100_000 + n * CPU_MODEL.page_size)))])
            ours, theirs = onboard_pair(manager, lower, Tier.G2)
            on = measure(args.repeats, 3, ours, theirs)
            for block in lower:
                block.release()
            manager.pool(Tier.G3).reset_inactive()
            for path, (mine, bare) in (("offload", off), ("onboard", on)):
                overhead = (mine - bare) / n * 1e6
                rows.rows.append(
                    {"mode": "cpu", "n": n, "path": path, "manager_s": mine, "engine_s": bare, "overhead_us_per_block": overhead}
                )
                rows.say(
                    f"{n:4} {path:<9} {mine * 1e3:8.3f} ms {bare * 1e3:7.3f} ms {overhead:8.2f} us/blk {mine / bare:6.2f}"
                )


def copy_ceiling(nbytes: int) -> tuple[float, float]:
    """Seconds of one large device -> pinned and pinned -> device ``cudaMemcpyAsync`` of ``nbytes`` (median of 5)."""
    import cupy
    import numpy as np

    device = cupy.empty(nbytes, dtype=cupy.uint8)
    pinned = cupy.cuda.alloc_pinned_memory(nbytes)
    host = np.frombuffer(pinned, dtype=np.uint8, count=nbytes)
    stream = cupy.cuda.Stream(non_blocking=True)

    def d2h() -> None:
        device.get(out=host, stream=stream)
        stream.synchronize()

    def h2d() -> None:
        device.set(host, stream=stream)
        stream.synchronize()

    d2h()
    h2d()
    return statistics.median(timed(d2h) for _ in range(5)), statistics.median(timed(h2d) for _ in range(5))


def run_gpu(args: argparse.Namespace, rows: Rows) -> None:
    block = GPU_MODEL.num_layers * GPU_MODEL.outer_dim * GPU_MODEL.page_size * GPU_MODEL.inner_dim * 2
    rows.say(
        f"GPU: device LayerSeparate(outer) G1 <-> pinned FullyContiguous G2, blocks of {block // 2**20} MiB, "
        f"{GPU_BLOCKS} per tier, batches of 16, 4 in flight; median of {args.repeats} rounds"
    )
    for cascade in (False, True):
        what = "with a disk tier behind the host (cascade G2 -> G3)" if cascade else "device and host tiers only"
        rows.say(f"-- {what}")
        rows.say(
            f"{'N':>4} {'path':<9} {'manager GB/s':>13} {'engine GB/s':>12} {'ceiling':>8} "
            f"{'mgr/ceil':>8} {'eng/ceil':>8} {'overhead':>14}"
        )
        disk = GPU_BLOCKS if cascade else 0
        with build(GPU_MODEL, device=GPU_BLOCKS, host=GPU_BLOCKS, disk=disk, pinned=True, directory=args.disk_dir) as manager:
            for n in NS:
                nbytes = n * block
                d2h, h2d = copy_ceiling(nbytes)
                salt = n * 100_000 + (7 if cascade else 0)
                held = fill(manager, Tier.G1, n, salt=salt)
                ours, theirs = offload_pair(manager, held, Tier.G2)
                off = measure(args.repeats, 3, ours, theirs)
                manager.offload_sync(held)
                manager.wait_idle()
                for b in held:
                    b.release()
                manager.pool(Tier.G1).reset_inactive()
                hashes = [b.sequence_hash for b in manager.token_blocks(list(range(salt, salt + n * GPU_MODEL.page_size)))]
                lower = manager.pool(Tier.G2).match(hashes)
                ours, theirs = onboard_pair(manager, lower, Tier.G1)
                on = measure(args.repeats, 3, ours, theirs)
                for b in lower:
                    b.release()
                for tier_ in manager.tiers:
                    manager.pool(tier_).reset_inactive()
                for path, (mine, bare), ceiling in (("offload", off, d2h), ("onboard", on, h2d)):
                    row = {
                        "mode": "gpu",
                        "cascade": cascade,
                        "n": n,
                        "path": path,
                        "manager_s": mine,
                        "engine_s": bare,
                        "ceiling_s": ceiling,
                        "manager_gbps": nbytes / mine / 1e9,
                        "engine_gbps": nbytes / bare / 1e9,
                        "ceiling_gbps": nbytes / ceiling / 1e9,
                        "manager_fraction": ceiling / mine,
                        "engine_fraction": ceiling / bare,
                        "overhead_us_per_block": (mine - bare) / n * 1e6,
                    }
                    rows.rows.append(row)
                    rows.say(
                        f"{n:4} {path:<9} {row['manager_gbps']:13.1f} {row['engine_gbps']:12.1f} "
                        f"{row['ceiling_gbps']:8.1f} {row['manager_fraction']:8.3f} {row['engine_fraction']:8.3f} "
                        f"{row['overhead_us_per_block']:8.2f} us/blk"
                    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--cpu", action="store_true", help="system <-> disk tiers with tiny blocks (default without GPU)")
    mode.add_argument("--gpu", action="store_true", help="device <-> pinned host with 4 MiB blocks (default with one)")
    parser.add_argument("--disk-dir", default=tempfile.gettempdir(), help="where the disk tier's file goes")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per row (default 31 CPU, 15 GPU)")
    parser.add_argument("--out", default=None, help="directory for bench_offload.json and bench_offload.log")
    args = parser.parse_args()
    from kvbm_builder.storage import cuda_available

    gpu = args.gpu or (not args.cpu and cuda_available())
    args.repeats = args.repeats or (15 if gpu else 31)
    rows = Rows(args.out)
    rows.say(
        f"bench_offload {datetime.datetime.now().isoformat(timespec='seconds')} on {platform.node()}: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    (run_gpu if gpu else run_cpu)(args, rows)
    rows.save({"date": datetime.date.today().isoformat(), "mode": "gpu" if gpu else "cpu", "cpus": os.cpu_count()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
